//! `statecast demo`: a whole statecast network on one machine, with a live
//! view of what it does and why.
//!
//! One process runs an origin (the plaza world), relays in several emulated
//! regions, a DNS zone for discovery, and a few hundred bot clients spread
//! over the regions. Every path between them goes through a user-space link
//! emulator with the scenario's RTT, jitter and loss ([`net`]). Bots
//! discover the relays of their region in DNS, probe them, connect to the
//! best, verify every tick against the origin's hash and steer their
//! avatars ([`bots`]); relays get killed or drained on schedule, and bots
//! fail over by themselves. The [`view`] shows per relay and per client
//! region what happens, live, and ends with a summary (`--json` for
//! machines).
//!
//! The scenario (regions, paths, relays, bots, faults, world) is a TOML
//! file ([`scenario`]); the default one is compiled in
//! (`cli/scenarios/default.toml`).

pub mod bots;
pub mod dns;
pub mod net;
pub mod scenario;
pub mod view;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use scenario::{Fault, FaultKind, Scenario};
use view::{Observer, Summary};

/// Arguments of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Scenario file (TOML: world, regions, paths, relays, bots, faults).
    /// Default: the built-in scenario, cli/scenarios/default.toml.
    #[arg(long, env = "STATECAST_SCENARIO")]
    pub scenario: Option<PathBuf>,
    /// Seconds to run; without it, runs until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<f64>,
    /// Crash a relay at SECS: its links go silent, then it stops, so its
    /// clients notice only the silence. `SECS` (the scenario's first relay)
    /// or `SECS:RELAY`. Repeatable; any --kill-relay-at or
    /// --drain-relay-at replaces the scenario's faults.
    #[arg(long, value_name = "SECS[:RELAY]", value_parser = parse_fault)]
    pub kill_relay_at: Vec<(f64, Option<String>)>,
    /// Drain a relay at SECS: goaway to its clients, which move before it
    /// exits. `SECS` (the scenario's last relay) or `SECS:RELAY`.
    /// Repeatable.
    #[arg(long, value_name = "SECS[:RELAY]", value_parser = parse_fault)]
    pub drain_relay_at: Vec<(f64, Option<String>)>,
    /// Total bots, spread over the regions in the scenario's proportions.
    #[arg(long)]
    pub bots: Option<usize>,
    /// No live view: print only a JSON summary at the end.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Ok(secs),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn parse_fault(text: &str) -> Result<(f64, Option<String>), String> {
    let (secs, relay) = match text.split_once(':') {
        Some((s, r)) if !r.trim().is_empty() => (s, Some(r.trim().to_owned())),
        Some(_) => return Err(format!("{text:?}: give SECS or SECS:RELAY")),
        None => (text, None),
    };
    match secs.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..1e6).contains(&v) => Ok((v, relay)),
        _ => Err(format!(
            "{secs:?} is not a number of seconds from the start"
        )),
    }
}

/// How often the view samples and redraws.
const VIEW_PERIOD: Duration = Duration::from_millis(250);
/// How often a status line is printed when stdout is not a terminal.
const LINE_PERIOD: Duration = Duration::from_secs(2);
/// How often the relays' origin RTTs are copied into their probe replies.
const REFRESH_PERIOD: Duration = Duration::from_secs(1);
/// Longest wait for the bots to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Where the live view goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Redraw one screen on a terminal.
    Screen,
    /// Periodic status lines and events (stdout is a pipe or a file).
    Lines,
    /// Nothing until the summary (`--json`).
    Quiet,
}

/// The scenario the arguments ask for, with their overrides applied, and
/// where it came from.
pub fn scenario(args: &Args) -> anyhow::Result<(Scenario, String)> {
    let (mut s, source) = match &args.scenario {
        Some(path) => (Scenario::load(path)?, path.display().to_string()),
        None => (Scenario::default_scenario(), "built-in default".to_owned()),
    };
    if let Some(bots) = args.bots {
        s.scale_bots(bots)?;
    }
    if !args.kill_relay_at.is_empty() || !args.drain_relay_at.is_empty() {
        let first = s.relays.first().map(|r| r.name.clone()).unwrap_or_default();
        let last = s.relays.last().map(|r| r.name.clone()).unwrap_or_default();
        s.faults = args
            .kill_relay_at
            .iter()
            .map(|(at, relay)| Fault {
                at_s: *at,
                kill: Some(relay.clone().unwrap_or_else(|| first.clone())),
                drain: None,
            })
            .chain(args.drain_relay_at.iter().map(|(at, relay)| Fault {
                at_s: *at,
                kill: None,
                drain: Some(relay.clone().unwrap_or_else(|| last.clone())),
            }))
            .collect();
        s.validate()
            .context("in the faults given on the command line")?;
    }
    s.faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Ok((s, source))
}

/// Runs the demo until the duration ends or Ctrl-C; prints the summary.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (scenario, source) = scenario(&args)?;
    let view = if args.json {
        View::Quiet
    } else if std::io::stdout().is_terminal() {
        View::Screen
    } else {
        View::Lines
    };
    // Two workers: the demo is sized for a 2-core machine, and more threads
    // than cores only add switching. The origin's tick loop has its own.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let summary = runtime.block_on(drive(&scenario, source, args.duration, view))?;
    // Whatever is still winding down (relay tasks after a kill) stops here.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", view::summary_text(&summary));
    }
    if summary.divergences > 0 {
        bail!(
            "{} ticks did not match the origin's hash",
            summary.divergences
        );
    }
    Ok(())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the whole network, returns the summary.
pub async fn drive(
    scenario: &Scenario,
    source: String,
    duration: Option<f64>,
    view: View,
) -> anyhow::Result<Summary> {
    tracing::info!(
        regions = scenario.regions.len(),
        relays = scenario.relays.len(),
        bots = scenario.bots(),
        "demo starting"
    );
    let mut net = net::Network::start(scenario).await?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();

    // Bots: one endpoint per region, joining over the ramp.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, mut events_rx) = mpsc::channel(4096);
    let common = bots::Common {
        world: scenario.world.name.clone(),
        dns: net.dns.addr,
        input_hz: scenario.bots.input_hz,
        stall_timeout: Duration::from_millis(scenario.bots.stall_timeout_ms),
        events: events_tx,
        stop: stop_rx,
        started,
    };
    let size = origin::worlds::plaza::PlazaConfig::default().size_m;
    let total = scenario.bots();
    let mut specs = Vec::new();
    let mut endpoints = Vec::new();
    for (r, region) in scenario.regions.iter().enumerate() {
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        endpoints.push(
            client::session::endpoint(&net.tls, local).context("cannot open a bot endpoint")?,
        );
        for _ in 0..region.bots {
            let index = specs.len();
            specs.push(bots::Spec {
                index,
                region: r,
                domain: dns::domain(&region.name),
                area: bots::area_for(
                    index,
                    scenario.world.seed,
                    size,
                    scenario.world.area_radius_m,
                ),
                // Interleave regions over the ramp.
                join_at: Duration::ZERO,
            });
        }
    }
    // Spread the joins evenly over the ramp, regions interleaved.
    let ramp = Duration::from_secs_f64(scenario.bots.ramp_s);
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by_key(|&i| {
        let r = specs[i].region;
        let nth = specs[..i].iter().filter(|s| s.region == r).count();
        (nth * 1000 / scenario.regions[r].bots.max(1), r)
    });
    for (k, &i) in order.iter().enumerate() {
        specs[i].join_at = ramp.mul_f64(k as f64 / total.max(1) as f64);
    }
    let mut handles = Vec::new();
    let mut nows = Vec::new();
    for spec in &specs {
        let now = Arc::new(Mutex::new(bots::BotNow::new()));
        nows.push(now.clone());
        handles.push(tokio::spawn(bots::run(
            spec.clone(),
            common.clone(),
            endpoints[spec.region].clone(),
            now,
        )));
    }
    drop(common);
    let mut observer = Observer::new(
        scenario,
        source,
        &net,
        specs,
        nows,
        started,
        started_unix_ms,
    );

    let stop_at = duration.map(|d| started + Duration::from_secs_f64(d));
    let stop = async {
        match stop_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(VIEW_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut faults = scenario.faults.iter().peekable();
    let mut next_refresh = started;
    let mut next_line = started + LINE_PERIOD;
    let mut stdout = std::io::stdout();
    if view == View::Screen {
        // The alternate screen: the terminal comes back as it was.
        let _ = write!(stdout, "\x1b[?1049h\x1b[?25l");
    }
    let far = started + Duration::from_secs(86_400 * 365);
    loop {
        let fault_at = faults.peek().map_or(far, |f| started + f.at());
        tokio::select! {
            biased;
            signal = &mut ctrl_c => {
                if let Err(e) = signal {
                    tracing::warn!(error = %e, "cannot listen for Ctrl-C");
                }
                break;
            }
            () = &mut stop => break,
            () = tokio::time::sleep_until(fault_at) => {
                let fault = faults.next().expect("peeked");
                let (kind, name) = fault.action();
                let Some(i) = net.relay_index(name) else { continue };
                let clients = net.relays[i].metrics.clients.get();
                observer.fault(kind, name, clients);
                match kind {
                    FaultKind::Kill => net.kill(i, started.elapsed()).await,
                    FaultKind::Drain => net.drain(i, started.elapsed()),
                }
                if view == View::Lines {
                    println!("{:>7.1}s  {kind:?} {name} ({clients} clients)", started.elapsed().as_secs_f64());
                }
            }
            Some(event) = events_rx.recv() => observer.on_event(&net, event),
            _ = tick.tick() => {
                let now = Instant::now();
                net.poll_drains();
                if now >= next_refresh {
                    net.refresh().await;
                    next_refresh = now + REFRESH_PERIOD;
                }
                observer.sample(&net);
                match view {
                    View::Screen => {
                        let screen = observer.screen(&net, duration);
                        // Home, draw each line over the old one, clear the rest.
                        let _ = write!(stdout, "\x1b[H{}\x1b[J", screen.replace('\n', "\x1b[K\n"));
                        let _ = stdout.flush();
                    }
                    View::Lines => {
                        for line in observer.unprinted(false) {
                            println!("{line}");
                        }
                        if now >= next_line {
                            println!("{}", observer.status_line(&net));
                            next_line = now + LINE_PERIOD;
                        }
                    }
                    View::Quiet => {}
                }
            }
        }
    }
    if view == View::Screen {
        let _ = write!(stdout, "\x1b[?25h\x1b[?1049l");
        let _ = stdout.flush();
    }
    // The bots' last state, while the relays still run.
    while let Ok(event) = events_rx.try_recv() {
        observer.on_event(&net, event);
    }
    observer.sample(&net);
    if view == View::Lines {
        for line in observer.unprinted(true) {
            println!("{line}");
        }
    }
    let end_states = observer.states();
    let summary = observer.summary(&net, &end_states);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + STOP_DEADLINE;
    for handle in handles {
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "a bot task failed"),
            Err(_) => {
                tracing::warn!("bots did not stop within {STOP_DEADLINE:?}");
                break;
            }
        }
    }
    for endpoint in endpoints {
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }
    net.stop().await;
    ensure!(summary.clients > 0, "the demo ran no bots");
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_with_or_without_a_relay() {
        assert_eq!(parse_fault("8"), Ok((8.0, None)));
        assert_eq!(
            parse_fault("8.5:us-east-1"),
            Ok((8.5, Some("us-east-1".into())))
        );
        for bad in ["", "x", "-1", "8:", "inf", "NaN:eu"] {
            assert!(parse_fault(bad).is_err(), "{bad}");
        }
    }

    fn args(extra: &[&str]) -> Args {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: Args,
        }
        let mut argv = vec!["demo"];
        argv.extend_from_slice(extra);
        Wrap::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn command_line_faults_replace_the_scenarios() {
        let (s, source) = scenario(&args(&[])).unwrap();
        assert_eq!(source, "built-in default");
        assert_eq!(s, {
            let mut d = Scenario::default_scenario();
            d.faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
            d
        });
        let (s, _) = scenario(&args(&[
            "--kill-relay-at",
            "8",
            "--drain-relay-at",
            "12",
            "--bots",
            "30",
        ]))
        .unwrap();
        assert_eq!(s.bots(), 30);
        let actions: Vec<(f64, FaultKind, String)> = s
            .faults
            .iter()
            .map(|f| (f.at_s, f.action().0, f.action().1.to_owned()))
            .collect();
        assert_eq!(
            actions,
            [
                (8.0, FaultKind::Kill, "eu-west-1".to_owned()),
                (12.0, FaultKind::Drain, "ap-southeast-1".to_owned())
            ]
        );
        let e = scenario(&args(&["--kill-relay-at", "8:mars-1"])).unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown relay \"mars-1\""),
            "{e:#}"
        );
        let e = scenario(&args(&[
            "--kill-relay-at",
            "8",
            "--drain-relay-at",
            "9:eu-west-1",
        ]))
        .unwrap_err();
        assert!(format!("{e:#}").contains("two faults"), "{e:#}");
    }
}
