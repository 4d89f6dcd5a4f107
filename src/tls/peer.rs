//! What the server learns about the peer once the handshake is done. Parsed once per
//! connection, then shared by every call on it.

use std::net::SocketAddr;
use std::sync::Arc;

use ring::digest::{digest, SHA256};
use x509_parser::extensions::GeneralName;

/// The verified client certificate of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The peer's address.
    pub remote: SocketAddr,
    /// SHA-256 of the DER leaf certificate.
    pub cert_sha256: [u8; 32],
    /// Normalised lower-case hex serial (see [`serial_hex`]).
    pub serial_hex: String,
    /// Every URI subject alternative name, in order.
    pub uri_sans: Vec<String>,
    /// End of the leaf's validity, unix seconds: no call is served after it, on a
    /// connection that outlives it or a resumed session alike.
    pub not_after: i64,
    /// The serials of the intermediates the peer presented, in the same form: a
    /// revocation of one of them refuses the peer's calls too.
    pub chain_serials: Vec<String>,
}

/// Connection info that tonic copies into every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Arc<PeerCert>);

impl PeerCert {
    /// Reads the facts identity needs from the (already verified) DER leaf, and the
    /// serials of the intermediates presented with it.
    pub fn parse(
        remote: SocketAddr,
        der: &[u8],
        intermediates: &[impl AsRef<[u8]>],
    ) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uri_sans.push((*uri).to_owned());
                }
            }
        }
        let mut cert_sha256 = [0u8; 32];
        cert_sha256.copy_from_slice(digest(&SHA256, der).as_ref());
        let chain_serials = intermediates
            .iter()
            .map(|der| {
                x509_parser::parse_x509_certificate(der.as_ref())
                    .map(|(_, c)| serial_hex(c.raw_serial()))
                    .map_err(|e| format!("intermediate certificate does not parse: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(PeerCert {
            remote,
            cert_sha256,
            serial_hex: serial_hex(cert.raw_serial()),
            uri_sans,
            not_after: cert.validity().not_after.timestamp(),
            chain_serials,
        })
    }
}

impl PeerCert {
    /// The identity the certificate claims, as the text connections are counted by
    /// ([`super::AcceptorLimits::max_connections_per_identity`]) and log lines name:
    /// its one URI SAN, with the trust domain in lower case (identity compares the
    /// domain without regard to case, so two spellings are one caller); every URI
    /// SAN, space-separated, when there is not exactly one; `-` when there is none.
    /// Whether it names a registered caller is [`crate::identity`]'s business.
    pub fn identity(&self) -> String {
        match self.uri_sans.as_slice() {
            [] => "-".to_owned(),
            [one] => match one
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split_once('/'))
            {
                Some((domain, path)) => {
                    format!("spiffe://{}/{path}", domain.to_ascii_lowercase())
                }
                None => one.clone(),
            },
            several => several.join(" "),
        }
    }
}

/// The canonical serial text (lower-case hex, no leading zeros; see
/// [`crate::pki::canonical_serial_hex`]), the one form every comparison of serials uses.
pub fn serial_hex(raw: &[u8]) -> String {
    crate::pki::serial_hex_from_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_uri_san_with_its_trust_domain_in_lower_case() {
        let peer = |uri_sans: &[&str]| PeerCert {
            remote: "127.0.0.1:1".parse().expect("address"),
            cert_sha256: [0; 32],
            serial_hex: "1".into(),
            uri_sans: uri_sans.iter().map(|s| s.to_string()).collect(),
            not_after: 0,
            chain_serials: Vec::new(),
        };
        assert_eq!(
            peer(&["spiffe://Safeguarding.Example/agency/police-met"]).identity(),
            "spiffe://safeguarding.example/agency/police-met"
        );
        // Role and id are compared exactly by identity, so they stay as they are.
        assert_eq!(
            peer(&["spiffe://safeguarding.example/Agency/Police-Met"]).identity(),
            "spiffe://safeguarding.example/Agency/Police-Met"
        );
        assert_eq!(peer(&["https://x.example"]).identity(), "https://x.example");
        assert_eq!(
            peer(&["spiffe://a/b/c", "spiffe://d/e/f"]).identity(),
            "spiffe://a/b/c spiffe://d/e/f"
        );
        assert_eq!(peer(&[]).identity(), "-");
    }

    #[test]
    fn serial_hex_drops_sign_padding() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x0a, 0xbc]), "abc");
        assert_eq!(serial_hex(&[0x00]), "0");
        // The same text an operator's input normalises to.
        assert_eq!(
            crate::pki::canonical_serial_hex("0A:BC").unwrap(),
            serial_hex(&[0x0a, 0xbc])
        );
    }
}
