//! # statecast-transport: the network plumbing every node shares
//!
//! Origin, relay and client all speak QUIC with TLS 1.3 and all expose the
//! same admin HTTP; this crate holds that plumbing once, so they stay thin
//! and agree on every detail. Protocol logic is not here: messages and their
//! encodings live in `proto`, and this crate only moves their bytes.
//!
//! ## The model
//!
//! 1. **Trust** ([`tls`]). At start-up a process picks a [`Trust`]: PEM
//!    files (`--cert`, `--key`, `--ca`) in production, or, with no
//!    certificate flags, a development CA in the data directory that the
//!    first process creates and every later one reuses, so processes on one
//!    machine trust each other and nothing else. It logs
//!    [`Trust::describe`] and calls [`Trust::load`], which gives a
//!    [`TlsConfig`].
//! 2. **QUIC** ([`quic`]). [`TlsConfig::server_config`] and
//!    [`TlsConfig::client_config`] build quinn configurations (TLS 1.3 only,
//!    ring, the ALPN of the link: [`ALPN_CLIENT`] between clients and
//!    relays, [`ALPN_UPSTREAM`] between relays and their upstream) carrying
//!    one [`TransportTuning`]. [`server_endpoint`] and [`client_endpoint`]
//!    bind UDP sockets with large kernel buffers and say when the kernel
//!    caps them.
//! 3. **Messages** ([`framed`]). [`FramedRecv`] and [`FramedSend`] carry
//!    `proto::Message` frames over QUIC streams with a size limit per
//!    stream; [`send_datagram`] and [`read_datagram`] carry one message per
//!    datagram.
//! 4. **Feed** ([`feed`]). The upstream protocol (ALPN
//!    [`ALPN_UPSTREAM`]): [`feed::serve`] publishes worlds' ticks to
//!    subscribers, latest wins, and [`Subscription`] receives and verifies
//!    them; origin → relay and relay → relay alike.
//! 5. **Admin** ([`admin`]). [`admin::serve`] runs `/metrics`, `/healthz`
//!    and `/readyz` on an internal listener, never on the data port.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use statecast_transport::{ALPN_CLIENT, Trust, server_endpoint};
//!
//! let trust = Trust::from_flags(None, None, None, None);
//! tracing::info!("trust: {}", trust.describe());
//! let tls = trust.load()?;
//! let endpoint = server_endpoint("[::]:4433".parse()?, tls.server_config(&[ALPN_CLIENT])?)?;
//! while let Some(incoming) = endpoint.accept().await {
//!     let conn = incoming.await?;
//!     // hand `conn` to the session logic
//! #   drop(conn);
//! }
//! # Ok(())
//! # }
//! ```

pub mod admin;
pub mod feed;
pub mod framed;
pub mod quic;
pub mod tls;

pub use admin::Readiness;
pub use feed::{
    FeedError, FeedStats, FeedTick, PublisherConfig, Source, Subscription, WorldInfo, Worlds,
};
pub use framed::{
    FrameError, FramedRecv, FramedSend, read_datagram, read_message, send_datagram, write_message,
};
pub use quic::{
    SocketBuffers, SocketOptions, TransportTuning, bind_udp, client_endpoint, server_endpoint,
    server_endpoint_with,
};
pub use tls::{DevCa, TlsConfig, TlsError, Trust, default_data_dir};

/// ALPN of the link between clients and relays.
pub const ALPN_CLIENT: &[u8] = b"statecast/1";

/// ALPN of the link between a relay and its upstream (the origin or a parent
/// relay).
pub const ALPN_UPSTREAM: &[u8] = b"statecast-up/1";
