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

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_statecast");
/// Longest wait for a process to start, log, or end.
const DEADLINE: Duration = Duration::from_secs(20);
/// Avatars in the plaza: enough to fill streams, light on a loaded machine.
const AVATARS: &str = "1000";

/// A fresh directory for one test's development CA.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("processes-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `statecast` process whose output is collected by two threads.
/// Killed (SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn spawn(name: &str, data: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env("RUST_LOG", "info")
            .env("STATECAST_DATA", data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the statecast binary starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let readers = vec![
            {
                let stdout = stdout.clone();
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = out.read_to_string(&mut text);
                    stdout.lock().unwrap().push_str(&text);
                })
            },
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines() {
                        let Ok(line) = line else { break };
                        stderr.lock().unwrap().push(line);
                    }
                })
            },
        ];
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for a JSON log line whose message is `message`; returns its
    /// fields.
    fn wait_for(&mut self, message: &str) -> Value {
        let start = Instant::now();
        loop {
            let found = self.stderr.lock().unwrap().iter().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                (v["fields"]["message"] == message).then(|| v["fields"].clone())
            });
            if let Some(fields) = found {
                return fields;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {message:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{} did not log {message:?} within {DEADLINE:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address logged as `field` in the line `message`.
    fn addr(&mut self, message: &str, field: &str) -> SocketAddr {
        let fields = self.wait_for(message);
        fields[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{message:?} has no address {field:?}: {fields}"))
    }

    /// Waits until the process exits, at most `deadline`; returns its status
    /// and how long the wait took.
    fn wait_exit(&mut self, deadline: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < deadline,
                "{} did not exit within {deadline:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON summary a `statecast client --json` printed (after it
    /// exited).
    fn summary(&self) -> Value {
        let out = self.stdout.lock().unwrap();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not one JSON object ({e}):\n{out}\nstderr:\n{}",
                self.name,
                self.log()
            )
        })
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An origin serving plaza on loopback; returns it and its upstream address.
fn origin(data: &Path) -> (Proc, SocketAddr, SocketAddr) {
    let mut origin = Proc::spawn(
        "origin",
        data,
        &[
            "origin",
            "--world",
            "plaza",
            "--avatars",
            AVATARS,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let upstream = origin.addr("origin running", "upstream");
    let admin = origin.addr("origin running", "admin");
    (origin, upstream, admin)
}

/// A relay of `upstream` listening for clients on `listen`; returns it, its
/// client address and its admin address.
fn relay(data: &Path, upstream: SocketAddr, listen: &str, extra: &[&str]) -> Relay {
    let upstream = upstream.to_string();
    let mut args = vec![
        "relay",
        "--origin",
        &upstream,
        "--listen",
        listen,
        "--admin",
        "127.0.0.1:0",
        "--probe",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn("relay", data, &args);
    let clients = proc.addr("relay running", "clients");
    let admin = proc.addr("relay running", "admin");
    Relay {
        proc,
        clients,
        admin,
    }
}

struct Relay {
    proc: Proc,
    clients: SocketAddr,
    admin: SocketAddr,
}

impl Relay {
    /// Waits until the relay has a client and has sent it `updates`.
    fn wait_serving(&self, clients: u64, updates: f64) {
        let start = Instant::now();
        loop {
            let text = get(self.admin, "/metrics").1;
            let connected = metric(&text, "statecast_relay_clients").unwrap_or(0.0);
            let sent = metric_sum(&text, "statecast_relay_updates_sent_total");
            if connected >= clients as f64 && sent >= updates {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the relay did not serve {clients} client(s) {updates} updates within {DEADLINE:?}:\n{text}\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn client(data: &Path, relay: SocketAddr, extra: &[&str]) -> Proc {
    let relay = relay.to_string();
    let mut args = vec!["client", "--relay", &relay, "--json"];
    args.extend_from_slice(extra);
    Proc::spawn("client", data, &args)
}

/// Checks a client's summary: it verified every tick it applied, applied
/// at least `min_ticks`, got mostly deltas.
fn check_verified(summary: &Value, min_ticks: u64) {
    let n = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {summary:#}"))
    };
    assert_eq!(n("divergences"), 0, "{summary:#}");
    assert_eq!(n("hash_checked"), n("ticks_applied"), "{summary:#}");
    assert!(n("ticks_applied") >= min_ticks, "{summary:#}");
    assert!(n("keyframes") <= 2 + n("ticks_applied") / 10, "{summary:#}");
    assert!(n("bytes_received") > 0, "{summary:#}");
}

/// `GET path` over HTTP/1.1; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).expect("admin HTTP connects");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked response: {head}"
    );
    (status, body.to_owned())
}

/// The value of the sample `name` (no labels) in exposition text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of every sample of `name`, whatever its labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Runs the real `promtool check metrics` on `text`; panics with its report
/// unless it is clean.
fn promtool_check(what: &str, text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: scripts/test.sh installs it \
             (Debian package `prometheus`: apt-get install --no-install-recommends prometheus)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the {what} metrics ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
