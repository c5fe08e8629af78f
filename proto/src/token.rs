//! Join tokens: `kmn1.<id>.<secret>.<ca-pin>`.
//!
//! Like kubeadm's bootstrap tokens, the id names the Secret that holds the token server-side,
//! the secret proves possession, and the CA pin (sha256 of the operator CA's DER) lets a new
//! agent trust the gateway before it has any certificate (kubeadm's discovery hash, in one string).

use std::fmt;
use std::str::FromStr;

use rand::Rng;

const PREFIX: &str = "kmn1";
/// Length of the token id, lowercase alphanumerics.
pub const ID_LEN: usize = 6;
/// Length of the token secret, lowercase alphanumerics (~103 bits).
pub const SECRET_LEN: usize = 20;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id; names the Secret `kommune-join-<id>`.
    pub id: String,
    /// Private part, compared in constant time by the operator.
    pub secret: String,
    /// sha256 (hex) of the operator CA certificate.
    pub ca_pin: String,
}

/// Why a string is not a join token. Messages never echo the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token must look like kmn1.<id>.<secret>.<ca-hash> (4 dot-separated parts), got {0} part(s)")]
    Parts(usize),
    #[error("join token must start with \"kmn1.\", got {0:?}")]
    Prefix(String),
    #[error("join token id must be {ID_LEN} characters of [a-z0-9], got {0:?}")]
    Id(String),
    #[error("join token secret must be {SECRET_LEN} characters of [a-z0-9]")]
    Secret,
    #[error("join token CA hash must be 64 lowercase hex digits")]
    CaPin,
}

impl JoinToken {
    /// A fresh random token for a CA with the given pin.
    pub fn generate(ca_pin: &str) -> Self {
        let mut rng = rand::thread_rng();
        let mut pick = |n: usize| -> String { (0..n).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect() };
        JoinToken { id: pick(ID_LEN), secret: pick(SECRET_LEN), ca_pin: ca_pin.to_string() }
    }

    /// Name of the Secret that stores this token in the operator's namespace.
    pub fn secret_name(&self) -> String {
        secret_name(&self.id)
    }

    /// Constant-time comparison of the secret part.
    pub fn secret_matches(&self, stored: &str) -> bool {
        let (a, b) = (self.secret.as_bytes(), stored.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Name of the Secret that stores the token with this id.
pub fn secret_name(id: &str) -> String {
    format!("kommune-join-{id}")
}

fn is_token_chars(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.len() != 4 {
            return Err(TokenError::Parts(parts.len()));
        }
        if parts[0] != PREFIX {
            return Err(TokenError::Prefix(parts[0].chars().take(8).collect()));
        }
        if !is_token_chars(parts[1], ID_LEN) {
            return Err(TokenError::Id(parts[1].chars().take(16).collect()));
        }
        if !is_token_chars(parts[2], SECRET_LEN) {
            return Err(TokenError::Secret);
        }
        if !crate::is_sha256_hex(parts[3]) {
            return Err(TokenError::CaPin);
        }
        Ok(JoinToken { id: parts[1].into(), secret: parts[2].into(), ca_pin: parts[3].into() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_pin)
    }
}

/// Debug never prints the secret, so tokens can sit in structs that get logged.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn generated_tokens_round_trip() {
        for _ in 0..100 {
            let t = JoinToken::generate(PIN);
            let parsed: JoinToken = t.to_string().parse().unwrap();
            assert_eq!(parsed, t);
        }
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let t = JoinToken::generate(PIN);
        assert_eq!(format!("  {t}\n").parse::<JoinToken>().unwrap(), t);
    }

    #[test]
    fn malformed_tokens_name_what_is_wrong() {
        let secret = "a".repeat(SECRET_LEN);
        let cases: Vec<(String, TokenError)> = vec![
            (String::new(), TokenError::Parts(1)),
            ("kmn1.abcdef".into(), TokenError::Parts(2)),
            (format!("kmn2.abcdef.{secret}.{PIN}"), TokenError::Prefix("kmn2".into())),
            (format!("kmn1.ABCDEF.{secret}.{PIN}"), TokenError::Id("ABCDEF".into())),
            (format!("kmn1.abcde.{secret}.{PIN}"), TokenError::Id("abcde".into())),
            (format!("kmn1.abcdef.short.{PIN}"), TokenError::Secret),
            (format!("kmn1.abcdef.{secret}.{}", &PIN[1..]), TokenError::CaPin),
            (format!("kmn1.abcdef.{secret}.{}", PIN.to_uppercase()), TokenError::CaPin),
            (format!("kmn1.abcdef.{secret}.{PIN}.x"), TokenError::Parts(5)),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<JoinToken>().unwrap_err(), want, "input {input:?}");
        }
    }

    #[test]
    fn errors_and_debug_never_contain_the_secret() {
        let t = JoinToken::generate(PIN);
        assert!(!format!("{t:?}").contains(&t.secret));
        let broken = format!("kmn1.{}.{}X.{}", t.id, t.secret, PIN);
        let err = broken.parse::<JoinToken>().unwrap_err().to_string();
        assert!(!err.contains(&t.secret), "{err}");
    }

    #[test]
    fn secret_comparison() {
        let t = JoinToken::generate(PIN);
        assert!(t.secret_matches(&t.secret.clone()));
        assert!(!t.secret_matches("nope"));
        assert!(!t.secret_matches(&"z".repeat(SECRET_LEN)));
    }
}
