//! `statecast probe`: ping relays' probe ports and show what a client would
//! choose, and why.
//!
//! It runs one round of the client's own [`Selector`]: `--count` pings to
//! every relay, `--interval-ms` apart and staggered across relays, from one
//! UDP socket; it waits `--timeout-ms` for the last pongs, then prints one
//! row per relay (best first): RTT min/median/p95, jitter, loss, the relay's
//! RTT to its origin and its load as the relay reports them, and the score
//! the selector ranks by. Progress goes to stderr. With `--json`, stdout
//! is one JSON array of objects instead.
//!
//! The relays come from `--relays` (probe addresses), or from DNS with
//! `--discover DOMAIN` (the `_statecast._udp.DOMAIN` SRV records and each
//! relay's TXT record, through [`client::discover`]; `--dns-server ADDR`
//! asks that server instead of the system's), which also gives each relay
//! its published region.
//!
//! `--watch` keeps probing, one round after another with the same
//! selector (so its hysteresis shows), and redraws the table after each
//! round (on a terminal, in place); with `--json`, one JSON array per round,
//! one per line. It runs until Ctrl-C, or for `--rounds N`.
//!
//! The exit status is non-zero when no relay answered (in the last round).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::IsTerminal;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use client::discover::Discoverer;
use client::select::{Candidate, Config, Estimate, ScoreParts, Selector, canonical, mapped};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::msg::{Message, VERSION};
use serde::Serialize;
use tokio::net::UdpSocket;

/// Arguments of `probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Probe addresses of the relays, `host:port`, comma-separated (a
    /// relay's `probe` setting; 4435 by default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:4435",
        env = "STATECAST_RELAYS"
    )]
    pub relays: Vec<String>,
    /// Find the relays in DNS instead: the `_statecast._udp.DOMAIN` SRV
    /// records, with each relay's TXT record (probe port, region).
    #[arg(long, value_name = "DOMAIN", conflicts_with = "relays")]
    pub discover: Option<String>,
    /// The DNS server to ask with --discover, `IP:PORT` [default: the
    /// system's resolvers].
    #[arg(long, value_name = "ADDR", requires = "discover")]
    pub dns_server: Option<SocketAddr>,
    /// Milliseconds a DNS discovery may take in all.
    #[arg(long, default_value_t = 5000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub dns_timeout_ms: u64,
    /// Keep probing in rounds and redraw the table after each (one JSON
    /// array per round with --json), until Ctrl-C or --rounds.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop after this many rounds.
    #[arg(long, value_name = "N", requires = "watch",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: Option<u64>,
    /// Pings per relay.
    #[arg(long, default_value_t = 5, env = "STATECAST_PROBE_COUNT",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
    /// Milliseconds between two pings to the same relay.
    #[arg(long, default_value_t = 100, env = "STATECAST_PROBE_INTERVAL_MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub interval_ms: u64,
    /// Milliseconds to wait for a pong before counting the ping lost.
    #[arg(long, default_value_t = 1000, env = "STATECAST_PROBE_TIMEOUT_MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
    /// Print one JSON array on stdout instead of the table.
    #[arg(long, env = "STATECAST_JSON")]
    pub json: bool,
}

/// One relay, as `--json` prints it. Times in milliseconds; `null` where
/// nothing is known (no pong).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The probe address as given.
    pub addr: String,
    /// The address it resolved to.
    pub resolved: String,
    /// Region the relay reports.
    pub region: Option<String>,
    /// Relay id the relay reports.
    pub relay_id: Option<String>,
    /// Lowest RTT.
    pub rtt_min_ms: Option<f64>,
    /// Median RTT.
    pub rtt_median_ms: Option<f64>,
    /// 95th percentile RTT.
    pub rtt_p95_ms: Option<f64>,
    /// Mean difference between consecutive RTTs.
    pub jitter_ms: Option<f64>,
    /// Share of pings lost, 0 to 1.
    pub loss: f64,
    /// Pings sent (and resolved: answered or timed out).
    pub sent: u32,
    /// Pongs received.
    pub received: u32,
    /// The relay's RTT to its origin, as it reports it (`null`: unknown).
    pub origin_rtt_ms: Option<f64>,
    /// The relay's load, permille of its capacity.
    pub load: Option<u16>,
    /// The selector's score (lower is better): RTT + origin RTT + load and
    /// loss penalties.
    pub score: Option<f64>,
    /// The score's parts.
    pub score_parts: Option<Parts>,
    /// Whether a client would pick this relay.
    pub chosen: bool,
    /// Why it was, or was not, picked.
    pub why: String,
}

/// A score's parts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Parts {
    /// Client-relay RTT (low percentile).
    pub rtt_ms: f64,
    /// Relay-origin RTT (the median of the known ones when unknown).
    pub origin_ms: f64,
    /// Load penalty.
    pub load_ms: f64,
    /// Loss penalty.
    pub loss_ms: f64,
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

impl From<ScoreParts> for Parts {
    fn from(s: ScoreParts) -> Parts {
        Parts {
            rtt_ms: ms(s.rtt),
            origin_ms: ms(s.origin),
            load_ms: ms(s.load),
            loss_ms: ms(s.loss),
        }
    }
}

/// Runs `statecast probe`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let rows = if args.watch {
        runtime.block_on(watch(&args))?
    } else {
        let rows = runtime.block_on(probe(&args))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_table(&rows);
        }
        rows
    };
    if !rows.iter().any(|r| r.chosen) {
        bail!(
            "no relay answered ({} ping{} each)",
            args.count,
            if args.count == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Resolves each `host:port` to one socket address.
async fn resolve(relays: &[String]) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    let mut out = Vec::with_capacity(relays.len());
    for relay in relays {
        let relay = relay.trim();
        if relay.is_empty() {
            continue;
        }
        let addr = tokio::net::lookup_host(relay)
            .await
            .with_context(|| format!("cannot resolve relay {relay:?} (expected host:port)"))?
            .next()
            .with_context(|| format!("relay {relay:?} resolves to no address"))?;
        out.push((relay.to_string(), addr));
    }
    if out.is_empty() {
        bail!("no relays given (--relays A,B,...)");
    }
    Ok(out)
}

/// The relays to probe: (name shown, probe address, client address,
/// region published in DNS).
struct Target {
    name: String,
    probe: SocketAddr,
    connect: SocketAddr,
    region: Option<String>,
}

/// The relays of `--relays`, or of `--discover` (relays skipped by
/// discovery are told on stderr).
async fn targets(args: &Args) -> anyhow::Result<Vec<Target>> {
    let Some(domain) = &args.discover else {
        return Ok(resolve(&args.relays)
            .await?
            .into_iter()
            .map(|(name, addr)| Target {
                name,
                probe: addr,
                connect: addr,
                region: None,
            })
            .collect());
    };
    let deadline = Duration::from_millis(args.dns_timeout_ms);
    let discoverer = match args.dns_server {
        Some(server) => Discoverer::with_server(server, deadline),
        None => Discoverer::system(deadline)?,
    };
    let found = discoverer
        .discover(domain)
        .await
        .with_context(|| format!("cannot discover the relays of {domain}"))?;
    for skipped in &found.skipped {
        eprintln!("skipped {}: {}", skipped.host, skipped.reason);
    }
    Ok(found
        .relays
        .into_iter()
        .map(|r| Target {
            name: format!("{}:{}", r.host, r.probe.port()),
            probe: r.probe,
            connect: r.connect,
            region: r.region,
        })
        .collect())
}

/// A nonce seed nobody can guess from outside the process.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Probes one round and returns the rows, best first.
pub async fn probe(args: &Args) -> anyhow::Result<Vec<Row>> {
    let mut last = Vec::new();
    probe_rounds(args, Some(1), |_, rows| last = rows).await?;
    Ok(last)
}

/// `--watch`: rounds until Ctrl-C or `--rounds`, each shown as it ends;
/// returns the last round's rows.
async fn watch(args: &Args) -> anyhow::Result<Vec<Row>> {
    let terminal = std::io::stdout().is_terminal();
    let mut last = Vec::new();
    let rounds = probe_rounds(args, args.rounds, |round, rows| {
        if args.json {
            match serde_json::to_string(&rows) {
                Ok(line) => println!("{line}"),
                Err(e) => tracing::error!(error = %e, "cannot print the round as JSON"),
            }
        } else {
            if terminal {
                // Redraw in place: clear the screen, cursor home.
                print!("\x1b[2J\x1b[H");
            }
            println!("round {round} (Ctrl-C stops)");
            print_table(&rows);
            println!();
        }
        last = rows;
    });
    tokio::select! {
        result = rounds => result?,
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted"),
    }
    Ok(last)
}

/// Probes in rounds with one selector (`rounds`: how many; `None`: until
/// cancelled), handing each round's rows, best first, to `on_round`.
async fn probe_rounds(
    args: &Args,
    rounds: Option<u64>,
    mut on_round: impl FnMut(u64, Vec<Row>),
) -> anyhow::Result<()> {
    let relays = targets(args).await?;
    if relays.is_empty() {
        bail!("no relays to probe");
    }
    // One socket: IPv4 when every relay is, else dual-stack IPv6 (IPv4
    // relays reached through mapped addresses).
    let v6 = relays.iter().any(|t| t.probe.is_ipv6());
    let bind: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let socket = UdpSocket::bind(bind)
        .await
        .with_context(|| format!("cannot bind a UDP socket on {bind}"))?;
    let names: HashMap<SocketAddr, String> = relays
        .iter()
        .rev()
        .map(|t| (canonical(t.probe), t.name.clone()))
        .collect();
    let regions: HashMap<SocketAddr, String> = relays
        .iter()
        .filter_map(|t| Some((canonical(t.probe), t.region.clone()?)))
        .collect();
    let candidates = relays
        .iter()
        .map(|t| Candidate {
            region: t.region.clone(),
            ..Candidate::new(t.probe, t.connect)
        })
        .collect();
    let interval = Duration::from_millis(args.interval_ms);
    let timeout = Duration::from_millis(args.timeout_ms);
    // A round's pings, and the wait for the last pong.
    let round = interval * args.count + timeout;
    let config = Config {
        probes_per_round: args.count,
        probe_interval: interval,
        probe_timeout: timeout,
        // Watching: a round a second at most, back to back when a round
        // takes longer.
        reprobe_every: (rounds != Some(1)).then(|| round.max(Duration::from_secs(1))),
        max_probed: relays.len(),
        nonce_seed: random_seed(),
        ..Config::default()
    };
    let start = Instant::now();
    let mut selector = Selector::new(config, candidates, start);
    let total = u64::from(args.count) * names.len() as u64;
    let mut progress = Progress::new(names.len(), args, total);
    let mut round_start = start;
    let (mut resolved_before, mut pongs_before, mut lost_before) = (0, 0, 0);
    let mut shown = 0;
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::with_capacity(proto::msg::PING_LEN);
    loop {
        // Each round ends by itself (every ping answered or timed out);
        // this bound only guards against a bug leaving the command hanging.
        let deadline = round_start + round + Duration::from_secs(2).max(round);
        let now = Instant::now();
        selector.handle_timeout(now);
        while let Some((to, ping)) = selector.poll_transmit(now) {
            out.clear();
            Message::Ping(ping)
                .encode_datagram(&mut out)
                .context("a ping encodes")?;
            let to = if v6 { mapped(to) } else { to };
            if let Err(e) = socket.send_to(&out, to).await {
                // Counted as lost when it times out.
                tracing::debug!(%to, error = %e, "ping not sent");
            }
        }
        let stats = selector.stats();
        let resolved = stats.pongs_matched + stats.pings_lost;
        progress.update(resolved - resolved_before);
        let completed = selector.rounds_completed();
        if completed > shown {
            shown = completed;
            progress.finish(
                stats.pongs_matched - pongs_before,
                stats.pings_lost - lost_before,
                round_start.elapsed(),
            );
            on_round(shown, rows(&selector, &names, &regions));
            if rounds.is_some_and(|n| shown >= n) {
                return Ok(());
            }
            round_start = Instant::now();
            (resolved_before, pongs_before, lost_before) =
                (resolved, stats.pongs_matched, stats.pings_lost);
            progress = Progress::new(names.len(), args, total);
            continue;
        }
        if now >= deadline {
            tracing::warn!("probing did not finish by its deadline");
            on_round(shown + 1, rows(&selector, &names, &regions));
            return Ok(());
        }
        let wake = selector.poll_timeout().unwrap_or(deadline).min(deadline);
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => {
                    if let Ok(Message::Pong(pong)) = Message::decode_datagram(&buf[..len], VERSION) {
                        selector.handle_pong(from, &pong, Instant::now());
                    }
                }
                Err(e) => tracing::debug!(error = %e, "probe socket receive error"),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
        }
    }
}

/// The live progress line on stderr (a bar on a terminal, two plain lines
/// otherwise).
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(relays: usize, args: &Args, total: u64) -> Progress {
        let what = format!(
            "probing {relays} relay{}: {} ping{} each, {} ms apart",
            if relays == 1 { "" } else { "s" },
            args.count,
            if args.count == 1 { "" } else { "s" },
            args.interval_ms
        );
        if !std::io::stderr().is_terminal() {
            eprintln!("{what}");
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} resolved")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what);
        Progress { bar: Some(bar) }
    }

    fn update(&self, resolved: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(resolved);
        }
    }

    fn finish(&self, pongs: u64, lost: u64, took: Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "{pongs} pong{}, {lost} lost, in {:.2} s",
            if pongs == 1 { "" } else { "s" },
            took.as_secs_f64()
        );
    }
}

/// The rows, best first (the failover order), then relays that never
/// answered in the order given.
fn rows(
    selector: &Selector,
    names: &HashMap<SocketAddr, String>,
    regions: &HashMap<SocketAddr, String>,
) -> Vec<Row> {
    let estimates = selector.estimates();
    let by_addr: HashMap<SocketAddr, &Estimate> = estimates.iter().map(|e| (e.addr, e)).collect();
    let chosen = selector.best();
    let best_score = chosen
        .and_then(|a| by_addr.get(&a))
        .and_then(|e| e.score)
        .map(|s| s.total);
    let mut order = selector.failover_order();
    let silent: Vec<SocketAddr> = estimates
        .iter()
        .filter(|e| !order.contains(&e.addr))
        .map(|e| e.addr)
        .collect();
    order.extend(silent);
    let runner_up = order
        .iter()
        .filter(|a| Some(**a) != chosen)
        .filter_map(|a| by_addr.get(a))
        .find(|e| e.alive)
        .copied();
    order
        .iter()
        .map(|addr| {
            let e = by_addr[addr];
            let is_chosen = Some(*addr) == chosen;
            let why = if is_chosen {
                why_chosen(e, runner_up, names)
            } else {
                why_not(e, best_score)
            };
            Row {
                addr: names.get(addr).cloned().unwrap_or_else(|| addr.to_string()),
                resolved: addr.to_string(),
                // What the relay says, else what DNS published.
                region: e.region.clone().or_else(|| regions.get(addr).cloned()),
                relay_id: e.relay_id.clone(),
                rtt_min_ms: e.rtt_min.map(ms),
                rtt_median_ms: e.rtt_median.map(ms),
                rtt_p95_ms: e.rtt_p95.map(ms),
                jitter_ms: e.jitter.map(ms),
                loss: (e.loss * 1e4).round() / 1e4,
                sent: e.resolved,
                received: e.received,
                origin_rtt_ms: e.origin_rtt.map(ms),
                load: e.load,
                score: e.score.map(|s| ms(s.total)),
                score_parts: e.score.map(Parts::from),
                chosen: is_chosen,
                why,
            }
        })
        .collect()
}

fn why_chosen(
    e: &Estimate,
    runner_up: Option<&Estimate>,
    names: &HashMap<SocketAddr, String>,
) -> String {
    let s = e.score.expect("the chosen relay has a score");
    let origin_note = match e.origin_rtt {
        Some(_) => "",
        None if s.origin.is_zero() => " (unknown)",
        None => " (unknown: the others' median)",
    };
    let mut why = format!(
        "lowest score {} ms = RTT {} + origin {}{origin_note} + load {} + loss {}",
        show(ms(s.total)),
        show(ms(s.rtt)),
        show(ms(s.origin)),
        show(ms(s.load)),
        show(ms(s.loss)),
    );
    match runner_up.and_then(|r| Some((r, r.score?))) {
        Some((r, rs)) => {
            let name = names
                .get(&r.addr)
                .cloned()
                .unwrap_or_else(|| r.addr.to_string());
            why.push_str(&format!(
                "; next best {name} at {} ms (+{} ms)",
                show(ms(rs.total)),
                show(ms(rs.total.saturating_sub(s.total)))
            ));
        }
        None => why.push_str("; the only relay that answered"),
    }
    why
}

fn why_not(e: &Estimate, best: Option<Duration>) -> String {
    if !e.answered {
        return "no answer".into();
    }
    if !e.alive {
        return "stopped answering".into();
    }
    match (e.score, best) {
        (Some(s), Some(b)) => format!("score +{} ms", show(ms(s.total.saturating_sub(b)))),
        _ => "no score".into(),
    }
}

/// Milliseconds for people: two decimals below 10 ms (loopback and LAN
/// paths), one above.
fn show(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), show)
}

fn print_table(rows: &[Row]) {
    let header = [
        "", "relay", "region", "id", "min", "median", "p95", "jitter", "loss", "origin", "load",
        "score",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        table.push(vec![
            if r.chosen { "*".into() } else { String::new() },
            r.addr.clone(),
            r.region.clone().unwrap_or_else(|| "-".into()),
            r.relay_id.clone().unwrap_or_else(|| "-".into()),
            opt_ms(r.rtt_min_ms),
            opt_ms(r.rtt_median_ms),
            opt_ms(r.rtt_p95_ms),
            opt_ms(r.jitter_ms),
            format!("{:.0}%", r.loss * 100.0),
            opt_ms(r.origin_rtt_ms),
            r.load
                .map_or_else(|| "-".into(), |l| format!("{:.1}%", f64::from(l) / 10.0)),
            opt_ms(r.score),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in table.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                // Text columns left-aligned, numbers right-aligned.
                if c <= 3 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if i == 0 {
            println!("{}", "-".repeat(line.join("  ").trim_end().len()));
        }
    }
    println!("times in ms; * = the relay a client would pick");
    match rows.iter().find(|r| r.chosen) {
        Some(r) => println!("pick {}: {}", r.addr, r.why),
        None => println!("pick: none (no relay answered)"),
    }
    for r in rows.iter().filter(|r| !r.chosen && r.score.is_none()) {
        println!("  {}: {}", r.addr, r.why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let cli = Cli::try_parse_from([&["statecast", "probe"], args].concat())?;
        match cli.command {
            Command::Probe(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_and_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.relays, vec!["127.0.0.1:4435"]);
        assert_eq!(
            (a.count, a.interval_ms, a.timeout_ms, a.json),
            (5, 100, 1000, false)
        );
        let a = parse(&[
            "--relays",
            "a.example:4435,10.0.0.1:9",
            "--count",
            "3",
            "--interval-ms",
            "20",
            "--json",
        ])
        .unwrap();
        assert_eq!(a.relays, vec!["a.example:4435", "10.0.0.1:9"]);
        assert_eq!((a.count, a.interval_ms, a.json), (3, 20, true));
        assert!(parse(&["--count", "0"]).is_err());
        let a = parse(&["--discover", "zone.test", "--dns-server", "127.0.0.1:53"]).unwrap();
        assert_eq!(a.discover.as_deref(), Some("zone.test"));
        assert_eq!(a.dns_server, Some("127.0.0.1:53".parse().unwrap()));
        assert!(parse(&["--discover", "zone.test", "--relays", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--dns-server", "127.0.0.1:53"]).is_err());
        let a = parse(&["--watch", "--rounds", "2", "--json"]).unwrap();
        assert_eq!((a.watch, a.rounds), (true, Some(2)));
        assert!(parse(&["--rounds", "2"]).is_err());
        assert!(parse(&["--watch", "--rounds", "0"]).is_err());
        assert!(parse(&["--interval-ms", "0"]).is_err());
    }

    #[tokio::test]
    async fn bad_addresses_are_refused_with_the_reason() {
        let err = resolve(&["no-port-here".into()]).await.unwrap_err();
        assert!(format!("{err:#}").contains("no-port-here"), "{err:#}");
        let err = resolve(&[" ".into()]).await.unwrap_err();
        assert!(format!("{err:#}").contains("no relays"), "{err:#}");
    }
}
