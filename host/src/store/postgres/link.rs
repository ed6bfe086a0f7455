//! Connections to PostgreSQL: how a host reaches the server ([`PgOptions`]),
//! connections that come back after the server restarts ([`Link`]), the
//! pool the store's work shares ([`Pool`]), the `LISTEN` connection that
//! wakes the poller ([`listen`]) and TLS (rustls, verified).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;
use tokio_postgres::Client;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::super::StoreError;

/// Connections for claims, recorded attempts and reads, by default: the
/// host opens three more (group-committed appends, lease renewal, `LISTEN`).
pub const DEFAULT_POOL_SIZE: usize = 4;

/// How long one statement may run before the server cancels it (the
/// request then fails as busy: 503 with `Retry-After`).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a delivery is one host's once that host appended it or read it
/// due: past it (the host died, or stalled), any host may run it. Longer
/// than any call's deadline and its wait in the queue.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

/// How a host uses a PostgreSQL store (`--store URL` and the `--store-*`
/// flags). Its `Debug` leaves the password out.
#[derive(Clone)]
pub struct PgOptions {
    config: tokio_postgres::Config,
    /// Connections for claims, recorded attempts and reads.
    pub pool_size: usize,
    /// The server cancels a statement running longer (`statement_timeout`).
    pub statement_timeout: Duration,
    /// How long a delivery this host appended or claimed stays its own.
    pub lease: Duration,
    /// Certificates (PEM) trusted for the server's TLS besides the web's
    /// public roots: a private CA, or the server's own self-signed one.
    pub ca_file: Option<PathBuf>,
    /// Every transaction read-only ([`super::PgStore::open_read_only`]).
    pub(super) read_only: bool,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("lease", &self.lease)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    /// `url` is `postgres://user:password@host:port/database` (or libpq's
    /// `key=value` form); `sslmode=disable|prefer|require` as libpq has it,
    /// `prefer` by default. The error never repeats the URL (it may hold a
    /// password).
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                StoreError::Failed(format!("the PostgreSQL URL does not parse: {e}"))
            })?;
        // A server that stops answering (a partition, not a refusal) is
        // noticed in seconds, not at the kernel's TCP timeouts: requests get
        // 503 rather than hang. The URL's own settings win.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        #[cfg(target_os = "linux")]
        config.tcp_user_timeout(Duration::from_secs(30));
        Ok(Self {
            config,
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lease: DEFAULT_LEASE,
            ca_file: None,
            read_only: false,
        })
    }

    /// Open one connection: TLS when the server offers it (or `sslmode`
    /// requires it) with the certificate verified, the statement timeout
    /// set. The connection's task lives on the current runtime.
    pub(super) async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self.open().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "the PostgreSQL connection ended");
            }
        });
        self.prepare(&client).await?;
        Ok(client)
    }

    async fn open(&self) -> Result<(Client, Connection), StoreError> {
        let tls = RustlsConnect(self.tls()?);
        self.config.connect(tls).await.map_err(super::classify)
    }

    async fn prepare(&self, client: &Client) -> Result<(), StoreError> {
        let ms = self.statement_timeout.as_millis();
        let read_only = if self.read_only { "on" } else { "off" };
        client
            .batch_execute(&format!(
                "SET statement_timeout = {ms}; SET default_transaction_read_only = {read_only}"
            ))
            .await
            .map_err(super::classify)
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, StoreError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        if let Some(file) = &self.ca_file {
            let unreadable = |e: &dyn std::fmt::Display| {
                StoreError::Failed(format!(
                    "the store's CA file {} is not readable PEM: {e}",
                    file.display()
                ))
            };
            for cert in CertificateDer::pem_file_iter(file).map_err(|e| unreadable(&e))? {
                roots
                    .add(cert.map_err(|e| unreadable(&e))?)
                    .map_err(|e| unreadable(&e))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Failed(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

type Connection = tokio_postgres::Connection<tokio_postgres::Socket, RustlsStream>;

/// A connection that comes back: each use checks it, and a closed one (the
/// server restarted, the network dropped) is replaced. While the server is
/// unreachable, uses fail at once as busy (the sender gets 503 with
/// `Retry-After`; workers leave deliveries pending) and a new connection is
/// tried at most once a second. The loss and the recovery are logged once
/// each.
pub(super) struct Link {
    options: Arc<PgOptions>,
    client: Arc<Mutex<Option<Client>>>,
    /// When connecting last failed; `None` while connected.
    down_since: std::sync::Mutex<Option<Instant>>,
}

pub(super) type LinkGuard = tokio::sync::OwnedMappedMutexGuard<Option<Client>, Client>;

/// How long an unreachable server is left alone between tries.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

impl Link {
    pub(super) async fn open(options: &Arc<PgOptions>) -> Result<Self, StoreError> {
        Ok(Self {
            options: options.clone(),
            client: Arc::new(Mutex::new(Some(options.connect().await?))),
            down_since: std::sync::Mutex::new(None),
        })
    }

    pub(super) async fn lock(&self) -> Result<LinkGuard, StoreError> {
        let mut slot = self.client.clone().lock_owned().await;
        if slot.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!("the PostgreSQL connection closed; reconnecting");
            *slot = None;
        }
        if slot.is_none() {
            let since = *self.down_since.lock().expect("link lock");
            if since.is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF) {
                return Err(StoreError::Busy("PostgreSQL is unreachable".into()));
            }
            match self.options.connect().await {
                Ok(client) => {
                    tracing::info!("PostgreSQL connection open again");
                    *self.down_since.lock().expect("link lock") = None;
                    *slot = Some(client);
                }
                Err(error) => {
                    *self.down_since.lock().expect("link lock") = Some(Instant::now());
                    return Err(StoreError::Busy(format!(
                        "PostgreSQL is unreachable: {error}"
                    )));
                }
            }
        }
        Ok(tokio::sync::OwnedMutexGuard::map(slot, |slot| {
            slot.as_mut().expect("connected above")
        }))
    }
}

/// [`PgOptions::pool_size`] connections, each taken in turn.
pub(super) struct Pool {
    links: Vec<Arc<Link>>,
    next: AtomicUsize,
}

impl Pool {
    pub(super) async fn open(options: &Arc<PgOptions>) -> Result<Self, StoreError> {
        let mut links = Vec::with_capacity(options.pool_size);
        for _ in 0..options.pool_size.max(1) {
            links.push(Arc::new(Link::open(options).await?));
        }
        Ok(Self {
            links,
            next: AtomicUsize::new(0),
        })
    }

    /// The next connection: one free now if there is one, else the next in
    /// turn (its user waits for it).
    pub(super) fn get(&self) -> Arc<Link> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.links.len();
        (0..n)
            .map(|i| &self.links[(start + i) % n])
            .find(|link| link.client.try_lock().is_ok())
            .unwrap_or(&self.links[start % n])
            .clone()
    }
}

/// A connection `LISTEN`ing on `channel`: each notification is a wake-up
/// for the poller. When it is lost it is opened again (once a second) and
/// the poller woken, since work may have come due meanwhile. Returns once
/// listening; the relay runs on the current runtime until `wake`'s receiver
/// is dropped.
pub(super) async fn listen(
    options: Arc<PgOptions>,
    channel: &'static str,
    wake: std::sync::mpsc::Sender<()>,
) -> Result<(), StoreError> {
    let mut relay = listen_once(&options, channel, wake.clone()).await?;
    tokio::spawn(async move {
        loop {
            // Ends with the connection, or when nobody listens any more.
            if !relay.await.unwrap_or(false) {
                return;
            }
            tracing::warn!("the PostgreSQL listening connection closed; reconnecting");
            relay = loop {
                tokio::time::sleep(RECONNECT_BACKOFF).await;
                if let Ok(relay) = listen_once(&options, channel, wake.clone()).await {
                    break relay;
                }
            };
            tracing::info!("PostgreSQL listening connection open again");
            if wake.send(()).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// One listening connection; the task resolves `true` when the connection
/// closed, `false` when the receiver is gone.
async fn listen_once(
    options: &PgOptions,
    channel: &str,
    wake: std::sync::mpsc::Sender<()>,
) -> Result<tokio::task::JoinHandle<bool>, StoreError> {
    let (client, mut connection) = options.open().await?;
    let relay = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    if wake.send(()).is_err() {
                        return false;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return true,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .map_err(super::classify)?;
    // The connection lives while its client does: as long as the relay.
    Ok(tokio::spawn(async move {
        let closed = relay.await.unwrap_or(true);
        drop(client);
        closed
    }))
}

/// rustls for tokio-postgres: the server's certificate is verified against
/// the web's public roots and the operator's CA file, for the host name in
/// the URL.
#[derive(Clone)]
struct RustlsConnect(Arc<rustls::ClientConfig>);

struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    /// `None` for a host that is no TLS name (a Unix socket's directory,
    /// over which TLS is never asked for).
    name: Option<ServerName<'static>>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnector;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        Ok(RustlsConnector {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_owned()).ok(),
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the store's host is not a name TLS can verify",
                )
            })?;
            let stream = connector.connect(name, stream).await?;
            Ok(RustlsStream(Box::pin(stream)))
        })
    }
}

/// A TLS stream over any socket tokio-postgres opens (TCP or Unix).
struct RustlsStream(Pin<Box<dyn Io>>);

trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    /// SCRAM authenticates without channel binding (`SCRAM-SHA-256`, not
    /// `-PLUS`); the certificate check above is what binds the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
