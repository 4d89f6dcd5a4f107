//! Identifiers that must not be confused with one another.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty, longer than 64 characters, or a character outside `[a-z0-9-]`. Holds
    /// the refused text as [`shown`] gives it.
    #[error("{0:?} is not a valid id: use 1 to 64 characters from a-z, 0-9 and '-'")]
    Malformed(String),
}

/// The most characters of a caller's text that a message quotes back: enough to
/// recognise it, never a multi-megabyte `grpc-message` that a client's header
/// limit (8 KiB in grpc-java) would turn into a protocol error.
pub const SHOWN_CHARS: usize = 64;

/// `text` as an error message may quote it: its first [`SHOWN_CHARS`] characters,
/// with `…` after them when there were more.
pub fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Checks the registry id grammar `[a-z0-9-]{1,64}` shared by agencies, auditors and
/// operators.
fn check_id(s: &str) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdError::Malformed(shown(s)))
    }
}

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses an id with the grammar `[a-z0-9-]{1,64}`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_id(s)?;
                Ok(Self(s.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// An agency's id in the registry, e.g. `police-met`.
    AgencyId
);
id_type!(
    /// Any registered principal's id (agency, auditor or operator), as in its
    /// certificate's SPIFFE id.
    PrincipalId
);

impl From<AgencyId> for PrincipalId {
    fn from(a: AgencyId) -> Self {
        PrincipalId(a.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_id_is_quoted_back_cut_to_64_characters() {
        let long = "é".repeat(3_000_000);
        let message = AgencyId::parse(&long).unwrap_err().to_string();
        assert!(message.starts_with(&format!("\"{}…\" is not a valid id", "é".repeat(64))));
        assert!(
            message.chars().count() < 200,
            "{} characters",
            message.len()
        );
        assert_eq!(shown("Police-Met"), "Police-Met");
        assert_eq!(shown(&"a".repeat(64)), "a".repeat(64));
    }

    #[test]
    fn id_grammar_is_enforced() {
        assert!(AgencyId::parse("police-met").is_ok());
        assert!(AgencyId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "Police", "a_b", "a/b", "é", &"a".repeat(65)] {
            assert!(AgencyId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
