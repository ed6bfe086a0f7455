//! Webhook signatures: `X-StateSet-Signature` is the hex HMAC-SHA256 of the raw body.
//!
//! Pure and I/O-free: this module knows the header's name and format and how to
//! compare in constant time. It does not know HTTP status codes or event JSON.
//! During a rotation several secrets are valid at once ([`Secrets`]); each is
//! named in logs by its [`Secret::fingerprint`], never by its value.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The header StateSet puts the signature in.
pub const SIGNATURE_HEADER: &str = "X-StateSet-Signature";

/// The environment variable the secret is read from.
pub const SECRET_ENV: &str = "STATESET_WEBHOOK_SECRET";

/// The environment variable several secrets are read from during a
/// rotation: separated by commas or newlines.
pub const SECRETS_ENV: &str = "STATESET_WEBHOOK_SECRETS";

/// Length of a hex SHA-256 MAC: 32 bytes, two hex digits each.
const SIGNATURE_HEX_LEN: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// The shared webhook secret. Its `Debug` never shows the value, so it cannot
/// leak through a log line or an error that prints a config.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wrap a secret; an empty one is refused because every body would verify
    /// against a MAC anyone can compute.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, SignatureError> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err(SignatureError::EmptySecret);
        }
        Ok(Self(secret))
    }

    /// A short name for the secret in logs and on the command line: eight hex
    /// digits of a SHA-256 of it (domain-separated), too few to confirm a
    /// guess at a strong secret, enough to tell a handful apart.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"stateset-hooks secret fingerprint\0");
        hash.update(&self.0);
        hex::encode(&hash.finalize()[..4])
    }

    /// The bytes, for another encoding of them (never for a log).
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The hex signature of `body` (lower-case), as a sender computes it.
    pub fn sign(&self, body: &[u8]) -> String {
        hex::encode(self.mac(body))
    }

    /// Check a header value against `body`. Upper- and lower-case hex are both
    /// accepted; the comparison of the MAC bytes is constant-time.
    pub fn verify(&self, body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
        let expected = decode_header(header)?;
        if self.signed(body, &expected) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }

    /// Whether `mac` is this secret's MAC of `body`, compared in constant time.
    fn signed(&self, body: &[u8], mac: &[u8; 32]) -> bool {
        bool::from(self.mac(body).as_slice().ct_eq(mac))
    }

    /// Whether `text` holds this secret anywhere: a value that must never be
    /// handed to a plugin.
    pub fn appears_in(&self, text: &[u8]) -> bool {
        text.windows(self.0.len())
            .any(|window| bool::from(window.ct_eq(&self.0)))
    }

    pub(crate) fn mac(&self, body: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The secrets a signature may be made with: one, or several while a sender
/// rotates. Never empty. Its `Debug` shows fingerprints only.
#[derive(Clone)]
pub struct Secrets(Vec<Secret>);

impl Secrets {
    pub fn one(secret: Secret) -> Self {
        Self(vec![secret])
    }

    /// At least one secret; two with the same value are one.
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Result<Self, SignatureError> {
        let mut all: Vec<Secret> = Vec::new();
        for secret in secrets {
            if !all.iter().any(|s| s.0 == secret.0) {
                all.push(secret);
            }
        }
        if all.is_empty() {
            return Err(SignatureError::EmptySecret);
        }
        Ok(Self(all))
    }

    /// Secrets from text: one per line or separated by commas; blank lines
    /// and lines starting with `#` are skipped, spaces around each trimmed.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        Self::new(list(text).map(|s| Secret::new(s).expect("not empty")))
    }

    /// The secret whose signature `header` is for `body`. Every secret is
    /// checked, each in constant time, whichever matches.
    pub fn verify(&self, body: &[u8], header: Option<&[u8]>) -> Result<&Secret, SignatureError> {
        let expected = decode_header(header)?;
        let mut matched = None;
        for secret in &self.0 {
            if secret.signed(body, &expected) && matched.is_none() {
                matched = Some(secret);
            }
        }
        matched.ok_or(SignatureError::Mismatch)
    }

    /// The one with this fingerprint.
    pub fn find(&self, fingerprint: &str) -> Option<&Secret> {
        self.0.iter().find(|s| s.fingerprint() == fingerprint)
    }

    /// The first: what `sign` and `send` use unless told otherwise.
    pub fn first(&self) -> &Secret {
        &self.0[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.iter()
    }

    /// The fingerprints, comma-separated, for a log line.
    pub fn fingerprints(&self) -> String {
        let all: Vec<String> = self.0.iter().map(Secret::fingerprint).collect();
        all.join(", ")
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({})", self.fingerprints())
    }
}

/// The items of a list of secrets: one per line or separated by commas,
/// blank lines and `#` lines skipped, each trimmed, none empty.
pub fn list(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Parse the header's shape without looking at the body, so a request with no
/// usable signature can be refused before its body is read.
pub fn decode_header(header: Option<&[u8]>) -> Result<[u8; 32], SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = header.trim_ascii();
    if header.len() != SIGNATURE_HEX_LEN {
        return Err(SignatureError::Malformed);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(header, &mut out).map_err(|_| SignatureError::Malformed)?;
    Ok(out)
}

/// Why a signature was refused. The messages name the cause, never the values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing {SIGNATURE_HEADER} header")]
    Missing,
    #[error("malformed {SIGNATURE_HEADER} header: expected 64 hex digits")]
    Malformed,
    #[error("signature does not match the body")]
    Mismatch,
    #[error("the webhook secret is empty")]
    EmptySecret,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2: key "Jefe".
    const RFC4231_KEY: &[u8] = b"Jefe";
    const RFC4231_DATA: &[u8] = b"what do ya want for nothing?";
    const RFC4231_MAC: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

    /// The webhook document's curl example, checked with
    /// `echo -n "$PAYLOAD" | openssl dgst -sha256 -hmac "your-webhook-secret"`.
    const DOC_SECRET: &[u8] = b"your-webhook-secret";
    const DOC_PAYLOAD: &[u8] =
        br#"{"type":"order.created","data":{"id":"order-123","status":"pending"}}"#;
    const DOC_MAC: &str = "50e6931ae267ce9978e43d1599f3b78c5e0ad364ddd02edb0bc60e2ac0c425a9";

    fn secret(key: &[u8]) -> Secret {
        Secret::new(key).unwrap()
    }

    #[test]
    fn known_answer_rfc4231() {
        assert_eq!(secret(RFC4231_KEY).sign(RFC4231_DATA), RFC4231_MAC);
        assert_eq!(
            secret(RFC4231_KEY).verify(RFC4231_DATA, Some(RFC4231_MAC.as_bytes())),
            Ok(())
        );
    }

    #[test]
    fn known_answer_webhook_document() {
        assert_eq!(secret(DOC_SECRET).sign(DOC_PAYLOAD), DOC_MAC);
    }

    #[test]
    fn upper_case_hex_and_surrounding_space_verify() {
        let header = format!(" {} ", RFC4231_MAC.to_uppercase());
        assert_eq!(
            secret(RFC4231_KEY).verify(RFC4231_DATA, Some(header.as_bytes())),
            Ok(())
        );
    }

    #[test]
    fn refusals_name_their_cause() {
        let s = secret(RFC4231_KEY);
        assert_eq!(s.verify(RFC4231_DATA, None), Err(SignatureError::Missing));
        assert_eq!(
            s.verify(RFC4231_DATA, Some(b"abc")),
            Err(SignatureError::Malformed)
        );
        let not_hex = "z".repeat(64);
        assert_eq!(
            s.verify(RFC4231_DATA, Some(not_hex.as_bytes())),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            s.verify(b"tampered", Some(RFC4231_MAC.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            secret(b"other").verify(RFC4231_DATA, Some(RFC4231_MAC.as_bytes())),
            Err(SignatureError::Mismatch)
        );
    }

    /// During a rotation either secret verifies, and which one did is told
    /// by fingerprint; a body signed with neither is refused.
    #[test]
    fn any_of_several_secrets_verifies_and_is_named_by_fingerprint() {
        let (old, new) = (secret(b"old-secret"), secret(b"new-secret"));
        let both = Secrets::parse("# rotating\n old-secret \n\nnew-secret,old-secret\n").unwrap();
        assert_eq!(both.iter().count(), 2, "the repeat is one");
        for s in [&old, &new] {
            let header = s.sign(DOC_PAYLOAD);
            let matched = both.verify(DOC_PAYLOAD, Some(header.as_bytes())).unwrap();
            assert_eq!(matched.fingerprint(), s.fingerprint());
            assert_eq!(
                both.find(&s.fingerprint()).unwrap().sign(b"x"),
                s.sign(b"x")
            );
        }
        assert_ne!(old.fingerprint(), new.fingerprint());
        assert_eq!(old.fingerprint().len(), 8);
        let other = secret(b"other").sign(DOC_PAYLOAD);
        assert_eq!(
            both.verify(DOC_PAYLOAD, Some(other.as_bytes()))
                .unwrap_err(),
            SignatureError::Mismatch
        );
        assert_eq!(
            Secrets::parse(" \n# none\n").unwrap_err(),
            SignatureError::EmptySecret
        );
        let shown = format!("{both:?}");
        assert!(
            !shown.contains("old-secret") && shown.contains(&old.fingerprint()),
            "{shown}"
        );
    }

    #[test]
    fn empty_secret_is_refused_and_debug_redacts() {
        assert_eq!(Secret::new("").unwrap_err(), SignatureError::EmptySecret);
        let shown = format!("{:?}", secret(b"hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
