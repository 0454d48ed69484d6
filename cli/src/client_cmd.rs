//! `statecast client`: a headless client. It joins a world through a relay,
//! applies and verifies every tick against the origin's hash, shows a live
//! status line on stderr, and ends with a summary (human, or one JSON object
//! with `--json`).
//!
//! Two ways to pick the relay:
//!
//! - `--relay ADDR`: that relay only; the run ends when it ends the session.
//! - `--relays A,B,C` or `--discover DOMAIN [--dns-server ADDR]`: candidates
//!   from a static list or from DNS (`_statecast._udp.DOMAIN`); the client
//!   probes them, connects to the best one and stays connected, moving to
//!   the next best (resuming its session) when its relay fails or drains
//!   ([`client::roam`]). The summary adds the relay switches, how many
//!   resumed without a keyframe, and the longest gap between two updates.
//!
//! It runs until `--duration` has passed, Ctrl-C, or the session ends for
//! good. The exit status is non-zero when any tick diverged from the
//! origin's hash, when the relay refused the session, and when the session
//! ended on an error rather than on request.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use client::discover::Discoverer;
use client::roam::{self, Move, RoamEvent, RoamStats, Roamer};
use client::select::Candidate;
use client::session::{self, Blame, Config, Session, SessionEvent, Stats};
use proto::ErrorCode;
use proto::msg::Area;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use transport::Trust;

/// Arguments of `client`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The relay's client address, `host:port`: that relay only, no
    /// failover (the default when neither --relays nor --discover is given).
    #[arg(long, default_value = "127.0.0.1:4434", env = "STATECAST_RELAY")]
    pub relay: String,
    /// Candidate relays, `HOST:PORT[/PROBE_PORT]` separated by commas (the
    /// probe port defaults to the client port + 1, as 4434 and 4435): probe
    /// them, use the best, fail over to the next.
    #[arg(
        long,
        value_delimiter = ',',
        env = "STATECAST_RELAYS",
        conflicts_with = "discover"
    )]
    pub relays: Vec<String>,
    /// Find the candidate relays in DNS, under `_statecast._udp.DOMAIN`
    /// (SRV, TXT and address records), then as with --relays.
    #[arg(long, env = "STATECAST_DISCOVER")]
    pub discover: Option<String>,
    /// The DNS server to ask for --discover (`ip:port`); default: the
    /// system's resolvers.
    #[arg(long, env = "STATECAST_DNS_SERVER", requires = "discover")]
    pub dns_server: Option<SocketAddr>,
    /// World to join.
    #[arg(long, default_value = "plaza", env = "STATECAST_WORLD")]
    pub world: String,
    /// Seconds to run; without it, runs until Ctrl-C or the relay ends the
    /// session.
    #[arg(long, env = "STATECAST_DURATION", value_parser = parse_duration)]
    pub duration: Option<f64>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long, env = "STATECAST_JSON")]
    pub json: bool,
    /// Area of interest, `X,Y,R` in world units (centre and radius);
    /// without it, the whole world.
    #[arg(long, env = "STATECAST_AREA", value_parser = parse_area, allow_hyphen_values = true)]
    pub area: Option<Area>,
    /// Name the relay's certificate must carry. Default: the host of
    /// `--relay` when it is a name, else `localhost` (which development
    /// certificates carry).
    #[arg(long, env = "STATECAST_SERVER_NAME")]
    pub server_name: Option<String>,
    /// CA certificate(s) to trust (PEM), for relays with production
    /// certificates. Without it, the local development CA.
    #[arg(long, env = "STATECAST_CA")]
    pub ca: Option<PathBuf>,
    /// Data directory of the local development CA (default
    /// `$STATECAST_DATA`, else `./.statecast`); ignored with `--ca`.
    #[arg(long, env = "STATECAST_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Token to present to the relay.
    #[arg(long, env = "STATECAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn parse_duration(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Ok(secs),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn parse_area(text: &str) -> Result<Area, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [x, y, radius] = parts[..] else {
        return Err(format!("{text:?} is not X,Y,R (three numbers)"));
    };
    let num = |s: &str| {
        s.parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{s:?} is not a finite number"))
    };
    let area = Area {
        x: num(x)?,
        y: num(y)?,
        radius: num(radius)?,
    };
    if area.radius < 0.0 {
        return Err(format!("the radius {} is negative", area.radius));
    }
    Ok(area)
}

/// How often the status line is redrawn.
const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// How often a status line is printed when stderr is not a terminal.
const LOG_PERIOD: Duration = Duration::from_secs(5);
/// Longest wait for the close to reach the relay.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The relay address used.
    pub relay: String,
    /// The relay's id and region, from its welcome.
    pub relay_id: Option<String>,
    /// The relay's region.
    pub region: Option<String>,
    /// Session id.
    pub session: Option<u64>,
    /// World joined.
    pub world: String,
    /// Seconds from the welcome to the end.
    pub duration_s: f64,
    /// Why the run ended.
    pub ended: String,
    /// Set when the run failed (refused, divergences, session error).
    pub error: Option<String>,
    /// Moves to another relay (failovers, drains, better relays).
    pub relay_switches: u64,
    /// Moves whose first update was a delta from the resumed tick.
    pub resumed_without_keyframe: u64,
    /// Longest time between two applied updates, in milliseconds.
    pub longest_gap_ms: f64,
    /// Milliseconds from the start to the first applied update.
    pub first_update_ms: Option<f64>,
    /// Every move, oldest first.
    pub moves: Vec<Move>,
    /// The sessions' counters (summed over every relay used).
    #[serde(flatten)]
    pub stats: Stats,
}

impl Summary {
    fn new(relay: String, world: String) -> Summary {
        Summary {
            relay,
            relay_id: None,
            region: None,
            session: None,
            world,
            duration_s: 0.0,
            ended: String::new(),
            error: None,
            relay_switches: 0,
            resumed_without_keyframe: 0,
            longest_gap_ms: 0.0,
            first_update_ms: None,
            moves: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Sets [`Summary::error`] when ticks diverged and nothing worse
    /// happened.
    fn check_divergences(&mut self) {
        if self.error.is_none() && self.stats.divergences > 0 {
            self.error = Some(format!(
                "{} of {} ticks did not match the origin's hash",
                self.stats.divergences, self.stats.hash_checked
            ));
        }
    }
}

/// Runs `statecast client`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let roaming = !args.relays.is_empty() || args.discover.is_some();
    let summary = if roaming {
        runtime.block_on(drive_roaming(&args))?
    } else {
        runtime.block_on(drive(&args))?
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    match summary.error {
        Some(error) => bail!(error),
        None => Ok(()),
    }
}

/// The server name to check: the host of `relay` if it is a DNS name.
fn default_server_name(relay: &str) -> String {
    let host = match relay.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => relay,
    };
    if host.parse::<std::net::IpAddr>().is_ok() || host.is_empty() {
        "localhost".to_owned()
    } else {
        host.to_owned()
    }
}

async fn resolve(relay: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(relay)
        .await
        .with_context(|| format!("cannot resolve the relay address {relay:?} (host:port)"))?
        .next()
        .with_context(|| format!("{relay:?} resolves to no address"))
}

/// Connects, runs until the end, and returns the summary (failures that
/// happen after the relay answered are in [`Summary::error`]).
async fn drive(args: &Args) -> anyhow::Result<Summary> {
    let trust = Trust::from_flags(None, None, args.ca.clone(), args.data_dir.clone());
    tracing::info!("trust: {}", trust.describe());
    let dev_ca = matches!(trust, Trust::DevCa { .. });
    let tls = trust.load().context("cannot load the certificates")?;
    let addr = resolve(&args.relay).await?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let endpoint = session::endpoint(&tls, bind)?;
    let mut config = Config::new(addr, args.world.clone());
    config.server_name = args
        .server_name
        .clone()
        .unwrap_or_else(|| default_server_name(&args.relay));
    config.interest = args.area;
    if let Some(token) = &args.token {
        config.token = token.clone().into_bytes().into();
    }
    tracing::info!(relay = %addr, world = %args.world, "connecting");

    let mut summary = Summary::new(args.relay.clone(), args.world.clone());
    let mut session = match Session::connect(&endpoint, config).await {
        Ok(session) => session,
        Err(error) => {
            let mut message = format!("cannot join world {:?} at {addr}: {error}", args.world);
            match error.blame() {
                Blame::Network => message += " (is a relay listening there?)",
                // TLS failures: the relay's certificate is not trusted here.
                Blame::Unknown if dev_ca => {
                    message += " (does the relay use the same development CA? \
                                see --data-dir, or pass --ca)"
                }
                _ => {}
            }
            summary.ended = "not connected".to_owned();
            summary.error = Some(message);
            return Ok(summary);
        }
    };
    let welcome = session.welcome();
    tracing::info!(
        session = format_args!("{:#x}", welcome.session),
        relay_id = %welcome.relay_id,
        region = %welcome.region,
        tick_rate = welcome.tick_rate,
        tick = welcome.tick,
        "joined"
    );
    summary.relay_id = Some(welcome.relay_id.clone());
    summary.region = Some(welcome.region.clone());
    summary.session = Some(welcome.session);

    let started = Instant::now();
    let (ended, error) = run_events(&mut session, args, started).await;
    summary.duration_s = started.elapsed().as_secs_f64();
    summary.stats = session.stats().clone();
    summary.ended = ended;
    summary.error = error;
    summary.check_divergences();
    session.close().await;
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    Ok(summary)
}

/// What a run reads events from: one session, or a roamer.
trait Source {
    /// Waits for the next event and handles it; `Some((ended, error))`
    /// when the run is over.
    async fn step(&mut self, window: &mut Window) -> Option<(String, Option<String>)>;
    /// The counters, and the relay in use if worth showing.
    fn status(&self) -> (Stats, Option<String>);
}

impl Source for Session {
    async fn step(&mut self, window: &mut Window) -> Option<(String, Option<String>)> {
        match self.next_event().await {
            Ok(SessionEvent::Applied { latency_us, .. }) => {
                if let Some(us) = latency_us {
                    window.latency.record_us(us);
                }
            }
            Ok(SessionEvent::Divergence {
                tick,
                expected,
                got,
            }) => {
                tracing::warn!(tick, %expected, %got, "state diverged from the origin's hash");
            }
            Ok(SessionEvent::Goaway(goaway)) => {
                tracing::warn!(
                    reason = %goaway.reason,
                    redirect = ?goaway.redirect,
                    deadline_ms = goaway.deadline_ms,
                    "the relay is draining (this client does not fail over)"
                );
            }
            Ok(SessionEvent::Closed { code, reason }) => {
                let ended = format!("the relay ended the session: {reason}");
                let failed = code != Some(ErrorCode::Normal);
                let detail = code.map_or("connection lost".to_owned(), |c| c.to_string());
                return Some((ended.clone(), failed.then(|| format!("{ended} ({detail})"))));
            }
            Err(error) => return Some(("session error".to_owned(), Some(error.to_string()))),
            // Other relays (a directory): --relay uses this relay only.
            #[allow(unreachable_patterns)]
            Ok(_) => {}
        }
        None
    }

    fn status(&self) -> (Stats, Option<String>) {
        (self.stats().clone(), None)
    }
}

impl Source for Roamer {
    async fn step(&mut self, window: &mut Window) -> Option<(String, Option<String>)> {
        match self.next_event().await {
            Ok(RoamEvent::Applied { latency_us, .. }) => {
                if let Some(us) = latency_us {
                    window.latency.record_us(us);
                }
            }
            Ok(RoamEvent::Divergence {
                tick,
                expected,
                got,
            }) => {
                tracing::warn!(tick, %expected, %got, "state diverged from the origin's hash");
            }
            Ok(RoamEvent::Moved(m)) => {
                tracing::info!(
                    from = %m.from,
                    to = %m.to,
                    region = %m.to_region,
                    reason = %m.reason,
                    gap_ms = format_args!("{:.0}", m.gap_ms),
                    keyframe = m.keyframe,
                    "moved to another relay"
                );
            }
            Err(error) => return Some(("session error".to_owned(), Some(error.to_string()))),
        }
        None
    }

    fn status(&self) -> (Stats, Option<String>) {
        let relay = self.relay().map(|r| format!("{} ({})", r.addr, r.region));
        (self.stats().session, relay)
    }
}

/// Handles events until the end (the source's, `--duration`, Ctrl-C) with
/// a status line on stderr; returns why it ended and, if it failed, how.
async fn run_events(
    source: &mut impl Source,
    args: &Args,
    started: Instant,
) -> (String, Option<String>) {
    let stop = async {
        match args.duration {
            Some(secs) => tokio::time::sleep(Duration::from_secs_f64(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let terminal = std::io::stderr().is_terminal();
    let mut status = tokio::time::interval_at(
        started + STATUS_PERIOD,
        if terminal { STATUS_PERIOD } else { LOG_PERIOD },
    );
    status.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut window = Window::new(started);
    let outcome = loop {
        tokio::select! {
            ended = source.step(&mut window) => if let Some(outcome) = ended {
                break outcome;
            },
            _ = status.tick() => {
                let (stats, relay) = source.status();
                window.report(&stats, relay.as_deref(), terminal);
            }
            _ = &mut stop => break ("duration reached".to_owned(), None),
            _ = &mut ctrl_c => break ("interrupted".to_owned(), None),
        }
    };
    if terminal {
        eprintln!();
    }
    outcome
}

/// What changed since the last status line.
struct Window {
    at: Instant,
    bytes: u64,
    ticks: u64,
    latency: client::session::Latency,
}

impl Window {
    fn new(at: Instant) -> Window {
        Window {
            at,
            bytes: 0,
            ticks: 0,
            latency: Default::default(),
        }
    }

    fn report(&mut self, stats: &Stats, relay: Option<&str>, terminal: bool) {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let kbps = (stats.bytes_received - self.bytes) as f64 * 8.0 / 1000.0 / secs;
        let rate = (stats.ticks_applied - self.ticks) as f64 / secs;
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let relay = relay.map_or(String::new(), |r| format!("{r} | "));
        let line = format!(
            "{relay}tick {} | {} applied ({rate:.0}/s) | {kbps:.1} kbit/s | latency p50 {} p99 {} ms | divergences {}",
            stats.tick.map_or("-".to_owned(), |t| t.to_string()),
            stats.ticks_applied,
            ms(self.latency.p50_ms()),
            ms(self.latency.p99_ms()),
            stats.divergences,
        );
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        *self = Window::new(now);
        self.bytes = stats.bytes_received;
        self.ticks = stats.ticks_applied;
    }
}

fn print_summary(summary: &Summary) {
    let s = &summary.stats;
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
    let kbps = if summary.duration_s > 0.0 {
        s.bytes_received as f64 * 8.0 / 1000.0 / summary.duration_s
    } else {
        0.0
    };
    println!(
        "statecast client: relay {} ({}, region {}), world {}, session {}",
        summary.relay,
        summary.relay_id.as_deref().unwrap_or("-"),
        summary.region.as_deref().unwrap_or("-"),
        summary.world,
        summary
            .session
            .map_or("-".to_owned(), |id| format!("{id:#x}")),
    );
    println!(
        "  ran        {:.1} s, {}",
        summary.duration_s, summary.ended
    );
    println!(
        "  ticks      {} applied, {} hash checked, {} divergences, {} keyframes",
        s.ticks_applied, s.hash_checked, s.divergences, s.keyframes
    );
    println!(
        "  updates    {} received ({} on streams), {:.1} KiB, {kbps:.1} kbit/s",
        s.updates_received,
        s.updates_on_streams,
        s.bytes_received as f64 / 1024.0
    );
    println!(
        "  not used   {} stale, {} missing base, {} undecodable, {} superseded, {} overflowed, {} streams reset, {} truncated",
        s.stale,
        s.missing_base,
        s.decode_errors,
        s.superseded,
        s.overflowed,
        s.stream_resets,
        s.streams_truncated
    );
    println!(
        "  latency    p50 {}, p99 {}, max {} (origin tick to apply)",
        ms(s.latency_ms.p50_ms()),
        ms(s.latency_ms.p99_ms()),
        ms(s.latency_ms.max_ms())
    );
    if !summary.moves.is_empty() || summary.relay_switches > 0 {
        println!(
            "  moves      {} ({} resumed without a keyframe), longest gap {:.0} ms",
            summary.relay_switches, summary.resumed_without_keyframe, summary.longest_gap_ms
        );
        for m in &summary.moves {
            println!(
                "             at {:.1} s {} ({}) -> {} ({}): {}, gap {:.0} ms{}",
                m.at_ms / 1e3,
                m.from,
                m.from_region,
                m.to,
                m.to_region,
                m.reason,
                m.gap_ms,
                if m.keyframe { ", keyframe" } else { "" }
            );
        }
    }
    if let Some(error) = &summary.error {
        println!("  FAILED     {error}");
    }
}

/// The candidates of `--relays` (see [`client::discover::from_static`]):
/// IP literals at once; when an entry names a host, the whole list again
/// through the system's resolvers. Any entry left out is an error.
async fn static_candidates(list: &[String]) -> anyhow::Result<Vec<Candidate>> {
    let entries: Vec<&str> = list.iter().map(|s| s.trim()).collect();
    let mut found = client::discover::from_static(&entries);
    if !found.skipped.is_empty()
        && let Ok(resolver) = Discoverer::system(Duration::from_secs(5))
    {
        found = resolver.from_static(&entries).await;
    }
    if !found.skipped.is_empty() {
        bail!(
            "--relays: {}",
            found
                .skipped
                .iter()
                .map(|s| format!("{}: {}", s.host, s.reason))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(found.candidates)
}

/// The candidates of `--relays` or `--discover`.
async fn candidates(args: &Args) -> anyhow::Result<(Vec<Candidate>, String)> {
    if let Some(domain) = &args.discover {
        let deadline = Duration::from_secs(5);
        let discoverer = match args.dns_server {
            Some(server) => Discoverer::with_server(server, deadline),
            None => Discoverer::system(deadline)
                .context("cannot read the system's DNS configuration")?,
        };
        let found = discoverer
            .discover(domain)
            .await
            .with_context(|| format!("cannot discover relays for {domain:?}"))?;
        for skipped in &found.skipped {
            tracing::warn!(host = %skipped.host, reason = %skipped.reason, "relay left out");
        }
        tracing::info!(domain = %domain, relays = found.relays.len(), "relays discovered");
        let candidates = found.relays.iter().map(|r| r.candidate(None)).collect();
        return Ok((candidates, domain.clone()));
    }
    let candidates = static_candidates(&args.relays).await?;
    Ok((candidates, args.relays.join(",")))
}

/// `--relays` / `--discover`: probe, connect to the best, stay connected.
async fn drive_roaming(args: &Args) -> anyhow::Result<Summary> {
    let trust = Trust::from_flags(None, None, args.ca.clone(), args.data_dir.clone());
    tracing::info!("trust: {}", trust.describe());
    let tls = trust.load().context("cannot load the certificates")?;
    let (candidates, shown) = candidates(args).await?;
    let v6 = candidates.iter().any(|c| c.connect.is_ipv6());
    let bind: SocketAddr = if v6 {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let endpoint = session::endpoint(&tls, bind)?;
    let mut config = roam::Config::new(args.world.clone());
    config.server_name = args
        .server_name
        .clone()
        .or_else(|| args.discover.clone())
        .unwrap_or_else(|| "localhost".to_owned());
    config.interest = args.area;
    if let Some(token) = &args.token {
        config.token = token.clone().into_bytes().into();
    }
    let mut summary = Summary::new(shown, args.world.clone());
    tracing::info!(candidates = candidates.len(), world = %args.world, "probing relays");
    let started = Instant::now();
    let mut roamer = match Roamer::connect(&endpoint, candidates, config).await {
        Ok(roamer) => roamer,
        Err(error) => {
            summary.ended = "not connected".to_owned();
            summary.error = Some(format!("cannot join world {:?}: {error}", args.world));
            return Ok(summary);
        }
    };
    if let (Some(relay), Some(session)) = (roamer.relay(), roamer.session()) {
        tracing::info!(
            relay = %relay.addr,
            relay_id = %relay.relay_id,
            region = %relay.region,
            session = format_args!("{:#x}", session.session_id()),
            "joined"
        );
        summary.session = Some(session.session_id());
    }
    let (ended, error) = run_events(&mut roamer, args, started).await;
    let stats: RoamStats = roamer.stats();
    summary.duration_s = started.elapsed().as_secs_f64();
    summary.relay = stats.relay.clone().unwrap_or(summary.relay);
    summary.relay_id = stats.relay_id.clone();
    summary.region = stats.region.clone();
    summary.relay_switches = stats.relay_switches;
    summary.resumed_without_keyframe = stats.resumed_without_keyframe;
    summary.longest_gap_ms = stats.longest_gap_ms;
    summary.first_update_ms = stats.first_update_ms;
    summary.moves = stats.moves;
    summary.stats = stats.session;
    summary.ended = ended;
    summary.error = error;
    summary.check_divergences();
    roamer.close().await;
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_parse_and_bad_ones_are_refused() {
        let area = parse_area("10,-20.5, 30").unwrap();
        assert_eq!((area.x, area.y, area.radius), (10.0, -20.5, 30.0));
        for bad in ["1,2", "1,2,3,4", "a,2,3", "1,2,-3", "1,NaN,3", "1,2,inf"] {
            assert!(parse_area(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_server_name_follows_the_relay_host() {
        assert_eq!(default_server_name("127.0.0.1:4434"), "localhost");
        assert_eq!(default_server_name("[::1]:4434"), "localhost");
        assert_eq!(
            default_server_name("relay-eu.example.com:4434"),
            "relay-eu.example.com"
        );
    }

    #[tokio::test]
    async fn static_candidates_take_a_probe_port_or_the_next_one() {
        let list = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        let c = static_candidates(&list("127.0.0.1:4434, 127.0.0.2:5000/6000"))
            .await
            .unwrap();
        assert_eq!(c[0].connect, "127.0.0.1:4434".parse().unwrap());
        assert_eq!(c[0].addr, "127.0.0.1:4435".parse().unwrap());
        assert_eq!(c[1].connect, "127.0.0.2:5000".parse().unwrap());
        assert_eq!(c[1].addr, "127.0.0.2:6000".parse().unwrap());
        for bad in [
            "127.0.0.1:4434/x",
            "127.0.0.1:4434/0",
            "127.0.0.1:65535",
            "127.0.0.1",
        ] {
            let error = static_candidates(&list(bad)).await.unwrap_err().to_string();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn durations_must_be_positive() {
        assert_eq!(parse_duration("2.5"), Ok(2.5));
        for bad in ["0", "-1", "x", "inf", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
