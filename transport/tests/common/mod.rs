//! Helpers shared by the integration tests: loopback endpoints with bounded
//! waits.
#![allow(dead_code)]

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Duration;

use statecast_transport::{TlsConfig, client_endpoint, server_endpoint};

/// Longest any single network step may take before a test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {STEP:?}"),
    }
}

/// A server endpoint on 127.0.0.1 with `tls`, accepting `alpn`.
pub fn server(tls: &TlsConfig, alpn: &[&[u8]]) -> (quinn::Endpoint, SocketAddr) {
    let endpoint = server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls.server_config(alpn).unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

/// Connects to `addr` as `server_name` with `tls`, offering `alpn`.
pub async fn connect(
    tls: &TlsConfig,
    alpn: &[&[u8]],
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(tls.client_config(alpn).unwrap(), addr, server_name)
        .unwrap();
    within("client handshake", connecting).await
}

/// Accepts one connection on `endpoint` and completes its handshake.
pub async fn accept(
    endpoint: &quinn::Endpoint,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let incoming = within("accept", endpoint.accept())
        .await
        .expect("endpoint closed");
    within("server handshake", incoming.into_future()).await
}

/// The ALPN protocol a connection agreed on.
pub fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}
