//! `lab route`: the matrix format, unknown pairs, small networks whose best
//! relay is known, and the shipped world matrix. All in simulated time.
//!
//! The shipped matrix is `lab/data/world.csv`, made by
//! `statecast_lab::matrix::synthetic(&Synthetic::default())`. To remake it
//! after changing the generator:
//! `STATECAST_REGENERATE=1 cargo test -p statecast-lab --test route shipped`.

use std::path::PathBuf;

use statecast_lab::matrix::{Matrix, MatrixError, Synthetic, synthetic};
use statecast_lab::route::{Network, RouteConfig, RouteError, Strategy, nodes_with_prefix};

fn world_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/world.csv")
}

fn world() -> Matrix {
    Matrix::from_file(&world_path()).expect("lab/data/world.csv")
}

#[test]
fn parses_with_or_without_header_comments_and_blank_lines() {
    let with = "a,b,rtt_ms\nx,y,10\ny,z,20.5\n";
    let without = "# a comment\n\nx, y ,10\r\n  y,z,20.5\n";
    for text in [with, without] {
        let m = Matrix::parse(text).unwrap();
        assert_eq!(m.names(), ["x", "y", "z"]);
        let (x, y, z) = (
            m.node("x").unwrap(),
            m.node("y").unwrap(),
            m.node("z").unwrap(),
        );
        assert_eq!(m.rtt(x, y), Some(10.0));
        assert_eq!(m.rtt(y, x), Some(10.0), "symmetric");
        assert_eq!(m.rtt(z, y), Some(20.5));
        assert_eq!(m.rtt(x, z), None, "missing pair: unknown");
        assert_eq!(m.rtt(x, x), Some(0.0));
        assert_eq!(m.pairs(), 2);
    }
    // Both directions with the same RTT are fine.
    assert_eq!(Matrix::parse("x,y,10\ny,x,10\n").unwrap().pairs(), 1);
}

#[test]
fn errors_name_their_line() {
    let cases: &[(&str, &str)] = &[
        (
            "x,y,10\nx,y\n",
            "line 2: expected `node,node,rtt_ms`, found 2 field(s)",
        ),
        (
            "x,y,10\nx,y,z,1\n",
            "line 2: expected `node,node,rtt_ms`, found 4 field(s)",
        ),
        ("x,y,10\n\nx,z,fast\n", "line 3: \"fast\" is not an RTT"),
        ("x,y,-1\n", "line 1: \"-1\" is not an RTT"),
        ("x,y,NaN\n", "line 1: \"NaN\" is not an RTT"),
        ("x,y,inf\n", "line 1: \"inf\" is not an RTT"),
        ("x,y,1e9\n", "line 1: \"1e9\" is not an RTT"),
        ("a,b,rtt\nx,y,1\nq,r,rtt\n", "line 3: \"rtt\" is not an RTT"),
        ("x,y,10\nx,x,3\n", "line 2: \"x\" is paired with itself"),
        ("x,,10\n", "line 1: empty node name"),
        (
            "x,y,10\n# c\ny,x,11\n",
            "line 3: y,x is 11 ms, but line 1 said 10 ms",
        ),
        ("a,b,rtt_ms\n# nothing\n", "the matrix holds no pair"),
        ("", "the matrix holds no pair"),
    ];
    for (text, want) in cases {
        let error = Matrix::parse(text).unwrap_err().to_string();
        assert!(error.starts_with(want), "{text:?}: {error}");
    }
    let missing = Matrix::from_file(&PathBuf::from("/nonexistent/m.csv")).unwrap_err();
    assert!(matches!(missing, MatrixError::Io { .. }), "{missing}");
    assert!(missing.to_string().contains("/nonexistent/m.csv"));
}

/// Two relays; client `c1` is nearer `near` but `far` has the better sum
/// with the origin; `c2` reaches only `far`; `c3` reaches only `cut`, which
/// has no path to the origin (unserved); `lonely` reaches nothing.
fn small() -> Matrix {
    Matrix::parse(
        "a,b,rtt_ms
         r-x-near,c-x-1,10
         r-x-far,c-x-1,25
         r-x-near,o,60
         r-x-far,o,20
         r-x-far,c-x-2,30
         r-x-near,r-x-far,40
         r-x-cut,c-x-3,5
         r-x-cut,r-x-near,50
         c-x-lonely,c-x-1,3
        ",
    )
    .unwrap()
}

#[test]
fn a_small_network_picks_the_known_best_and_handles_missing_pairs() {
    let m = small();
    let relays = nodes_with_prefix(&m, "r-");
    assert_eq!(relays.len(), 3);
    let origin = m.node("o");
    let config = RouteConfig {
        jitter_ms: 1.0,
        loss: 0.0,
        ..RouteConfig::new(relays, origin)
    };
    let net = Network::new(&m, config).unwrap();
    // Clients: every node neither relay nor origin.
    assert_eq!(net.clients().len(), 4);
    for strategy in [Strategy::coords(), Strategy::unhinted(), Strategy::all()] {
        let report = net.run(&strategy, &mut |_, _| {});
        // c-x-3 (only a relay without origin) and c-x-lonely are unserved.
        assert_eq!((report.clients, report.unserved), (2, 2), "{report:?}");
        assert_eq!(report.best_share, 1.0, "{report:?}");
        assert_eq!(report.near_best_share, 1.0);
        assert_eq!(report.regret_p95_ms, 0.0);
        assert_eq!(report.no_choice, 0);
        // c-x-2's probe to r-x-near is lost (no pair), so it counts.
        assert!(report.relays_probed_per_client >= 2.0, "{report:?}");
        assert!(report.probe_packets_per_client >= 10.0);
        assert!(report.worst.is_empty());
    }
}

#[test]
fn without_an_origin_the_nearest_relay_is_best() {
    let m = small();
    let relays = nodes_with_prefix(&m, "r-");
    let config = RouteConfig {
        jitter_ms: 0.0,
        loss: 0.0,
        ..RouteConfig::new(relays, None)
    };
    let net = Network::new(&m, config).unwrap();
    // Now "o" is a client too (it reaches near and far), and c-x-3 is
    // served by cut: only c-x-lonely is left.
    assert_eq!(net.clients().len(), 5);
    let report = net.run(&Strategy::all(), &mut |_, _| {});
    assert_eq!((report.clients, report.unserved), (4, 1), "{report:?}");
    assert_eq!(report.best_share, 1.0, "{report:?}");
}

#[test]
fn a_wrong_choice_shows_as_regret() {
    // Probes are all lost to the best relay of this client, so it can only
    // choose the other: 15 ms of regret, beyond max(5 ms, 10% of 10 ms).
    let m = Matrix::parse("r-a-1,c-a-1,10\nr-a-2,c-a-1,25\nr-a-1,r-a-2,20\n").unwrap();
    let mut config = RouteConfig::new(nodes_with_prefix(&m, "r-"), None);
    (config.jitter_ms, config.loss) = (0.0, 0.0);
    let net = Network::new(&m, config.clone()).unwrap();
    assert_eq!(net.run(&Strategy::all(), &mut |_, _| {}).best_share, 1.0);
    // Everything lost: no choice at all.
    config.loss = 1.0;
    let net = Network::new(&m, config).unwrap();
    let report = net.run(&Strategy::all(), &mut |_, _| {});
    assert_eq!((report.clients, report.no_choice), (1, 1), "{report:?}");
    assert_eq!((report.best_share, report.near_best_share), (0.0, 0.0));
    assert_eq!(report.worst.len(), 1);
    assert_eq!(report.worst[0].chosen, None);
    assert_eq!(report.worst[0].best, "r-a-1");
}

#[test]
fn bad_configurations_are_refused() {
    let m = small();
    let relays = nodes_with_prefix(&m, "r-");
    let origin = m.node("o");
    let net = |c: RouteConfig| Network::new(&m, c).map(drop);
    assert_eq!(
        net(RouteConfig::new(vec![], origin)),
        Err(RouteError::NoRelays)
    );
    let mut dup = relays.clone();
    dup.push(relays[0]);
    assert!(matches!(
        net(RouteConfig::new(dup, origin)),
        Err(RouteError::DuplicateRelay(_))
    ));
    assert!(matches!(
        net(RouteConfig::new(relays.clone(), Some(relays[0]))),
        Err(RouteError::OriginIsRelay(_))
    ));
    assert_eq!(
        net(RouteConfig::new(vec![999], None)),
        Err(RouteError::UnknownNode(999))
    );
    for (jitter_ms, loss) in [(f64::NAN, 0.0), (-1.0, 0.0), (0.0, 1.5), (0.0, f64::NAN)] {
        let c = RouteConfig {
            jitter_ms,
            loss,
            ..RouteConfig::new(relays.clone(), origin)
        };
        assert_eq!(net(c), Err(RouteError::Conditions));
    }
}

#[test]
fn the_same_seed_gives_the_same_report() {
    // A synthetic world: every fifth relay (24), 300 clients, 1% missing.
    let m = synthetic(&Synthetic {
        seed: 5,
        missing: 0.01,
        ..Synthetic::default()
    });
    let relays: Vec<usize> = nodes_with_prefix(&m, "r-").into_iter().step_by(5).collect();
    let clients_kept = nodes_with_prefix(&m, "c-").len();
    assert!(clients_kept > 200);
    let config = RouteConfig::new(relays, m.node("o-euc"));
    let a = Network::new(&m, config.clone()).unwrap();
    let b = Network::new(&m, config.clone()).unwrap();
    assert_eq!(a.relay_coords(), b.relay_coords());
    let ra = a.run(&Strategy::coords(), &mut |_, _| {});
    let rb = b.run(&Strategy::coords(), &mut |_, _| {});
    assert_eq!(ra, rb);
    let other = Network::new(&m, RouteConfig { seed: 2, ..config }).unwrap();
    assert_ne!(other.relay_coords(), a.relay_coords(), "the seed matters");
}

#[test]
fn shipped_matrix_matches_its_generator() {
    let generated = synthetic(&Synthetic::default());
    if std::env::var_os("STATECAST_REGENERATE").is_some() {
        std::fs::create_dir_all(world_path().parent().unwrap()).unwrap();
        std::fs::write(world_path(), generated.to_csv()).unwrap();
    }
    let shipped = world();
    let mut names = shipped.names().to_vec();
    let mut want = generated.names().to_vec();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(shipped.pairs(), generated.pairs());
    // Node order follows first appearance in the file: compare by name.
    let map: Vec<usize> = generated
        .names()
        .iter()
        .map(|n| shipped.node(n).unwrap())
        .collect();
    for a in 0..generated.len() {
        for b in a + 1..generated.len() {
            let (s, g) = (shipped.rtt(map[a], map[b]), generated.rtt(a, b));
            assert!(
                match (s, g) {
                    (Some(s), Some(g)) => (s - g).abs() < 0.06,
                    (None, None) => true,
                    _ => false,
                },
                "{},{}: shipped {s:?}, generated {g:?}",
                generated.names()[a],
                generated.names()[b]
            );
        }
    }
}

#[test]
fn shipped_matrix_has_the_documented_shape() {
    let world = world();
    let m = &world;
    let relays = nodes_with_prefix(m, "r-");
    let clients = nodes_with_prefix(m, "c-");
    assert_eq!((relays.len(), clients.len()), (120, 300));
    let rtt = |a: &str, b: &str| m.rtt(m.node(a).unwrap(), m.node(b).unwrap());
    // Intercontinental RTTs as documented (relays near the cities).
    let between = |ra: &str, rb: &str| -> Vec<f64> {
        let a = nodes_with_prefix(m, &format!("r-{ra}-"));
        let b = nodes_with_prefix(m, &format!("r-{rb}-"));
        let mut v: Vec<f64> = a
            .iter()
            .flat_map(|&x| {
                b.iter()
                    .filter_map(move |&y| (x != y).then(|| m.rtt(x, y)).flatten())
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let median = |v: &[f64]| v[v.len() / 2];
    let eu_us = median(&between("euw", "use"));
    assert!((65.0..110.0).contains(&eu_us), "euw-use {eu_us}");
    let eu_asia = median(&between("euc", "apse"));
    assert!((120.0..200.0).contains(&eu_asia), "euc-apse {eu_asia}");
    let eu_japan = median(&between("euw", "apne"));
    assert!((180.0..260.0).contains(&eu_japan), "euw-apne {eu_japan}");
    let intra = median(&between("euc", "euc"));
    assert!((5.0..40.0).contains(&intra), "euc-euc {intra}");
    assert!(rtt("o-euc", "r-euc-00").is_some());
    assert_eq!(
        rtt("o-euc", "c-euc-000"),
        None,
        "client-origin pairs left out"
    );
    // Some client-relay pairs are missing (unreachable relays).
    let missing = clients
        .iter()
        .flat_map(|&c| relays.iter().map(move |&r| (c, r)))
        .filter(|&(c, r)| m.rtt(c, r).is_none())
        .count();
    assert!((20..300).contains(&missing), "{missing} missing pairs");
}

/// The shipped matrix (120 relays, 5 ms of jitter, 2% loss), each origin
/// choice and none: coordinates, with the relays' published origin RTTs,
/// keep probing within 8 relays and choose near the best far more often
/// than 8 relays without hints. A floor under the measured figures
/// (benches/README.md, "Routing at scale": at seed 1 99.3% near best with
/// the origin in Frankfurt, 99.7% in Ashburn, 99.3% without an origin; 99.0
/// to 100% with an origin and 96.7 to 100% without over seeds 1 to 6),
/// with a margin for small changes. The code of the first guide reached 99.7
/// / 99.7 / 95.0%, the code before it 76 / 91 / 73%.
#[test]
fn shipped_matrix_coordinates_come_near_the_target_within_the_budget() {
    let m = world();
    for (origin, floor) in [
        (Some("o-euc"), 0.985),
        (Some("o-use"), 0.985),
        (None, 0.985),
    ] {
        let config = RouteConfig::new(nodes_with_prefix(&m, "r-"), origin.and_then(|o| m.node(o)));
        let net = Network::new(&m, config).unwrap();
        let coords = net.run(&Strategy::coords(), &mut |_, _| {});
        let unhinted = net.run(&Strategy::unhinted(), &mut |_, _| {});
        assert!(coords.clients >= 290, "{coords:?}");
        assert!(coords.relays_probed_max <= 8, "{origin:?}: {coords:#?}");
        assert!(unhinted.relays_probed_max <= 9, "{origin:?}: {unhinted:#?}");
        assert!(coords.near_best_share >= floor, "{origin:?}: {coords:#?}");
        assert!(
            coords.near_best_share >= unhinted.near_best_share + 0.3,
            "{origin:?}: coords {} unhinted {}",
            coords.near_best_share,
            unhinted.near_best_share
        );
    }
}
