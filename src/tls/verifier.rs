//! The client certificate verifier: webpki's chain, validity and CRL checks, plus
//! what webpki leaves out.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use x509_parser::oid_registry::OID_X509_EXT_EXTENDED_KEY_USAGE;

use super::{serial_hex, Revocations};

/// Wraps webpki's verifier and additionally requires (a) an extended key usage
/// extension that includes clientAuth (webpki accepts a certificate with no EKU at
/// all) and (b) that no operator has revoked its serial or an intermediate's.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientVerifier {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, revocations: Arc<Revocations>) -> Self {
        ClientVerifier { inner, revocations }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let client_auth = cert
            .get_extension_unique(&OID_X509_EXT_EXTENDED_KEY_USAGE)
            .ok()
            .flatten()
            .and_then(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::ExtendedKeyUsage(eku) => {
                    Some(eku.client_auth)
                }
                _ => None,
            })
            .unwrap_or(false);
        if !client_auth {
            return Err(Error::InvalidCertificate(CertificateError::InvalidPurpose));
        }
        if self.revocations.is_revoked(&serial_hex(cert.raw_serial())) {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        // An operator may revoke an intermediate too (a CRL's are webpki's, checked
        // against the right issuer).
        for der in intermediates {
            let (_, ca) = x509_parser::parse_x509_certificate(der)
                .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
            if self
                .revocations
                .is_revoked_by_operator(&serial_hex(ca.raw_serial()))
            {
                return Err(Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
