//! The child a concern, record or consent is about, by NHS number.

use std::fmt;

/// Why an NHS number was refused. The message never echoes the number itself, so it
/// is safe to return to a caller and to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    /// Not ten digits once spaces are removed.
    #[error("subject.nhs_number must be 10 digits (spaces allowed)")]
    Format,
    /// Ten digits whose modulus-11 check digit does not match.
    #[error("subject.nhs_number fails its modulus-11 check digit")]
    CheckDigit,
}

/// A valid NHS number: ten digits whose last is the modulus-11 check digit of the
/// first nine. Its `Debug` output is redacted so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NhsNumber([u8; 10]);

impl NhsNumber {
    /// Parses ten digits, ignoring spaces (as printed on NHS letters: `943 476 5919`).
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let mut digits = [0u8; 10];
        let mut n = 0;
        for c in input.chars() {
            match c {
                ' ' => continue,
                '0'..='9' if n < 10 => {
                    digits[n] = c as u8 - b'0';
                    n += 1;
                }
                _ => return Err(NhsNumberError::Format),
            }
        }
        if n != 10 {
            return Err(NhsNumberError::Format);
        }
        let sum: u32 = digits[..9]
            .iter()
            .enumerate()
            .map(|(i, d)| u32::from(*d) * (10 - i as u32))
            .sum();
        let check = match 11 - (sum % 11) {
            11 => 0,
            10 => return Err(NhsNumberError::CheckDigit),
            c => c as u8,
        };
        if check != digits[9] {
            return Err(NhsNumberError::CheckDigit);
        }
        Ok(NhsNumber(digits))
    }

    /// The normalised ten digits, no spaces: the input to the subject HMAC.
    pub fn digits(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_numbers_with_or_without_spaces() {
        for ok in ["9434765919", "943 476 5919", "4010232137", "0000000000"] {
            let n = NhsNumber::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(n.digits(), ok.replace(' ', ""));
        }
    }

    #[test]
    fn rejects_bad_check_digit_and_format() {
        assert_eq!(
            NhsNumber::parse("9434765918"),
            Err(NhsNumberError::CheckDigit)
        );
        assert_eq!(NhsNumber::parse("943476591"), Err(NhsNumberError::Format));
        assert_eq!(NhsNumber::parse("94347659190"), Err(NhsNumberError::Format));
        assert_eq!(NhsNumber::parse("94347x5919"), Err(NhsNumberError::Format));
        assert_eq!(NhsNumber::parse(""), Err(NhsNumberError::Format));
        // A check value of 10 means the number can never be valid.
        assert_eq!(
            NhsNumber::parse("1000000010"),
            Err(NhsNumberError::CheckDigit)
        );
    }

    #[test]
    fn debug_is_redacted() {
        let n = NhsNumber::parse("9434765919").unwrap();
        assert!(!format!("{n:?}").contains("943"));
    }
}
