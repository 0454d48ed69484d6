//! A large open world of walking avatars, for interest management and
//! fan-out: many entities, spread far apart, each changing a little every
//! tick.
//!
//! Avatars walk between waypoints at walking pace (some jog), turning
//! smoothly, pausing now and then to talk, wave or sit; a few loiter in place.
//! Waypoints are either nearby (a stroll of 20 to 250 m) or around one of a
//! few hotspots (squares, fountains), so the crowd is denser in places, as
//! real crowds are. Everything is drawn from the seed (ChaCha8). The world
//! runs at 20 Hz on a square of [`PlazaConfig::size_m`] metres, origin at a
//! corner.
//!
//! Fields, per avatar (entity id = avatar index):
//!
//! | field | encoding |
//! | --- | --- |
//! | `transform.x`, `transform.y` | float over `[0, size_m]`, about 1 cm steps (18 bits for 2 km) |
//! | `transform.heading` | float over `[0, 2π]`, 10 bits; radians counter-clockwise from +x |
//! | `motion.speed` | float over `[0, 8]` m/s, 8 bits |
//! | `motion.anim` | integer 0 to 7, see [`Anim`] |
//! | `state.controlled` | bool: a client session drives the avatar |
//!
//! A client session that joins takes a free avatar and steers it with
//! inputs; when it leaves, the avatar walks on by itself.

use crate::sim::{InputError, SessionId, Simulation};
use proto::{Component, Encoding, EntityId, Field, Layout, Position, Schema, Snapshot};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::f64::consts::{PI, TAU};

/// Ticks per second.
pub const TICK_RATE: u32 = 20;
/// Top of the speed field's range, in m/s.
pub const MAX_SPEED: f64 = 8.0;
/// Walking speed of a driven avatar at full stick, in m/s.
pub const DRIVEN_WALK: f64 = 1.6;
/// Running speed of a driven avatar at full stick, in m/s.
pub const DRIVEN_RUN: f64 = 5.5;
/// Smallest world side accepted, in metres.
pub const MIN_SIZE_M: f64 = 10.0;
/// Largest world side accepted, in metres (keeps 1 cm steps within 32 bits).
pub const MAX_SIZE_M: f64 = 1_000_000.0;

const DT: f64 = 1.0 / TICK_RATE as f64;
/// Fastest turn of a wandering avatar, rad/s.
const TURN_RATE: f64 = 2.5;
/// Speed change of a wandering avatar, m/s per second.
const ACCEL: f64 = 2.0;
const POSITION_STEP_M: f64 = 0.01;
const HEADING_BITS: u8 = 10;
const SPEED_BITS: u8 = 8;

// Field indexes in the schema (and lane indexes: every field is one lane;
// the sixth, `state.controlled`, is a bool stored as is).
const X: usize = 0;
const Y: usize = 1;
const HEADING: usize = 2;
const SPEED: usize = 3;
const ANIM: usize = 4;

/// What an avatar is shown doing (`motion.anim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Anim {
    /// Standing.
    Idle = 0,
    /// Walking.
    Walk = 1,
    /// Running.
    Run = 2,
    /// Talking (standing).
    Talk = 3,
    /// Waving (standing).
    Wave = 4,
    /// Sitting.
    Sit = 5,
}

impl Anim {
    const STANDING: [Anim; 4] = [Anim::Idle, Anim::Talk, Anim::Wave, Anim::Sit];
}

/// How to build a plaza.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlazaConfig {
    /// Number of avatars (entities), 1 to [`proto::schema::MAX_ENTITIES`].
    pub avatars: u32,
    /// Side of the square world in metres, [`MIN_SIZE_M`] to [`MAX_SIZE_M`].
    pub size_m: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for PlazaConfig {
    /// 10 000 avatars on 2 km x 2 km: a crowd too big to send whole to
    /// anyone, on an area large enough for interest management to matter.
    fn default() -> Self {
        PlazaConfig {
            avatars: 10_000,
            size_m: 2000.0,
            seed: 0,
        }
    }
}

/// Why a [`PlazaConfig`] was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlazaConfigError {
    /// Avatar count out of range.
    #[error("avatars must be 1 to {max}, not {0}", max = proto::schema::MAX_ENTITIES)]
    Avatars(u32),
    /// World size out of range.
    #[error("size_m must be {MIN_SIZE_M} to {MAX_SIZE_M} metres, not {0}")]
    Size(f64),
}

/// What a wandering avatar is up to.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Going to `target` at `pace` m/s.
    Walk {
        target: [f64; 2],
        pace: f64,
        run: bool,
    },
    /// Standing still for `ticks` more ticks, doing `anim`.
    Pause { ticks: u32, anim: Anim },
    /// Never walks; changes what it does after `ticks` ticks.
    Loiter { ticks: u32, anim: Anim },
}

#[derive(Clone, Debug)]
struct Avatar {
    pos: [f64; 2],
    /// Radians in `[0, 2π)`.
    heading: f64,
    speed: f64,
    anim: Anim,
    plan: Plan,
    /// The move direction and run flag of the driving session, if any.
    driven: Option<([f64; 2], bool)>,
}

/// The plaza world. See the [module documentation](self).
#[derive(Debug)]
pub struct Plaza {
    config: PlazaConfig,
    schema: Schema,
    avatars: Vec<Avatar>,
    hotspots: Vec<[f64; 2]>,
    rng: ChaCha8Rng,
    sessions: HashMap<SessionId, u32>,
    /// Where the search for a free avatar starts.
    cursor: usize,
    tick: u64,
}

/// The plaza schema for a world of `avatars` avatars on a `size_m` square.
///
/// # Panics
/// If the configuration is out of range (see [`Plaza::try_new`]).
pub fn schema(avatars: u32, size_m: f64) -> Schema {
    check(avatars, size_m).expect("plaza configuration out of range");
    let field = |name: &str, encoding| Field {
        name: name.into(),
        encoding,
    };
    let steps = (size_m / POSITION_STEP_M).ceil();
    let bits = (steps + 1.0).log2().ceil().clamp(8.0, 32.0) as u8;
    let coord = Encoding::Float {
        min: 0.0,
        max: size_m,
        bits,
    };
    Schema {
        name: "plaza".into(),
        components: vec![
            Component {
                name: "transform".into(),
                fields: vec![
                    field("x", coord),
                    field("y", coord),
                    field(
                        "heading",
                        Encoding::Float {
                            min: 0.0,
                            max: TAU,
                            bits: HEADING_BITS,
                        },
                    ),
                ],
            },
            Component {
                name: "motion".into(),
                fields: vec![
                    field(
                        "speed",
                        Encoding::Float {
                            min: 0.0,
                            max: MAX_SPEED,
                            bits: SPEED_BITS,
                        },
                    ),
                    field("anim", Encoding::Int { min: 0, max: 7 }),
                ],
            },
            Component {
                name: "state".into(),
                fields: vec![field("controlled", Encoding::Bool)],
            },
        ],
        position: Some(Position {
            fields: vec!["transform.x".into(), "transform.y".into()],
        }),
        max_entities: avatars,
    }
}

fn check(avatars: u32, size_m: f64) -> Result<(), PlazaConfigError> {
    if avatars == 0 || avatars > proto::schema::MAX_ENTITIES {
        return Err(PlazaConfigError::Avatars(avatars));
    }
    if !(MIN_SIZE_M..=MAX_SIZE_M).contains(&size_m) {
        return Err(PlazaConfigError::Size(size_m));
    }
    Ok(())
}

/// `angle` in `(-π, π]`.
fn wrap_pi(angle: f64) -> f64 {
    let a = angle.rem_euclid(TAU);
    if a > PI { a - TAU } else { a }
}

impl Plaza {
    /// A plaza with its crowd placed and already under way.
    ///
    /// # Panics
    /// If the configuration is out of range; [`Plaza::try_new`] returns the
    /// error instead.
    pub fn new(config: PlazaConfig) -> Plaza {
        match Plaza::try_new(config) {
            Ok(plaza) => plaza,
            Err(e) => panic!("{e}"),
        }
    }

    /// A plaza, or why the configuration is refused.
    pub fn try_new(config: PlazaConfig) -> Result<Plaza, PlazaConfigError> {
        check(config.avatars, config.size_m)?;
        let size = config.size_m;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let hotspot_count = ((size / 400.0).powi(2).round() as usize).clamp(1, 64);
        let hotspots = (0..hotspot_count)
            .map(|_| {
                [
                    rng.random_range(0.1 * size..0.9 * size),
                    rng.random_range(0.1 * size..0.9 * size),
                ]
            })
            .collect();
        let mut plaza = Plaza {
            config,
            schema: schema(config.avatars, size),
            avatars: Vec::with_capacity(config.avatars as usize),
            hotspots,
            rng,
            sessions: HashMap::new(),
            cursor: 0,
            tick: 0,
        };
        for _ in 0..config.avatars {
            let avatar = plaza.spawn();
            plaza.avatars.push(avatar);
        }
        Ok(plaza)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &PlazaConfig {
        &self.config
    }

    /// Ticks stepped so far.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// A new avatar: near a hotspot or anywhere, most of them already
    /// walking (facing their waypoint at full pace), some pausing, a few
    /// loitering for good.
    fn spawn(&mut self) -> Avatar {
        let pos = if self.rng.random_bool(0.4) {
            self.near_hotspot()
        } else {
            let size = self.config.size_m;
            [
                self.rng.random_range(0.0..size),
                self.rng.random_range(0.0..size),
            ]
        };
        let mut avatar = Avatar {
            pos,
            heading: self.rng.random_range(0.0..TAU),
            speed: 0.0,
            anim: Anim::Idle,
            plan: Plan::Pause {
                ticks: 0,
                anim: Anim::Idle,
            },
            driven: None,
        };
        let roll: f64 = self.rng.random();
        if roll < 0.05 {
            avatar.plan = self.loiter();
        } else if roll < 0.12 {
            avatar.plan = self.pause();
        } else {
            avatar.plan = self.walk(pos);
            if let Plan::Walk { target, pace, run } = avatar.plan {
                avatar.heading = (target[1] - pos[1])
                    .atan2(target[0] - pos[0])
                    .rem_euclid(TAU);
                avatar.speed = pace;
                avatar.anim = if run { Anim::Run } else { Anim::Walk };
            }
        }
        if let Plan::Pause { anim, .. } | Plan::Loiter { anim, .. } = avatar.plan {
            avatar.anim = anim;
        }
        avatar
    }

    /// A point around a random hotspot (within about 40 m), inside the world.
    fn near_hotspot(&mut self) -> [f64; 2] {
        let spot = self.hotspots[self.rng.random_range(0..self.hotspots.len())];
        let mut offset = || (self.rng.random::<f64>() + self.rng.random::<f64>() - 1.0) * 40.0;
        let p = [spot[0] + offset(), spot[1] + offset()];
        p.map(|c| c.clamp(0.0, self.config.size_m))
    }

    /// A walk from `from`: to a hotspot, or a stroll of 20 to 250 m; mostly
    /// at walking pace, sometimes jogging.
    fn walk(&mut self, from: [f64; 2]) -> Plan {
        let size = self.config.size_m;
        let target = if self.rng.random_bool(0.35) {
            self.near_hotspot()
        } else {
            let angle = self.rng.random_range(0.0..TAU);
            let dist = self.rng.random_range(20.0..250.0);
            [from[0] + dist * angle.cos(), from[1] + dist * angle.sin()]
                .map(|c| c.clamp(1.0, size - 1.0))
        };
        let run = self.rng.random_bool(0.12);
        let pace = if run {
            self.rng.random_range(2.8..5.5)
        } else {
            self.rng.random_range(0.9..1.7)
        };
        Plan::Walk { target, pace, run }
    }

    /// A pause of 2 to 20 s, doing something standing.
    fn pause(&mut self) -> Plan {
        Plan::Pause {
            ticks: self.rng.random_range(2 * TICK_RATE..20 * TICK_RATE),
            anim: Anim::STANDING[self.rng.random_range(0..Anim::STANDING.len())],
        }
    }

    /// Loitering: 10 to 40 s of one standing activity, then another.
    fn loiter(&mut self) -> Plan {
        Plan::Loiter {
            ticks: self.rng.random_range(10 * TICK_RATE..40 * TICK_RATE),
            anim: Anim::STANDING[self.rng.random_range(0..Anim::STANDING.len())],
        }
    }

    /// One tick of the avatar at `index`.
    fn advance(&mut self, index: usize) {
        let size = self.config.size_m;
        let a = &mut self.avatars[index];
        if let Some((dir, run)) = a.driven {
            let mag = (dir[0] * dir[0] + dir[1] * dir[1]).sqrt();
            let top = if run { DRIVEN_RUN } else { DRIVEN_WALK };
            a.speed = mag * top;
            if mag > 0.0 {
                a.heading = dir[1].atan2(dir[0]).rem_euclid(TAU);
                a.anim = if run { Anim::Run } else { Anim::Walk };
            } else {
                a.anim = Anim::Idle;
            }
            a.pos = [
                (a.pos[0] + dir[0] * top * DT).clamp(0.0, size),
                (a.pos[1] + dir[1] * top * DT).clamp(0.0, size),
            ];
            return;
        }
        let next = match &mut a.plan {
            Plan::Walk { target, pace, run } => {
                let (dx, dy) = (target[0] - a.pos[0], target[1] - a.pos[1]);
                let dist = (dx * dx + dy * dy).sqrt();
                if dist <= (a.speed * DT).max(0.3) {
                    a.pos = *target;
                    Some(true)
                } else {
                    let diff = wrap_pi(dy.atan2(dx) - a.heading);
                    let turn = TURN_RATE * DT;
                    a.heading = (a.heading + diff.clamp(-turn, turn)).rem_euclid(TAU);
                    // Slow down in sharp turns, so the turning circle never
                    // encloses the waypoint.
                    let want = *pace * diff.cos().max(0.25);
                    a.speed += (want - a.speed).clamp(-ACCEL * DT, ACCEL * DT);
                    a.anim = if *run && a.speed > 2.2 {
                        Anim::Run
                    } else {
                        Anim::Walk
                    };
                    a.pos = [
                        (a.pos[0] + a.heading.cos() * a.speed * DT).clamp(0.0, size),
                        (a.pos[1] + a.heading.sin() * a.speed * DT).clamp(0.0, size),
                    ];
                    None
                }
            }
            Plan::Pause { ticks, anim } => {
                *ticks = ticks.saturating_sub(1);
                a.speed = (a.speed - 2.0 * ACCEL * DT).max(0.0);
                a.pos = [
                    (a.pos[0] + a.heading.cos() * a.speed * DT).clamp(0.0, size),
                    (a.pos[1] + a.heading.sin() * a.speed * DT).clamp(0.0, size),
                ];
                a.anim = if a.speed > 0.3 { Anim::Walk } else { *anim };
                (*ticks == 0).then_some(false)
            }
            Plan::Loiter { ticks, anim } => {
                *ticks = ticks.saturating_sub(1);
                a.speed = 0.0;
                a.anim = *anim;
                (*ticks == 0).then_some(false)
            }
        };
        match (next, a.plan) {
            (None, _) => {}
            (Some(_), Plan::Loiter { .. }) => {
                let plan = self.loiter();
                self.avatars[index].plan = plan;
            }
            // Arrived: pause half the time, else walk on at once.
            (Some(true), _) if self.rng.random_bool(0.5) => {
                let plan = self.pause();
                self.avatars[index].plan = plan;
            }
            (Some(_), _) => {
                let from = self.avatars[index].pos;
                let plan = self.walk(from);
                self.avatars[index].plan = plan;
            }
        }
    }
}

impl Simulation for Plaza {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn tick_rate(&self) -> u32 {
        TICK_RATE
    }

    fn step(&mut self) {
        for index in 0..self.avatars.len() {
            self.advance(index);
        }
        self.tick += 1;
    }

    fn snapshot(&self, layout: &Layout) -> Snapshot {
        debug_assert_eq!(
            layout.schema(),
            &self.schema,
            "snapshot of a foreign layout"
        );
        let rows = self.avatars.iter().enumerate().map(|(id, a)| {
            let lanes = [
                layout.quantize_float(X, a.pos[0]),
                layout.quantize_float(Y, a.pos[1]),
                layout.quantize_float(HEADING, a.heading),
                layout.quantize_float(SPEED, a.speed),
                layout.quantize_int(ANIM, a.anim as i64),
                u32::from(a.driven.is_some()),
            ];
            (id as EntityId, lanes)
        });
        let rows: Vec<_> = rows.collect();
        Snapshot::from_entities(
            layout,
            rows.iter().map(|(id, lanes)| (*id, &lanes[..], &[][..])),
        )
        .expect("plaza lanes are quantized within the plaza layout")
    }

    /// Gives the session a free avatar (the next one not driven, searching
    /// round from the last one handed out). It stands still until the first
    /// input.
    fn join(&mut self, session: SessionId) -> Option<EntityId> {
        if let Some(&id) = self.sessions.get(&session) {
            return Some(id);
        }
        let n = self.avatars.len();
        let index = (0..n)
            .map(|k| (self.cursor + k) % n)
            .find(|&i| self.avatars[i].driven.is_none())?;
        self.cursor = (index + 1) % n;
        let avatar = &mut self.avatars[index];
        avatar.driven = Some(([0.0, 0.0], false));
        avatar.speed = 0.0;
        avatar.anim = Anim::Idle;
        let id = index as EntityId;
        self.sessions.insert(session, id);
        Some(id)
    }

    fn leave(&mut self, session: SessionId) {
        if let Some(id) = self.sessions.remove(&session) {
            let index = id as usize;
            let from = self.avatars[index].pos;
            let plan = self.walk(from);
            let avatar = &mut self.avatars[index];
            avatar.driven = None;
            avatar.plan = plan;
        }
    }

    /// Input: two signed bytes, the move direction x and y, each scaled to
    /// `[-1, 1]`, and optionally a third byte of flags (bit 0: run; the
    /// other bits must be 0). It holds until the next input.
    fn input(&mut self, session: SessionId, input: &[u8]) -> Result<(), InputError> {
        let Some(&id) = self.sessions.get(&session) else {
            return Err(InputError::UnknownSession(session));
        };
        let (x, y, flags) = match *input {
            [x, y] => (x, y, 0),
            [x, y, flags] => (x, y, flags),
            _ => {
                return Err(InputError::Malformed {
                    len: input.len(),
                    reason: "plaza input is 2 or 3 bytes: direction x, y as i8, then flags",
                });
            }
        };
        if flags & !1 != 0 {
            return Err(InputError::Malformed {
                len: input.len(),
                reason: "plaza input flags: only bit 0 (run) is defined",
            });
        }
        let dir = crate::sim::direction(x, y);
        self.avatars[id as usize].driven = Some((dir, flags & 1 == 1));
        Ok(())
    }
}
