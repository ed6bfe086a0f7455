//! Text from outside (a plugin's `Err` message, a sender's event id, a load
//! failure) made safe to write to a log line or a terminal.
//!
//! Owns one rule: control characters are written as Rust escapes (`\n`,
//! `\u{1b}`), so such text cannot end a log line and forge the next one, or
//! drive the terminal that shows a table; everything else, any Unicode,
//! passes as it is. It does not cut or quote text.

use std::borrow::Cow;

/// `text` with its control characters escaped as [`char::escape_debug`]
/// writes them; borrowed when there are none (the usual case).
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert!(matches!(
            escape_controls("plain ümlaut 注文 ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("bad\nINFO forged line\r\u{1b}[2J\u{7f}\u{9b}\t\"quoted\" \\"),
            "bad\\nINFO forged line\\r\\u{1b}[2J\\u{7f}\\u{9b}\\t\"quoted\" \\"
        );
    }
}
