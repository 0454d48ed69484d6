//! The admin listener over real TCP on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntGaugeVec, Opts, Registry};
use statecast_transport::{Readiness, admin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection, read to the end.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(STEP, exchange)
        .await
        .expect("admin answered in time");
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A small check of the Prometheus text format: every line is a comment
/// (`# HELP name text`, `# TYPE name kind`) or a sample `name{labels} value
/// [timestamp]`. The real `promtool check metrics` runs in CI.
fn check_exposition(text: &str) -> Result<usize, String> {
    let mut samples = 0;
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| Err(format!("line {}: {why}: {line:?}", n + 1));
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next();
            if matches!(keyword, Some("HELP" | "TYPE")) && !words.next().is_some_and(is_metric_name)
            {
                return fail("HELP or TYPE without a metric name");
            }
            if keyword == Some("TYPE") {
                let kind = words.next().unwrap_or("");
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return fail("unknown metric type");
                }
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if !is_metric_name(&line[..name_end]) {
            return fail("bad metric name");
        }
        let mut rest = &line[name_end..];
        if let Some(labels) = rest.strip_prefix('{') {
            let Some(after) = parse_labels(labels) else {
                return fail("bad labels");
            };
            rest = after;
        }
        let Some(rest) = rest.strip_prefix(' ') else {
            return fail("no space before the value");
        };
        let mut fields = rest.split(' ');
        let value = fields.next().unwrap_or("");
        let value_ok = matches!(value, "+Inf" | "-Inf" | "NaN") || value.parse::<f64>().is_ok();
        if !value_ok {
            return fail("bad value");
        }
        if let Some(ts) = fields.next()
            && ts.parse::<i64>().is_err()
        {
            return fail("bad timestamp");
        }
        if fields.next().is_some() {
            return fail("trailing fields");
        }
        samples += 1;
    }
    Ok(samples)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `k="v",k2="v2"}` and returns what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<&str> {
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Some(rest);
        }
        let eq = s.find('=')?;
        let name = &s[..eq];
        let mut chars = name.chars();
        let name_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return None;
        }
        s = s[eq + 1..].strip_prefix('"')?;
        // The value runs to the first unescaped quote.
        let mut escaped = false;
        let end = s.char_indices().find_map(|(i, c)| {
            if escaped {
                escaped = false;
                None
            } else if c == '\\' {
                escaped = true;
                None
            } else if c == '"' {
                Some(i)
            } else {
                None
            }
        })?;
        s = &s[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[test]
fn the_exposition_check_catches_bad_lines() {
    assert_eq!(
        check_exposition("# HELP a b\n# TYPE a counter\na 1\n"),
        Ok(1)
    );
    assert_eq!(check_exposition("a{b=\"c\\\"d\",e=\"f\"} 1.5 123\n"), Ok(1));
    assert!(check_exposition("a{b=c} 1\n").is_err());
    assert!(check_exposition("1a 1\n").is_err());
    assert!(check_exposition("a one\n").is_err());
    assert!(check_exposition("# TYPE a thing\n").is_err());
}

fn registry() -> (Registry, IntCounter) {
    let registry = Registry::new();
    let updates = IntCounter::with_opts(Opts::new(
        "statecast_test_updates_sent_total",
        "Updates sent to clients.",
    ))
    .unwrap();
    registry.register(Box::new(updates.clone())).unwrap();
    let clients = IntGaugeVec::new(
        Opts::new("statecast_test_clients", "Connected clients."),
        &["world", "region"],
    )
    .unwrap();
    registry.register(Box::new(clients.clone())).unwrap();
    clients.with_label_values(&["plaza", "eu-\"west\""]).set(3);
    let latency = HistogramVec::new(
        HistogramOpts::new("statecast_test_fanout_seconds", "Fan-out latency.")
            .buckets(vec![0.001, 0.005, 0.025]),
        &["world"],
    )
    .unwrap();
    registry.register(Box::new(latency.clone())).unwrap();
    latency.with_label_values(&["plaza"]).observe(0.002);
    (registry, updates)
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let (registry, updates) = registry();
    updates.inc_by(3);
    let readiness = Readiness::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, task) = admin::serve(
        "127.0.0.1:0".parse().unwrap(),
        registry,
        readiness.clone(),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap();

    let metrics = request(addr, "GET", "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(
        metrics
            .body
            .contains("\nstatecast_test_updates_sent_total 3\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("# TYPE statecast_test_fanout_seconds histogram")
    );
    let samples =
        check_exposition(&metrics.body).unwrap_or_else(|e| panic!("{e}\n{}", metrics.body));
    // Counter, gauge, and the histogram's 3 buckets + Inf + sum + count.
    assert_eq!(samples, 1 + 1 + 6);

    // A registered counter moves between scrapes.
    updates.inc();
    let again = request(addr, "GET", "/metrics").await;
    assert!(
        again
            .body
            .contains("\nstatecast_test_updates_sent_total 4\n")
    );

    let health = request(addr, "GET", "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let ready = request(addr, "GET", "/readyz").await;
    assert_eq!(ready.status, 503);
    readiness.set_ready(true);
    let ready = request(addr, "GET", "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    readiness.set_ready(false);
    assert_eq!(request(addr, "GET", "/readyz").await.status, 503);

    let head = request(addr, "HEAD", "/healthz").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(request(addr, "GET", "/").await.status, 404);
    assert_eq!(request(addr, "GET", "/metrics/extra").await.status, 404);
    let post = request(addr, "POST", "/metrics").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // Shutdown ends the task and closes the listener.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(STEP, task)
        .await
        .expect("admin task ends after shutdown")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_waits_for_nobody_idle() {
    // An idle keep-alive connection does not hold shutdown past its grace.
    let (registry, _) = registry();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, task) = admin::serve(
        "127.0.0.1:0".parse().unwrap(),
        registry,
        Readiness::new(),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(STEP, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    stop_tx.send(()).unwrap();
    tokio::time::timeout(STEP, task)
        .await
        .expect("admin task ends with an idle connection open")
        .unwrap();
    // The idle connection was closed by the server.
    let n = tokio::time::timeout(STEP, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}
