//! `fanout`: what fan-out costs. Runs an origin (in this process), one relay
//! (a `statecast relay` process) and N load clients on loopback, and the two
//! baselines (the relay encoding per client, and a plain quinn server that
//! sends the same bytes), then prints a table or JSON.
//!
//! ```sh
//! cargo build --release -p statecast
//! cargo run --release -p statecast-benches --bin fanout -- --set 100,1000
//! ```
//!
//! See `benches/README.md` for the figures and `statecast_benches::fanout`
//! for what is measured and how.

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use statecast_benches::fanout::{self, Settings, floor, servers::Runner};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What fan-out costs: relay CPU per client update against a plain quinn
/// floor and against encoding per client, memory per client, bytes,
/// relay-added latency, drops.
#[derive(Debug, Parser)]
#[command(name = "fanout")]
struct Args {
    /// Measure this many clients only.
    #[arg(long, conflicts_with = "set")]
    clients: Option<usize>,
    /// Numbers of clients to measure, one row each [default: 100,1000,4000].
    #[arg(long, value_delimiter = ',')]
    set: Option<Vec<usize>>,
    /// Seconds of the measurement window, per server and N.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds between the last client connecting and the window.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Print a JSON array (one object per N) instead of the table.
    #[arg(long)]
    json: bool,
    /// Avatars in the plaza world.
    #[arg(long, default_value_t = 10_000)]
    avatars: u32,
    /// Side of the plaza world, in metres.
    #[arg(long, default_value_t = 2000.0)]
    world_size: f64,
    /// Interest radius of every client, in metres (110 m with 50 m cells
    /// gives about 150 entities per client in the default world).
    #[arg(long, default_value_t = 110.0)]
    radius: f64,
    /// Relay cell size, in metres.
    #[arg(long, default_value_t = 50.0)]
    cell_size: f64,
    /// Client endpoints (UDP sockets) the load clients share.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Skip the two baselines (per-client encoding, floor).
    #[arg(long)]
    no_baselines: bool,
    /// How much to raise the nice value of this process's own threads (the
    /// origin and the load clients) above the servers under test (which
    /// keep the nice value the bench started with), so that the servers get
    /// the cores first, as on a machine of their own; the same for the
    /// relay, per-client encode and floor runs. CPU is measured per process
    /// either way. Off by default: on a machine shared with other work the
    /// lowered load clients are the ones starved, acknowledge late, and the
    /// relay's baselines scatter (see benches/README.md).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    load_nice: i32,
    /// How the relays schedule their fan-out threads: `realtime`
    /// (`SCHED_FIFO`, the relay's default), `nice=N` (normal scheduling at
    /// nice N) or `normal` (neither); both need CAP_SYS_NICE, which the
    /// relays report in their logs if refused.
    #[arg(
        long,
        value_name = "realtime|nice=N|normal",
        default_value = "realtime"
    )]
    fanout_priority: String,
    /// The `statecast` binary [default: next to this one, i.e.
    /// target/release/statecast].
    #[arg(long, value_name = "PATH")]
    relay_bin: Option<PathBuf>,

    /// Internal: run the floor server (spawned by the bench).
    #[arg(long, hide = true)]
    floor_server: bool,
    /// Internal (floor server): QUIC address.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
    /// Internal (floor server): development CA directory.
    #[arg(long, hide = true)]
    data_dir: Option<PathBuf>,
    /// Internal (floor server): datagram size.
    #[arg(long, hide = true)]
    size: Option<usize>,
    /// Internal (floor server): ticks per second.
    #[arg(long, hide = true, default_value_t = 20)]
    rate: u32,
    /// Internal (floor server): time of tick 0, us since the UNIX epoch.
    #[arg(long, hide = true)]
    epoch_us: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let result = if args.floor_server {
        floor_server(&args)
    } else {
        bench(&args)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The bench's runtime: its worker and blocking threads (origin, load
/// clients) run at `nice` above the nice value of the main thread, which
/// keeps it and starts the servers (a child inherits the nice value of
/// the thread that forks it; the servers' is checked and reported). On
/// Linux a nice value is per thread.
fn bench_runtime(nice: i32) -> anyhow::Result<tokio::runtime::Runtime> {
    let base = rustix::process::getpriority_process(None).unwrap_or(0);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if nice > 0 {
        let target = (base + nice).min(19);
        builder.on_thread_start(move || {
            if let Err(e) = rustix::process::setpriority_process(None, target) {
                eprintln!("warning: cannot lower the load threads' priority: {e}");
            }
        });
    }
    builder.build().context("cannot start the async runtime")
}

/// The floor server: serves until its stdin closes (the bench ended, however
/// it ended).
fn floor_server(args: &Args) -> anyhow::Result<()> {
    let config = floor::FloorConfig {
        listen: args
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: args.data_dir.clone().context("--data-dir is required")?,
        size: args.size.context("--size is required")?,
        rate: args.rate.max(1),
        epoch_us: args.epoch_us.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64)
        }),
    };
    runtime()?.block_on(async move {
        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed.send(());
        });
        let (addr, serve) = floor::bind(config, async {
            let _ = stdin_closed.await;
        })?;
        let mut out = std::io::stdout();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
        serve.await;
        Ok(())
    })
}

/// The relay binary, or a clear error saying how to build it.
fn relay_binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match flag {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("cannot locate this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("statecast"),
    };
    if !path.is_file() {
        bail!(
            "the relay binary {} is missing: build it first with \
             `cargo build --release -p statecast` (or pass --relay-bin PATH)",
            path.display()
        );
    }
    warn_if_stale(&path);
    Ok(path)
}

/// Warns when the sources of the relay are newer than the binary (a stale
/// build would measure old code).
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stack: Vec<PathBuf> = ["relay/src", "transport/src", "proto/src", "cli/src"]
        .iter()
        .map(|d| workspace.join(d))
        .collect();
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    // Bounded: these trees hold tens of files.
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > 1000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(t, _)| modified > *t)
            {
                newest = Some((modified, path));
            }
        }
    }
    if let Some((modified, path)) = newest
        && modified > built
    {
        eprintln!(
            "warning: {} is newer than {}: rebuild with `cargo build --release -p statecast` \
             to measure the current relay",
            path.display(),
            bin.display()
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn bench(args: &Args) -> anyhow::Result<()> {
    let relay_bin = relay_binary(args.relay_bin.as_deref())?;
    let floor_bin = std::env::current_exe().context("cannot locate this executable")?;
    let clients = match (&args.set, args.clients) {
        (Some(set), _) => set.clone(),
        (None, Some(n)) => vec![n],
        (None, None) => vec![100, 1000, 4000],
    };
    if clients.is_empty() || clients.contains(&0) {
        bail!("client counts must be at least 1");
    }
    let secs = |s: f64, what: &str| {
        if s.is_finite() && s > 0.0 && s <= 3600.0 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(anyhow!("--{what} must be between 0 and 3600 seconds"))
        }
    };
    let settings = Settings {
        clients,
        duration: secs(args.duration, "duration")?,
        warmup: secs(args.warmup, "warmup")?,
        avatars: args.avatars,
        world_size_m: args.world_size,
        radius: args.radius,
        cell_size: args.cell_size,
        endpoints: args.endpoints.clamp(1, 64),
        baselines: !args.no_baselines,
        runner: Runner::Processes {
            relay_bin,
            floor_bin,
        },
        load_nice: (args.load_nice > 0).then_some(args.load_nice),
        fanout_priority: parse_priority(&args.fanout_priority)?,
        ..Settings::default()
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(Duration::from_millis(120));
    let rows = bench_runtime(args.load_nice)?.block_on(async {
        tokio::select! {
            rows = fanout::run(&settings, &progress) => rows,
            () = shutdown_signal() => Err(anyhow!("interrupted; child processes stopped")),
        }
    });
    progress.finish_and_clear();
    let rows = rows?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "fan-out on loopback: plaza {} avatars on {} m, radius {} m, cells {} m, 20 Hz, \
             {} s windows after {} s warm-up; {} cores, load average at start {}; \
             origin and load clients at nice +{} over the servers",
            settings.avatars,
            settings.world_size_m,
            settings.radius,
            settings.cell_size,
            settings.duration.as_secs_f64(),
            settings.warmup.as_secs_f64(),
            cores,
            loadavg
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            args.load_nice,
        );
        println!(
            "load average at the end {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!();
        print!("{}", fanout::table(&rows));
        println!();
        print!("{}", fanout::details(&rows));
    }
    Ok(())
}

/// `--fanout-priority`.
fn parse_priority(text: &str) -> anyhow::Result<relay::priority::Priority> {
    let normal = |nice| relay::priority::Priority {
        realtime: false,
        nice,
    };
    match text {
        "realtime" => Ok(relay::Config::default().fanout_priority()),
        "normal" => Ok(normal(None)),
        _ => text
            .strip_prefix("nice=")
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|n| (-20..=19).contains(n))
            .map(|n| normal(Some(n)))
            .ok_or_else(|| {
                anyhow!(
                    "--fanout-priority must be realtime, nice=N (-20 to 19) or normal, not {text:?}"
                )
            }),
    }
}
