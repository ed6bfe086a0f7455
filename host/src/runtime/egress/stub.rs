//! Outbound HTTP that never leaves the host: for a dry run (`shadow`,
//! `test`), each request the allowlist admits is read, recorded and answered
//! from canned responses (503 when none matches); a refused one is recorded
//! with the reason. Nothing is resolved, connected or sent.
//!
//! Owns the canned responses and the record; the allowlist, the caps and the
//! deadline are [`super::Egress`]'s, the same as for a live call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Full};
use wasmtime_wasi_http::{Error, WasiBody};

/// The status of a request no canned response matches: "unavailable", what
/// a plugin must survive anyway.
pub const DEFAULT_STUB_STATUS: u16 = 503;

/// Bytes of a request body kept in its record.
pub const RECORDED_BODY_BYTES: usize = 4 << 10;

/// The answers a dry run gives, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpStub {
    pub responses: Vec<CannedResponse>,
    /// The status when none matches (an empty body).
    pub otherwise: u16,
}

impl Default for HttpStub {
    fn default() -> Self {
        Self {
            responses: Vec::new(),
            otherwise: DEFAULT_STUB_STATUS,
        }
    }
}

/// One canned answer: to requests for `url` (exactly, or every URL starting
/// with it when it ends in `*`), of `method` when given.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CannedResponse {
    pub method: Option<String>,
    pub url: String,
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

fn ok() -> u16 {
    200
}

impl CannedResponse {
    fn matches(&self, method: &str, url: &str) -> bool {
        let url_ok = match self.url.strip_suffix('*') {
            Some(prefix) => url.starts_with(prefix),
            None => url == self.url,
        };
        url_ok
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }
}

/// One request a dry-run call made, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    /// The URL, with credential-like query values replaced by `[redacted]`.
    pub url: String,
    /// Headers as sent, credentials' values replaced by `[redacted]`.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy), its first [`RECORDED_BODY_BYTES`].
    pub body: String,
    /// The status it was answered with (none when refused or failed).
    pub status: Option<u16>,
    /// Why it was refused, or how it failed, instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Header names whose values are credentials: never recorded.
fn is_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name != super::IDEMPOTENCY_HEADER
        && [
            "auth",
            "cookie",
            "key",
            "token",
            "secret",
            "signature",
            "password",
        ]
        .iter()
        .any(|word| name.contains(word))
}

/// A URL as recorded: the values of query parameters named like
/// credentials (`?api_key=...`) replaced by `[redacted]`.
fn recorded_url(uri: &http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.to_string();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_credential(name) => format!("{name}=[redacted]"),
            _ => pair.to_owned(),
        })
        .collect();
    let text = uri.to_string();
    let base = text.split_once('?').map_or(text.as_str(), |(base, _)| base);
    format!("{base}?{}", redacted.join("&"))
}

fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = if is_credential(name.as_str()) {
                "[redacted]".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// A call's record of its requests, shared with the futures that answer them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorder(Arc<Mutex<Vec<RecordedRequest>>>);

impl Recorder {
    fn push(&self, request: RecordedRequest) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
    }

    pub(crate) fn take(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Record a request the allowlist or the caps refused.
    pub(crate) fn refused<B>(&self, request: &Request<B>, why: &str) {
        self.push(RecordedRequest {
            method: request.method().to_string(),
            url: recorded_url(request.uri()),
            headers: recorded_headers(request.headers()),
            body: String::new(),
            status: None,
            refused: Some(why.to_owned()),
        });
    }

    /// Read an admitted request's body (bounded as a live one is), record
    /// it and answer from `stub`.
    pub(crate) async fn answer(
        &self,
        stub: &HttpStub,
        request: Request<super::Bounded<WasiBody>>,
    ) -> Result<Response<WasiBody>, Error> {
        let (parts, body) = request.into_parts();
        let (method, url) = (parts.method.to_string(), recorded_url(&parts.uri));
        let mut record = RecordedRequest {
            method,
            url,
            headers: recorded_headers(&parts.headers),
            body: String::new(),
            status: None,
            refused: None,
        };
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                record.refused = Some(format!("the request body failed: {error}"));
                self.push(record);
                return Err(error);
            }
        };
        let kept = &body[..body.len().min(RECORDED_BODY_BYTES)];
        record.body = String::from_utf8_lossy(kept).into_owned();
        let canned = stub
            .responses
            .iter()
            .find(|c| c.matches(&record.method, &record.url));
        let mut response = Response::builder();
        let (status, body) = match canned {
            Some(canned) => {
                for (name, value) in &canned.headers {
                    response = response.header(name, value);
                }
                (canned.status, Bytes::from(canned.body.clone()))
            }
            None => (stub.otherwise, Bytes::new()),
        };
        record.status = Some(status);
        self.push(record);
        let body = Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync();
        response
            .status(status)
            .body(body)
            .map_err(|_| Error::InternalError(Some(format!("canned response {status} is invalid"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_responses_match_by_url_and_method() {
        let canned = |method: Option<&str>, url: &str| CannedResponse {
            method: method.map(str::to_owned),
            url: url.to_owned(),
            status: 201,
            headers: BTreeMap::new(),
            body: String::new(),
        };
        assert!(canned(None, "https://a.test/x").matches("GET", "https://a.test/x"));
        assert!(!canned(None, "https://a.test/x").matches("GET", "https://a.test/xy"));
        assert!(canned(None, "https://a.test/*").matches("PUT", "https://a.test/x/y"));
        assert!(canned(Some("post"), "https://a.test/x").matches("POST", "https://a.test/x"));
        assert!(!canned(Some("POST"), "https://a.test/x").matches("GET", "https://a.test/x"));
    }

    #[test]
    fn credentials_are_not_recorded() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer sk_live_1".parse().unwrap());
        headers.insert("x-api-key", "k1".parse().unwrap());
        headers.insert("idempotency-key", "evt_1:orders".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        let recorded = recorded_headers(&headers);
        let text = format!("{recorded:?}");
        assert!(
            !text.contains("sk_live_1") && !text.contains("k1\""),
            "{text}"
        );
        assert!(text.contains("evt_1:orders") && text.contains("application/json"));
        let url: http::Uri = "https://a.test/x?sku=1&api_key=sk_live_2&token=t"
            .parse()
            .unwrap();
        assert_eq!(
            recorded_url(&url),
            "https://a.test/x?sku=1&api_key=[redacted]&token=[redacted]"
        );
    }
}
