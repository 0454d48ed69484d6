//! What fan-out costs: origin + one relay + N load clients on loopback,
//! against two baselines (the relay encoding per client, and a plain quinn
//! server sending the same bytes), as `fanout` (src/bin/fanout.rs) reports
//! it.
//!
//! ## One measurement
//!
//! For each N and each server under test (relay, relay with the chunk cache
//! off, floor):
//!
//! 1. a fresh server process starts (its memory and CPU are its own);
//! 2. one client connects and receives updates until the relay's ring is
//!    full; the server's RSS then is the 0-client baseline (the world is
//!    subscribed and held, only the per-client part is missing);
//! 3. the other N - 1 clients connect, then a warm-up passes;
//! 4. over the window: the server's CPU time (utime + stime of
//!    `/proc/PID/stat`), the updates and bytes clients received for the
//!    ticks of the window, their latency (origin tick time to receipt), the
//!    relay's `/metrics` before and after (fan-out latency histogram,
//!    drops, cache), the RSS at the end.
//!
//! CPU per update = server CPU time / updates delivered to clients, so
//! updates that never arrive make every delivered one dearer. `missed` =
//! clients x ticks of the window - updates received for them: whatever the
//! cause (skipped by a busy relay, dropped by quinn or the kernel, a stream
//! reset because a newer update superseded it).
//!
//! The load clients decode each update and acknowledge it but never apply
//! it ([`load`]): the bench measures the relay, not client decoding.

pub mod floor;
pub mod hist;
pub mod load;
pub mod procfs;
pub mod prom;
pub mod servers;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use load::{Handshake, Load, now_us};
use proto::interest::Grid;
use proto::msg::Area;
use serde::Serialize;
use servers::{RelaySpec, Runner, Server};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Name of the world the origin serves.
pub const WORLD: &str = "plaza";
/// Fan-out latency histogram of the relay.
const FANOUT_LATENCY: &str = "statecast_relay_fanout_latency_seconds";
/// Fan-out stage histogram of the relay.
const FANOUT_STAGE: &str = "statecast_relay_fanout_stage_seconds";
/// CPU the relay's fan-out threads spent building updates.
const BUILD_CPU: &str = "statecast_relay_build_cpu_seconds_total";
/// Chunks the relay coded in advance.
const PRECODED: &str = "statecast_relay_chunks_precoded_total";
/// Time allowed after the window for updates of its last ticks to arrive.
const GRACE: Duration = Duration::from_millis(400);

/// What to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Numbers of clients, one row each.
    pub clients: Vec<usize>,
    /// Length of the measurement window.
    pub duration: Duration,
    /// Time after the last client connected before the window.
    pub warmup: Duration,
    /// Avatars in the plaza world.
    pub avatars: u32,
    /// Side of the plaza world, in metres.
    pub world_size_m: f64,
    /// Interest radius of every client, in metres.
    pub radius: f64,
    /// Relay cell size, in metres.
    pub cell_size: f64,
    /// Seed of the world.
    pub seed: u64,
    /// Client endpoints the load clients share.
    pub endpoints: usize,
    /// Also run the two baselines.
    pub baselines: bool,
    /// Updates the first client receives before the memory baseline is
    /// read (at least the relay's ring: 64 ticks by default).
    pub ring_updates: u64,
    /// Where the servers run.
    pub runner: Runner,
    /// The nice value the bench's own threads (origin, load clients) run
    /// at, if lowered (the binary does it; reported here). The servers
    /// keep the nice value the bench started with.
    pub load_nice: Option<i32>,
    /// How the relays schedule their fan-out threads.
    pub fanout_priority: relay::priority::Priority,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            clients: vec![100, 1000, 4000],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(3),
            avatars: 10_000,
            world_size_m: 2000.0,
            radius: 110.0,
            cell_size: 50.0,
            seed: 1,
            endpoints: 4,
            baselines: true,
            ring_updates: 70,
            runner: Runner::InProcess,
            load_nice: None,
            fanout_priority: relay::Config::default().fanout_priority(),
        }
    }
}

/// One server under test, measured over one window.
#[derive(Clone, Debug, Serialize)]
pub struct ModeReport {
    /// `relay`, `per_client_encode` or `floor`.
    pub mode: String,
    /// Clients connected (and measured).
    pub clients: usize,
    /// Clients that could not connect (the server was overloaded).
    pub failed_connects: usize,
    /// Clients that received at least one update.
    pub clients_receiving: u64,
    /// Ticks in the window.
    pub ticks: u64,
    /// Window length, seconds (ticks / tick rate).
    pub window_s: f64,
    /// Server CPU seconds per wall second (1.0 = one core busy).
    pub cpu_cores: f64,
    /// Server CPU microseconds per update delivered.
    pub cpu_us_per_update: f64,
    /// Updates received for the window's ticks.
    pub updates: u64,
    /// Updates per second, all clients.
    pub updates_per_s: f64,
    /// Updates that never arrived: clients x ticks - updates.
    pub missed: u64,
    /// Update bytes (datagram, or frame on a stream) per client per second.
    pub bytes_per_client_per_s: f64,
    /// UDP payload bytes (QUIC packets) received per client per second.
    pub wire_bytes_per_client_per_s: f64,
    /// Mean update size, bytes.
    pub mean_update_bytes: f64,
    /// Share of updates that came on a stream (too large for a datagram).
    pub stream_share: f64,
    /// Origin tick time (floor: send time) to receipt by the client, p50.
    pub client_latency_ms_p50: Option<f64>,
    /// The same, p99.
    pub client_latency_ms_p99: Option<f64>,
    /// Relay's fan-out latency (tick arrival to update handed to quinn),
    /// p50, from its histogram's bucket deltas.
    pub added_latency_ms_p50: Option<f64>,
    /// The same, p99.
    pub added_latency_ms_p99: Option<f64>,
    /// Drops the relay counted (`statecast_relay_drops_total`).
    pub relay_drops: Option<u64>,
    /// Chunk cache hit ratio over the window.
    pub cache_hit_ratio: Option<f64>,
    /// Relay CPU seconds spent encoding chunks per wall second.
    pub encode_cores: Option<f64>,
    /// Relay CPU microseconds spent encoding chunks per update delivered
    /// (for `per_client_encode`, what coding each client's chunks costs).
    pub encode_us_per_update: Option<f64>,
    /// Relay CPU seconds spent splitting upstream ticks into cells per wall
    /// second (a fixed cost per tick; absent for relays without the metric).
    pub split_cores: Option<f64>,
    /// Microseconds per chunk encoded (cache miss).
    pub encode_us_per_chunk: Option<f64>,
    /// Chunk lookups (hits and misses) per update delivered.
    pub chunks_per_update: Option<f64>,
    /// Relay CPU microseconds spent building updates (coding chunks, in
    /// advance or on first use, and assembling datagrams; not sending them)
    /// per update delivered: wall time of the fan-out's building, less the
    /// time its threads waited for a core (absent for relays without the
    /// metric). For `per_client_encode` this is what coding and assembling
    /// each client's update costs.
    pub build_us_per_update: Option<f64>,
    /// Chunks coded in advance per tick of the window.
    pub precoded_per_tick: Option<f64>,
    /// Relay fan-out stages (tick arrival to the end of each step, per
    /// fan-out loop): stage -> (p50, p99) ms, from the histogram's bucket
    /// deltas (absent for relays without the metric).
    pub stages_ms: BTreeMap<String, (f64, f64)>,
    /// The server process's nice value (`None` in process).
    pub server_nice: Option<i32>,
    /// The nice value of the bench's own threads, if lowered.
    pub load_nice: Option<i32>,
    /// Server RSS with one client (ring full), MiB.
    pub rss_base_mib: f64,
    /// Server RSS with every client, MiB.
    pub rss_mib: f64,
    /// (RSS with N clients - RSS with one) / (N - 1), MiB.
    pub mib_per_client: Option<f64>,
    /// CPU of the bench process (origin and load clients), cores.
    pub bench_cpu_cores: f64,
}

/// One row of the table: N clients, the relay and its baselines.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Clients.
    pub clients: usize,
    /// Relay CPU microseconds per update delivered.
    pub relay_cpu_us_per_update: f64,
    /// Floor CPU microseconds per datagram delivered.
    pub floor_cpu_us_per_update: Option<f64>,
    /// relay / floor.
    pub ratio_to_floor: Option<f64>,
    /// Relay without the chunk cache, CPU microseconds per update.
    pub per_client_encode_cpu_us_per_update: Option<f64>,
    /// per-client encoding / relay.
    pub encode_ratio: Option<f64>,
    /// The same for building updates only (coding chunks and assembling
    /// datagrams, thread CPU; quinn, the split and reading acks left out):
    /// what the chunk cache saves where it acts.
    pub build_ratio: Option<f64>,
    /// Relay memory per client, MiB.
    pub mib_per_client: Option<f64>,
    /// Update bytes per client per second.
    pub bytes_per_client_per_s: f64,
    /// Relay-added latency p50, ms.
    pub added_latency_ms_p50: Option<f64>,
    /// Relay-added latency p99, ms.
    pub added_latency_ms_p99: Option<f64>,
    /// Client-observed latency (origin tick to receipt) p50, ms.
    pub client_latency_ms_p50: Option<f64>,
    /// The same, p99.
    pub client_latency_ms_p99: Option<f64>,
    /// Updates for the window's ticks that no client received.
    pub dropped: u64,
    /// Of which the relay counted as dropped.
    pub relay_drops: u64,
    /// Mean entities in a client's interest cells.
    pub entities_per_client: f64,
    /// The relay run.
    pub relay: ModeReport,
    /// The relay with the chunk cache off.
    pub per_client_encode: Option<ModeReport>,
    /// The floor server.
    pub floor: Option<ModeReport>,
}

/// Shared by every measurement of a run.
struct Ctx<'a> {
    settings: &'a Settings,
    dir: PathBuf,
    origin: &'a origin::OriginHandle,
    tls: transport::TlsConfig,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Relay { cache: bool },
    Floor { size: usize },
}

impl Ctx<'_> {
    /// Client `i`'s interest: a low-discrepancy (R2) spread over the world.
    fn area(&self, i: usize) -> Area {
        const A1: f64 = 0.754_877_666_246_692_7;
        const A2: f64 = 0.569_840_290_998_053_2;
        let size = self.settings.world_size_m;
        let x = (0.5 + i as f64 * A1).fract() * size;
        let y = (0.5 + i as f64 * A2).fract() * size;
        Area {
            x: x as f32,
            y: y as f32,
            radius: self.settings.radius as f32,
        }
    }

    fn origin_tick(&self) -> u64 {
        self.origin.ticks().borrow().as_ref().map_or(0, |t| t.tick)
    }

    /// Mean entities in the interest cells of clients 0..n, at the newest tick.
    fn entities_per_client(&self, n: usize) -> f64 {
        let Some(tick) = self.origin.ticks().borrow().clone() else {
            return 0.0;
        };
        let grid = Grid::new(self.settings.cell_size);
        let counts: HashMap<_, usize> = grid
            .split(&self.origin.world.layout, &tick.snapshot)
            .into_iter()
            .map(|(cell, part)| (cell, part.len()))
            .collect();
        let total: usize = (0..n)
            .map(|i| {
                let a = self.area(i);
                grid.cells_within(a.x as f64, a.y as f64, a.radius as f64)
                    .iter()
                    .map(|c| counts.get(c).copied().unwrap_or(0))
                    .sum::<usize>()
            })
            .sum();
        total as f64 / n.max(1) as f64
    }
}

/// Runs every N of `settings`: starts an origin in this process, then the
/// servers under test, and returns one row per N.
pub async fn run(settings: &Settings, progress: &ProgressBar) -> anyhow::Result<Vec<Row>> {
    let mut scratch = procfs::ScratchDir::new("statecast-fanout")?;
    let result = run_in(settings, progress, scratch.path().to_owned()).await;
    if result.is_err() {
        // Keep the servers' logs for the error message's reader.
        scratch.keep();
    }
    result
}

async fn run_in(
    settings: &Settings,
    progress: &ProgressBar,
    dir: PathBuf,
) -> anyhow::Result<Vec<Row>> {
    progress.set_message(format!(
        "starting the origin (plaza, {} avatars on {} m)",
        settings.avatars, settings.world_size_m
    ));
    let plaza = origin::worlds::plaza::Plaza::try_new(origin::worlds::plaza::PlazaConfig {
        avatars: settings.avatars,
        size_m: settings.world_size_m,
        seed: settings.seed,
    })?;
    let config = origin::Config {
        world: WORLD.into(),
        seed: settings.seed,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls: origin::config::Tls {
            data_dir: Some(dir.clone()),
            ..Default::default()
        },
        ..origin::Config::default()
    };
    let origin = origin::start_with(config, Box::new(plaza))
        .await
        .context("origin failed to start")?;
    let mut ticks = origin.ticks();
    tokio::time::timeout(Duration::from_secs(20), ticks.wait_for(|t| t.is_some()))
        .await
        .context("the origin made no tick within 20 s")?
        .context("the origin stopped")?;
    drop(ticks);
    let tls = transport::Trust::dev(&dir).load()?;
    let ctx = Ctx {
        settings,
        dir,
        origin: &origin,
        tls,
    };
    let mut rows = Vec::new();
    for &n in &settings.clients {
        let n = n.max(1);
        let relay = measure(&ctx, Mode::Relay { cache: true }, n, progress).await?;
        let (per_client_encode, floor) = if settings.baselines {
            let encode = measure(&ctx, Mode::Relay { cache: false }, n, progress).await?;
            let size = relay.mean_update_bytes.round().max(1.0) as usize;
            let floor = measure(&ctx, Mode::Floor { size }, n, progress).await?;
            (Some(encode), Some(floor))
        } else {
            (None, None)
        };
        let per = |r: &Option<ModeReport>| r.as_ref().map(|r| r.cpu_us_per_update);
        let floor_us = per(&floor);
        let encode_us = per(&per_client_encode);
        rows.push(Row {
            clients: n,
            relay_cpu_us_per_update: relay.cpu_us_per_update,
            floor_cpu_us_per_update: floor_us,
            ratio_to_floor: floor_us.map(|f| relay.cpu_us_per_update / f),
            per_client_encode_cpu_us_per_update: encode_us,
            encode_ratio: encode_us.map(|e| e / relay.cpu_us_per_update),
            build_ratio: per_client_encode
                .as_ref()
                .and_then(|e| e.build_us_per_update)
                .zip(relay.build_us_per_update)
                .map(|(e, r)| e / r),
            mib_per_client: relay.mib_per_client,
            bytes_per_client_per_s: relay.bytes_per_client_per_s,
            added_latency_ms_p50: relay.added_latency_ms_p50,
            added_latency_ms_p99: relay.added_latency_ms_p99,
            client_latency_ms_p50: relay.client_latency_ms_p50,
            client_latency_ms_p99: relay.client_latency_ms_p99,
            dropped: relay.missed,
            relay_drops: relay.relay_drops.unwrap_or(0),
            entities_per_client: ctx.entities_per_client(n),
            relay,
            per_client_encode,
            floor,
        });
    }
    origin.shutdown().await;
    Ok(rows)
}

/// Sleeps `total`, updating the progress message every 250 ms and checking
/// that the server still runs.
async fn wait(
    server: &mut Server,
    total: Duration,
    progress: &ProgressBar,
    what: &str,
) -> anyhow::Result<()> {
    let end = Instant::now() + total;
    loop {
        server.check_alive()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        let left = end - now;
        progress.set_message(format!("{what} ({:.0} s left)", left.as_secs_f64().ceil()));
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
}

async fn measure(
    ctx: &Ctx<'_>,
    mode: Mode,
    n: usize,
    progress: &ProgressBar,
) -> anyhow::Result<ModeReport> {
    let settings = ctx.settings;
    let name = match mode {
        Mode::Relay { cache: true } => "relay",
        Mode::Relay { cache: false } => "per_client_encode",
        Mode::Floor { .. } => "floor",
    };
    let label = format!("N={n} {name}");
    progress.set_message(format!("{label}: starting the server"));
    let (mut server, floor_config) = match mode {
        Mode::Floor { size } => {
            let config = floor::FloorConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                data_dir: ctx.dir.clone(),
                size,
                rate: ctx.origin.world.tick_rate,
                epoch_us: now_us(),
            };
            let name = format!("floor-{n}");
            let server = servers::start_floor(&settings.runner, config.clone(), &name).await?;
            (server, Some(config))
        }
        Mode::Relay { cache } => {
            let spec = RelaySpec {
                upstream: ctx.origin.upstream_addr,
                data_dir: ctx.dir.clone(),
                chunk_cache: cache,
                cell_size: settings.cell_size,
                fanout_priority: settings.fanout_priority,
                name: format!("{name}-{n}"),
            };
            (servers::start_relay(&settings.runner, &spec).await?, None)
        }
    };
    let tick_now = || match &floor_config {
        Some(f) => f.tick_at(now_us()),
        None => ctx.origin_tick(),
    };
    let handshake = match mode {
        Mode::Relay { .. } => Handshake::Relay {
            world: WORLD.into(),
        },
        Mode::Floor { .. } => Handshake::None,
    };
    let mut load = Load::new(&ctx.tls, settings.endpoints)?;
    let stats = load.stats().clone();
    let area = |i: usize| ctx.area(i);

    // One client, until the ring is full: the memory baseline.
    progress.set_message(format!("{label}: first client, filling the relay's ring"));
    if let (_, Some(e)) = load
        .connect(server.addr, &handshake, 1, &area, &|_| {})
        .await
    {
        let tail = servers::log_tail(server.log.as_deref());
        bail!("{label}: the first client could not connect: {e:#}{tail}");
    }
    let want = match mode {
        Mode::Relay { cache: true } => settings.ring_updates.max(1),
        _ => 1,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.updates.load(Ordering::Relaxed) < want {
        server.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{label}: the first client received {} of {want} updates in 30 s{}",
                stats.updates.load(Ordering::Relaxed),
                servers::log_tail(server.log.as_deref())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_base = server.rss_bytes()?;

    let mut failed_connects = 0;
    if n > 1 {
        let connecting = format!("{label}: connecting clients");
        let (failed, error) = load
            .connect(server.addr, &handshake, n - 1, &area, &|k| {
                if k % 16 == 0 || k + 1 == n {
                    progress.set_message(format!("{connecting} {}/{n}", k + 1));
                }
            })
            .await;
        if let Some(e) = error {
            // Measured anyway, with the clients that did connect: an
            // overloaded server is a finding, not a reason to stop.
            progress.println(format!(
                "{label}: {failed} of {n} clients could not connect (first: {e:#}); \
                 measuring the {} that did",
                n - failed
            ));
        }
        failed_connects = failed;
    }
    let connected = load.len();
    wait(
        &mut server,
        settings.warmup,
        progress,
        &format!("{label}: warm-up"),
    )
    .await?;

    // The window.
    let lo = tick_now();
    stats.open_window(lo);
    let scrape0 = match server.admin {
        Some(admin) => Some(prom::Scrape::fetch(admin).await?),
        None => None,
    };
    let wire0 = load.wire_rx_bytes();
    let bench0 = procfs::cpu_seconds(std::process::id())?;
    let cpu0 = server.cpu_seconds()?;
    let t0 = Instant::now();
    wait(
        &mut server,
        settings.duration,
        progress,
        &format!("{label}: measuring"),
    )
    .await?;
    let hi = tick_now();
    stats.close_window(hi);
    let cpu1 = server.cpu_seconds()?;
    let wall = t0.elapsed().as_secs_f64();
    let bench1 = procfs::cpu_seconds(std::process::id())?;
    let wire1 = load.wire_rx_bytes();
    let scrape1 = match server.admin {
        Some(admin) => Some(prom::Scrape::fetch(admin).await?),
        None => None,
    };
    let rss = server.rss_bytes()?;
    tokio::time::sleep(GRACE).await;

    let ticks = hi.saturating_sub(lo);
    let rate = f64::from(ctx.origin.world.tick_rate);
    let window_s = ticks as f64 / rate;
    let updates = stats.window_updates.load(Ordering::Relaxed);
    let bytes = stats.window_bytes.load(Ordering::Relaxed);
    let streams = stats.window_streams.load(Ordering::Relaxed);
    let expected = ticks * connected as u64;
    let updates_per_s = updates as f64 / window_s.max(1e-9);
    let cpu_cores = (cpu1 - cpu0) / wall;
    let per_client_s = (connected as f64 * window_s).max(1e-9);
    let mut report = ModeReport {
        mode: name.into(),
        clients: connected,
        failed_connects,
        clients_receiving: stats.receiving.load(Ordering::Relaxed),
        ticks,
        window_s,
        cpu_cores,
        cpu_us_per_update: if updates > 0 {
            cpu_cores / updates_per_s * 1e6
        } else {
            f64::NAN
        },
        updates,
        updates_per_s,
        missed: expected.saturating_sub(updates),
        bytes_per_client_per_s: bytes as f64 / per_client_s,
        wire_bytes_per_client_per_s: (wire1 - wire0) as f64 / (connected as f64 * wall),
        mean_update_bytes: bytes as f64 / updates.max(1) as f64,
        stream_share: streams as f64 / updates.max(1) as f64,
        client_latency_ms_p50: stats.latency.quantile_ms(0.5),
        client_latency_ms_p99: stats.latency.quantile_ms(0.99),
        added_latency_ms_p50: None,
        added_latency_ms_p99: None,
        relay_drops: None,
        cache_hit_ratio: None,
        encode_cores: None,
        encode_us_per_update: None,
        split_cores: None,
        encode_us_per_chunk: None,
        chunks_per_update: None,
        build_us_per_update: None,
        precoded_per_tick: None,
        stages_ms: BTreeMap::new(),
        server_nice: server.nice,
        load_nice: settings.load_nice,
        rss_base_mib: rss_base as f64 / MIB,
        rss_mib: rss as f64 / MIB,
        mib_per_client: (connected > 1)
            .then(|| (rss as f64 - rss_base as f64) / MIB / (connected - 1) as f64),
        bench_cpu_cores: (bench1 - bench0) / wall,
    };
    if let (Some(before), Some(after)) = (&scrape0, &scrape1) {
        let buckets = prom::bucket_delta(
            &before.buckets(FANOUT_LATENCY),
            &after.buckets(FANOUT_LATENCY),
        );
        report.added_latency_ms_p50 = prom::quantile(&buckets, 0.5).map(|s| s * 1e3);
        report.added_latency_ms_p99 = prom::quantile(&buckets, 0.99).map(|s| s * 1e3);
        let delta = |name: &str| after.sum(name) - before.sum(name);
        report.relay_drops = Some(delta("statecast_relay_drops_total").max(0.0) as u64);
        let hits = delta("statecast_relay_chunk_cache_hits_total");
        let misses = delta("statecast_relay_chunk_cache_misses_total");
        report.cache_hit_ratio = (hits + misses > 0.0).then(|| hits / (hits + misses));
        let encode_s = delta("statecast_relay_encode_seconds_total");
        report.encode_cores = Some(encode_s / wall);
        report.encode_us_per_update = (updates > 0).then(|| encode_s / updates as f64 * 1e6);
        if after.sum("statecast_relay_split_seconds_total") > 0.0 {
            report.split_cores = Some(delta("statecast_relay_split_seconds_total") / wall);
        }
        report.encode_us_per_chunk = (misses > 0.0).then(|| encode_s / misses * 1e6);
        report.chunks_per_update = (updates > 0).then(|| (hits + misses) / updates as f64);
        if after.sum(BUILD_CPU) > 0.0 && updates > 0 {
            report.build_us_per_update = Some(delta(BUILD_CPU) / updates as f64 * 1e6);
        }
        if ticks > 0 && after.sum(PRECODED) > 0.0 {
            report.precoded_per_tick = Some(delta(PRECODED) / ticks as f64);
        }
        for stage in ["picked", "split", "coded", "first", "last"] {
            let label = format!("stage=\"{stage}\"");
            let buckets = prom::bucket_delta(
                &before.buckets_with(FANOUT_STAGE, &label),
                &after.buckets_with(FANOUT_STAGE, &label),
            );
            if let (Some(p50), Some(p99)) = (
                prom::quantile(&buckets, 0.5),
                prom::quantile(&buckets, 0.99),
            ) {
                report
                    .stages_ms
                    .insert(stage.into(), (p50 * 1e3, p99 * 1e3));
            }
        }
    }
    progress.set_message(format!("{label}: stopping"));
    load.shutdown().await;
    server.stop().await;
    progress.println(format!(
        "{label}: {:.1} us/update, {:.2} cores, {:.0} updates/s, missed {}, {:.0} B/update",
        report.cpu_us_per_update,
        report.cpu_cores,
        report.updates_per_s,
        report.missed,
        report.mean_update_bytes
    ));
    Ok(report)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The rows as a text table (one line per N).
pub fn table(rows: &[Row]) -> String {
    fn opt(v: Option<f64>, digits: usize) -> String {
        match v {
            Some(v) if v.is_finite() => format!("{v:.digits$}"),
            _ => "-".into(),
        }
    }
    let mut out = String::new();
    out.push_str(
        "| clients | relay us/update | floor us/update | relay/floor | per-client encode us/update | encode/relay | encode/relay, building updates only | MiB/client | bytes/client/s | added ms p50 | added ms p99 | dropped (relay) |\n",
    );
    out.push_str(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} ({}) |\n",
            r.clients,
            r.relay_cpu_us_per_update,
            opt(r.floor_cpu_us_per_update, 1),
            opt(r.ratio_to_floor, 2),
            opt(r.per_client_encode_cpu_us_per_update, 1),
            opt(r.encode_ratio, 1),
            opt(r.build_ratio, 1),
            opt(r.mib_per_client, 3),
            r.bytes_per_client_per_s,
            opt(r.added_latency_ms_p50, 2),
            opt(r.added_latency_ms_p99, 2),
            r.dropped,
            r.relay_drops,
        ));
    }
    out
}

/// Secondary figures per N and server, as text lines.
pub fn details(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "N={}: {:.0} entities per client on average\n",
            r.clients, r.entities_per_client
        ));
        let reports = [
            Some(&r.relay),
            r.per_client_encode.as_ref(),
            r.floor.as_ref(),
        ];
        for m in reports.into_iter().flatten() {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            out.push_str(&format!(
                "  {:<17} cpu {:.2} cores, {:.1} us/update, {:.0} updates/s, missed {}, {:.0} B/update ({:.1}% streams), wire {:.0} B/client/s, client latency p50 {} p99 {} ms, receiving {}/{}, RSS {:.1} -> {:.1} MiB, bench process {:.2} cores{}{}{}{}{}\n",
                m.mode,
                m.cpu_cores,
                m.cpu_us_per_update,
                m.updates_per_s,
                m.missed,
                m.mean_update_bytes,
                m.stream_share * 100.0,
                m.wire_bytes_per_client_per_s,
                f(m.client_latency_ms_p50),
                f(m.client_latency_ms_p99),
                m.clients_receiving,
                m.clients,
                m.rss_base_mib,
                m.rss_mib,
                m.bench_cpu_cores,
                m.cache_hit_ratio
                    .map_or(String::new(), |h| format!(", cache hits {:.1}%", h * 100.0)),
                m.encode_cores
                    .map_or(String::new(), |e| format!(", encoding {e:.3} cores")),
                m.encode_us_per_chunk
                    .map_or(String::new(), |e| format!(" ({e:.1} us/chunk)")),
                m.encode_us_per_update
                    .map_or(String::new(), |e| format!(", encoding {e:.1} us/update")),
                m.split_cores
                    .map_or(String::new(), |e| format!(", splitting ticks {e:.3} cores")),
            ));
            let mut more = Vec::new();
            if let Some(b) = m.build_us_per_update {
                more.push(format!("building {b:.1} us/update (thread CPU)"));
            }
            if let Some(p) = m.precoded_per_tick {
                more.push(format!("{p:.0} chunks coded in advance per tick"));
            }
            if !m.stages_ms.is_empty() {
                let stages: Vec<String> = m
                    .stages_ms
                    .iter()
                    .map(|(k, (p50, p99))| format!("{k} {p50:.2}/{p99:.2}"))
                    .collect();
                more.push(format!("stages p50/p99 ms: {}", stages.join(", ")));
            }
            if let Some(n) = m.server_nice {
                more.push(format!(
                    "nice: server {n}, load {}",
                    m.load_nice
                        .map_or("unchanged".to_owned(), |l| l.to_string())
                ));
            }
            if !more.is_empty() {
                out.push_str(&format!("  {:<17} {}\n", "", more.join("; ")));
            }
            if m.failed_connects > 0 {
                out.push_str(&format!(
                    "  {:<17} {} of {} clients could not connect (server overloaded); figures are for the {} that did\n",
                    m.mode,
                    m.failed_connects,
                    m.clients + m.failed_connects,
                    m.clients
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measurement core end to end, in process, small: 10 clients, a
    /// 1,000-avatar world, 2-second windows. The figures mean nothing (one
    /// process, debug build); the fields must be there and sane.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke_in_process() {
        let settings = Settings {
            clients: vec![10],
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            avatars: 1000,
            world_size_m: 500.0,
            radius: 60.0,
            endpoints: 2,
            ring_updates: 3,
            runner: Runner::InProcess,
            ..Settings::default()
        };
        let rows = run(&settings, &ProgressBar::hidden()).await.unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.clients, 10);
        assert!(r.entities_per_client > 0.0);
        for m in [
            Some(&r.relay),
            r.per_client_encode.as_ref(),
            r.floor.as_ref(),
        ] {
            let m = m.expect("baselines ran");
            assert_eq!(m.clients_receiving, 10, "{m:?}");
            assert!(m.ticks >= 20, "{m:?}");
            assert!(m.updates > 0, "{m:?}");
            assert!(
                m.cpu_us_per_update.is_finite() && m.cpu_us_per_update > 0.0,
                "{m:?}"
            );
            assert!(m.bytes_per_client_per_s > 0.0, "{m:?}");
            assert!(m.mean_update_bytes > 0.0, "{m:?}");
            assert!(m.client_latency_ms_p99.is_some_and(|l| l >= 0.0), "{m:?}");
        }
        assert!(r.added_latency_ms_p50.is_some_and(|l| l >= 0.0));
        assert!(r.added_latency_ms_p99 >= r.added_latency_ms_p50);
        assert!(r.floor_cpu_us_per_update.is_some());
        assert!(r.per_client_encode_cpu_us_per_update.is_some());
        // The relay's own breakdown: building CPU, chunks coded in advance
        // (cache on only), the stages of its fan-out.
        for m in [&r.relay, r.per_client_encode.as_ref().unwrap()] {
            assert!(m.build_us_per_update.is_some_and(|b| b > 0.0), "{m:?}");
            for stage in ["picked", "split", "last"] {
                let (p50, p99) = m.stages_ms[stage];
                assert!(p50 >= 0.0 && p99 >= p50, "{stage}: {m:?}");
            }
        }
        assert!(r.relay.precoded_per_tick.is_some_and(|p| p > 0.0));
        assert!(
            r.per_client_encode
                .as_ref()
                .unwrap()
                .precoded_per_tick
                .is_none()
        );
        assert!(r.build_ratio.is_some_and(|b| b > 0.0));
        let json = serde_json::to_value(&rows).unwrap();
        for key in [
            "clients",
            "relay_cpu_us_per_update",
            "floor_cpu_us_per_update",
            "per_client_encode_cpu_us_per_update",
            "bytes_per_client_per_s",
            "added_latency_ms_p50",
            "added_latency_ms_p99",
            "dropped",
        ] {
            assert!(json[0].get(key).is_some(), "{key} missing");
        }
        assert!(table(&rows).contains("| 10 |"));
    }
}
