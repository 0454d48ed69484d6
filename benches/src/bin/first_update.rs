//! `first_update`: how long a client takes from start to its first verified
//! update, against the issue's target of 3 x the best RTT plus the QUIC
//! handshake, both measured in the same run.
//!
//! ```sh
//! cargo run --release -p statecast-benches --bin first_update -- [--rtts 20,50,100] [--trials 10] [--json]
//! ```
//!
//! Setup, all in this process on loopback: an origin (plaza), three relays
//! already serving the world (one warm client each, as in a running
//! network), and per RTT R three pairs of [`lab::link::Link`]s (QUIC and
//! probes) that put the relays at R, 2R and 4R from the client. Per trial:
//!
//! - **baseline**: a fresh QUIC endpoint connects to the best relay through
//!   its link and the time to the established connection (the handshake) is
//!   taken;
//! - **client**: a fresh endpoint runs [`client::roam::Roamer::connect`]
//!   (probe the three, pick, connect, hello/welcome) and waits for the first
//!   applied, hash-checked update.
//!
//! The figure is `(client - handshake) / R`: the target is at most 3.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use client::roam::{self, RoamEvent, Roamer};
use client::select::Candidate;
use lab::link::{Direction, Link, LinkConfig};
use serde::Serialize;

/// Start to first verified update, against 3 x RTT + the QUIC handshake.
#[derive(Debug, Parser)]
#[command(name = "first_update")]
struct Args {
    /// RTTs (ms) from the client to the best relay, one row each; the
    /// other two relays sit at 2x and 4x.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100")]
    rtts: Vec<u64>,
    /// Trials per RTT.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Avatars in the plaza world.
    #[arg(long, default_value_t = 2000)]
    avatars: u32,
    /// Print one JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    rtt_ms: u64,
    trials: usize,
    handshake_ms_p50: f64,
    first_update_ms_p50: f64,
    first_update_ms_p90: f64,
    /// (first update - handshake) / RTT, median and 90th percentile.
    rtts_beyond_handshake_p50: f64,
    rtts_beyond_handshake_p90: f64,
    picked_best: usize,
    target_met: bool,
}

fn link(rtt_ms: u64) -> LinkConfig {
    LinkConfig::symmetric(Direction {
        delay: Duration::from_millis(rtt_ms) / 2,
        jitter: Duration::from_micros(500),
        ..Direction::default()
    })
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.trials == 0 || args.rtts.is_empty() {
        bail!("--trials and --rtts must not be empty");
    }
    let dir = std::env::temp_dir().join(format!("statecast-first-update-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;

    let plaza = origin::worlds::plaza::Plaza::try_new(origin::worlds::plaza::PlazaConfig {
        avatars: args.avatars,
        ..Default::default()
    })?;
    let origin = origin::start_with(
        origin::Config {
            world: "plaza".into(),
            listen: any,
            admin: any,
            tls: origin::config::Tls {
                data_dir: Some(dir.clone()),
                ..Default::default()
            },
            ..origin::Config::default()
        },
        Box::new(plaza),
    )
    .await
    .context("origin failed to start")?;
    let mut relays = Vec::new();
    for i in 0..3 {
        let relay = relay::start(relay::Config {
            id: format!("relay-{i}"),
            region: format!("r{i}"),
            listen: any,
            upstream: origin.upstream_addr,
            admin: any,
            probe: Some(any),
            data_dir: Some(dir.clone()),
            ..relay::Config::default()
        })
        .await
        .context("relay failed to start")?;
        relays.push(relay);
    }
    let tls = transport::Trust::dev(&dir).load()?;
    // One warm client per relay: each relay holds the world, as in a
    // running network.
    let warm_endpoint = client::session::endpoint(&tls, any)?;
    let mut warm = Vec::new();
    for relay in &relays {
        let config = client::session::Config::new(relay.client_addr, "plaza");
        let mut session = client::Session::connect(&warm_endpoint, config).await?;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let client::SessionEvent::Applied { .. } = session.next_event().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .context("a warm client got no update in 10 s")??;
        warm.push(tokio::spawn(async move {
            while session.next_event().await.is_ok() {}
        }));
    }

    let mut rows = Vec::new();
    for &rtt in &args.rtts {
        let mut links = Vec::new();
        let mut candidates = Vec::new();
        for (i, relay) in relays.iter().enumerate() {
            let config = link(rtt << i);
            let probe = relay.probe_addr.context("relays answer probes")?;
            let quic = Link::start(any, relay.client_addr, config.clone()).await?;
            let probe = Link::start(any, probe, config).await?;
            candidates.push(Candidate::new(probe.local_addr(), quic.local_addr()));
            links.push((quic, probe));
        }
        let best = candidates[0].connect;
        let mut handshakes = Vec::new();
        let mut firsts = Vec::new();
        let mut picked_best = 0;
        for trial in 0..args.trials {
            eprint!("\rRTT {rtt} ms: trial {}/{}", trial + 1, args.trials);
            let endpoint = client::session::endpoint(&tls, any)?;
            let start = Instant::now();
            let conn = endpoint.connect(best, "localhost")?.await?;
            handshakes.push(ms(start.elapsed()));
            conn.close(0u32.into(), b"");
            drop(conn);

            let endpoint = client::session::endpoint(&tls, any)?;
            let mut config = roam::Config::new("plaza");
            config.interest = Some(proto::msg::Area {
                x: 0.0,
                y: 0.0,
                radius: 100.0,
            });
            config.select.nonce_seed = trial as u64 + 1;
            let start = Instant::now();
            let mut roamer = Roamer::connect(&endpoint, candidates.clone(), config).await?;
            let connected = start.elapsed();
            let first = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let RoamEvent::Applied { .. } = roamer.next_event().await? {
                        return anyhow::Ok(start.elapsed());
                    }
                }
            })
            .await
            .context("no first update within 10 s")??;
            firsts.push(ms(first));
            if std::env::var_os("FIRST_UPDATE_DEBUG").is_some() {
                eprintln!(
                    " connected {:.1} ms, first update {:.1} ms",
                    ms(connected),
                    ms(first)
                );
            }
            if roamer.relay().map(|r| r.addr) == Some(best) {
                picked_best += 1;
            }
            roamer.close().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        eprintln!();
        let beyond: Vec<f64> = firsts
            .iter()
            .zip(&handshakes)
            .map(|(f, h)| (f - h) / rtt as f64)
            .collect();
        let p90 = percentile(&beyond, 0.9);
        rows.push(Row {
            rtt_ms: rtt,
            trials: args.trials,
            handshake_ms_p50: percentile(&handshakes, 0.5),
            first_update_ms_p50: percentile(&firsts, 0.5),
            first_update_ms_p90: percentile(&firsts, 0.9),
            rtts_beyond_handshake_p50: percentile(&beyond, 0.5),
            rtts_beyond_handshake_p90: p90,
            picked_best,
            target_met: p90 <= 3.0,
        });
        for (quic, probe) in links {
            quic.stop().await;
            probe.stop().await;
        }
    }
    for task in warm {
        task.abort();
    }
    for relay in relays {
        relay.shutdown().await;
    }
    origin.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>7} {:>7} {:>12} {:>14} {:>14} {:>16} {:>16} {:>11}",
        "rtt ms",
        "trials",
        "handshake",
        "first p50",
        "first p90",
        "(first-hs)/rtt",
        "p90",
        "picked best"
    );
    for r in &rows {
        println!(
            "{:>7} {:>7} {:>9.1} ms {:>11.1} ms {:>11.1} ms {:>16.2} {:>16.2} {:>8}/{}{}",
            r.rtt_ms,
            r.trials,
            r.handshake_ms_p50,
            r.first_update_ms_p50,
            r.first_update_ms_p90,
            r.rtts_beyond_handshake_p50,
            r.rtts_beyond_handshake_p90,
            r.picked_best,
            r.trials,
            if r.target_met {
                ""
            } else {
                "  (target missed)"
            }
        );
    }
    Ok(())
}
