//! Joins a world through a relay and reacts to entity events: for every tick
//! applied, how many entities came into view, changed and left, and where
//! one of the changed ones is now.
//!
//! Run with: cargo run -p statecast-client --example events -- --relay 127.0.0.1:4434
//!
//! Start an origin and a relay first (`statecast origin`, then `statecast
//! relay`, from the same directory: all three trust the development CA that
//! the first of them creates in `./.statecast`). Options: `--world NAME`
//! (default `plaza`), `--area X,Y,R` (an area of interest, in metres),
//! `--ticks N` (stop after N ticks). Stop with Ctrl-C.

use std::error::Error;
use std::net::SocketAddr;

use proto::Layout;
use proto::msg::Area;
use statecast_client::session::{self, Config, Session, SessionEvent};
use statecast_client::{Event, Replica};
use transport::Trust;

struct Options {
    relay: SocketAddr,
    world: String,
    area: Option<Area>,
    ticks: Option<u64>,
}

fn options() -> Result<Options, Box<dyn Error>> {
    let mut options = Options {
        relay: "127.0.0.1:4434".parse()?,
        world: "plaza".to_owned(),
        area: None,
        ticks: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--relay" => options.relay = value()?.parse()?,
            "--world" => options.world = value()?,
            "--ticks" => options.ticks = Some(value()?.parse()?),
            "--area" => {
                let v: Vec<f32> = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                let [x, y, radius] = v[..] else {
                    return Err("--area takes X,Y,R".into());
                };
                options.area = Some(Area { x, y, radius });
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(options)
}

/// Where entity `id` is in the newest state, if the world has positions.
fn position(replica: &Replica, layout: &Layout, id: u32) -> Option<(f64, f64)> {
    let lanes = replica.current()?.entity(id)?;
    let fields = layout.position_fields();
    let lane = |f: usize| lanes[layout.fields()[f].lane];
    let (x, y) = (*fields.first()?, *fields.get(1)?);
    Some((layout.dequantize(x, lane(x)), layout.dequantize(y, lane(y))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let options = options()?;

    // The development CA in ./.statecast (or $STATECAST_DATA), as the origin
    // and relay use by default. Production: Trust::from_flags(None, None,
    // Some(ca_file), None).
    let trust = Trust::from_flags(None, None, None, None);
    println!("trust: {}", trust.describe());
    let tls = trust.load()?;
    let endpoint = session::endpoint(&tls, "0.0.0.0:0".parse()?)?;

    let mut config = Config::new(options.relay, options.world);
    config.interest = options.area;
    // Ask for entity events (bots that only count ticks leave this off).
    config.events = true;
    let mut session = Session::connect(&endpoint, config).await?;
    let welcome = session.welcome();
    println!(
        "joined world {} on relay {} ({}), session {:#x}, {} ticks/s",
        welcome.world, welcome.relay_id, welcome.region, welcome.session, welcome.tick_rate
    );

    let mut ticks = 0;
    loop {
        let event = tokio::select! {
            event = session.next_event() => event?,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            SessionEvent::Applied {
                tick,
                keyframe,
                latency_us,
                events,
            } => {
                let (mut added, mut changed, mut removed) = (0, 0, 0);
                let mut moved = None;
                for event in &events {
                    match event {
                        Event::Added(_) => added += 1,
                        Event::Changed(id) => {
                            changed += 1;
                            moved.get_or_insert(*id);
                        }
                        Event::Removed(_) => removed += 1,
                    }
                }
                let held = session.replica().current().map_or(0, |s| s.entity_count());
                let latency =
                    latency_us.map_or("?".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0));
                let mut line = format!(
                    "tick {tick}{}: +{added} ~{changed} -{removed}, {held} held, {latency}",
                    if keyframe { " (keyframe)" } else { "" }
                );
                if let Some(id) = moved
                    && let Some((x, y)) = position(session.replica(), session.layout(), id)
                {
                    line += &format!(", entity {id} at ({x:.1}, {y:.1})");
                }
                println!("{line}");
                ticks += 1;
                if options.ticks.is_some_and(|n| ticks >= n) {
                    break;
                }
            }
            SessionEvent::Divergence { tick, .. } => {
                println!("tick {tick}: state does not match the origin's hash (repaired next tick)")
            }
            SessionEvent::Goaway(goaway) => {
                println!("the relay is draining: {}", goaway.reason)
            }
            SessionEvent::Directory(directory) => {
                println!("the relay knows {} relays", directory.relays.len())
            }
            SessionEvent::Closed { reason, .. } => {
                println!("session closed: {reason}");
                break;
            }
        }
    }
    let stats = session.stats().clone();
    let p50 = stats
        .latency_ms
        .p50_ms()
        .map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
    println!(
        "{} ticks applied, {} divergences, {} keyframes, latency p50 {p50}",
        stats.ticks_applied, stats.divergences, stats.keyframes
    );
    session.close().await;
    endpoint.wait_idle().await;
    Ok(())
}
