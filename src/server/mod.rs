//! The HTTP server of `cdp run`: where realtime data enters (the
//! Segment-compatible [`collector`]) and where operators look inside a
//! running platform (the [`admin`] API, `/healthz`, `/readyz`,
//! `/metrics`). It runs on the runtime's tokio, under the supervisor's
//! cancellation, and follows manifest reloads: write keys, source maps and
//! admin tokens change live; the listen address and TLS files are read
//! once at start.
//!
//! Connections are served by hyper directly (not `axum::serve`) so that
//! slow clients are bounded: a connection must send its request head
//! within [`HEADER_TIMEOUT`], and a request must be answered within
//! [`REQUEST_TIMEOUT`], or it is closed.

pub mod admin;
pub mod auth;
pub mod collector;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runtime::Snapshot;
use crate::store::Store;

/// A connection must send its request head within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (body included) must be answered within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS handshake must finish within this.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections are served at once; more wait in the
/// kernel's accept queue.
const MAX_CONNECTIONS: usize = 16_384;

/// What the admin API asks the supervisor to do.
#[derive(Debug)]
pub enum Control {
    /// Run a source sync now (its lease keeps it from running twice).
    RunSync { name: String, reply: tokio::sync::oneshot::Sender<Result<(), RunRefused>> },
    /// Reload the manifest from disk.
    Reload,
}

/// Why a sync could not be started now.
#[derive(Debug)]
pub enum RunRefused {
    /// Not a plugin source of the running manifest.
    Unknown(String),
    /// Running already (here or in another process).
    Busy(String),
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub collector: collector::Handle,
    pub metrics: Option<PrometheusHandle>,
    pub control: mpsc::Sender<Control>,
}

impl AppState {
    /// The manifest running now.
    pub fn snap(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }
}

/// A bound server, not yet serving.
pub struct Bound {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub addr: SocketAddr,
}

impl Bound {
    /// Binds `listen` and, when the manifest asks for TLS, loads its
    /// certificate and key.
    pub async fn bind(listen: &str, snap: &Snapshot) -> Result<Bound> {
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!(
                "cannot listen on {listen}; set `server.listen` in the manifest or `cdp run --listen HOST:PORT` \
                 (port 0 picks a free one)"
            )
        })?;
        let addr = listener.local_addr()?;
        let tls = match &snap.manifest.server.tls {
            Some(t) => Some(tls_acceptor(&snap.base.join(&t.cert), &snap.base.join(&t.key))?),
            None => None,
        };
        Ok(Bound { listener, tls, addr })
    }

    /// Whether this server speaks HTTPS.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Serves until `cancel`, then stops accepting and lets open requests
    /// finish.
    pub async fn serve(self, state: AppState, cancel: CancellationToken) {
        let app = router(state);
        let conns = TaskTracker::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tracing::info!(addr = %self.addr, scheme = self.scheme(), "HTTP server listening");
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = cancel.cancelled() => break,
            };
            let (tcp, peer) = tokio::select! {
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = cancel.cancelled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let app = app.clone();
            let tls = self.tls.clone();
            let cancel = cancel.clone();
            conns.spawn(async move {
                let _permit = permit;
                match tls {
                    None => serve_conn(TokioIo::new(tcp), app, cancel).await,
                    Some(acceptor) => match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_conn(TokioIo::new(stream), app, cancel).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    },
                }
            });
        }
        conns.close();
        if tokio::time::timeout(REQUEST_TIMEOUT, conns.wait()).await.is_err() {
            tracing::warn!("some HTTP connections were still open at shutdown");
        }
    }
}

async fn serve_conn<I>(io: TokioIo<I>, app: Router, cancel: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn).await;
        }
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(collector::routes())
        .merge(admin::routes(state.clone()))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(observe))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(state)
}

/// Answers 503 when a request takes longer than [`REQUEST_TIMEOUT`] (a
/// client that sends its body slowly, or a store that does not answer).
async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(StatusCode::REQUEST_TIMEOUT, "the request was not completed in time; send it again"),
    }
}

/// Counts and times every request by its route pattern (never its path:
/// paths hold identifiers).
async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(crate::metrics::HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    res
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the store answers and a manifest is applied.
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, format!("ok: manifest {}\n", &state.snap().sha256[..12])).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("the store does not answer: {e}")),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are not recorded in this process"),
    }
}

/// A JSON error body: `{"success": false, "code": STATUS, "message": "..."}`
/// (RudderStack's SDKs read `code`).
pub fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({"success": false, "code": status.as_u16(), "message": message})))
        .into_response()
}
