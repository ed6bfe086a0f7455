//! Outbound HTTP for plugins: the standard `wasi:http/outgoing-handler`,
//! deny by default.
//!
//! A plugin reaches only the hosts its manifest's `[http] allowed_hosts`
//! lists ([`allowlist`]), names are resolved here and every address is
//! checked (loopback, private, link-local and the like stay out unless the
//! operator allows private networks and the manifest names that host), the
//! connection goes to the checked addresses only, redirects are not followed
//! (the plugin sees the 3xx), no proxy is used, and each request is bounded:
//! its time (clamped to the call's remaining deadline), its request and
//! response bodies, and the requests per call. Every request carries an
//! `Idempotency-Key` naming the delivery, unless the plugin set one.
//!
//! Owns the `[http]` manifest section, the per-call hooks wasmtime-wasi-http
//! calls and the connector. Knows nothing of plugin directories or storage.

pub mod allowlist;
pub mod stub;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Scheme as UriScheme;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

pub use self::allowlist::{AllowedHost, Scheme, is_private};
use self::stub::{HttpStub, Recorder};
use super::output::CallTag;
use super::secrets::Secrets;
use crate::text::escape_controls;

/// A request's time, connect to the last byte of the response, unless the
/// manifest says otherwise; never past the call's own deadline.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Response body cap: a JSON API answer is kilobytes.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Request body cap.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 256 << 10;
/// Requests one call may make: a handler notifies a few services, it does
/// not crawl.
pub const DEFAULT_MAX_REQUESTS: u32 = 10;

/// The most a manifest may ask for unless the operator says otherwise
/// ([`HttpPolicy`]; the call's deadline bounds time anyway).
pub const DEFAULT_MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RESPONSE_CEILING: u64 = 16 << 20;
pub const DEFAULT_MAX_REQUEST_CEILING: u64 = 4 << 20;
pub const DEFAULT_MAX_REQUESTS_CEILING: u32 = 100;

/// The operator's bounds on every plugin's `[http]`: private networks or
/// not, and the most a manifest may ask for. A default above a ceiling is
/// lowered to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    /// May a host a manifest names exactly resolve to a private address
    /// (loopback, RFC 1918, link-local, unique local, ...)?
    pub allow_private_networks: bool,
    pub max_timeout: Duration,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub max_requests: u32,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        Self {
            allow_private_networks: false,
            max_timeout: DEFAULT_MAX_HTTP_TIMEOUT,
            max_request_bytes: DEFAULT_MAX_REQUEST_CEILING,
            max_response_bytes: DEFAULT_MAX_RESPONSE_CEILING,
            max_requests: DEFAULT_MAX_REQUESTS_CEILING,
        }
    }
}

/// The header every outbound request carries unless the plugin set it:
/// `EVENT_KEY:PLUGIN`, the same on every attempt of a delivery, so the API
/// called can drop a repeat (a delivery runs at least once).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A manifest's `[http]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpManifest {
    /// `scheme://host[:port]` entries, Spin's format; empty denies all.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    pub timeout_ms: Option<u64>,
    pub max_request_kib: Option<u64>,
    pub max_response_kib: Option<u64>,
    pub max_requests: Option<u32>,
}

/// What one plugin may do over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    pub allowed: Vec<AllowedHost>,
    /// The operator's choice: may a host the manifest names exactly resolve
    /// to a private address?
    pub allow_private: bool,
    pub timeout: Duration,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub max_requests: u32,
}

impl Default for HttpGrant {
    /// No host at all.
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            allow_private: false,
            timeout: DEFAULT_HTTP_TIMEOUT,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_requests: DEFAULT_MAX_REQUESTS,
        }
    }
}

impl HttpManifest {
    /// The grant this section asks for under the operator's `policy`,
    /// refused (naming the key) when an entry is malformed or a value is
    /// above the policy's maximum.
    pub fn grant(&self, policy: &HttpPolicy) -> Result<HttpGrant, String> {
        fn within<T: Ord + std::fmt::Display>(
            key: &str,
            asked: Option<T>,
            default: T,
            max: T,
        ) -> Result<T, String> {
            match asked {
                Some(v) if v > max => Err(format!("http.{key} = {v} is above the maximum, {max}")),
                Some(v) => Ok(v),
                None => Ok(default.min(max)),
            }
        }
        let allowed = self
            .allowed_hosts
            .iter()
            .map(|entry| AllowedHost::parse(entry).map_err(|e| format!("http.{e}")))
            .collect::<Result<_, _>>()?;
        let millis = |d: Duration| d.as_millis() as u64;
        let kib = |bytes: u64| bytes >> 10;
        Ok(HttpGrant {
            allowed,
            allow_private: policy.allow_private_networks,
            timeout: Duration::from_millis(within(
                "timeout_ms",
                self.timeout_ms,
                millis(DEFAULT_HTTP_TIMEOUT),
                millis(policy.max_timeout),
            )?),
            max_request_bytes: within(
                "max_request_kib",
                self.max_request_kib,
                kib(DEFAULT_MAX_REQUEST_BYTES),
                kib(policy.max_request_bytes),
            )? << 10,
            max_response_bytes: within(
                "max_response_kib",
                self.max_response_kib,
                kib(DEFAULT_MAX_RESPONSE_BYTES),
                kib(policy.max_response_bytes),
            )? << 10,
            max_requests: within(
                "max_requests",
                self.max_requests,
                DEFAULT_MAX_REQUESTS,
                policy.max_requests,
            )?,
        })
    }
}

/// One call's outbound HTTP: its grant, deadline and request budget, and
/// in a dry run the stub that answers in the network's place.
pub(crate) struct Egress {
    grant: Arc<HttpGrant>,
    deadline: Instant,
    requests_left: u32,
    pub(crate) tag: CallTag,
    /// A dry run's stub and the record of what it answered; `None` live.
    stub: Option<(Arc<HttpStub>, Recorder)>,
}

impl Egress {
    /// `stub`: answer every admitted request from it, sending nothing, and
    /// record each request with these secrets (the plugin's configuration
    /// read from the environment) redacted.
    pub(crate) fn new(
        grant: Arc<HttpGrant>,
        deadline: Instant,
        tag: CallTag,
        stub: Option<(Arc<HttpStub>, Secrets)>,
    ) -> Self {
        let requests_left = grant.max_requests;
        Self {
            grant,
            deadline,
            requests_left,
            tag,
            stub: stub.map(|(stub, secrets)| (stub, Recorder::new(secrets))),
        }
    }

    /// The requests a dry run made (none for a live call).
    pub(crate) fn recorded(&self) -> Vec<stub::RecordedRequest> {
        self.stub
            .as_ref()
            .map_or_else(Vec::new, |(_, recorder)| recorder.take())
    }

    /// Where a request may go, or why not. Logs a refusal, and in a dry run
    /// records it.
    fn admit(&mut self, request: &Request<WasiBody>) -> Result<Target, Error> {
        let admitted = self.check(request);
        if let (Err((_, why)), Some((_, recorder))) = (&admitted, &self.stub) {
            recorder.refused(request, why);
        }
        admitted.map_err(|(error, _)| error)
    }

    fn check(&mut self, request: &Request<WasiBody>) -> Result<Target, (Error, &'static str)> {
        let uri = request.uri();
        let scheme = match uri.scheme() {
            Some(s) if *s == UriScheme::HTTPS => Scheme::Https,
            Some(s) if *s == UriScheme::HTTP => Scheme::Http,
            _ => return Err((Error::HttpProtocolError, "neither http nor https")),
        };
        let host = uri
            .host()
            .ok_or((Error::HttpRequestUriInvalid, "no host"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        let denied = |why: &'static str| {
            // A dry run's refusals are in its record, not the host log.
            if !self.tag.dry {
                tracing::warn!(
                    plugin = %self.tag.plugin, event = %escape_controls(&self.tag.event),
                    host = %escape_controls(&host), port, "outbound request denied: {why}"
                );
            }
            Err((Error::HttpRequestDenied, why))
        };
        if !self
            .grant
            .allowed
            .iter()
            .any(|entry| entry.matches(scheme, &host, port))
        {
            return denied("not in the manifest's [http] allowed_hosts");
        }
        if self.requests_left == 0 {
            return denied("the call used its [http] max_requests");
        }
        self.requests_left -= 1;
        let private_ok =
            self.grant.allow_private && self.grant.allowed.iter().any(|e| e.names(&host));
        Ok(Target {
            scheme,
            host,
            port,
            private_ok,
        })
    }
}

/// An admitted request's destination.
struct Target {
    scheme: Scheme,
    host: String,
    port: u16,
    /// May it reach a private address?
    private_ok: bool,
}

type Sent = Result<
    (
        Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        mut request: Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let admitted = self.admit(&request);
        let key = self.tag.delivery_key();
        if let Ok(value) = HeaderValue::from_str(&key) {
            request
                .headers_mut()
                .entry(IDEMPOTENCY_HEADER)
                .or_insert(value);
        }
        let grant = self.grant.clone();
        // The request's own time, never past the call's deadline; the
        // guest's request options may not lengthen it.
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let until = Instant::now() + grant.timeout.min(remaining);
        let plugin = self.tag.plugin.clone();
        if let Some((stub, recorder)) = self.stub.clone() {
            return Box::new(async move {
                admitted?;
                let limit = grant.max_request_bytes;
                let over = Error::HttpRequestBodySize(Some(limit));
                let request = request.map(|body| Bounded::new(body, limit, until.into(), over));
                let response = recorder.answer(&stub, request).await?;
                let io: Box<dyn Future<Output = Result<(), Error>> + Send> =
                    Box::new(async { Ok(()) });
                Ok((response, io))
            });
        }
        Box::new(async move {
            let target = admitted?;
            let sent = send(request, &target, &grant, until.into()).await;
            if let Err(error) = &sent {
                tracing::debug!(%plugin, host = %target.host, "outbound request failed: {error}");
            }
            sent
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Resolve, check, connect, and send one request, all by `until`.
async fn send(
    mut request: Request<WasiBody>,
    target: &Target,
    grant: &HttpGrant,
    until: tokio::time::Instant,
) -> Sent {
    let timed = |error: Error| move |_| error;
    let addrs = tokio::time::timeout_at(until, resolve(target))
        .await
        .map_err(timed(Error::DnsTimeout))??;
    let tcp = tokio::time::timeout_at(until, TcpStream::connect(&addrs[..]))
        .await
        .map_err(timed(Error::ConnectionTimeout))?
        .map_err(Error::Connect)?;
    let stream: Box<dyn Stream> = match target.scheme {
        Scheme::Http => Box::new(tcp),
        Scheme::Https => {
            let name = match target.host.parse::<IpAddr>() {
                Ok(ip) => rustls::pki_types::ServerName::from(ip),
                Err(_) => rustls::pki_types::ServerName::try_from(target.host.clone())?,
            };
            let tls = tokio_rustls::TlsConnector::from(TLS.clone()).connect(name, tcp);
            Box::new(
                tokio::time::timeout_at(until, tls)
                    .await
                    .map_err(timed(Error::ConnectionTimeout))?
                    .map_err(Error::Tls)?,
            )
        }
    };
    let handshake = hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream));
    let (mut sender, conn) = tokio::time::timeout_at(until, handshake)
        .await
        .map_err(timed(Error::ConnectionTimeout))??;
    // The request line carries the path only (the host is in `Host`).
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| Error::HttpRequestUriInvalid)?;
    let request = request.map(|body| {
        let limit = grant.max_request_bytes;
        Bounded::new(body, limit, until, Error::HttpRequestBodySize(Some(limit))).boxed_unsync()
    });

    // The response, while the connection's I/O is driven beside it.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let response = tokio::time::timeout_at(until, async {
        let send = sender.send_request(request);
        tokio::pin!(send);
        loop {
            tokio::select! {
                response = &mut send => break response.map_err(hyper_error),
                ended = &mut conn, if !conn_done => {
                    conn_done = true;
                    ended.map_err(hyper_error)?;
                }
            }
        }
    })
    .await
    .map_err(timed(Error::HttpResponseTimeout))??;
    let limit = grant.max_response_bytes;
    // A declared length past the cap fails before any byte is read.
    if response.body().size_hint().lower() > limit {
        return Err(Error::HttpResponseBodySize(Some(limit)));
    }
    let response = response.map(|body| {
        Bounded::new(body, limit, until, Error::HttpResponseBodySize(Some(limit))).boxed_unsync()
    });
    let io = async move {
        if !conn_done {
            tokio::time::timeout_at(until, conn)
                .await
                .map_err(|_| Error::HttpResponseTimeout)??;
        }
        Ok(())
    };
    Ok((response, Box::new(io)))
}

/// A failed exchange's error code: the one a bounded body ended with (a
/// request body over its cap, say) when that is the cause, else hyper's.
fn hyper_error(error: hyper::Error) -> Error {
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        match inner.downcast_ref::<Error>() {
            Some(Error::HttpRequestBodySize(limit)) => return Error::HttpRequestBodySize(*limit),
            Some(Error::ConnectionReadTimeout) => return Error::ConnectionReadTimeout,
            _ => {}
        }
        cause = inner.source();
    }
    Error::from(error)
}

/// The addresses to connect to: the host's own if it is an IP literal, else
/// what the name resolves to; in either case only the allowed ones.
async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, Error> {
    let found: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|_| Error::DestinationNotFound)?
            .collect(),
    };
    let allowed: Vec<SocketAddr> = found
        .iter()
        .copied()
        .filter(|addr| target.private_ok || !is_private(addr.ip()))
        .collect();
    if allowed.is_empty() {
        tracing::warn!(
            host = %target.host, addresses = ?found,
            "outbound request denied: the host resolves only to private addresses"
        );
        return Err(Error::DestinationIpProhibited);
    }
    Ok(allowed)
}

/// TLS with the web's public roots (no system store, no client certificate).
static TLS: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
});

/// A body cut at `limit` bytes and at `until`: the error it ends with says
/// which.
pub(crate) struct Bounded<B> {
    inner: B,
    left: u64,
    over: Option<Error>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Bounded<B> {
    fn new(inner: B, limit: u64, until: tokio::time::Instant, over: Error) -> Self {
        Self {
            inner,
            left: limit,
            over: Some(over),
            deadline: Box::pin(tokio::time::sleep_until(until)),
        }
    }
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    this.left = 0;
                    let over = this.over.take().unwrap_or(Error::HttpProtocolError);
                    return Poll::Ready(Some(Err(over)));
                }
                this.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
