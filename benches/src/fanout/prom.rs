//! Reads a relay's `/metrics` (Prometheus text) over plain HTTP and computes
//! quantiles from histogram bucket deltas, as `histogram_quantile` does.

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most bytes of an admin answer read.
const MAX_ANSWER: u64 = 4 << 20;

/// `GET path` on a plain HTTP/1.1 listener; the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .with_context(|| format!("GET {path} on {addr}: no answer within 5 s"))?
        .with_context(|| format!("GET {path} on {addr}"))?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path} on {addr}: no HTTP head in the answer");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path} on {addr}: bad status line"))?;
    Ok((status, body.to_owned()))
}

/// One scrape: every sample by its full name (`name{labels}`).
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// Parses Prometheus text exposition.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            samples.insert(name.trim().to_owned(), value);
        }
        Scrape { samples }
    }

    /// Scrapes `/metrics` at `admin`.
    pub async fn fetch(admin: SocketAddr) -> anyhow::Result<Scrape> {
        let (status, body) = http_get(admin, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics on {admin}: status {status}");
        }
        Ok(Scrape::parse(&body))
    }

    /// The sample `name` (with its labels, as written), or 0.
    pub fn get(&self, name: &str) -> f64 {
        self.samples.get(name).copied().unwrap_or(0.0)
    }

    /// Sum of every sample of metric `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.as_str() == name
                    || k.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The cumulative buckets of histogram `name`: (upper bound, count),
    /// by increasing bound, `+Inf` last.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        self.buckets_with(name, "")
    }

    /// The buckets of the series of histogram `name` whose labels include
    /// `label` (as written: `stage="split"`; empty: every series, summed
    /// per bound).
    pub fn buckets_with(&self, name: &str, label: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut sums: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let found = self.samples.iter().filter_map(|(k, v)| {
            let labels = k.strip_prefix(&prefix)?;
            if !label.is_empty() && !labels.split([',', '}']).any(|l| l == label) {
                return None;
            }
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        });
        for (le, v) in found {
            sums.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        }
        let mut out: Vec<(f64, f64)> = sums.into_values().collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The buckets of `after` minus those of `before` (same bounds).
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, count)| {
            let old = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - old).max(0.0))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the
/// bucket as Prometheus' `histogram_quantile` does; a quantile in the
/// `+Inf` bucket is reported as the largest finite bound. `None` without
/// samples.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = cum - lower.1;
            let within = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, cum);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP statecast_relay_fanout_latency_seconds Time.
# TYPE statecast_relay_fanout_latency_seconds histogram
statecast_relay_fanout_latency_seconds_bucket{le="0.001"} 50
statecast_relay_fanout_latency_seconds_bucket{le="0.002"} 90
statecast_relay_fanout_latency_seconds_bucket{le="0.005"} 100
statecast_relay_fanout_latency_seconds_bucket{le="+Inf"} 100
statecast_relay_fanout_latency_seconds_sum 0.1
statecast_relay_fanout_latency_seconds_count 100
statecast_relay_drops_total{reason="datagram_send"} 3
statecast_relay_drops_total{reason="stream_superseded"} 4
statecast_relay_bytes_sent_total 12345
"#;

    #[test]
    fn parses_and_computes_quantiles() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.get("statecast_relay_bytes_sent_total"), 12345.0);
        assert_eq!(s.sum("statecast_relay_drops_total"), 7.0);
        let b = s.buckets("statecast_relay_fanout_latency_seconds");
        assert_eq!(b.len(), 4);
        assert!((quantile(&b, 0.5).unwrap() - 0.001).abs() < 1e-9);
        assert!((quantile(&b, 0.7).unwrap() - 0.0015).abs() < 1e-9);
        let before: Vec<_> = b.iter().map(|&(le, c)| (le, c / 2.0)).collect();
        let d = bucket_delta(&before, &b);
        assert_eq!(d.last().unwrap().1, 50.0);
        assert_eq!(quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
    }

    #[test]
    fn picks_the_series_of_one_label() {
        let s = Scrape::parse(
            r#"
x_seconds_bucket{stage="split",le="0.001"} 4
x_seconds_bucket{stage="split",le="+Inf"} 5
x_seconds_bucket{stage="last",le="0.001"} 1
x_seconds_bucket{stage="last",le="+Inf"} 7
"#,
        );
        let inf = f64::INFINITY;
        assert_eq!(
            s.buckets_with("x_seconds", "stage=\"split\""),
            vec![(0.001, 4.0), (inf, 5.0)]
        );
        assert_eq!(
            s.buckets_with("x_seconds", "stage=\"last\""),
            vec![(0.001, 1.0), (inf, 7.0)]
        );
        assert_eq!(s.buckets("x_seconds"), vec![(0.001, 5.0), (inf, 12.0)]);
        assert!(s.buckets_with("x_seconds", "stage=\"coded\"").is_empty());
    }
}
