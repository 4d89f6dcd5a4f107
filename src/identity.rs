//! Who is calling: from a verified client certificate to a typed [`Caller`].
//!
//! The certificate proves *who* (its one URI SAN, `spiffe://<trust-domain>/<role>/<id>`);
//! the registry in the config says *what* (whether the id exists, its sector). Nothing
//! here knows about TLS or gRPC.

use crate::config::Config;
use crate::domain::{AgencyId, PrincipalId, Role, Sector};
use crate::tls::PeerCert;

/// An authenticated, registered caller. Handlers receive this, never raw certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The registered id (agency, auditor or operator id).
    pub id: PrincipalId,
    /// What kind of principal it is.
    pub role: Role,
    /// The agency's sector; `None` for auditors and operators.
    pub sector: Option<Sector>,
    /// SHA-256 of the client certificate, recorded in audit entries.
    pub cert_sha256: [u8; 32],
    /// The certificate's serial, normalised lower-case hex.
    pub serial_hex: String,
}

impl Caller {
    /// The caller as an agency, when it is one.
    pub fn agency(&self) -> Option<(AgencyId, Sector)> {
        match (self.role, self.sector) {
            (Role::Agency, Some(sector)) => AgencyId::parse(self.id.as_str())
                .ok()
                .map(|id| (id, sector)),
            _ => None,
        }
    }
}

/// Why a verified certificate does not identify a registered caller. The messages go
/// back to the caller (UNAUTHENTICATED): they describe the caller's own certificate
/// and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate has no URI subject alternative name.
    #[error("client certificate has no URI SAN; expected spiffe://{trust_domain}/<role>/<id>")]
    NoUriSan {
        /// The gateway's trust domain.
        trust_domain: String,
    },
    /// The certificate has several URI SANs, so its identity is ambiguous.
    #[error("client certificate has {0} URI SANs; exactly one spiffe:// URI is required")]
    SeveralUriSans(usize),
    /// The URI is not `spiffe://<trust-domain>/<role>/<id>`.
    #[error(
        "client certificate URI SAN {uri:?} is not of the form spiffe://{trust_domain}/<role>/<id>"
    )]
    Malformed {
        /// The URI as found.
        uri: String,
        /// The gateway's trust domain.
        trust_domain: String,
    },
    /// A SPIFFE id from another trust domain.
    #[error("client certificate belongs to trust domain {found:?}, not {expected:?}")]
    ForeignTrustDomain {
        /// The domain in the certificate.
        found: String,
        /// The gateway's trust domain.
        expected: String,
    },
    /// A role the gateway does not know.
    #[error("client certificate role {0:?} is not one of agency, auditor, operator")]
    UnknownRole(String),
    /// Well formed, but not in the registry.
    #[error("{role} {id:?} is not registered with this gateway")]
    Unregistered {
        /// The role in the certificate.
        role: Role,
        /// The id in the certificate.
        id: String,
    },
}

/// Resolves a verified peer certificate to a registered caller.
pub fn identify(peer: &PeerCert, config: &Config) -> Result<Caller, IdentityError> {
    let trust_domain = config.trust_domain.as_str();
    let uri = match peer.uri_sans.as_slice() {
        [] => {
            return Err(IdentityError::NoUriSan {
                trust_domain: trust_domain.to_owned(),
            })
        }
        [one] => one,
        several => return Err(IdentityError::SeveralUriSans(several.len())),
    };
    let malformed = || IdentityError::Malformed {
        uri: uri.clone(),
        trust_domain: trust_domain.to_owned(),
    };
    let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
    let mut parts = rest.split('/');
    let (Some(domain), Some(role), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    if !domain.eq_ignore_ascii_case(trust_domain) {
        return Err(IdentityError::ForeignTrustDomain {
            found: domain.to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    let role = match role {
        "agency" => Role::Agency,
        "auditor" => Role::Auditor,
        "operator" => Role::Operator,
        other => return Err(IdentityError::UnknownRole(other.to_owned())),
    };
    let unregistered = || IdentityError::Unregistered {
        role,
        id: id.to_owned(),
    };
    let principal = PrincipalId::parse(id).map_err(|_| unregistered())?;
    let sector = match role {
        Role::Agency => Some(
            config
                .registry()
                .agency(id)
                .ok_or_else(unregistered)?
                .sector,
        ),
        Role::Auditor | Role::Operator => {
            if !config.registry().role_of(role, id) {
                return Err(unregistered());
            }
            None
        }
    };
    Ok(Caller {
        id: principal,
        role,
        sector,
        cert_sha256: peer.cert_sha256,
        serial_hex: peer.serial_hex.clone(),
    })
}
