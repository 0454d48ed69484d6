//! `statecast trace`: record a built-in world to a trace file, and measure the
//! delta codec on a trace.
//!
//! File formats are described in [`benches::trace`]: `cubes` traces use the
//! 2015 compression challenge's public format, every other world statecast's
//! SCTRACE1.

use anyhow::{Context, bail, ensure};
use benches::measure::{self, Report};
use benches::trace as tracefile;
use indicatif::{ProgressBar, ProgressStyle};
use origin::Simulation;
use origin::worlds::{self, cubes, plaza};
use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `statecast trace ...`
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run a built-in world for some ticks and record every tick's snapshot.
    Record(RecordArgs),
    /// Code every frame of a trace against an older one, check, and measure.
    Bench(BenchArgs),
}

/// Arguments of `trace record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// World to run (cubes, plaza).
    #[arg(long, env = "STATECAST_WORLD")]
    pub world: String,
    /// Ticks to run; one frame is recorded after each.
    #[arg(long)]
    pub ticks: u64,
    /// File to write (replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the world's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// For plaza: number of avatars (default: the world's default).
    #[arg(long)]
    pub avatars: Option<u32>,
}

/// Arguments of `trace bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Trace file (cubes challenge format, or SCTRACE1).
    #[arg(long)]
    pub trace: PathBuf,
    /// Ticks between baseline and target: 6 is 100 ms at 60 Hz, the
    /// challenge's rule.
    #[arg(long, default_value_t = 6)]
    pub lag: usize,
    /// Packets per second, for kbps (the challenge counts at 60 Hz).
    #[arg(long, default_value_t = 60.0)]
    pub hz: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `trace` subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Record(args) => {
            let summary = record(&args)?;
            println!("{summary}");
            Ok(())
        }
        Command::Bench(args) => bench(&args),
    }
}

/// Builds the world a `record` asks for.
pub fn world(name: &str, seed: u64, avatars: Option<u32>) -> anyhow::Result<Box<dyn Simulation>> {
    match (name, avatars) {
        ("plaza", Some(avatars)) => {
            let config = plaza::PlazaConfig {
                avatars,
                seed,
                ..plaza::PlazaConfig::default()
            };
            Ok(Box::new(
                plaza::Plaza::try_new(config).context("invalid plaza configuration")?,
            ))
        }
        (_, Some(_)) => bail!("--avatars applies to the plaza world only"),
        (name, None) => Ok(worlds::by_name(name, seed)?),
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("progress template is valid"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Records a trace as `args` say and returns a one-line summary.
pub fn record(args: &RecordArgs) -> anyhow::Result<String> {
    ensure!(args.ticks > 0, "--ticks must be at least 1");
    let mut sim = world(&args.world, args.seed, args.avatars)?;
    let schema = sim.schema().clone();
    let layout = schema
        .layout()
        .with_context(|| format!("world {} declares an invalid schema", args.world))?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let is_cubes = schema == cubes::schema();
    let format = if is_cubes { "cubes" } else { "SCTRACE1" };
    tracing::info!(world = %args.world, seed = args.seed, ticks = args.ticks, format, out = %args.out.display(), "recording");

    let bar = progress(args.ticks, "recording");
    let started = Instant::now();
    let mut entities = 0;
    let bytes = if is_cubes {
        for _ in 0..args.ticks {
            sim.step();
            let snapshot = sim.snapshot(&layout);
            entities = snapshot.len();
            cubes::write_frame(&mut out, &cubes::to_records(&snapshot))
                .with_context(|| format!("cannot write to {}", args.out.display()))?;
            bar.inc(1);
        }
        out.flush()
            .with_context(|| format!("cannot write to {}", args.out.display()))?;
        args.ticks * cubes::FRAME_BYTES as u64
    } else {
        let mut writer = tracefile::Writer::new(&mut out, &schema)?;
        for _ in 0..args.ticks {
            sim.step();
            let snapshot = sim.snapshot(&layout);
            entities = snapshot.len();
            writer
                .frame(&snapshot)
                .with_context(|| format!("cannot write to {}", args.out.display()))?;
            bar.inc(1);
        }
        let bytes = writer.bytes();
        writer
            .finish()
            .with_context(|| format!("cannot write to {}", args.out.display()))?;
        bytes
    };
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write to {}", args.out.display()))?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    Ok(format!(
        "recorded {} frames of {} ({} entities, seed {}) to {} in {} format: {} bytes ({:.1} MiB) in {:.2} s ({:.0} ticks/s)",
        args.ticks,
        args.world,
        entities,
        args.seed,
        args.out.display(),
        format,
        bytes,
        bytes as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64(),
        args.ticks as f64 / elapsed.as_secs_f64().max(1e-9),
    ))
}

/// Loads a trace, measures the codec on it and prints the report.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.hz.is_finite() && args.hz > 0.0,
        "--hz must be a positive number"
    );
    let started = Instant::now();
    let trace = tracefile::load(&args.trace)?;
    tracing::info!(
        trace = %args.trace.display(),
        format = trace.format.name(),
        world = trace.world(),
        frames = trace.frames.len(),
        load_ms = started.elapsed().as_millis() as u64,
        "trace loaded"
    );
    let bar = progress(trace.frames.len().saturating_sub(args.lag) as u64, "coding");
    bar.enable_steady_tick(Duration::from_millis(250));
    let report = measure::run(&trace, args.lag, args.hz, |done| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("cannot measure {}", args.trace.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    if !report.exact {
        bail!(
            "{} packets did not decode exactly; first: {}",
            report.mismatches,
            report.first_mismatch.as_deref().unwrap_or("?")
        );
    }
    if report.bitpack_exact == Some(false) {
        bail!("the bit-packed baseline did not round-trip every packet");
    }
    Ok(())
}

/// The human table of a report.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let ms = 1000.0 * r.lag as f64 / r.hz;
    let _ = writeln!(
        s,
        "trace: {} ({} format), {} frames, {} entities; each frame coded against the one {} ticks before ({:.0} ms at {} Hz)\n",
        r.world, r.format, r.frames, r.entities, r.lag, ms, r.hz
    );
    let _ = writeln!(
        s,
        "{:<30} {:>8} {:>13} {:>10} {:>10} {:>10} {:>6}",
        "codec", "packets", "bytes/packet", "kbps", "encode us", "decode us", "exact"
    );
    let yes = |b: bool| if b { "yes" } else { "NO" };
    let row = |s: &mut String,
               name: &str,
               bytes: f64,
               kbps: f64,
               enc: Option<f64>,
               dec: Option<f64>,
               exact: Option<bool>| {
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "{:<30} {:>8} {:>13.1} {:>10.1} {:>10} {:>10} {:>6}",
            name,
            if exact.is_some() {
                r.packets.to_string()
            } else {
                "-".into()
            },
            bytes,
            kbps,
            us(enc),
            us(dec),
            exact.map_or("-", yes),
        );
    };
    row(
        &mut s,
        "statecast (with prediction)",
        r.bytes_per_packet,
        r.kbps,
        Some(r.encode_us),
        Some(r.decode_us),
        Some(r.exact),
    );
    row(
        &mut s,
        "statecast (no prediction)",
        r.bytes_per_packet_no_prediction,
        r.kbps_no_prediction,
        Some(r.encode_us_no_prediction),
        Some(r.decode_us_no_prediction),
        Some(r.exact),
    );
    if let Some(b) = r.bitpack_bytes_per_packet {
        row(
            &mut s,
            "bit-packed baseline",
            b,
            r.bitpack_kbps.unwrap_or(0.0),
            r.bitpack_encode_us,
            r.bitpack_decode_us,
            r.bitpack_exact,
        );
    }
    row(
        &mut s,
        "full quantized snapshot",
        r.full_bytes_per_packet,
        r.full_kbps,
        None,
        None,
        None,
    );
    let _ = writeln!(s);
    let mut ratios = Vec::new();
    if let (Some(p), Some(n)) = (r.ratio_vs_bitpack, r.ratio_no_prediction_vs_bitpack) {
        ratios.push(format!("{p:.2} x bitpack ({n:.2} x without prediction)"));
    }
    ratios.push(format!("{:.3} x full", r.ratio_vs_full));
    let saved = 1.0 - r.bytes_per_packet / r.bytes_per_packet_no_prediction;
    ratios.push(format!("prediction saves {:.0}%", 100.0 * saved));
    let _ = writeln!(s, "statecast: {}", ratios.join(", "));
    let _ = writeln!(
        s,
        "largest packet {} bytes; encode + decode p99 {:.1} us",
        r.max_bytes_per_packet, r.encode_decode_us_p99
    );
    s
}
