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

/// Requests one call's record keeps (refused ones count too); later ones
/// are dropped, so a plugin looping on a refused request cannot grow the
/// host's memory.
pub const MAX_RECORDED_REQUESTS: usize = 100;
/// Headers kept per recorded request, and bytes per header value.
const MAX_RECORDED_HEADERS: usize = 32;
const MAX_RECORDED_HEADER_BYTES: usize = 256;
/// Configuration values shorter than this are not redacted where they
/// appear (a secret is longer; a short value would blank out ordinary text).
const MIN_SECRET_BYTES: usize = 6;

const REDACTED: &str = "[redacted]";

/// Names of headers and query parameters whose values are credentials.
fn is_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name != super::IDEMPOTENCY_HEADER
        && [
            "auth",
            "cookie",
            "key",
            "token",
            "secret",
            "sig",
            "pass",
            "pwd",
            "credential",
            "session",
        ]
        .iter()
        .any(|word| name.contains(word))
}

/// Cut `text` to at most `max` bytes on a char boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        text.truncate(crate::runtime::output::floor_char_boundary(&text, max));
    }
    text
}

/// A call's record of its requests, shared with the futures that answer
/// them. What it keeps is redacted: the values of credential-named headers
/// and query parameters, user info in a URL, and every configuration value
/// the plugin read from the environment, wherever it appears.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    secrets: Arc<[String]>,
}

impl Recorder {
    pub(crate) fn new(secrets: Vec<String>) -> Self {
        Self {
            requests: Arc::default(),
            secrets: secrets
                .into_iter()
                .filter(|s| s.len() >= MIN_SECRET_BYTES)
                .collect(),
        }
    }

    fn push(&self, request: RecordedRequest) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() < MAX_RECORDED_REQUESTS {
            requests.push(request);
        }
    }

    pub(crate) fn take(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `text` with every secret replaced.
    fn scrub(&self, text: String) -> String {
        self.secrets.iter().fold(text, |text, secret| {
            if text.contains(secret.as_str()) {
                text.replace(secret.as_str(), REDACTED)
            } else {
                text
            }
        })
    }

    /// A URL as recorded: no user info, credential-named query values and
    /// secrets redacted.
    fn url(&self, uri: &http::Uri) -> String {
        let authority = uri.authority().map(|a| a.as_str());
        let host = authority.map(|a| a.rsplit_once('@').map_or(a, |(_, host)| host));
        let mut url = format!(
            "{}{}{}{}",
            uri.scheme_str()
                .map_or(String::new(), |s| format!("{s}://")),
            host.unwrap_or(""),
            uri.path(),
            if uri.query().is_some() { "?" } else { "" },
        );
        if let Some(query) = uri.query() {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if is_credential(name) => format!("{name}={REDACTED}"),
                    _ => pair.to_owned(),
                })
                .collect();
            url.push_str(&pairs.join("&"));
        }
        self.scrub(url)
    }

    fn headers(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .take(MAX_RECORDED_HEADERS)
            .map(|(name, value)| {
                let value = if is_credential(name.as_str()) {
                    REDACTED.to_owned()
                } else {
                    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    self.scrub(cut(text, MAX_RECORDED_HEADER_BYTES))
                };
                (name.as_str().to_owned(), value)
            })
            .collect()
    }

    /// Record a request the allowlist or the caps refused.
    pub(crate) fn refused<B>(&self, request: &Request<B>, why: &str) {
        self.push(RecordedRequest {
            method: request.method().to_string(),
            url: self.url(request.uri()),
            headers: self.headers(request.headers()),
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
        // Canned answers match the URL as the plugin sent it.
        let (method, url) = (parts.method.to_string(), parts.uri.to_string());
        let mut record = RecordedRequest {
            method,
            url: self.url(&parts.uri),
            headers: self.headers(&parts.headers),
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
        let kept = String::from_utf8_lossy(&body[..body.len().min(RECORDED_BODY_BYTES)]);
        record.body = self.scrub(cut(kept.into_owned(), RECORDED_BODY_BYTES));
        let canned = stub
            .responses
            .iter()
            .find(|c| c.matches(&record.method, &url));
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
    fn credentials_and_secrets_are_not_recorded() {
        let recorder = Recorder::new(vec!["sk_live_env_secret".into(), "abc".into()]);
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer sk_live_1".parse().unwrap());
        headers.insert("x-api-key", "k1".parse().unwrap());
        headers.insert("idempotency-key", "evt_1:orders".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-note", "holds sk_live_env_secret inline".parse().unwrap());
        let text = format!("{:?}", recorder.headers(&headers));
        assert!(
            !text.contains("sk_live_1") && !text.contains("k1\""),
            "{text}"
        );
        assert!(!text.contains("sk_live_env_secret"), "{text}");
        assert!(text.contains("evt_1:orders") && text.contains("application/json"));
        let url: http::Uri =
            "https://user:pw@a.test/hooks/sk_live_env_secret?sku=abc&api_key=2&sig=3"
                .parse()
                .unwrap();
        assert_eq!(
            recorder.url(&url),
            "https://a.test/hooks/[redacted]?sku=abc&api_key=[redacted]&sig=[redacted]",
            "short values (abc) are left alone"
        );
    }

    #[test]
    fn a_call_records_at_most_its_cap() {
        let recorder = Recorder::new(Vec::new());
        let request = Request::get("https://a.test/").body(()).unwrap();
        for _ in 0..MAX_RECORDED_REQUESTS + 50 {
            recorder.refused(&request, "not allowed");
        }
        assert_eq!(recorder.take().len(), MAX_RECORDED_REQUESTS);
    }
}
