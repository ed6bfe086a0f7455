//! The secrets a plugin was given (its configuration values read from the
//! environment) and the scrubbing that keeps them out of what the host keeps
//! and shows of a call: its log lines, its error, the requests a dry run
//! records.
//!
//! Each secret is matched as given and in the forms it takes on its way into
//! a URL, a form or a header: percent-encoded (either case of hex digit) and
//! base64 (standard and URL-safe, padded or not). A plugin set on leaking one
//! can still disguise it (a secret inside a longer base64 text, reversed); what
//! this stops is the honest slip, and a plugin has no way out but its grants.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// Values shorter than this are not scrubbed: a secret is longer, and a short
/// value would blank out ordinary text.
pub const MIN_SECRET_BYTES: usize = 6;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Every form of every secret, longest first (a longer form containing a
/// shorter one is replaced whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(Arc<[String]>);

impl Secrets {
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut forms: Vec<String> = values
            .into_iter()
            .filter(|value| value.len() >= MIN_SECRET_BYTES)
            .flat_map(|value| {
                let bytes = value.as_bytes();
                [
                    percent_encoded(bytes, Hex::Upper),
                    percent_encoded(bytes, Hex::Lower),
                    STANDARD.encode(bytes),
                    STANDARD_NO_PAD.encode(bytes),
                    URL_SAFE.encode(bytes),
                    URL_SAFE_NO_PAD.encode(bytes),
                    value,
                ]
            })
            .collect();
        forms.sort_unstable_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Self(forms.into())
    }

    /// `text` with every form of every secret replaced by [`REDACTED`].
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut text = Cow::Borrowed(text);
        for form in self.0.iter() {
            if text.contains(form.as_str()) {
                text = Cow::Owned(text.replace(form.as_str(), REDACTED));
            }
        }
        text
    }
}

enum Hex {
    Upper,
    Lower,
}

/// `bytes` as a URL or form would carry them: every byte but the unreserved
/// ones (RFC 3986) as `%XX`, in `hex` digits.
fn percent_encoded(bytes: &[u8], hex: Hex) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        let _ = match hex {
            _ if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => write!(out, "{}", b as char),
            Hex::Upper => write!(out, "%{b:02X}"),
            Hex::Lower => write!(out, "%{b:02x}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_secret_is_scrubbed_and_short_values_are_not() {
        let secrets = Secrets::new(["sk+live/key=1".to_owned(), "abc".to_owned()]);
        for text in [
            "token sk+live/key=1 in a line",
            "client_secret=sk%2Blive%2Fkey%3D1&x=1",
            "client_secret=sk%2blive%2fkey%3d1",
            "basic c2srbGl2ZS9rZXk9MQ==",
            "c2srbGl2ZS9rZXk9MQ",
            "c2srbGl2ZS9rZXk9MQ==".replace('+', "-").as_str(),
        ] {
            let scrubbed = secrets.scrub(text);
            assert!(scrubbed.contains(REDACTED), "{text} -> {scrubbed}");
            assert!(!scrubbed.contains("sk"), "{text} -> {scrubbed}");
            assert!(!scrubbed.contains("c2sr"), "{text} -> {scrubbed}");
        }
        assert!(matches!(secrets.scrub("abc xyz"), Cow::Borrowed("abc xyz")));
        assert_eq!(Secrets::new(["short".to_owned()]).scrub("short"), "short");
        // Only the secret, in any of its forms: not another case of it.
        let mixed = Secrets::new(["Token123".to_owned()]);
        assert_eq!(mixed.scrub("token123 Token123"), "token123 [redacted]");
    }
}
