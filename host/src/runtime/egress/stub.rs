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

use crate::runtime::secrets::{REDACTED, Secrets};

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
/// Headers kept per recorded request, and bytes per header name and value.
const MAX_RECORDED_HEADERS: usize = 32;
const MAX_RECORDED_HEADER_BYTES: usize = 256;
/// Bytes of a recorded URL.
const MAX_RECORDED_URL_BYTES: usize = 1 << 10;
/// Bytes of headers and bodies one call's record keeps in all: past it, a
/// request is recorded by method, URL and answer alone. With the caps
/// above, a call's record stays under 200 KiB whatever the plugin sends.
pub const RECORDED_BYTES_PER_CALL: usize = 64 << 10;

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

/// `text` scrubbed of `secrets`, then cut to at most `max` bytes on a char
/// boundary (scrubbed first: a secret across the cut leaves no part behind).
fn kept(secrets: &Secrets, text: &str, max: usize) -> String {
    let text = secrets.scrub(text);
    text[..crate::runtime::output::floor_char_boundary(&text, max)].to_owned()
}

/// A call's record of its requests, shared with the futures that answer
/// them. What it keeps is redacted: the values of credential-named headers
/// and query parameters, user info in a URL, and every configuration value
/// the plugin read from the environment, wherever it appears.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    record: Arc<Mutex<Record>>,
    secrets: Secrets,
}

#[derive(Debug, Default)]
struct Record {
    requests: Vec<RecordedRequest>,
    /// Bytes of headers and bodies kept so far.
    bytes: usize,
}

impl Recorder {
    pub(crate) fn new(secrets: Secrets) -> Self {
        Self {
            record: Arc::default(),
            secrets,
        }
    }

    fn push(&self, mut request: RecordedRequest) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        if record.requests.len() >= MAX_RECORDED_REQUESTS {
            return;
        }
        let bytes = request.body.len()
            + (request.headers.iter())
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        if record.bytes + bytes > RECORDED_BYTES_PER_CALL {
            request.headers.clear();
            request.body.clear();
        } else {
            record.bytes += bytes;
        }
        record.requests.push(request);
    }

    pub(crate) fn take(&self) -> Vec<RecordedRequest> {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut record.requests)
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
        kept(&self.secrets, &url, MAX_RECORDED_URL_BYTES)
    }

    fn headers(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .take(MAX_RECORDED_HEADERS)
            .map(|(name, value)| {
                let value = if is_credential(name.as_str()) {
                    REDACTED.to_owned()
                } else {
                    let text = String::from_utf8_lossy(value.as_bytes());
                    kept(&self.secrets, &text, MAX_RECORDED_HEADER_BYTES)
                };
                let name = kept(&self.secrets, name.as_str(), MAX_RECORDED_HEADER_BYTES);
                (name, value)
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
        record.body = kept(
            &self.secrets,
            &String::from_utf8_lossy(&body),
            RECORDED_BODY_BYTES,
        );
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
        let recorder = Recorder::new(Secrets::new([
            "sk_live_env_secret".to_owned(),
            "abc".to_owned(),
        ]));
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
        let recorder = Recorder::new(Secrets::default());
        let long = "x".repeat(60 << 10);
        let mut request = Request::get(format!("https://a.test/{long}"));
        for n in 0..2 * MAX_RECORDED_HEADERS {
            request = request.header(format!("x-{n}-{long}"), long.as_str());
        }
        let request = request.body(()).unwrap();
        for _ in 0..MAX_RECORDED_REQUESTS + 50 {
            recorder.refused(&request, "not allowed");
        }
        let record = recorder.take();
        assert_eq!(record.len(), MAX_RECORDED_REQUESTS);
        let bytes: usize = (record.iter())
            .map(|r| r.url.len() + r.body.len())
            .chain(
                record
                    .iter()
                    .flat_map(|r| &r.headers)
                    .map(|(n, v)| n.len() + v.len()),
            )
            .sum();
        assert!(
            bytes <= RECORDED_BYTES_PER_CALL + MAX_RECORDED_REQUESTS * MAX_RECORDED_URL_BYTES,
            "{bytes} bytes recorded"
        );
        assert!(record[0].url.len() <= MAX_RECORDED_URL_BYTES);
        assert_eq!(record[0].headers.len(), MAX_RECORDED_HEADERS);
        assert_eq!(record[0].headers[0].0.len(), MAX_RECORDED_HEADER_BYTES);
        assert!(
            record.last().unwrap().headers.is_empty(),
            "the budget is spent"
        );
    }
}
