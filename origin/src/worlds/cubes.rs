//! The cubes scene of Glenn Fiedler's 2015 "snapshot compression" articles
//! and challenge: 900 small cubes and one player cube, simulated with rapier
//! at 60 Hz and quantized exactly as the challenge's data set is.
//!
//! # Scene
//!
//! The world is z-up, in metres. A 30 x 30 grid of 1 m cubes (entities 0 to
//! 899, row by row) rests asleep on a ground plane; the flat floor spans
//! ±[`FLOOR_HALF`] m and is fenced by 35° ramps, so that cubes knocked to the
//! edge slide back into play, and by walls behind them, so that everything
//! stays inside the quantization bounds. The player cube ([`PLAYER`], 2 m,
//! heavy) ploughs and tumbles through them: a script steers it by forces and
//! torques towards waypoints that wander over the floor (mostly the current
//! spot of a random cube, so it keeps finding cubes wherever they were
//! pushed) and makes it hop now and then, all drawn from the seed. Cubes get
//! shoved, tumble, pile up against each other, settle and sleep; over minutes
//! of play some 50 to 130 cubes change between frames six ticks apart. A
//! client session may take the player over ([`Simulation::join`]); the
//! script pauses while it drives.
//!
//! Cubes fall asleep (rapier sleeping) once they settle, and sleeping cubes
//! keep exactly the same quantized values tick after tick.
//!
//! # Quantization (the challenge's record)
//!
//! | lane | field | range |
//! | --- | --- | --- |
//! | 0 | orientation largest (index of the dropped component) | 0..=3 |
//! | 1-3 | orientation a, b, c (smallest three, 9 bits each) | 0..=511 |
//! | 4-5 | position x, y (512 units per metre, ±32 m) | -16384..=16383 |
//! | 6 | position z (512 units per metre, 0 to 16 m) | 0..=8191 |
//! | 7 | interacting | 0..=1 |
//!
//! A body is *interacting* while rapier keeps it awake: it is moving, or was
//! touched or moved less than half a second ago (rapier's time before
//! sleep). It becomes 0 the tick the body falls asleep.
//!
//! The challenge's file format is headerless: each frame is [`CUBES`]
//! records of eight little-endian `i32` in the order above
//! ([`write_frame`], [`read_trace`]). Snapshot lanes hold integer fields
//! offset by their minimum (x lane = x + 16384); [`to_records`] and
//! [`from_records`] convert.

use crate::sim::{InputError, SessionId, Simulation};
use proto::{
    Component, Encoding, EntityId, Field, Layout, Position, Schema, Snapshot, SnapshotBuilder,
    SnapshotError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rapier3d::math::{Pose, Rotation, Vector};
use rapier3d::prelude::{ColliderBuilder, PhysicsWorld, RigidBodyBuilder, RigidBodyHandle};
use std::f32::consts::FRAC_PI_2;
use std::io;

/// Entities in the scene: 900 small cubes and the player cube.
pub const CUBES: usize = 901;
/// Entity id of the player cube.
pub const PLAYER: EntityId = 900;
/// Ticks per second.
pub const TICK_RATE: u32 = 60;
/// Position units per metre.
pub const UNITS_PER_METRE: f32 = 512.0;
/// Half the side of the flat floor, in metres.
pub const FLOOR_HALF: f32 = 21.0;
/// One challenge record: orientation largest, a, b, c, position x, y, z,
/// interacting.
pub type Record = [i32; 8];
/// Bytes of one frame of a trace file: [`CUBES`] records of 8 `i32`.
pub const FRAME_BYTES: usize = CUBES * 8 * 4;

/// Names of the record's values, in order.
pub const RECORD_FIELDS: [&str; 8] = [
    "orientation_largest",
    "orientation_a",
    "orientation_b",
    "orientation_c",
    "position_x",
    "position_y",
    "position_z",
    "interacting",
];
/// Inclusive range of each record value, in order.
pub const RECORD_RANGES: [(i32, i32); 8] = [
    (0, 3),
    (0, 511),
    (0, 511),
    (0, 511),
    (-16384, 16383),
    (-16384, 16383),
    (0, 8191),
    (0, 1),
];

const QUAT_BITS: u8 = 9;
/// Most physics steps spent bringing the new scene to rest.
const SETTLE_TICKS_MAX: usize = 600;
const GRID: usize = 30;
const SPACING: f32 = 1.25;
const CUBE_HALF: f32 = 0.5;
const PLAYER_HALF: f32 = 1.0;
/// Six times as dense as the small cubes: 48 kg against 1 kg, so that it
/// shoves them rather than climbing over them.
const PLAYER_DENSITY: f32 = 6.0;
/// Low friction and double weight keep the player on the floor, ploughing
/// through the cubes instead of riding on top of them.
const PLAYER_FRICTION: f32 = 0.1;
const PLAYER_GRAVITY_SCALE: f32 = 2.0;
/// Upward speed of the scripted player's occasional hop, m/s: a bump that
/// tosses the cubes it lands near, too small to land it on top of the grid.
const HOP_SPEED: f32 = 3.0;
/// Top speed the player is driven to, in m/s.
const PLAYER_SPEED: f32 = 6.0;
/// Rolling rate the player is driven to, in rad/s.
const PLAYER_ROLL: f32 = 5.0;
const RAMP_ANGLE: f32 = 35.0 * std::f32::consts::PI / 180.0;
const RAMP_LENGTH: f32 = 10.0;
/// Bodies beyond these bounds (tunnelled through a wall, thrown too high)
/// are put back on the floor.
const ESCAPE_XY: f32 = 30.5;
const ESCAPE_Z_MAX: f32 = 15.5;

/// Why cubes records or a trace were refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CubesError {
    /// The trace's length is not a whole number of frames.
    #[error("trace of {len} bytes is not a whole number of {FRAME_BYTES}-byte frames")]
    Truncated {
        /// Length of the trace in bytes.
        len: usize,
    },
    /// Reading the trace failed.
    #[error("reading trace: {0}")]
    Io(#[from] io::Error),
    /// The layout given is not the cubes layout ([`schema`]).
    #[error("layout of world {0:?} is not the cubes layout")]
    WrongLayout(String),
    /// A record value is outside its range.
    #[error("record {record}: {field} = {value} is outside [{min}, {max}]")]
    OutOfRange {
        /// Index of the record (the entity id).
        record: usize,
        /// Name of the value ([`RECORD_FIELDS`]).
        field: &'static str,
        /// Value found.
        value: i32,
        /// Smallest allowed.
        min: i32,
        /// Largest allowed.
        max: i32,
    },
    /// The records do not make a snapshot (e.g. too many of them).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// The cubes schema: orientation, position, state, in the challenge's lane
/// order (largest, a, b, c, x, y, z, interacting).
pub fn schema() -> Schema {
    let field = |name: &str, encoding| Field {
        name: name.into(),
        encoding,
    };
    let position = Encoding::Int {
        min: -16384,
        max: 16383,
    };
    Schema {
        name: "cubes".into(),
        components: vec![
            Component {
                name: "orientation".into(),
                fields: vec![field("rotation", Encoding::Quat { bits: QUAT_BITS })],
            },
            Component {
                name: "position".into(),
                fields: vec![
                    field("x", position),
                    field("y", position),
                    field("z", Encoding::Int { min: 0, max: 8191 }),
                ],
            },
            Component {
                name: "state".into(),
                fields: vec![field("interacting", Encoding::Bool)],
            },
        ],
        position: Some(Position {
            fields: vec!["position.x".into(), "position.y".into()],
        }),
        max_entities: CUBES as u32,
    }
}

/// The challenge records of a snapshot of the cubes layout: one per entity, in
/// id order (for a full snapshot, record index = entity id).
///
/// # Panics
/// If the snapshot does not have the cubes layout's 8 lanes per entity.
pub fn to_records(snapshot: &Snapshot) -> Vec<Record> {
    assert_eq!(
        snapshot.lanes_per_entity(),
        8,
        "not a snapshot of the cubes layout"
    );
    (0..snapshot.len())
        .map(|i| {
            let lanes = snapshot.lanes(i);
            let mut record = [0i32; 8];
            for (k, slot) in record.iter_mut().enumerate() {
                // Lanes hold `value - min`; every range here fits an i32.
                *slot = (i64::from(lanes[k]) + i64::from(RECORD_RANGES[k].0)) as i32;
            }
            record
        })
        .collect()
}

/// The snapshot that challenge records stand for, entity id = record index.
/// Every value is checked against its range.
pub fn from_records(layout: &Layout, records: &[Record]) -> Result<Snapshot, CubesError> {
    if *layout.schema() != schema() {
        return Err(CubesError::WrongLayout(layout.schema().name.clone()));
    }
    let mut builder = SnapshotBuilder::new(layout);
    for (index, record) in records.iter().enumerate() {
        let mut lanes = [0u32; 8];
        for (k, (&value, &(min, max))) in record.iter().zip(&RECORD_RANGES).enumerate() {
            if !(min..=max).contains(&value) {
                return Err(CubesError::OutOfRange {
                    record: index,
                    field: RECORD_FIELDS[k],
                    value,
                    min,
                    max,
                });
            }
            lanes[k] = (value - min) as u32;
        }
        let id = EntityId::try_from(index).map_err(|_| SnapshotError::TooMany {
            count: records.len(),
            max: layout.max_entities(),
        })?;
        builder.push(id, &lanes, &[])?;
    }
    Ok(builder.finish()?)
}

/// Writes one frame of the challenge's trace format: [`CUBES`] records of
/// eight little-endian `i32`, no header. Refuses (`InvalidInput`) any other
/// number of records, which would make the file unreadable.
pub fn write_frame(w: &mut impl io::Write, records: &[Record]) -> io::Result<()> {
    if records.len() != CUBES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a cubes frame has {CUBES} records, not {}", records.len()),
        ));
    }
    let mut buf = Vec::with_capacity(FRAME_BYTES);
    for record in records {
        for value in record {
            buf.extend_from_slice(&value.to_le_bytes());
        }
    }
    w.write_all(&buf)
}

/// Reads a whole trace in the challenge's format: frames of [`CUBES`]
/// records. Values are not range-checked here ([`from_records`] does).
pub fn read_trace(r: &mut impl io::Read) -> Result<Vec<Vec<Record>>, CubesError> {
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)?;
    if bytes.len() % FRAME_BYTES != 0 {
        return Err(CubesError::Truncated { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(FRAME_BYTES)
        .map(|frame| {
            frame
                .chunks_exact(32)
                .map(|rec| {
                    let mut record = [0i32; 8];
                    for (slot, b) in record.iter_mut().zip(rec.chunks_exact(4)) {
                        *slot = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    record
                })
                .collect()
        })
        .collect())
}

/// The script that steers the player while no session drives it.
#[derive(Debug)]
struct Script {
    /// Where the player heads, on the floor.
    target: [f32; 2],
    /// Ticks before a new waypoint is drawn even if this one is not reached.
    ticks_left: u32,
    /// Ticks before the next hop.
    hop_in: u32,
}

/// The cubes world. See the [module documentation](self).
pub struct Cubes {
    schema: Schema,
    world: PhysicsWorld,
    /// Body of each entity, index = entity id.
    bodies: Vec<RigidBodyHandle>,
    rng: ChaCha8Rng,
    script: Script,
    /// The session driving the player, and its last move direction.
    driver: Option<(SessionId, [f32; 2])>,
    tick: u64,
}

impl std::fmt::Debug for Cubes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cubes")
            .field("tick", &self.tick)
            .field("driver", &self.driver)
            .field("script", &self.script)
            .finish_non_exhaustive()
    }
}

impl Cubes {
    /// The scene at rest, every small cube asleep on the floor, the player in
    /// a corner; the script's choices follow from `seed`.
    pub fn new(seed: u64) -> Cubes {
        let mut world = PhysicsWorld::new();
        world.gravity = Vector::new(0.0, 0.0, -9.81);
        world.integration_parameters.dt = 1.0 / TICK_RATE as f32;
        build_arena(&mut world);

        let mut bodies = Vec::with_capacity(CUBES);
        let offset = (GRID as f32 - 1.0) / 2.0;
        for row in 0..GRID {
            for col in 0..GRID {
                let x = (col as f32 - offset) * SPACING;
                let y = (row as f32 - offset) * SPACING;
                let (handle, _) = world.insert(
                    RigidBodyBuilder::dynamic().translation(Vector::new(x, y, CUBE_HALF)),
                    ColliderBuilder::cuboid(CUBE_HALF, CUBE_HALF, CUBE_HALF)
                        .friction(0.5)
                        .restitution(0.1),
                );
                bodies.push(handle);
            }
        }
        // The player starts just off a corner of the grid.
        let corner = offset * SPACING + CUBE_HALF + 0.3 + PLAYER_HALF;
        let (player, _) = world.insert(
            RigidBodyBuilder::dynamic()
                .translation(Vector::new(-corner, -corner, PLAYER_HALF))
                .gravity_scale(PLAYER_GRAVITY_SCALE),
            ColliderBuilder::cuboid(PLAYER_HALF, PLAYER_HALF, PLAYER_HALF)
                .density(PLAYER_DENSITY)
                .friction(PLAYER_FRICTION),
        );
        bodies.push(player);

        let mut cubes = Cubes {
            schema: schema(),
            world,
            bodies,
            rng: ChaCha8Rng::seed_from_u64(seed),
            script: Script {
                target: [0.0, 0.0],
                ticks_left: 0,
                hop_in: 0,
            },
            driver: None,
            tick: 0,
        };
        cubes.settle();
        cubes.script.hop_in = cubes.hop_delay();
        cubes.new_waypoint();
        cubes
    }

    /// Steps the physics alone (no script, no tick counted) until every
    /// body sleeps, so that the scene starts at rest: tick 0 has every cube
    /// asleep on the floor.
    fn settle(&mut self) {
        for _ in 0..SETTLE_TICKS_MAX {
            if self
                .bodies
                .iter()
                .all(|&h| self.world.bodies[h].is_sleeping())
            {
                return;
            }
            self.world.step();
        }
    }

    /// Ticks stepped so far.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// Whether a session drives the player now.
    pub fn driven(&self) -> bool {
        self.driver.is_some()
    }

    /// Ticks until the next hop of the scripted player (3 to 8 s).
    fn hop_delay(&mut self) -> u32 {
        self.rng.random_range(3 * TICK_RATE..8 * TICK_RATE)
    }

    /// Draws the script's next waypoint: mostly where a random small cube is
    /// now (so the player keeps finding cubes wherever they were pushed),
    /// sometimes a random point of the floor.
    fn new_waypoint(&mut self) {
        let reach = FLOOR_HALF - PLAYER_HALF - 1.0;
        let target = if self.rng.random_bool(0.75) {
            let id = self.rng.random_range(0..PLAYER as usize);
            let t = self.world.bodies[self.bodies[id]].translation();
            [t.x, t.y]
        } else {
            [
                self.rng.random_range(-reach..reach),
                self.rng.random_range(-reach..reach),
            ]
        };
        self.script.target = target.map(|c| c.clamp(-reach, reach));
        self.script.ticks_left = self.rng.random_range(3 * TICK_RATE..9 * TICK_RATE);
    }

    /// The scripted move direction for this tick (and the hop, if due).
    fn scripted(&mut self) -> [f32; 2] {
        let p = self.world.bodies[self.bodies[PLAYER as usize]].translation();
        let mut d = [self.script.target[0] - p.x, self.script.target[1] - p.y];
        let mut dist = (d[0] * d[0] + d[1] * d[1]).sqrt();
        self.script.ticks_left = self.script.ticks_left.saturating_sub(1);
        if dist < 1.0 || self.script.ticks_left == 0 {
            self.new_waypoint();
            d = [self.script.target[0] - p.x, self.script.target[1] - p.y];
            dist = (d[0] * d[0] + d[1] * d[1]).sqrt();
        }
        self.script.hop_in = self.script.hop_in.saturating_sub(1);
        if self.script.hop_in == 0 {
            self.script.hop_in = self.hop_delay();
            let body = &mut self.world.bodies[self.bodies[PLAYER as usize]];
            if body.translation().z < PLAYER_HALF * 1.5 {
                let up = body.mass() * HOP_SPEED;
                body.apply_impulse(Vector::new(0.0, 0.0, up), true);
            }
        }
        if dist < 1e-3 {
            [0.0, 0.0]
        } else {
            [d[0] / dist, d[1] / dist]
        }
    }

    /// Drives the player towards `dir` (length at most 1): a force towards
    /// the wanted velocity and a torque towards the matching roll. A zero
    /// direction brakes without waking a sleeping player.
    fn push_player(&mut self, dir: [f32; 2]) {
        let body = &mut self.world.bodies[self.bodies[PLAYER as usize]];
        body.reset_forces(false);
        body.reset_torques(false);
        let wake = dir != [0.0, 0.0];
        if !wake && body.is_sleeping() {
            return;
        }
        let mass = body.mass();
        let v = body.linvel();
        let want = Vector::new(dir[0], dir[1], 0.0) * PLAYER_SPEED;
        let force =
            ((want - Vector::new(v.x, v.y, 0.0)) * mass * 3.0).clamp_length_max(mass * 20.0);
        body.add_force(force, wake);
        let spin = Vector::new(-dir[1], dir[0], 0.0) * PLAYER_ROLL;
        let torque = ((spin - body.angvel()) * mass * 2.0).clamp_length_max(mass * 3.0);
        body.add_torque(torque, wake);
    }

    /// Puts back on the floor any body that left the arena (tunnelled
    /// through a wall or thrown too high), so that quantized values stay
    /// meaningful.
    fn recover_escaped(&mut self) {
        for (id, &handle) in self.bodies.iter().enumerate() {
            let body = &mut self.world.bodies[handle];
            if body.is_sleeping() {
                continue;
            }
            let t = body.translation();
            let out = t.x.abs() > ESCAPE_XY
                || t.y.abs() > ESCAPE_XY
                || !(-1.0..=ESCAPE_Z_MAX).contains(&t.z)
                || !t.is_finite();
            if out {
                let spot = FLOOR_HALF - 3.0;
                let (x, y) = if t.is_finite() {
                    (t.x.clamp(-spot, spot), t.y.clamp(-spot, spot))
                } else {
                    (0.0, 0.0)
                };
                let half = if id == PLAYER as usize {
                    PLAYER_HALF
                } else {
                    CUBE_HALF
                };
                body.set_position(
                    Pose::from_parts(Vector::new(x, y, 4.0 + half), Rotation::IDENTITY),
                    true,
                );
                body.set_linvel(Vector::ZERO, true);
                body.set_angvel(Vector::ZERO, true);
            }
        }
    }
}

/// The floor, four ramps rising from its edges and four walls behind them.
fn build_arena(world: &mut PhysicsWorld) {
    let ground = world.insert_body(RigidBodyBuilder::fixed());
    let mut fixed = |collider: ColliderBuilder| {
        world
            .colliders
            .insert_with_parent(collider, ground, &mut world.bodies);
    };
    fixed(ColliderBuilder::cuboid(40.0, 40.0, 1.0).translation(Vector::new(0.0, 0.0, -1.0)));
    let (sin, cos) = RAMP_ANGLE.sin_cos();
    let outer = FLOOR_HALF + RAMP_LENGTH * cos;
    for side in 0..4 {
        let turn = Rotation::from_rotation_z(side as f32 * FRAC_PI_2);
        // Ramp for the +x edge, then turned: its top face starts at the
        // floor's edge and rises towards the wall.
        let along = Vector::new(cos, 0.0, sin);
        let normal = Vector::new(-sin, 0.0, cos);
        let centre = Vector::new(FLOOR_HALF, 0.0, 0.0) + along * (RAMP_LENGTH / 2.0) - normal * 0.5;
        fixed(
            ColliderBuilder::cuboid(RAMP_LENGTH / 2.0, outer + 2.0, 0.5)
                .position(Pose::from_parts(
                    turn * centre,
                    turn * Rotation::from_rotation_y(-RAMP_ANGLE),
                ))
                .friction(0.4),
        );
        let wall = Vector::new(outer + 1.0 + 0.5, 0.0, 8.0);
        fixed(
            ColliderBuilder::cuboid(1.0, outer + 3.0, 8.0)
                .position(Pose::from_parts(turn * wall, turn)),
        );
    }
}

impl Simulation for Cubes {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn tick_rate(&self) -> u32 {
        TICK_RATE
    }

    fn step(&mut self) {
        let dir = match self.driver {
            Some((_, dir)) => dir,
            None => self.scripted(),
        };
        self.push_player(dir);
        self.world.step();
        self.recover_escaped();
        self.tick += 1;
    }

    fn snapshot(&self, layout: &Layout) -> Snapshot {
        debug_assert_eq!(
            layout.schema(),
            &self.schema,
            "snapshot of a foreign layout"
        );
        let mut builder = SnapshotBuilder::new(layout);
        for (id, &handle) in self.bodies.iter().enumerate() {
            let body = &self.world.bodies[handle];
            let r = body.rotation();
            let t = body.translation();
            let q = proto::quant::quantize_quat([r.x, r.y, r.z, r.w].map(f64::from), QUAT_BITS);
            let unit = |v: f32| (f64::from(v) * f64::from(UNITS_PER_METRE)).round() as i64;
            let lanes = [
                q[0],
                q[1],
                q[2],
                q[3],
                layout.quantize_int(1, unit(t.x)),
                layout.quantize_int(2, unit(t.y)),
                layout.quantize_int(3, unit(t.z)),
                u32::from(!body.is_sleeping()),
            ];
            builder
                .push(id as EntityId, &lanes, &[])
                .expect("cubes lanes are quantized within the cubes layout");
        }
        builder
            .finish()
            .expect("cubes entity ids are distinct and within max_entities")
    }

    /// The first session gets the player cube ([`PLAYER`]); others get none
    /// while it is driven.
    fn join(&mut self, session: SessionId) -> Option<EntityId> {
        match self.driver {
            None => {
                self.driver = Some((session, [0.0, 0.0]));
                Some(PLAYER)
            }
            Some((driver, _)) if driver == session => Some(PLAYER),
            Some(_) => None,
        }
    }

    fn leave(&mut self, session: SessionId) {
        if matches!(self.driver, Some((driver, _)) if driver == session) {
            self.driver = None;
            self.new_waypoint();
        }
    }

    /// Input: two signed bytes, the wanted roll direction x and y, each
    /// scaled to `[-1, 1]`. It holds until the next input.
    fn input(&mut self, session: SessionId, input: &[u8]) -> Result<(), InputError> {
        let Some((driver, dir)) = &mut self.driver else {
            return Err(InputError::UnknownSession(session));
        };
        if *driver != session {
            return Err(InputError::UnknownSession(session));
        }
        let &[x, y] = input else {
            return Err(InputError::Malformed {
                len: input.len(),
                reason: "cubes input is 2 bytes: roll direction x, y as i8",
            });
        };
        *dir = crate::sim::direction(x, y).map(|c| c as f32);
        Ok(())
    }
}
