//! The plaza world: valid and deterministic snapshots, a crowd that walks,
//! and sessions that take avatars over and give them back.

use origin::worlds::plaza::{self, Plaza, PlazaConfig, PlazaConfigError};
use origin::{InputError, Simulation};
use proto::{Encoding, Layout, Snapshot};
use statecast_origin as origin;

fn small(seed: u64) -> Plaza {
    Plaza::new(PlazaConfig {
        avatars: 2000,
        size_m: 600.0,
        seed,
    })
}

fn step_n(world: &mut Plaza, n: usize) {
    for _ in 0..n {
        world.step();
    }
}

/// Rebuilds a snapshot through the checking constructor.
fn checked(layout: &Layout, s: &Snapshot) -> Snapshot {
    let empty: Vec<Vec<u8>> = Vec::new();
    Snapshot::from_entities(
        layout,
        (0..s.len()).map(|i| (s.ids()[i], s.lanes(i), &empty[..])),
    )
    .unwrap()
}

fn xy(layout: &Layout, s: &Snapshot, id: u32) -> [f64; 2] {
    let lanes = s.lanes(s.find(id).unwrap());
    [
        layout.dequantize(0, lanes[0]),
        layout.dequantize(1, lanes[1]),
    ]
}

#[test]
fn schema_resolves_positions_to_about_a_centimetre() {
    let world = Plaza::new(PlazaConfig::default());
    let l = world.schema().layout().unwrap();
    assert_eq!(l.max_entities(), 10_000);
    assert_eq!(l.position_fields(), &[0, 1]);
    assert_eq!(l.field_path(4), "motion.anim");
    match l.encoding(0) {
        Encoding::Float { min, max, bits } => {
            assert_eq!((min, max), (0.0, 2000.0));
            let step = (max - min) / ((1u64 << bits) - 1) as f64;
            assert!(step <= 0.01 && step > 0.004, "{bits} bits, step {step}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.tick_rate(), 20);
}

#[test]
fn most_avatars_move_within_a_second_and_some_stand() {
    let mut world = Plaza::new(PlazaConfig::default());
    let l = world.schema().layout().unwrap();
    let start = world.snapshot(&l);
    assert_eq!(start.len(), 10_000);
    assert_eq!(checked(&l, &start), start);
    step_n(&mut world, 20);
    let later = world.snapshot(&l);
    assert_eq!(checked(&l, &later), later);
    let mut moved = 0;
    let mut standing = 0;
    for id in 0..10_000 {
        let (a, b) = (xy(&l, &start, id), xy(&l, &later, id));
        let d = ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt();
        assert!(d <= 8.0 + 0.02, "avatar {id} moved {d} m in 1 s");
        if d > 0.3 {
            moved += 1;
        }
        // Standing animations (idle, talk, wave, sit) with no speed.
        let lanes = later.lanes(id as usize);
        if lanes[3] == 0 && [0, 3, 4, 5].contains(&lanes[4]) {
            standing += 1;
        }
    }
    assert!(
        moved > 8000,
        "only {moved} of 10000 avatars walked in a second"
    );
    assert!(standing > 300, "only {standing} avatars stand still");
}

#[test]
fn crowd_keeps_walking_and_stays_inside() {
    let mut world = small(4);
    let l = world.schema().layout().unwrap();
    step_n(&mut world, 2400);
    let a = world.snapshot(&l);
    step_n(&mut world, 20);
    let b = world.snapshot(&l);
    let moved = (0..2000)
        .filter(|&id| xy(&l, &a, id) != xy(&l, &b, id))
        .count();
    assert!(moved > 1400, "after 2 minutes only {moved} of 2000 move");
    let running = (0..2000).filter(|&i| b.lanes(i)[4] == 2).count();
    assert!(running > 20, "{running} runners");
    for id in 0..2000 {
        let [x, y] = xy(&l, &b, id);
        assert!((0.0..=600.0).contains(&x) && (0.0..=600.0).contains(&y));
    }
}

#[test]
fn same_seed_same_hashes_other_seed_differs() {
    let (mut a, mut b, mut c) = (small(11), small(11), small(12));
    let l = a.schema().layout().unwrap();
    assert_ne!(a.snapshot(&l).hash(), c.snapshot(&l).hash());
    for _ in 0..10 {
        step_n(&mut a, 30);
        step_n(&mut b, 30);
        step_n(&mut c, 30);
        let (sa, sb, sc) = (a.snapshot(&l), b.snapshot(&l), c.snapshot(&l));
        assert_eq!(sa.hash(), sb.hash());
        assert_eq!(sa, sb);
        assert_ne!(sa.hash(), sc.hash());
    }
}

#[test]
fn sessions_drive_avatars_and_give_them_back() {
    let (mut a, mut b) = (small(5), small(5));
    let l = a.schema().layout().unwrap();
    let id = a.join(100).unwrap();
    assert_eq!(b.join(100), Some(id));
    assert_eq!(a.join(100), Some(id), "joining twice keeps the avatar");
    let other = a.join(101).unwrap();
    assert_ne!(other, id);
    b.join(101).unwrap();
    let s = a.snapshot(&l);
    assert_eq!(s.lanes(id as usize)[5], 1, "controlled");
    assert_eq!(s.lanes(id as usize)[3], 0, "stands still until told");

    // Refused inputs change nothing.
    assert_eq!(a.input(7, &[127, 0]), Err(InputError::UnknownSession(7)));
    for bad in [
        &[][..],
        &[1][..],
        &[1, 2, 0, 0][..],
        &[1, 2, 2][..],
        &[1, 2, 0x81][..],
    ] {
        assert!(
            matches!(a.input(100, bad), Err(InputError::Malformed { len, .. }) if len == bad.len()),
            "{bad:?}"
        );
    }
    step_n(&mut a, 20);
    step_n(&mut b, 20);
    assert_eq!(a.snapshot(&l), b.snapshot(&l));
    let before = xy(&l, &a.snapshot(&l), id);
    assert_eq!(
        before,
        xy(&l, &s, id),
        "a driven avatar without input stays"
    );

    // Walk north, then run east.
    a.input(100, &[0, 127]).unwrap();
    step_n(&mut a, 20);
    let walked = xy(&l, &a.snapshot(&l), id);
    assert!((walked[0] - before[0]).abs() < 0.02);
    let dy = walked[1] - before[1];
    let expect = if before[1] + 1.6 <= 600.0 {
        1.6
    } else {
        600.0 - before[1]
    };
    assert!((dy - expect).abs() < 0.05, "walked {dy} m north");
    a.input(100, &[127, 0, 1]).unwrap();
    step_n(&mut a, 1);
    let s = a.snapshot(&l);
    assert_eq!(s.lanes(id as usize)[4], 2, "running");
    let speed = l.dequantize(3, s.lanes(id as usize)[3]);
    assert!((speed - plaza::DRIVEN_RUN).abs() < 0.05, "{speed}");

    // Leaving hands the avatar back to the crowd, and frees it.
    a.leave(100);
    a.leave(100);
    assert_eq!(a.input(100, &[0, 0]), Err(InputError::UnknownSession(100)));
    step_n(&mut a, 40);
    let s = a.snapshot(&l);
    assert_eq!(s.lanes(id as usize)[5], 0);
    assert!(s.lanes(id as usize)[3] > 0, "walks on by itself");
}

#[test]
fn joins_stop_when_every_avatar_is_taken() {
    let mut world = Plaza::new(PlazaConfig {
        avatars: 3,
        size_m: 50.0,
        seed: 1,
    });
    let mut ids: Vec<_> = (0..3).map(|s| world.join(s).unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2]);
    assert_eq!(world.join(3), None);
    world.leave(1);
    assert_eq!(world.join(3), Some(ids[1]));
}

#[test]
fn bad_configs_are_refused() {
    let bad = |avatars, size_m| {
        Plaza::try_new(PlazaConfig {
            avatars,
            size_m,
            seed: 0,
        })
        .err()
    };
    assert_eq!(bad(0, 100.0), Some(PlazaConfigError::Avatars(0)));
    assert_eq!(
        bad(2_000_000, 100.0),
        Some(PlazaConfigError::Avatars(2_000_000))
    );
    assert!(matches!(bad(10, 1.0), Some(PlazaConfigError::Size(_))));
    assert!(matches!(bad(10, f64::NAN), Some(PlazaConfigError::Size(_))));
    assert!(bad(1, 10.0).is_none());
}
