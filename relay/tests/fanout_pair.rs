//! Drives the relay's fan-out core and many client replicas in memory, with
//! loss, reordering and lost acks, and checks every applied tick against the
//! relay's state (no sockets, no clocks: deterministic).

use client::replica::{ApplyError, Replica};
use origin::Simulation;
use origin::worlds::plaza::{Plaza, PlazaConfig};
use proto::interest::Grid;
use proto::msg::{Message, Update, VERSION};
use statecast_relay::fanout::{ChunkCache, ClientView, Interest, WorldState};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A tiny deterministic generator (xorshift) for loss decisions.
struct Dice(u64);
impl Dice {
    fn roll(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Client {
    view: ClientView,
    replica: Replica,
    in_flight: Vec<Update>,
    /// The interest each sent tick was built for.
    interests: std::collections::BTreeMap<u64, Interest>,
    applied: u64,
    keyframes: u64,
    acks_lost: bool,
}

fn world(avatars: u32) -> (Plaza, Arc<proto::Layout>) {
    let plaza = Plaza::new(PlazaConfig {
        avatars,
        size_m: 400.0,
        seed: 7,
    });
    let layout = Arc::new(plaza.schema().layout().unwrap());
    (plaza, layout)
}

/// Expected content: the relay's cells at `tick` within the interest.
fn expected_ids(world: &WorldState, interest: Interest, tick: u64) -> BTreeSet<u32> {
    let state = world.get(tick).unwrap();
    let mut ids = BTreeSet::new();
    for cell in world.interest_cells(interest, state) {
        if let Some(c) = state.cells.get(&cell) {
            ids.extend(c.snapshot.ids().iter().copied());
        }
    }
    ids
}

#[test]
fn replicas_track_the_relay_under_loss_reordering_and_lost_acks() {
    let (mut plaza, layout) = world(1500);
    let ring = 40;
    let mut world = WorldState::new(layout.clone(), Some(Grid::new(50.0)), ring);
    let cache = ChunkCache::new(true);
    let mut dice = Dice(0x1234_5678_9abc_def1);
    let mut clients: Vec<Client> = (0..24)
        .map(|i| {
            let interest = if i % 6 == 0 {
                Interest::All
            } else {
                Interest::Around {
                    x: 40.0 + (i as f64 * 37.0) % 320.0,
                    y: 40.0 + (i as f64 * 53.0) % 320.0,
                    radius: 60.0 + (i % 3) as f64 * 20.0,
                }
            };
            Client {
                view: ClientView::new(interest, ring),
                replica: Replica::new(layout.clone(), 64),
                in_flight: Vec::new(),
                interests: Default::default(),
                applied: 0,
                keyframes: 0,
                // One client never gets its acks through: keyframes only.
                acks_lost: i == 5,
            }
        })
        .collect();

    for tick in 1..=240u64 {
        plaza.step();
        let snapshot = Arc::new(plaza.snapshot(&layout));
        let hash = snapshot.hash();
        let (state, evicted) = world.push(tick, tick * 50_000, hash, snapshot).unwrap();
        if let Some(old) = evicted {
            cache.evict_before(old + 1);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            // Clients move their interest now and then.
            if tick % 60 == 0
                && let Interest::Around { x, y, radius } = c.view.interest()
            {
                c.view.set_interest(Interest::Around {
                    x: (x + 45.0) % 400.0,
                    y,
                    radius,
                });
            }
            let built = c.view.build_update(&world, &state, &cache).unwrap();
            c.interests.insert(tick, c.view.interest());
            // The update survives the wire format.
            let mut wire = Vec::new();
            Message::Update(built.update.clone())
                .encode(&mut wire)
                .unwrap();
            let Some((Message::Update(update), _)) =
                proto::msg::decode_frame(&wire, VERSION).unwrap()
            else {
                panic!("not an update")
            };
            assert_eq!(update, built.update);
            // 10% loss; 10% delayed by one tick (reordering).
            let r = dice.roll();
            if r < 0.10 {
                continue;
            }
            c.in_flight.push(update);
            if r < 0.20 && c.in_flight.len() == 1 {
                continue;
            }
            let mut delivered = std::mem::take(&mut c.in_flight);
            if r < 0.30 {
                delivered.reverse();
            }
            for update in delivered {
                match c.replica.apply(&update) {
                    Ok(applied) => {
                        c.applied += 1;
                        c.keyframes += applied.keyframe as u64;
                        let held: BTreeSet<u32> = c
                            .replica
                            .current()
                            .unwrap()
                            .entities()
                            .map(|(id, _)| id)
                            .collect();
                        let interest = c.interests[&applied.tick];
                        assert_eq!(
                            held,
                            expected_ids(&world, interest, applied.tick),
                            "client {i} tick {}",
                            applied.tick
                        );
                        if !c.acks_lost && dice.roll() > 0.1 {
                            c.view.on_ack(applied.tick);
                        }
                    }
                    Err(ApplyError::Stale { .. }) => {}
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            assert!(c.view.remembered() <= ring);
        }
    }
    for (i, c) in clients.iter().enumerate() {
        assert!(c.applied > 150, "client {i} applied only {}", c.applied);
        if c.acks_lost {
            assert_eq!(
                c.keyframes, c.applied,
                "without acks every update is a keyframe"
            );
        } else {
            assert!(c.keyframes < 30, "client {i}: {} keyframes", c.keyframes);
        }
    }
    let (hits, misses) = cache.counts();
    assert!(hits > misses, "cache hits {hits} misses {misses}");
    assert!(cache.len() < 40 * 400, "cache holds {} chunks", cache.len());
}

#[test]
fn a_client_whose_baseline_is_gone_gets_a_keyframe() {
    let (mut plaza, layout) = world(300);
    let mut world = WorldState::new(layout.clone(), Some(Grid::new(50.0)), 8);
    let cache = ChunkCache::new(true);
    let mut view = ClientView::new(Interest::All, 8);
    let mut replica = Replica::new(layout.clone(), 64);
    let mut first_ack = None;
    for tick in 1..=30u64 {
        plaza.step();
        let snapshot = Arc::new(plaza.snapshot(&layout));
        let hash = snapshot.hash();
        let (state, _) = world.push(tick, 0, hash, snapshot).unwrap();
        let built = view.build_update(&world, &state, &cache).unwrap();
        let applied = replica.apply(&built.update).unwrap();
        if tick == 1 {
            view.on_ack(applied.tick);
            first_ack = Some(applied.tick);
        }
        if tick <= 8 {
            assert_eq!(built.update.base, first_ack.filter(|_| tick > 1));
        } else {
            // Tick 1 left the ring of 8: keyframes from then on.
            assert!(built.keyframe, "tick {tick}");
        }
        assert_eq!(
            replica.current().unwrap().hash(),
            state.hash,
            "Interest::All holds the whole world"
        );
    }
}

#[test]
fn tampered_chunks_are_caught_by_the_hash() {
    let (mut plaza, layout) = world(300);
    let mut world = WorldState::new(layout.clone(), None, 8);
    let cache = ChunkCache::new(true);
    let mut view = ClientView::new(Interest::All, 8);
    let mut replica = Replica::new(layout.clone(), 8);
    plaza.step();
    let snapshot = Arc::new(plaza.snapshot(&layout));
    let (state, _) = world.push(1, 0, snapshot.hash(), snapshot).unwrap();
    let mut update = view.build_update(&world, &state, &cache).unwrap().update;
    update.hash ^= 1;
    assert!(matches!(
        replica.apply(&update),
        Err(ApplyError::HashMismatch { .. })
    ));
    assert!(replica.current().is_none(), "a divergent state is not kept");
}
