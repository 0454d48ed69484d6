//! The cubes world: valid and deterministic snapshots, a lively scene with
//! sleeping cubes, the challenge's record and file format, and inputs.

use origin::worlds::cubes::{
    self, CUBES, Cubes, CubesError, FRAME_BYTES, PLAYER, Record, from_records, read_trace,
    to_records, write_frame,
};
use origin::{InputError, Simulation};
use proto::{Layout, Snapshot};
use statecast_origin as origin;

fn layout() -> Layout {
    cubes::schema().layout().unwrap()
}

/// Rebuilds a snapshot through the checking constructor: proves every lane is
/// within its range and the ids are distinct.
fn checked(layout: &Layout, s: &Snapshot) -> Snapshot {
    let empty: Vec<Vec<u8>> = Vec::new();
    Snapshot::from_entities(
        layout,
        (0..s.len()).map(|i| (s.ids()[i], s.lanes(i), &empty[..])),
    )
    .unwrap()
}

fn step_n(world: &mut Cubes, n: usize) {
    for _ in 0..n {
        world.step();
    }
}

/// Number of entities (player excluded) whose lanes differ between `a` and `b`.
fn changed(a: &Snapshot, b: &Snapshot) -> usize {
    (0..PLAYER as usize)
        .filter(|&i| a.lanes(i) != b.lanes(i))
        .count()
}

#[test]
fn schema_has_the_challenge_lane_order() {
    let l = layout();
    assert_eq!(l.lane_count(), 8);
    assert_eq!(l.max_entities(), CUBES);
    assert_eq!(l.field_path(0), "orientation.rotation");
    assert_eq!(
        (1..5).map(|i| l.field_path(i)).collect::<Vec<_>>(),
        [
            "position.x",
            "position.y",
            "position.z",
            "state.interacting"
        ]
    );
    assert_eq!(l.lanes()[1].max(), 511);
    assert_eq!(l.lanes()[4].max(), 32767);
    assert_eq!(l.lanes()[6].max(), 8191);
    assert_eq!(l.position_fields(), &[1, 2]);
}

#[test]
fn scene_starts_at_rest_on_the_floor() {
    let l = layout();
    let world = Cubes::new(1);
    let snap = world.snapshot(&l);
    assert_eq!(checked(&l, &snap), snap);
    assert_eq!(snap.ids(), (0..CUBES as u32).collect::<Vec<_>>());
    let records = to_records(&snap);
    for r in &records[..PLAYER as usize] {
        // Upright: largest is w (index 3), the others at mid-range (zero
        // sits between steps 255 and 256).
        assert_eq!(r[0], 3);
        assert!(r[1..4].iter().all(|c| (255..=256).contains(c)), "{r:?}");
        assert!((255..=256).contains(&r[6]), "half a metre up: {r:?}");
        assert_eq!(r[7], 0, "asleep at start");
    }
    assert_eq!(
        records[PLAYER as usize][6], 512,
        "the 2 m player rests 1 m up"
    );
}

#[test]
fn same_seed_same_hashes_other_seed_differs() {
    let l = layout();
    let (mut a, mut b, mut c) = (Cubes::new(7), Cubes::new(7), Cubes::new(8));
    let mut differed = false;
    for tick in 0..400 {
        a.step();
        b.step();
        c.step();
        if tick % 20 == 19 {
            let (sa, sb, sc) = (a.snapshot(&l), b.snapshot(&l), c.snapshot(&l));
            assert_eq!(sa.hash(), sb.hash(), "tick {tick}");
            assert_eq!(sa, sb);
            differed |= sa.hash() != sc.hash();
        }
    }
    assert!(differed, "seeds 7 and 8 gave the same scene for 400 ticks");
}

/// Fifty seconds of play: in every ten-second window the player knocks
/// dozens of cubes about, while most cubes sleep with values frozen.
#[test]
fn scene_stays_lively_and_sleeping_cubes_hold_still() {
    const WINDOW: usize = 600;
    let l = layout();
    let mut world = Cubes::new(3);
    // The last seven frames: changes are counted over six ticks, the gap
    // the challenge's delta tests use.
    let mut recent = std::collections::VecDeque::from([world.snapshot(&l)]);
    let mut window_start = recent[0].clone();
    let (mut quiet_pairs, mut pairs) = (0usize, 0usize);
    let mut six_apart = Vec::new();
    let mut most_awake = 0;
    for tick in 1..=5 * WINDOW {
        world.step();
        let snap = world.snapshot(&l);
        assert_eq!(checked(&l, &snap), snap);
        let prev = recent.back().unwrap();
        for i in 0..CUBES {
            let (was, now) = (prev.lanes(i), snap.lanes(i));
            // Asleep on both ticks: the quantized values cannot have moved.
            if was[7] == 0 && now[7] == 0 {
                assert_eq!(was, now, "sleeping cube {i} changed at tick {tick}");
                quiet_pairs += 1;
            }
            pairs += 1;
        }
        most_awake = most_awake.max((0..CUBES).filter(|&i| snap.lanes(i)[7] == 1).count());
        recent.push_back(snap);
        if recent.len() > 7 {
            recent.pop_front();
            six_apart.push(changed(&recent[0], &recent[6]));
        }
        if tick % WINDOW == 0 {
            let now = recent.back().unwrap();
            let moved = changed(&window_start, now);
            let chunk = &six_apart[six_apart.len() - (WINDOW - 6).min(six_apart.len())..];
            let mean = chunk.iter().sum::<usize>() as f64 / chunk.len() as f64;
            println!("ticks up to {tick}: {moved} cubes moved, {mean:.1} change over 6 ticks");
            assert!(moved >= 40, "ticks up to {tick}: only {moved} cubes moved");
            assert!(
                mean >= 10.0,
                "ticks up to {tick}: {mean:.1} cubes change over 6 ticks"
            );
            window_start = now.clone();
        }
    }
    assert!(most_awake >= 20, "at most {most_awake} cubes awake at once");
    let quiet = quiet_pairs as f64 / pairs as f64;
    assert!(
        quiet > 0.5,
        "only {quiet:.2} of cubes asleep on consecutive ticks"
    );
    let mean = six_apart.iter().sum::<usize>() as f64 / six_apart.len() as f64;
    assert!(
        mean < 400.0,
        "{mean} of 900 cubes change over 6 ticks: nothing settles"
    );
    // Everything stays inside the arena (well within the ±32 m range).
    for r in to_records(recent.back().unwrap()) {
        assert!(r[4].abs() < 31 * 512 && r[5].abs() < 31 * 512, "{r:?}");
        assert!(r[6] < 8000, "{r:?}");
    }
}

#[test]
fn records_round_trip_through_snapshots_and_files() {
    let l = layout();
    let mut world = Cubes::new(5);
    step_n(&mut world, 240);
    let first = world.snapshot(&l);
    step_n(&mut world, 6);
    let second = world.snapshot(&l);

    let records = to_records(&second);
    assert_eq!(records.len(), CUBES);
    assert_eq!(from_records(&l, &records).unwrap(), second);

    let mut file = Vec::new();
    write_frame(&mut file, &to_records(&first)).unwrap();
    write_frame(&mut file, &records).unwrap();
    assert_eq!(file.len(), 2 * FRAME_BYTES);
    // Little-endian i32s, record after record, no header.
    let x0 = i32::from_le_bytes(file[16..20].try_into().unwrap());
    assert_eq!(x0, to_records(&first)[0][4]);
    let trace = read_trace(&mut &file[..]).unwrap();
    assert_eq!(trace, vec![to_records(&first), records.clone()]);
    assert_eq!(from_records(&l, &trace[0]).unwrap(), first);

    assert!(read_trace(&mut &[][..]).unwrap().is_empty());
    let cut = read_trace(&mut &file[..file.len() - 4]);
    assert!(
        matches!(cut, Err(CubesError::Truncated { len }) if len == 2 * FRAME_BYTES - 4),
        "{cut:?}"
    );
    assert!(write_frame(&mut Vec::new(), &records[..900]).is_err());
}

#[test]
fn from_records_refuses_values_out_of_range_and_foreign_layouts() {
    let l = layout();
    let good: Vec<Record> = vec![[3, 256, 256, 256, 0, 0, 256, 0]; CUBES];
    from_records(&l, &good).unwrap();
    let cases: [(usize, i32, &str); 6] = [
        (0, 4, "orientation_largest"),
        (2, 512, "orientation_b"),
        (4, 16384, "position_x"),
        (5, -16385, "position_y"),
        (6, -1, "position_z"),
        (7, 2, "interacting"),
    ];
    for (lane, value, name) in cases {
        let mut bad = good.clone();
        bad[17][lane] = value;
        match from_records(&l, &bad) {
            Err(CubesError::OutOfRange {
                record: 17,
                field,
                value: v,
                ..
            }) => {
                assert_eq!((field, v), (name, value));
            }
            other => panic!("{name} = {value}: {other:?}"),
        }
    }
    let too_many = vec![good[0]; CUBES + 1];
    assert!(matches!(
        from_records(&l, &too_many),
        Err(CubesError::Snapshot(_))
    ));
    let mut other = cubes::schema();
    other.name = "boxes".into();
    assert!(matches!(
        from_records(&other.layout().unwrap(), &good),
        Err(CubesError::WrongLayout(_))
    ));
}

#[test]
fn one_session_drives_the_player_and_bad_input_changes_nothing() {
    let l = layout();
    let (mut a, mut b) = (Cubes::new(9), Cubes::new(9));
    assert_eq!(a.join(1), Some(PLAYER));
    assert_eq!(a.join(1), Some(PLAYER), "joining twice keeps the player");
    assert_eq!(a.join(2), None, "the player is taken");
    assert_eq!(b.join(1), Some(PLAYER));

    // Refused inputs leave `a` exactly as `b`.
    assert_eq!(a.input(2, &[127, 0]), Err(InputError::UnknownSession(2)));
    assert_eq!(a.input(3, &[127, 0]), Err(InputError::UnknownSession(3)));
    for bad in [&[][..], &[127][..], &[127, 0, 0][..], &[0u8; 65][..]] {
        assert!(
            matches!(a.input(1, bad), Err(InputError::Malformed { len, .. }) if len == bad.len()),
            "{bad:?}"
        );
    }
    step_n(&mut a, 60);
    step_n(&mut b, 60);
    assert_eq!(a.snapshot(&l), b.snapshot(&l));

    // Good input: `a` rolls to +x, `b` to -x.
    a.input(1, &[127, 0]).unwrap();
    b.input(1, &[0x81, 0]).unwrap();
    let x0 = to_records(&a.snapshot(&l))[PLAYER as usize][4];
    step_n(&mut a, 120);
    step_n(&mut b, 120);
    let xa = to_records(&a.snapshot(&l))[PLAYER as usize][4];
    let xb = to_records(&b.snapshot(&l))[PLAYER as usize][4];
    assert!(xa > x0 + 2 * 512, "driven +x: {x0} -> {xa}");
    assert!(xb < xa - 3 * 512, "+x run ended at {xa}, -x run at {xb}");

    // Leaving frees the player for the next session, and the script resumes.
    a.leave(2);
    assert_eq!(a.join(3), None, "session 2 never held the player");
    a.leave(1);
    assert!(!a.driven());
    assert_eq!(a.input(1, &[0, 0]), Err(InputError::UnknownSession(1)));
    assert_eq!(a.join(3), Some(PLAYER));
}
