//! The origin server: a world's tick loop, the upstream feed that relays
//! subscribe to, and the admin HTTP listener.
//!
//! [`start`] brings everything up and returns an [`OriginHandle`] (for tests,
//! tools and the demo); [`run`] starts and then serves until its shutdown
//! future resolves (for `statecast origin`).
//!
//! | part | where | what |
//! | --- | --- | --- |
//! | tick loop | its own thread | [`crate::tick`]: inputs, step, snapshot, hash, publish |
//! | feed | `listen`, QUIC, ALPN statecast-up/1 | [`transport::feed::serve`]: relays subscribe, get ticks, send inputs |
//! | admin | `admin`, HTTP | `/metrics` (`statecast_origin_*`), `/healthz`, `/readyz` (ready once the first tick is out) |
//!
//! Each relay subscription gets its own input channel; a task forwards its
//! batches to the tick loop tagged with the subscription, and tells the loop
//! when the subscription ends, so the sessions that came through that relay
//! leave the world.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;

use proto::ErrorCode;
use proto::msg::InputBatch;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use transport::feed::{self, FeedStats, FeedTick, OpenFuture, Source, WorldInfo, Worlds};
use transport::{ALPN_UPSTREAM, Readiness};

use crate::config::Config;
use crate::sim::Simulation;
use crate::tick::{Event, TickLoop, TickMetrics};
use crate::worlds::{self, UnknownWorld};

/// Input batches a relay subscription may queue before the publisher drops
/// new ones (a few ticks of a busy relay).
pub const SUBSCRIPTION_INPUT_QUEUE: usize = 64;

/// Events (input batches, ended subscriptions) queued for the tick loop.
pub const EVENT_QUEUE: usize = 4096;

/// Why an origin could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No built-in world has the configured name.
    #[error(transparent)]
    UnknownWorld(#[from] UnknownWorld),
    /// The world could not be built or described.
    #[error("cannot build the world: {0}")]
    World(String),
    /// Certificates could not be loaded or made.
    #[error("TLS: {0}")]
    Tls(#[from] transport::TlsError),
    /// The upstream QUIC listener could not be bound.
    #[error("cannot listen for relays on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The admin HTTP listener could not be bound.
    #[error("cannot serve admin HTTP on {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The tick loop could not start, or died.
    #[error("tick loop: {0}")]
    TickLoop(String),
}

/// The built-in world that `config` names, with its seed (and avatars, for
/// plaza).
pub fn build_world(config: &Config) -> Result<Box<dyn Simulation>, OriginError> {
    match (config.world.as_str(), config.avatars) {
        ("plaza", Some(avatars)) => {
            let plaza = worlds::plaza::Plaza::try_new(worlds::plaza::PlazaConfig {
                avatars,
                seed: config.seed,
                ..worlds::plaza::PlazaConfig::default()
            })
            .map_err(|e| OriginError::World(e.to_string()))?;
            Ok(Box::new(plaza))
        }
        (name, _) => Ok(worlds::by_name(name, config.seed)?),
    }
}

/// A running origin. Stop it with [`OriginHandle::shutdown`]; dropping it
/// stops it too, without waiting.
#[derive(Debug)]
pub struct OriginHandle {
    /// Where relays subscribe (QUIC, ALPN statecast-up/1).
    pub upstream_addr: SocketAddr,
    /// The admin HTTP listener.
    pub admin_addr: SocketAddr,
    /// The world served.
    pub world: WorldInfo,
    ticks: watch::Receiver<Option<Arc<FeedTick>>>,
    stats: Arc<FeedStats>,
    registry: prometheus::Registry,
    stop: watch::Sender<bool>,
    tick_stop: Option<std_mpsc::Sender<()>>,
    tick_thread: Option<std::thread::JoinHandle<()>>,
    serve: Option<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
}

impl OriginHandle {
    /// The newest tick, as the feed publishes it (`None` before the first).
    pub fn ticks(&self) -> watch::Receiver<Option<Arc<FeedTick>>> {
        self.ticks.clone()
    }

    /// The feed's counters.
    pub fn stats(&self) -> &Arc<FeedStats> {
        &self.stats
    }

    /// The metrics registry `/metrics` serves.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Stops accepting relays, sends subscribed relays a goaway, stops the
    /// tick loop and the admin listener, and waits for all of it. Problems
    /// (a tick loop that panicked) are logged.
    pub async fn shutdown(self) {
        if let Err(e) = self.finish().await {
            tracing::error!(error = %e, "origin stopped with an error");
        }
    }

    async fn finish(mut self) -> Result<(), OriginError> {
        self.stop.send_replace(true);
        if let Some(serve) = self.serve.take() {
            let _ = serve.await;
        }
        drop(self.tick_stop.take());
        if let Some(admin) = self.admin.take() {
            let _ = admin.await;
        }
        if let Some(thread) = self.tick_thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| OriginError::TickLoop(e.to_string()))?;
            if let Err(panic) = joined {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                return Err(OriginError::TickLoop(format!("panicked: {what}")));
            }
        }
        tracing::info!("origin stopped");
        Ok(())
    }
}

impl Drop for OriginHandle {
    fn drop(&mut self) {
        // Without `shutdown`: tell everything to stop, wait for nothing.
        self.stop.send_replace(true);
    }
}

/// The feed's view of the origin: one world, a fresh input channel per
/// subscription.
struct OriginWorlds {
    info: WorldInfo,
    ticks: watch::Receiver<Option<Arc<FeedTick>>>,
    events: mpsc::Sender<Event>,
    next_subscription: AtomicU64,
}

impl Worlds for OriginWorlds {
    fn open(&self, world: &str) -> OpenFuture<'_> {
        if world != self.info.world {
            let refusal = (
                ErrorCode::UnknownWorld,
                format!(
                    "this origin serves world {:?}, not {world:?}",
                    self.info.world
                ),
            );
            return Box::pin(std::future::ready(Err(refusal)));
        }
        let from = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let (inputs, mut batches) = mpsc::channel::<InputBatch>(SUBSCRIPTION_INPUT_QUEUE);
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                if events.send(Event::Inputs { from, batch }).await.is_err() {
                    return;
                }
            }
            // Every sender is gone: the subscription ended.
            let _ = events.send(Event::Gone { from }).await;
        });
        let source = Source {
            info: self.info.clone(),
            ticks: self.ticks.clone(),
            inputs,
        };
        Box::pin(std::future::ready(Ok(source)))
    }
}

/// Starts an origin running the built-in world that `config` names.
pub async fn start(config: Config) -> Result<OriginHandle, OriginError> {
    let world = build_world(&config)?;
    start_with(config, world).await
}

/// Starts an origin running `world` (any [`Simulation`]), served under the
/// name `config.world`.
pub async fn start_with(
    config: Config,
    world: Box<dyn Simulation>,
) -> Result<OriginHandle, OriginError> {
    config.validate().map_err(OriginError::Config)?;
    let info = WorldInfo::new(
        config.world.clone(),
        world.schema().clone(),
        world.tick_rate(),
    )
    .map_err(|e| OriginError::World(e.to_string()))?;

    let trust = config.tls.trust();
    tracing::info!("trust: {}", trust.describe());
    let tls = tokio::task::spawn_blocking(move || trust.load())
        .await
        .map_err(|e| OriginError::TickLoop(format!("loading certificates: {e}")))??;
    let server_config = if config.tls.verify_clients {
        tls.server_config_mutual(&[ALPN_UPSTREAM])?
    } else {
        tls.server_config(&[ALPN_UPSTREAM])?
    };
    let endpoint = transport::server_endpoint(config.listen, server_config).map_err(|source| {
        OriginError::Listen {
            addr: config.listen,
            source,
        }
    })?;
    let upstream_addr = endpoint
        .local_addr()
        .map_err(|source| OriginError::Listen {
            addr: config.listen,
            source,
        })?;

    let registry = prometheus::Registry::new();
    let metrics = TickMetrics::register(&registry)?;
    let stats = Arc::new(FeedStats::default());
    registry.register(Box::new(stats.collector("statecast_origin")?))?;
    let readiness = Readiness::new();

    let (stop, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (admin_addr, admin) = transport::admin::serve(
        config.admin,
        registry.clone(),
        readiness.clone(),
        stopped(stop_rx.clone()),
    )
    .await
    .map_err(|source| OriginError::Admin {
        addr: config.admin,
        source,
    })?;

    let (publish, ticks) = watch::channel(None);
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (tick_stop, tick_stop_rx) = std_mpsc::channel();
    let tick_loop = TickLoop {
        layout: info.layout.clone(),
        sim: world,
        events,
        publish,
        metrics,
        readiness,
    };
    let tick_thread = std::thread::Builder::new()
        .name(format!("tick-{}", info.world))
        .spawn(move || tick_loop.run(tick_stop_rx));
    let tick_thread = match tick_thread {
        Ok(thread) => thread,
        Err(e) => {
            stop.send_replace(true);
            return Err(OriginError::TickLoop(format!(
                "cannot start its thread: {e}"
            )));
        }
    };

    let worlds = Arc::new(OriginWorlds {
        info: info.clone(),
        ticks: ticks.clone(),
        events: event_tx,
        next_subscription: AtomicU64::new(1),
    });
    let publisher = feed::PublisherConfig {
        id: config.id.clone(),
        region: config.region.clone(),
        auth: config.auth_secret.as_ref().map(|s| s.as_bytes().to_vec()),
        keyframe_after: config.keyframe_after,
        max_connections: config.max_connections,
    };
    let serve = tokio::spawn(feed::serve(
        endpoint,
        worlds,
        publisher,
        stats.clone(),
        stopped(stop_rx),
    ));
    tracing::info!(
        world = %info.world,
        tick_rate = info.tick_rate,
        upstream = %upstream_addr,
        admin = %admin_addr,
        id = %config.id,
        region = %config.region,
        relay_auth = if config.auth_secret.is_some() { "shared secret" } else { "none (TLS only)" },
        mutual_tls = config.tls.verify_clients,
        "origin running"
    );
    Ok(OriginHandle {
        upstream_addr,
        admin_addr,
        world: info,
        ticks,
        stats,
        registry,
        stop,
        tick_stop: Some(tick_stop),
        tick_thread: Some(tick_thread),
        serve: Some(serve),
        admin: Some(admin),
    })
}

/// Runs an origin until `shutdown` resolves (or its tick loop dies), then
/// stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), OriginError> {
    let handle = start(config).await?;
    let mut ticks = handle.ticks();
    let tick_loop_ended = async move { while ticks.changed().await.is_ok() {} };
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = tick_loop_ended => tracing::error!("the tick loop stopped"),
    }
    handle.finish().await
}
