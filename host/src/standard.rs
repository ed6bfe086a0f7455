//! Standard Webhooks signatures (specification v1.0.0), the scheme Svix and
//! many other senders use: `webhook-id`, `webhook-timestamp` (Unix seconds)
//! and `webhook-signature`, a space-separated list of `v1,<base64 of the
//! HMAC-SHA256 of "id.timestamp.body">`, with a `whsec_<base64>` secret.
//!
//! Pure and I/O-free, like `signature.rs`: it knows the headers, the signed
//! content and the timestamp tolerance, not HTTP status codes. Every `v1`
//! signature is compared with every secret, each in constant time; other
//! versions (`v1a`, asymmetric) are skipped.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use subtle::ConstantTimeEq as _;

use crate::signature::{Secret, Secrets};

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// How far a message's timestamp may be from now, either way, by default:
/// the reference libraries' five minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The environment variable the `whsec_` secrets are read from (commas or
/// newlines between several).
pub const SECRETS_ENV: &str = "STATESET_STANDARD_WEBHOOK_SECRETS";

/// A `whsec_<base64>` secret (the prefix optional, padding optional) as the
/// key bytes it stands for.
pub fn parse_secret(text: &str) -> Result<Secret, StandardError> {
    let encoded = text.trim();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    let key = STANDARD
        .decode(encoded)
        .or_else(|_| STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| StandardError::BadSecret)?;
    Secret::new(key).map_err(|_| StandardError::BadSecret)
}

/// Several `whsec_` secrets from text: separated by commas or newlines,
/// `#` lines skipped.
pub fn parse_secrets(text: &str) -> Result<Secrets, StandardError> {
    let secrets = crate::signature::list(text)
        .map(parse_secret)
        .collect::<Result<Vec<_>, _>>()?;
    Secrets::new(secrets).map_err(|_| StandardError::BadSecret)
}

/// How a secret is written (its base64 without padding, which both the
/// padded and the unpadded form contain): text a plugin must never read.
pub fn text_forms(secret: &Secret) -> Option<Secret> {
    Secret::new(STANDARD_NO_PAD.encode(secret.expose())).ok()
}

/// The store key of a message: its `webhook-id` in a namespace of its own,
/// so a Standard sender's ids never meet StateSet's event ids.
pub fn key(id: &str) -> String {
    format!("standard:{id}")
}

/// Svix's names for the same three headers, taken when the unbranded ones
/// are absent.
pub const SVIX_HEADERS: [(&str, &str); 3] = [
    (ID_HEADER, "svix-id"),
    (TIMESTAMP_HEADER, "svix-timestamp"),
    (SIGNATURE_HEADER, "svix-signature"),
];

/// The signature header's value for a message: `v1,<base64>`.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        STANDARD.encode(secret.mac(&signed_content(id, timestamp, body)))
    )
}

fn signed_content(id: &str, timestamp: impl std::fmt::Display, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

/// The three headers of a message, as received.
#[derive(Clone, Copy)]
pub struct Headers<'a> {
    pub id: Option<&'a [u8]>,
    pub timestamp: Option<&'a [u8]>,
    pub signature: Option<&'a [u8]>,
}

/// What a message's headers say, checked for shape and timestamp before
/// its body is read. Its `Debug` leaves the signatures out.
#[derive(Clone)]
pub struct Envelope {
    pub id: String,
    timestamp: i64,
    signatures: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Headers")
            .field("id", &self.id.map(String::from_utf8_lossy))
            .field("timestamp", &self.timestamp.map(String::from_utf8_lossy))
            .field("signature", &self.signature.map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("timestamp", &self.timestamp)
            .field("signatures", &self.signatures.len())
            .finish()
    }
}

impl Envelope {
    /// Every header present and well formed, at least one `v1` signature,
    /// and the timestamp within `tolerance` of `now` (Unix seconds).
    pub fn check(
        headers: Headers<'_>,
        now: i64,
        tolerance: Duration,
    ) -> Result<Self, StandardError> {
        fn text<'v>(value: Option<&'v [u8]>, name: &'static str) -> Result<&'v str, StandardError> {
            let value = value.ok_or(StandardError::Missing(name))?;
            std::str::from_utf8(value)
                .map(str::trim)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or(StandardError::Missing(name))
        }
        let id = text(headers.id, ID_HEADER)?.to_owned();
        let timestamp: i64 = text(headers.timestamp, TIMESTAMP_HEADER)?
            .parse()
            .map_err(|_| StandardError::BadTimestamp)?;
        let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
        if timestamp < now.saturating_sub(tolerance) {
            return Err(StandardError::TooOld { tolerance });
        }
        if timestamp > now.saturating_add(tolerance) {
            return Err(StandardError::TooNew { tolerance });
        }
        let (mut signatures, mut malformed) = (Vec::new(), false);
        for entry in text(headers.signature, SIGNATURE_HEADER)?.split(' ') {
            let Some(encoded) = entry.strip_prefix("v1,") else {
                continue; // another version: not ours to check
            };
            // A malformed entry is skipped, as the reference libraries do:
            // another may match.
            match STANDARD.decode(encoded) {
                Ok(bytes) if bytes.len() == 32 => {
                    let mut mac = [0u8; 32];
                    mac.copy_from_slice(&bytes);
                    signatures.push(mac);
                }
                _ => malformed = true,
            }
        }
        if signatures.is_empty() {
            return Err(if malformed {
                StandardError::Malformed
            } else {
                StandardError::NoV1Signature
            });
        }
        Ok(Self {
            id,
            timestamp,
            signatures,
        })
    }

    /// The secret one of the signatures was made with over `body`.
    pub fn verify<'s>(
        &self,
        secrets: &'s Secrets,
        body: &[u8],
    ) -> Result<&'s Secret, StandardError> {
        let content = signed_content(&self.id, self.timestamp, body);
        let mut matched = None;
        for secret in secrets.iter() {
            let mac = secret.mac(&content);
            for signature in &self.signatures {
                if bool::from(mac.as_slice().ct_eq(signature)) && matched.is_none() {
                    matched = Some(secret);
                }
            }
        }
        matched.ok_or(StandardError::Mismatch)
    }
}

/// Why a Standard Webhooks message was refused. Messages name the cause,
/// never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StandardError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("{TIMESTAMP_HEADER} is not an integer number of seconds")]
    BadTimestamp,
    #[error(
        "{TIMESTAMP_HEADER} is more than {tolerance} s in the past: a stale or replayed message"
    )]
    TooOld { tolerance: i64 },
    #[error("{TIMESTAMP_HEADER} is more than {tolerance} s in the future")]
    TooNew { tolerance: i64 },
    #[error("{SIGNATURE_HEADER} has no v1 signature")]
    NoV1Signature,
    #[error("malformed {SIGNATURE_HEADER}: a v1 signature is not base64 of 32 bytes")]
    Malformed,
    #[error("no signature in {SIGNATURE_HEADER} matches the message")]
    Mismatch,
    #[error("a Standard Webhooks secret must be whsec_ and base64 of at least one byte")]
    BadSecret,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's published vectors: (secret, id, timestamp,
    /// payload, signature).
    const VECTORS: [(&str, &str, i64, &str, &str); 2] = [
        // libraries/rust/src/lib.rs, test_sign
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
        // libraries/python/tests/test_webhooks.py, test_sign_function (and
        // libraries/javascript/src/webhook.test.ts)
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
    ];

    fn headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> Headers<'a> {
        Headers {
            id: Some(id.as_bytes()),
            timestamp: Some(timestamp.as_bytes()),
            signature: Some(signature.as_bytes()),
        }
    }

    fn check(id: &str, ts: &str, sig: &str, now: i64) -> Result<Envelope, StandardError> {
        Envelope::check(headers(id, ts, sig), now, DEFAULT_TOLERANCE)
    }

    #[test]
    fn the_published_vectors_sign_and_verify() {
        for (secret, id, ts, payload, expected) in VECTORS {
            let key = parse_secret(secret).unwrap();
            assert_eq!(sign(&key, id, ts, payload.as_bytes()), expected);
            let secrets = Secrets::one(key);
            let envelope = check(id, &ts.to_string(), expected, ts).unwrap();
            assert!(envelope.verify(&secrets, payload.as_bytes()).is_ok());
            assert_eq!(
                envelope.verify(&secrets, b"{}").unwrap_err(),
                StandardError::Mismatch,
                "another body"
            );
        }
    }

    #[test]
    fn bad_messages_are_refused_naming_the_cause() {
        let (secret, id, ts, payload, good) = VECTORS[1];
        let secrets = Secrets::one(parse_secret(secret).unwrap());
        let at = ts.to_string();
        let verify = |sig: &str| {
            check(id, &at, sig, ts)?
                .verify(&secrets, payload.as_bytes())
                .map(|_| ())
        };
        // The near miss from the reference suites: last character changed.
        let near = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
        assert_eq!(verify(near), Err(StandardError::Mismatch));
        assert_eq!(verify("v1,"), Err(StandardError::Malformed));
        assert_eq!(
            verify(&good[..good.len() - 4]),
            Err(StandardError::Malformed)
        );
        assert_eq!(verify("v1,not base64!"), Err(StandardError::Malformed));
        assert_eq!(
            verify(&good.replace("v1,", "v2,")),
            Err(StandardError::NoV1Signature)
        );
        assert_eq!(
            verify(&good.replace("v1,", "v1a,")),
            Err(StandardError::NoV1Signature)
        );
        // Any of several may match; other versions and malformed entries
        // are skipped.
        assert_eq!(verify(&format!("v1a,abc {near} v1,!! {good}")), Ok(()));
        // Missing headers and a timestamp that is not an integer.
        let none = Headers {
            id: None,
            ..headers(id, &at, good)
        };
        let missing = Envelope::check(none, ts, DEFAULT_TOLERANCE).unwrap_err();
        assert_eq!(missing, StandardError::Missing(ID_HEADER));
        for header in [TIMESTAMP_HEADER, SIGNATURE_HEADER] {
            let mut h = headers(id, &at, good);
            if header == TIMESTAMP_HEADER {
                h.timestamp = None;
            } else {
                h.signature = Some(b"  ");
            }
            let error = Envelope::check(h, ts, DEFAULT_TOLERANCE).unwrap_err();
            assert_eq!(error, StandardError::Missing(header));
        }
        assert_eq!(
            check(id, "16142.5", good, ts).unwrap_err(),
            StandardError::BadTimestamp
        );
        // The tolerance's edges, both ways: 300 s is in, 301 s is out.
        let tolerance = DEFAULT_TOLERANCE.as_secs() as i64;
        assert!(check(id, &at, good, ts + tolerance).is_ok());
        assert!(check(id, &at, good, ts - tolerance).is_ok());
        assert_eq!(
            check(id, &at, good, ts + tolerance + 1).unwrap_err(),
            StandardError::TooOld { tolerance }
        );
        assert_eq!(
            check(id, &at, good, ts - tolerance - 1).unwrap_err(),
            StandardError::TooNew { tolerance }
        );
    }

    #[test]
    fn secrets_parse_as_the_reference_libraries_take_them() {
        let (secret, ..) = VECTORS[1];
        let bare = secret.strip_prefix("whsec_").unwrap();
        let unpadded = parse_secret("whsec_dGVzdA").unwrap(); // "test", no padding
        assert_eq!(unpadded.sign(b"x"), Secret::new("test").unwrap().sign(b"x"));
        assert_eq!(
            parse_secret(bare).unwrap().sign(b"x"),
            parse_secret(secret).unwrap().sign(b"x"),
            "the prefix is optional"
        );
        let forms = text_forms(&parse_secret(secret).unwrap()).unwrap();
        assert!(
            forms.appears_in(secret.as_bytes()),
            "found in the text it was written as"
        );
        for bad in ["whsec_", "", "whsec_!!!"] {
            assert_eq!(
                parse_secret(bad).unwrap_err(),
                StandardError::BadSecret,
                "{bad:?}"
            );
        }
        let two = parse_secrets(&format!("{secret},\n# old\n{}", VECTORS[0].0)).unwrap();
        assert_eq!(two.iter().count(), 2);
    }
}
