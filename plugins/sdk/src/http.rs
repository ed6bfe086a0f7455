//! Outbound HTTP from a plugin, through `wasi:http`: blocking calls that
//! return the status and the whole body.
//!
//! The host lets a plugin reach only the hosts its manifest lists in
//! `[http] allowed_hosts` and bounds each request (time, body sizes, requests
//! per event). Every request carries `Idempotency-Key: EVENT_KEY:PLUGIN`
//! ([`crate::delivery_key`]), the same on every attempt of a delivery: a
//! delivery runs at least once, so the receiving API can drop a repeat. An error names the `wasi:http` error code
//! (`HttpRequestDenied`, `DestinationIpProhibited`, `ConnectionReadTimeout`,
//! `HttpResponseBodySize`, ...).

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme, http_error_code};
use wasip2::io::streams::StreamError;

/// A response: its status and whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The URL asked for.
    pub url: String,
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The response if its status is 2xx, else an error naming the URL,
    /// the status and the body's start: `?` it to fail (and retry) the
    /// delivery on an answer that is not a success.
    pub fn error_for_status(self) -> Result<Self, String> {
        if self.is_success() {
            return Ok(self);
        }
        let text = self.text();
        let start: String = text.chars().take(200).collect();
        Err(format!("{} answered {}: {start}", self.url, self.status))
    }

    /// The body as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("response is not the JSON expected: {e}"))
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `url`.
pub fn get(url: &str) -> Result<Response, String> {
    send(Method::Get, url, &[], &[])
}

/// POST `body` as JSON to `url`.
pub fn post_json(url: &str, body: &impl Serialize) -> Result<Response, String> {
    let body = serde_json::to_vec(body).map_err(|e| format!("cannot encode the body: {e}"))?;
    send(
        Method::Post,
        url,
        &[("content-type", b"application/json")],
        &body,
    )
}

/// POST `body` as JSON to the URL the manifest's `[config]` sets under
/// `config_key`, failing (so the delivery is retried) on an answer that is
/// not 2xx, and log `{what} sent to URL: STATUS`. Without that key, nothing
/// leaves the plugin: it logs what it would have sent.
pub fn post_json_to_config(
    config_key: &str,
    what: &str,
    body: &impl Serialize,
) -> Result<(), String> {
    let Some(url) = crate::config(config_key) else {
        let body =
            serde_json::to_string(body).map_err(|e| format!("cannot encode the body: {e}"))?;
        crate::info(&format!("not sent (no {config_key} in [config]): {body}"));
        return Ok(());
    };
    let response = post_json(&url, body)?.error_for_status()?;
    crate::info(&format!("{what} sent to {url}: {}", response.status));
    Ok(())
}

fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Response, String> {
    let failed = |what: String| {
        format!(
            "{method_name} {url} failed: {what}",
            method_name = name(&method)
        )
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| failed("not an absolute URL".into()))?;
    let scheme = match scheme {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => return Err(failed(format!("unsupported scheme {other:?}"))),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let fields = Fields::new();
    let key = crate::delivery_key();
    let idempotency: (&str, &[u8]) = ("idempotency-key", key.as_bytes());
    for (name, value) in headers.iter().chain([&idempotency]) {
        fields
            .append(name, value)
            .map_err(|e| failed(format!("header {name}: {e:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    let invalid = |part: &str| failed(format!("invalid {part}"));
    request
        .set_method(&method)
        .map_err(|()| invalid("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid("host"))?;
    let path = if path.is_empty() { "/" } else { path };
    request
        .set_path_with_query(Some(path))
        .map_err(|()| invalid("path"))?;
    let outgoing = request.body().map_err(|()| invalid("body"))?;
    // Sent first, then the body written: the host takes the body as it
    // streams, and holds only a couple of chunks before that.
    let pending = outgoing_handler::handle(request, None).map_err(|e| failed(format!("{e:?}")))?;
    let written = write_body(outgoing, body);
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or_else(|| failed("no response".into()))?
        .map_err(|()| failed("response taken twice".into()))?
        // The host's reason (a body over its cap, say) comes before the
        // write error it caused.
        .map_err(|e| failed(format!("{e:?}")))?;
    written.map_err(failed)?;
    let status = response.status();
    let incoming = response.consume().map_err(|()| invalid("response body"))?;
    let stream = incoming.stream().map_err(|()| invalid("response body"))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => bytes.extend(chunk),
            Err(StreamError::Closed) => break,
            Err(error) => return Err(failed(stream_error(error))),
        }
    }
    Ok(Response {
        url: url.to_owned(),
        status,
        body: bytes,
    })
}

/// Write all of `body` and finish it; on an error the body is dropped
/// unfinished, which tells the host the request is incomplete.
fn write_body(outgoing: OutgoingBody, body: &[u8]) -> Result<(), String> {
    if !body.is_empty() {
        let stream = outgoing.write().map_err(|()| "invalid body".to_owned())?;
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(stream_error)?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("{e:?}"))
}

fn stream_error(error: StreamError) -> String {
    match error {
        StreamError::Closed => "closed".into(),
        StreamError::LastOperationFailed(error) => match http_error_code(&error) {
            Some(code) => format!("{code:?}"),
            None => error.to_debug_string(),
        },
    }
}

fn name(method: &Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Post => "POST",
        _ => "request",
    }
}
