//! Run with: cargo run -p statecast-origin --example custom_world
//! and, to host it for relays and clients (Ctrl-C to stop):
//! cargo run -p statecast-origin --example custom_world -- --serve
//! then `statecast relay` and `statecast client --world orbits`.
//!
//! A user-written world: planets on circular orbits around a sun, and a
//! probe that a client session can steer. It shows the whole contract of
//! [`origin::Simulation`]: declare a schema, step, quantize into a snapshot
//! through [`proto::SnapshotBuilder`], hand an entity to a session, and check
//! its inputs.

use origin::{InputError, SessionId, Simulation};
use proto::{Component, Encoding, EntityId, Field, Layout, Position, Schema, Snapshot};
use statecast_origin as origin;
use std::f64::consts::TAU;

/// Half the side of the square the world spans, in astronomical units.
const EXTENT_AU: f64 = 40.0;
/// Entity id of the steerable probe (planets are 0..PLANETS).
const PROBE: EntityId = 100;

struct Planet {
    /// Orbit radius in AU.
    radius: f64,
    /// Orbital period in ticks.
    period: f64,
    /// Angle at tick 0, radians.
    phase: f64,
}

struct Orbits {
    schema: Schema,
    planets: Vec<Planet>,
    tick: u64,
    probe: [f64; 2],
    thrust: [f64; 2],
    pilot: Option<SessionId>,
}

impl Orbits {
    fn new() -> Orbits {
        let coord = Encoding::Float {
            min: -EXTENT_AU,
            max: EXTENT_AU,
            bits: 20,
        };
        let schema = Schema {
            name: "orbits".into(),
            components: vec![
                Component {
                    name: "body".into(),
                    fields: vec![
                        Field {
                            name: "x".into(),
                            encoding: coord,
                        },
                        Field {
                            name: "y".into(),
                            encoding: coord,
                        },
                    ],
                },
                Component {
                    name: "kind".into(),
                    fields: vec![Field {
                        name: "probe".into(),
                        encoding: Encoding::Bool,
                    }],
                },
            ],
            position: Some(Position {
                fields: vec!["body.x".into(), "body.y".into()],
            }),
            max_entities: 128,
        };
        // Radii and periods of the eight planets (Kepler: T ~ r^1.5), one
        // Earth year lasting 600 ticks.
        let radii = [0.39, 0.72, 1.0, 1.52, 5.2, 9.54, 19.2, 30.1];
        let planets = radii
            .iter()
            .enumerate()
            .map(|(i, &radius)| Planet {
                radius,
                period: 600.0 * f64::powf(radius, 1.5),
                phase: i as f64 * 0.7,
            })
            .collect();
        Orbits {
            schema,
            planets,
            tick: 0,
            probe: [1.0, 0.0],
            thrust: [0.0, 0.0],
            pilot: None,
        }
    }
}

impl Simulation for Orbits {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn tick_rate(&self) -> u32 {
        30
    }

    fn step(&mut self) {
        self.tick += 1;
        for (c, t) in self.probe.iter_mut().zip(self.thrust) {
            *c = (*c + t * 0.05).clamp(-EXTENT_AU, EXTENT_AU);
        }
    }

    fn snapshot(&self, layout: &Layout) -> Snapshot {
        let mut builder = proto::SnapshotBuilder::new(layout);
        let t = self.tick as f64;
        for (id, p) in self.planets.iter().enumerate() {
            let angle = p.phase + TAU * t / p.period;
            let lanes = [
                layout.quantize_float(0, p.radius * angle.cos()),
                layout.quantize_float(1, p.radius * angle.sin()),
                0,
            ];
            builder.push(id as EntityId, &lanes, &[]).expect("in range");
        }
        let probe = [
            layout.quantize_float(0, self.probe[0]),
            layout.quantize_float(1, self.probe[1]),
            1,
        ];
        builder.push(PROBE, &probe, &[]).expect("in range");
        builder.finish().expect("distinct ids")
    }

    fn join(&mut self, session: SessionId) -> Option<EntityId> {
        match self.pilot {
            None => {
                self.pilot = Some(session);
                Some(PROBE)
            }
            Some(pilot) if pilot == session => Some(PROBE),
            Some(_) => None,
        }
    }

    fn leave(&mut self, session: SessionId) {
        if self.pilot == Some(session) {
            self.pilot = None;
            self.thrust = [0.0, 0.0];
        }
    }

    fn input(&mut self, session: SessionId, input: &[u8]) -> Result<(), InputError> {
        if self.pilot != Some(session) {
            return Err(InputError::UnknownSession(session));
        }
        let &[x, y] = input else {
            return Err(InputError::Malformed {
                len: input.len(),
                reason: "probe thrust is 2 bytes (x, y as i8)",
            });
        };
        self.thrust = [x as i8, y as i8].map(|v| f64::from(v) / 127.0);
        Ok(())
    }
}

fn main() {
    let mut world = Orbits::new();
    let layout = world.schema().layout().expect("the orbits schema is valid");
    println!("world {} at {} Hz", world.schema(), world.tick_rate());
    let session = 1;
    let probe = world.join(session).expect("the probe is free");
    world.input(session, &[127, 0]).expect("valid thrust");
    assert!(world.input(session, &[1, 2, 3]).is_err());
    for _ in 0..5 {
        world.step();
        let snap = world.snapshot(&layout);
        let lanes = snap.lanes(snap.find(probe).expect("the probe is in every snapshot"));
        println!(
            "tick {:>2}: {} entities, state hash {}, probe at x = {:.3} AU",
            world.tick,
            snap.len(),
            snap.hash(),
            layout.dequantize(0, lanes[0]),
        );
    }
    world.leave(session);

    if std::env::args().any(|a| a == "--serve") {
        serve();
    }
}

/// Hosts the world with the origin library: relays subscribe to it exactly
/// as to the built-in worlds (the schema travels with the subscription).
fn serve() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let config = origin::Config {
            world: "orbits".into(),
            ..origin::Config::default()
        };
        let handle = origin::start_with(config, Box::new(Orbits::new()))
            .await
            .expect("the origin starts");
        println!(
            "hosting `orbits`: relays subscribe at {}, metrics at http://{}/metrics",
            handle.upstream_addr, handle.admin_addr
        );
        tokio::signal::ctrl_c().await.expect("Ctrl-C handler");
        handle.shutdown().await;
    });
}
