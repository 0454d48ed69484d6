//! The demo's emulated geography, on loopback in one process.
//!
//! ```text
//!  bots of region C --link(C,R) quic--> relay R --link(R,O) backbone--> origin (region O)
//!                   --link(C,R) probe-> R's probe responder
//!  DNS: _statecast._udp.C.demo.test -> the link(C,R) ports of every relay R
//! ```
//!
//! - For every client region C and relay R, two [`Link`]s with the
//!   conditions of the path between C and R's region (half the RTT and half
//!   the jitter each way, the path's loss each way): one in front of R's
//!   QUIC port, one in front of its probe port. Bots of C reach R only
//!   through them, so what they measure and feel is the emulated path.
//! - For every relay, a link to the origin with the backbone RTT between
//!   its region and the origin's: the relay measures it and reports it in
//!   its probe replies, and clients add it to their score.
//! - A relay's probe port is served here with [`relay::probe::serve`] and
//!   the relay's own figures (load, draining, origin RTT), rather than by
//!   the relay: every bot's probes arrive from 127.0.0.1, which the relay's
//!   default per-source rate limit (sized for one NAT address in the wild)
//!   would take for one flood. The limits here are those of one machine's
//!   bots.
//!
//! A *kill* cuts every link of the relay (100% loss) before stopping it, so
//! its close frames never arrive and clients see silence, as after a crash.
//! A *drain* is the relay's own: goaway to every client, exit once they
//! left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use lab::{Direction, Link, LinkConfig};
use relay::RelayHandle;
use relay::metrics::Metrics;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::{TlsConfig, Trust};

use super::dns::{self, Dns};
use super::scenario::{Conditions, Scenario};

/// What a relay is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Serving.
    Up,
    /// Told its clients to go; exits once they have.
    Draining,
    /// Drained and exited.
    Drained,
    /// Crashed (killed).
    Killed,
}

impl RelayState {
    /// Whether clients on it are fine.
    pub fn live(self) -> bool {
        self == RelayState::Up
    }

    /// For the view.
    pub fn label(self) -> &'static str {
        match self {
            RelayState::Up => "up",
            RelayState::Draining => "draining",
            RelayState::Drained => "drained",
            RelayState::Killed => "KILLED",
        }
    }
}

/// What the probe responder says about a relay, kept current by
/// [`Network::refresh`].
#[derive(Default)]
struct ProbeState {
    origin_rtt_us: AtomicU64,
    draining: AtomicBool,
}

/// One relay of the demo.
pub struct RelayNode {
    /// Its name (relay id).
    pub name: String,
    /// Its region (index into the scenario's regions).
    pub region: usize,
    /// Its metrics (still readable after it stopped).
    pub metrics: Metrics,
    /// What it is doing.
    pub state: RelayState,
    /// When it was killed or told to drain, from the start.
    pub fault_at: Option<Duration>,
    handle: Option<RelayHandle>,
    drain: Option<JoinHandle<()>>,
    upstream: Link,
    probe: Arc<ProbeState>,
    probe_addr: SocketAddr,
    probe_stop: watch::Sender<bool>,
    probe_task: JoinHandle<()>,
}

/// The links of one client region to one relay.
pub struct Access {
    /// The client region (index).
    pub region: usize,
    /// The relay (index).
    pub relay: usize,
    /// In front of the relay's QUIC port.
    pub quic: Link,
    /// In front of its probe port.
    pub probe: Link,
}

/// Everything but the bots.
pub struct Network {
    /// The origin.
    pub origin: origin::OriginHandle,
    /// The relays, in the scenario's order.
    pub relays: Vec<RelayNode>,
    /// Every (client region, relay) pair's links.
    pub access: Vec<Access>,
    /// The discovery zone.
    pub dns: Dns,
    /// The TLS every bot uses (the development CA of `dir`).
    pub tls: TlsConfig,
    /// Which relay a QUIC link address leads to.
    pub by_addr: HashMap<SocketAddr, usize>,
    world: String,
    _dir: tempfile::TempDir,
}

/// Link conditions for a path of `rtt` and `jitter` (split over the two
/// directions) and `loss` per direction.
fn link_config(rtt: Duration, jitter: Duration, loss: f64, seed: u64) -> LinkConfig {
    let way = Direction {
        delay: rtt / 2,
        jitter: jitter / 2,
        loss,
        ..Direction::default()
    };
    LinkConfig {
        up: way.clone(),
        down: way,
        seed,
    }
}

fn cut() -> LinkConfig {
    LinkConfig::symmetric(Direction {
        loss: 1.0,
        ..Direction::default()
    })
}

const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// How long the whole network may take to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);

impl Network {
    /// Starts the origin, the relays with their links and probe
    /// responders, and the DNS zone.
    pub async fn start(scenario: &Scenario) -> anyhow::Result<Network> {
        tokio::time::timeout(START_DEADLINE, Network::start_inner(scenario))
            .await
            .with_context(|| format!("the demo network did not start within {START_DEADLINE:?}"))?
    }

    async fn start_inner(s: &Scenario) -> anyhow::Result<Network> {
        let dir = tempfile::Builder::new()
            .prefix("statecast-demo-")
            .tempdir()
            .context("cannot create a directory for the demo's certificates")?;
        let mut config = origin::Config {
            world: s.world.name.clone(),
            avatars: Some(s.world.avatars),
            seed: s.world.seed,
            listen: LOCAL,
            admin: LOCAL,
            id: "origin".into(),
            region: s.origin.region.clone(),
            ..origin::Config::default()
        };
        config.tls.data_dir = Some(dir.path().to_path_buf());
        let origin = origin::start(config)
            .await
            .context("the origin did not start")?;
        let trust = Trust::dev(dir.path());
        let tls = tokio::task::spawn_blocking(move || trust.load())
            .await
            .context("loading certificates panicked")?
            .context("cannot load the demo's development CA")?;

        let mut relays = Vec::new();
        for (i, r) in s.relays.iter().enumerate() {
            let region = s
                .regions
                .iter()
                .position(|g| g.name == r.region)
                .expect("validated");
            let c = s.conditions(&r.region, &s.origin.region);
            let upstream = Link::start(
                LOCAL,
                origin.upstream_addr,
                link_config(c.backbone_rtt, Duration::ZERO, 0.0, 1000 + i as u64),
            )
            .await
            .context("cannot start a relay's backbone link")?;
            let handle = relay::start(relay::Config {
                id: r.name.clone(),
                region: r.region.clone(),
                listen: LOCAL,
                upstream: upstream.local_addr(),
                admin: LOCAL,
                probe: None,
                cell_size: s.world.cell_m,
                // Stay subscribed for the whole demo, clients or not.
                release_after_secs: 24 * 3600,
                data_dir: Some(dir.path().to_path_buf()),
                ..relay::Config::default()
            })
            .await
            .with_context(|| format!("relay {} did not start", r.name))?;
            let metrics = handle.metrics.clone();
            let probe = Arc::new(ProbeState {
                origin_rtt_us: AtomicU64::new(u64::MAX),
                draining: AtomicBool::new(false),
            });
            let socket = tokio::net::UdpSocket::bind(LOCAL)
                .await
                .context("cannot bind a probe port")?;
            let probe_addr = socket.local_addr()?;
            let (probe_stop, mut stopped) = watch::channel(false);
            let info = {
                let probe = probe.clone();
                let metrics = metrics.clone();
                let (id, region) = (r.name.clone(), r.region.clone());
                let max_clients = relay::Config::default().max_clients.max(1) as u64;
                move || {
                    let rtt = probe.origin_rtt_us.load(Ordering::Relaxed);
                    let load = if probe.draining.load(Ordering::Relaxed) {
                        u16::MAX
                    } else {
                        let clients = metrics.clients.get().max(0) as u64;
                        (clients * 1000 / max_clients).min(u16::MAX.into()) as u16
                    };
                    relay::probe::Info {
                        relay_id: id.clone(),
                        region: region.clone(),
                        load,
                        origin_rtt: (rtt != u64::MAX).then(|| Duration::from_micros(rtt)),
                        coords: None,
                    }
                }
            };
            let limits = relay::probe::Limits {
                // Every bot of the machine shares 127.0.0.1.
                per_source_rate: 20_000.0,
                per_source_burst: 40_000.0,
                global_rate: 20_000.0,
                global_burst: 40_000.0,
                ..relay::probe::Limits::default()
            };
            let probe_task = tokio::spawn(relay::probe::serve(
                socket,
                info,
                limits,
                metrics.probes.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ));
            relays.push(RelayNode {
                name: r.name.clone(),
                region,
                metrics,
                state: RelayState::Up,
                fault_at: None,
                handle: Some(handle),
                drain: None,
                upstream,
                probe,
                probe_addr,
                probe_stop,
                probe_task,
            });
        }

        let mut access = Vec::new();
        let mut by_addr = HashMap::new();
        let mut zone = Vec::new();
        for (ci, region) in s.regions.iter().enumerate() {
            let mut entries = Vec::new();
            for (ri, relay) in relays.iter().enumerate() {
                let relay_region = &s.regions[relay.region].name;
                let Conditions {
                    rtt, jitter, loss, ..
                } = s.conditions(&region.name, relay_region);
                let seed = (ci * 100 + ri) as u64;
                let client_addr = relay.handle.as_ref().expect("just started").client_addr;
                let quic = Link::start(LOCAL, client_addr, link_config(rtt, jitter, loss, seed))
                    .await
                    .context("cannot start a client link")?;
                let probe = Link::start(
                    LOCAL,
                    relay.probe_addr,
                    link_config(rtt, jitter, loss, seed + 50),
                )
                .await
                .context("cannot start a probe link")?;
                entries.push(dns::Entry {
                    relay: relay.name.clone(),
                    relay_region: relay_region.clone(),
                    quic_port: quic.local_addr().port(),
                    probe_port: probe.local_addr().port(),
                });
                by_addr.insert(quic.local_addr(), ri);
                access.push(Access {
                    region: ci,
                    relay: ri,
                    quic,
                    probe,
                });
            }
            zone.push((region.name.clone(), entries));
        }
        let dns = Dns::serve(&zone).await?;
        let network = Network {
            origin,
            relays,
            access,
            dns,
            tls,
            by_addr,
            world: s.world.name.clone(),
            _dir: dir,
        };
        network.warm_up().await?;
        Ok(network)
    }

    /// Subscribes every relay to the world before any bot arrives (a
    /// production relay would be subscribed already), so that the first
    /// probes already report each relay's origin RTT: one session per
    /// relay, straight to its port, until its first tick.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let endpoint = client::session::endpoint(&self.tls, LOCAL)
            .context("cannot open the warm-up endpoint")?;
        for relay in &self.relays {
            let addr = relay.handle.as_ref().expect("running").client_addr;
            let mut config = client::session::Config::new(addr, self.world.clone());
            config.interest = Some(proto::msg::Area {
                x: 0.0,
                y: 0.0,
                radius: 1.0,
            });
            let mut session = client::Session::connect(&endpoint, config)
                .await
                .with_context(|| format!("relay {} did not welcome a client", relay.name))?;
            for _ in 0..1000 {
                match session.next_event().await {
                    Ok(client::SessionEvent::Applied { .. }) => break,
                    Ok(client::SessionEvent::Closed { reason, .. }) => {
                        anyhow::bail!("relay {} closed the warm-up session: {reason}", relay.name)
                    }
                    Ok(_) => {}
                    Err(e) => anyhow::bail!("relay {}: warm-up session failed: {e}", relay.name),
                }
            }
            session.close().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        self.refresh().await;
        Ok(())
    }

    /// Copies each running relay's origin RTT into its probe replies.
    pub async fn refresh(&self) {
        for relay in &self.relays {
            if let Some(handle) = &relay.handle
                && let Some(rtt) = relay::server::origin_rtt(handle, &self.world).await
            {
                relay
                    .probe
                    .origin_rtt_us
                    .store(rtt.as_micros() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Finds a relay by name.
    pub fn relay_index(&self, name: &str) -> Option<usize> {
        self.relays.iter().position(|r| r.name == name)
    }

    /// Crashes relay `i`: every link to and from it drops everything from
    /// now on, then it stops (its goodbyes die in the cut links).
    pub async fn kill(&mut self, i: usize, at: Duration) {
        for a in self.access.iter().filter(|a| a.relay == i) {
            a.quic.set(cut());
            a.probe.set(cut());
        }
        let relay = &mut self.relays[i];
        relay.upstream.set(cut());
        relay.state = RelayState::Killed;
        relay.fault_at = Some(at);
        if let Some(handle) = relay.handle.take() {
            handle.shutdown().await;
        }
        let _ = relay.probe_stop.send(true);
    }

    /// Drains relay `i` in the background: goaway now, exit once its
    /// clients left (or the relay's drain deadline passed).
    pub fn drain(&mut self, i: usize, at: Duration) {
        let relay = &mut self.relays[i];
        let Some(handle) = relay.handle.take() else {
            return;
        };
        relay.probe.draining.store(true, Ordering::Relaxed);
        relay.state = RelayState::Draining;
        relay.fault_at = Some(at);
        relay.drain = Some(tokio::spawn(handle.drain()));
    }

    /// Notes drains that finished.
    pub fn poll_drains(&mut self) {
        for relay in &mut self.relays {
            if relay.state == RelayState::Draining
                && relay.drain.as_ref().is_some_and(|d| d.is_finished())
            {
                relay.state = RelayState::Drained;
                let _ = relay.probe_stop.send(true);
            }
        }
    }

    /// Bytes the links of client region `region` delivered to it (QUIC
    /// and probes: what its bots' network cards would count).
    pub fn wire_bytes_down(&self, region: usize) -> u64 {
        self.access
            .iter()
            .filter(|a| a.region == region)
            .map(|a| a.quic.stats().down.bytes_forwarded + a.probe.stats().down.bytes_forwarded)
            .sum()
    }

    /// Stops everything, waiting for each part (bounded by each part's own
    /// deadlines).
    pub async fn stop(self) {
        for relay in self.relays {
            let _ = relay.probe_stop.send(true);
            if let Some(handle) = relay.handle {
                handle.shutdown().await;
            }
            if let Some(drain) = relay.drain {
                drain.abort();
                let _ = drain.await;
            }
            let _ = relay.probe_task.await;
            relay.upstream.stop().await;
        }
        for a in self.access {
            a.quic.stop().await;
            a.probe.stop().await;
        }
        self.dns.stop().await;
        self.origin.shutdown().await;
    }
}
