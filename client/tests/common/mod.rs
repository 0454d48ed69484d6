//! What several client tests need: a real origin and relay in-process on
//! loopback, sharing one development CA, and a client endpoint that trusts
//! it.

use std::net::SocketAddr;

use statecast_client::session;

/// An origin (plaza, 4 avatars) and one relay subscribed to it, plus a
/// client endpoint. Dropping it stops nothing gracefully: call
/// [`Stack::stop`].
pub struct Stack {
    pub origin: origin::OriginHandle,
    pub relay: relay::RelayHandle,
    pub endpoint: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

/// Starts the stack; `relay` is the relay's configuration before the
/// addresses (loopback, any port), upstream and data directory are filled
/// in.
pub async fn stack(relay: relay::Config) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut origin_config = origin::Config {
        world: "plaza".into(),
        avatars: Some(4),
        listen: local,
        admin: local,
        ..origin::Config::default()
    };
    origin_config.tls.data_dir = Some(dir.path().to_path_buf());
    let origin = origin::start(origin_config).await.expect("origin starts");
    let relay = relay::start(relay::Config {
        listen: local,
        admin: local,
        upstream: origin.upstream_addr,
        data_dir: Some(dir.path().to_path_buf()),
        ..relay
    })
    .await
    .expect("relay starts");
    let trust = transport::Trust::dev(dir.path());
    let tls = tokio::task::spawn_blocking(move || trust.load())
        .await
        .unwrap()
        .unwrap();
    let endpoint = session::endpoint(&tls, local).unwrap();
    Stack {
        origin,
        relay,
        endpoint,
        _dir: dir,
    }
}

impl Stack {
    /// Waits for the endpoint's connections to close, then stops the relay
    /// and the origin.
    pub async fn stop(self) {
        self.endpoint.wait_idle().await;
        self.relay.shutdown().await;
        drop(self.origin);
    }
}
