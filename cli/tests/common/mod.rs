//! Helpers shared by the tests that run the real `statecast` binary:
//! processes whose output is collected, addresses read from their JSON log
//! lines, admin HTTP and Prometheus text. Every wait has a deadline, and
//! every process is killed when dropped.
// Each test file uses only some of the helpers.
#![allow(dead_code)]
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_statecast");
/// Longest wait for a process to start, log, or end.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Avatars in the plaza: enough to fill streams, light on a loaded machine.
pub const AVATARS: &str = "1000";

/// A fresh directory for one test's development CA.
pub fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("processes-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `statecast` process whose output is collected by two threads.
/// Killed (SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, data: &Path, args: &[&str]) -> Proc {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for a JSON log line whose message is `message`; returns its
    /// fields.
    pub fn wait_for(&mut self, message: &str) -> Value {
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
    pub fn addr(&mut self, message: &str, field: &str) -> SocketAddr {
        let fields = self.wait_for(message);
        fields[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{message:?} has no address {field:?}: {fields}"))
    }

    /// Waits until the process exits, at most `deadline`; returns its status
    /// and how long the wait took.
    pub fn wait_exit(&mut self, deadline: Duration) -> (ExitStatus, Duration) {
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
    pub fn summary(&self) -> Value {
        let out = self.stdout.lock().unwrap();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not one JSON object ({e}):\n{out}\nstderr:\n{}",
                self.name,
                self.log()
            )
        })
    }

    pub fn signal(&self, signal: &str) {
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
pub fn origin(data: &Path) -> (Proc, SocketAddr, SocketAddr) {
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
pub fn relay(data: &Path, upstream: SocketAddr, listen: &str, extra: &[&str]) -> Relay {
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
    let fields = proc.wait_for("relay running");
    let probe = fields["probe"]
        .as_str()
        .and_then(|s| s.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("the relay logged no probe address: {fields}"));
    Relay {
        proc,
        clients,
        admin,
        probe,
    }
}

pub struct Relay {
    pub proc: Proc,
    pub clients: SocketAddr,
    pub admin: SocketAddr,
    /// Its UDP probe address.
    pub probe: SocketAddr,
}

impl Relay {
    /// Waits until the relay has a client and has sent it `updates`.
    pub fn wait_serving(&self, clients: u64, updates: f64) {
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

pub fn client(data: &Path, relay: SocketAddr, extra: &[&str]) -> Proc {
    let relay = relay.to_string();
    let mut args = vec!["client", "--relay", &relay, "--json"];
    args.extend_from_slice(extra);
    Proc::spawn("client", data, &args)
}

/// Checks a client's summary: it verified every tick it applied, applied
/// at least `min_ticks`, got mostly deltas.
pub fn check_verified(summary: &Value, min_ticks: u64) {
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
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
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
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of every sample of `name`, whatever its labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
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
pub fn promtool_check(what: &str, text: &str) {
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
