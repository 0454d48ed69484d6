//! The internal admin listener: metrics and health over plain HTTP/1.1.
//!
//! | path | answer |
//! | --- | --- |
//! | `/metrics` | the registry in Prometheus text format (`text/plain; version=0.0.4`) |
//! | `/healthz` | 200 `ok` while the process runs (liveness) |
//! | `/readyz` | 200 `ready` once [`Readiness::set_ready`]`(true)`, 503 `not ready` before and while draining |
//! | other | 404 |
//!
//! Only `GET` and `HEAD` are served (405 otherwise). This listener belongs on
//! an internal address, never on the data port: it has no authentication.
//! It holds at most [`MAX_CONNECTIONS`] connections and drops a connection
//! that does not send its request head within [`HEADER_TIMEOUT`], so a
//! misbehaving scraper cannot pin it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections the admin listener holds at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a connection has to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time in-flight admin requests get to finish after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Whether the process is ready for traffic, as `/readyz` reports it.
/// Clones share one flag. Starts not ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts not ready.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Marks the process ready (after start-up) or not (while draining).
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl From<Arc<AtomicBool>> for Readiness {
    fn from(flag: Arc<AtomicBool>) -> Readiness {
        Readiness(flag)
    }
}

struct State {
    registry: Registry,
    readiness: Readiness,
}

/// Binds the admin listener on `addr` (port 0 picks one) and serves it until
/// `shutdown` completes; then it stops accepting and gives requests in flight
/// [`SHUTDOWN_GRACE`] to finish. Returns the bound address and the task,
/// which ends after shutdown.
///
/// Must be called inside a Tokio runtime.
pub async fn serve<F>(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: F,
) -> io::Result<(SocketAddr, JoinHandle<()>)>
where
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "admin HTTP listening (/metrics, /healthz, /readyz)");
    let state = Arc::new(State {
        registry,
        readiness,
    });
    let task = tokio::spawn(accept_loop(listener, state, shutdown));
    Ok((local, task))
}

async fn accept_loop<F>(listener: TcpListener, state: Arc<State>, shutdown: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather
                // than spin on the error.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin listener full; closing connection");
            continue;
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&state, &req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections still open after the shutdown grace period");
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => metrics(&state.registry),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ if state.readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 << 10);
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            resp.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
