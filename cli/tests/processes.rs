//! The real `statecast` binary as separate processes on loopback: an origin,
//! a relay and headless clients, as an operator runs them.
//!
//! - a client's JSON summary shows every tick verified, and the `/metrics`
//!   of the origin and the relay pass the real `promtool check metrics`
//!   (Debian package `prometheus`; `scripts/test.sh` installs it);
//! - killing the relay (SIGKILL) ends the client with a clear error, and a
//!   relay restarted on the same address serves a new client;
//! - SIGTERM drains the relay: its client hears a goaway, newcomers are
//!   refused, and the relay exits 0 once its clients have left, or at its
//!   drain deadline.
//!
//! Every process binds port 0 and logs JSON lines; the tests read the bound
//! addresses from the "origin running" and "relay running" lines. Every wait
//! has a deadline, and every process is killed when its test ends.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn a_client_verifies_every_tick_and_metrics_pass_promtool() {
    let data = scratch("metrics");
    let (_origin, upstream, origin_admin) = origin(&data);
    let relay = relay(&data, upstream, "127.0.0.1:0", &[]);

    let mut client = client(&data, relay.clients, &["--duration", "3"]);
    let (status, _) = client.wait_exit(DEADLINE);
    let summary = client.summary();
    assert!(status.success(), "{status}: {summary:#}\n{}", client.log());
    assert!(summary["error"].is_null(), "{summary:#}");
    assert_eq!(summary["relay_id"], "relay-1");
    // Three seconds at 20 Hz: a quarter of the ticks, on a loaded machine.
    check_verified(&summary, 15);

    assert_eq!(get(relay.admin, "/healthz").0, 200);
    assert_eq!(get(relay.admin, "/readyz").0, 200);
    let (code, text) = get(relay.admin, "/metrics");
    assert_eq!(code, 200);
    promtool_check("relay", &text);
    for name in [
        "statecast_relay_clients",
        "statecast_relay_bytes_sent_total",
        "statecast_relay_updates_sent_total{via=\"stream\"}",
        "statecast_relay_updates_sent_total{via=\"datagram\"}",
        "statecast_relay_keyframes_sent_total",
        "statecast_relay_encode_seconds_total",
        "statecast_relay_fanout_latency_seconds_bucket",
        "statecast_relay_upstream_lag_seconds",
        "statecast_relay_chunk_cache_hits_total",
        "statecast_relay_chunk_cache_misses_total",
        "statecast_relay_chunk_cache_hit_ratio",
        "statecast_relay_drops_total{reason=\"stream_superseded\"}",
        "statecast_relay_drops_total{reason=\"datagram_send\"}",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from the relay's metrics:\n{text}"
        );
    }
    // What the client's run left in them.
    assert!(metric(&text, "statecast_relay_bytes_sent_total").unwrap() > 0.0);
    assert!(metric_sum(&text, "statecast_relay_updates_sent_total") >= 15.0);
    assert!(metric(&text, "statecast_relay_keyframes_sent_total").unwrap() >= 1.0);
    assert!(metric(&text, "statecast_relay_encode_seconds_total").unwrap() > 0.0);
    assert!(metric(&text, "statecast_relay_fanout_latency_seconds_count").unwrap() >= 15.0);
    assert!(metric(&text, "statecast_relay_upstream_ticks_total").unwrap() >= 15.0);
    assert_eq!(metric(&text, "statecast_relay_clients"), Some(0.0));

    let (code, text) = get(origin_admin, "/metrics");
    assert_eq!(code, 200);
    promtool_check("origin", &text);
    assert!(
        text.lines().any(|l| l.starts_with("statecast_origin_")),
        "no statecast_origin_ metric:\n{text}"
    );
}

#[test]
fn a_killed_relay_gives_its_client_a_clear_error_and_restarts_on_its_address() {
    let data = scratch("restart");
    let (_origin, upstream, _) = origin(&data);
    let mut relay1 = relay(&data, upstream, "127.0.0.1:0", &[]);
    let address = relay1.clients;

    let mut first = client(&data, address, &["--duration", "60"]);
    relay1.wait_serving(1, 5.0);
    relay1.proc.signal("KILL");
    relay1.proc.wait_exit(DEADLINE);

    // The client notices within QUIC's idle timeout (5 s) and says what
    // happened, naming the relay.
    let (status, waited) = first.wait_exit(DEADLINE);
    let summary = first.summary();
    assert!(
        !status.success(),
        "the client should fail when its relay dies: {summary:#}"
    );
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("relay") && error.contains("stopped answering"),
        "unclear error {error:?} in {summary:#}"
    );
    assert!(
        first.log().contains("error: the relay"),
        "no error line on stderr:\n{}",
        first.log()
    );
    assert!(waited < Duration::from_secs(12), "noticed after {waited:?}");
    check_verified(&summary, 1);

    // A relay started again on the same address serves a new client.
    let relay2 = relay(&data, upstream, &address.to_string(), &[]);
    assert_eq!(relay2.clients, address);
    let mut second = client(&data, address, &["--duration", "2"]);
    let (status, _) = second.wait_exit(DEADLINE);
    let summary = second.summary();
    assert!(status.success(), "{status}: {summary:#}\n{}", second.log());
    check_verified(&summary, 5);
}

#[test]
fn sigterm_drains_the_relay() {
    let data = scratch("drain");
    let (_origin, upstream, _) = origin(&data);

    // Clients leave before the deadline: the relay exits as soon as they
    // have, with status 0.
    let mut relay1 = relay(&data, upstream, "127.0.0.1:0", &["--drain-secs", "20"]);
    let mut leaving = client(&data, relay1.clients, &["--duration", "4"]);
    relay1.wait_serving(1, 5.0);
    relay1.proc.signal("TERM");
    relay1
        .proc
        .wait_for("draining: goaway sent, waiting for clients to leave");
    // Newcomers are turned away while the relay drains.
    let mut late = client(&data, relay1.clients, &["--duration", "1"]);
    let (status, _) = late.wait_exit(DEADLINE);
    assert!(
        !status.success(),
        "a draining relay accepted a client:\n{}",
        late.log()
    );
    assert!(!late.summary()["error"].is_null());

    let (status, _) = leaving.wait_exit(DEADLINE);
    let summary = leaving.summary();
    assert!(status.success(), "{status}: {summary:#}\n{}", leaving.log());
    assert!(
        leaving.log().contains("the relay is draining"),
        "the client did not report the goaway:\n{}",
        leaving.log()
    );
    check_verified(&summary, 5);
    let (status, waited) = relay1.proc.wait_exit(DEADLINE);
    assert!(status.success(), "the relay exited with {status}");
    assert!(
        waited < Duration::from_secs(8),
        "the relay took {waited:?} after its last client left"
    );
    let finished = relay1.proc.wait_for("drain finished");
    assert_eq!(finished["left_behind"], 0, "{finished}");

    // A client that stays: the relay exits 0 at its deadline, and the client
    // is told the relay is going.
    let mut relay2 = relay(&data, upstream, "127.0.0.1:0", &["--drain-secs", "2"]);
    let mut staying = client(&data, relay2.clients, &[]);
    relay2.wait_serving(1, 5.0);
    relay2.proc.signal("TERM");
    let (status, waited) = relay2.proc.wait_exit(DEADLINE);
    assert!(status.success(), "the relay exited with {status}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "the relay exited {waited:?} after SIGTERM, its drain deadline is 2 s"
    );
    let finished = relay2.proc.wait_for("drain finished");
    assert_eq!(finished["left_behind"], 1, "{finished}");
    let (status, _) = staying.wait_exit(DEADLINE);
    let summary = staying.summary();
    assert!(!status.success(), "{summary:#}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(error.contains("draining"), "unclear error {error:?}");
    assert!(staying.log().contains("the relay is draining"));
    check_verified(&summary, 5);
}

#[test]
fn a_client_with_several_relays_fails_over_and_resumes() {
    let data = scratch("failover");
    let (_origin, upstream, _) = origin(&data);
    let mut relays = [
        relay(&data, upstream, "127.0.0.1:0", &["--region", "one"]),
        relay(&data, upstream, "127.0.0.1:0", &["--region", "two"]),
    ];
    let list = relays
        .iter()
        .map(|r| format!("{}/{}", r.clients, r.probe.port()))
        .collect::<Vec<_>>()
        .join(",");
    // A client fixed on each relay, so both hold the world: the roaming
    // client can then resume from its last tick wherever it goes.
    let _keepers: Vec<Proc> = relays
        .iter()
        .map(|r| client(&data, r.clients, &["--duration", "30"]))
        .collect();
    for r in &relays {
        r.wait_serving(1, 5.0);
    }
    let mut client = Proc::spawn(
        "client",
        &data,
        &["client", "--relays", &list, "--duration", "6", "--json"],
    );
    // Both relays are on loopback: the client takes either. Wait until one
    // serves it (two clients), then kill that one.
    let start = std::time::Instant::now();
    let serving = loop {
        let busy = relays.iter().position(|r| {
            let text = get(r.admin, "/metrics").1;
            metric(&text, "statecast_relay_clients").unwrap_or(0.0) >= 2.0
                && metric_sum(&text, "statecast_relay_updates_sent_total") >= 40.0
        });
        if let Some(i) = busy {
            break i;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no relay served the client:\n{}",
            client.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    relays[serving].proc.signal("KILL");
    relays[serving].proc.wait_exit(DEADLINE);

    let (status, _) = client.wait_exit(DEADLINE);
    let summary = client.summary();
    assert!(status.success(), "{status}: {summary:#}\n{}", client.log());
    check_verified(&summary, 20);
    let other = ["one", "two"][1 - serving];
    assert_eq!(summary["region"], other, "{summary:#}");
    assert_eq!(summary["relay_switches"], 1, "{summary:#}");
    assert_eq!(summary["resumed_without_keyframe"], 1, "{summary:#}");
    let gap = summary["longest_gap_ms"].as_f64().unwrap();
    assert!(gap > 0.0 && gap < 5_000.0, "{summary:#}");
    let moves = summary["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{summary:#}");
    assert_eq!(moves[0]["reason"]["kind"], "lost", "{summary:#}");
}

#[test]
fn a_client_fails_over_to_a_relay_it_learnt_from_a_directory() {
    let data = scratch("directory");
    let (_origin, upstream, _) = origin(&data);
    let other = relay(&data, upstream, "127.0.0.1:0", &["--region", "two"]);
    let peer = format!(
        "id=relay-two,addr={},probe={},region=two",
        other.clients, other.probe
    );
    let mut first = relay(
        &data,
        upstream,
        "127.0.0.1:0",
        &["--region", "one", "--peer", &peer],
    );
    // The client is told of the first relay only.
    let only = format!("{}/{}", first.clients, first.probe.port());
    let mut client = Proc::spawn(
        "client",
        &data,
        &["client", "--relays", &only, "--duration", "5", "--json"],
    );
    first.wait_serving(1, 20.0);
    first.proc.signal("KILL");
    first.proc.wait_exit(DEADLINE);

    let (status, _) = client.wait_exit(DEADLINE);
    let summary = client.summary();
    assert!(status.success(), "{status}: {summary:#}\n{}", client.log());
    check_verified(&summary, 20);
    assert_eq!(summary["region"], "two", "{summary:#}");
    assert_eq!(summary["relay_switches"], 1, "{summary:#}");
}
