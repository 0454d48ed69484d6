//! The floor: a plain quinn server that sends every connection one datagram
//! of a fixed size per tick, and reads (and discards) what the clients send
//! back (their acks). No state, no interest, no encoding: what fan-out
//! costs on this stack (quinn, rustls with ring, tokio, the UDP socket)
//! before any relay logic. The bench runs it as a separate process
//! (`fanout --floor-server`), so its CPU is measured as the relay's is.
//!
//! Each datagram is a valid `Update` (one padding chunk), so the same load
//! clients decode and acknowledge it. Tick `k` is sent at `epoch + k /
//! rate`, like the origin's drift-free tick loop; a tick the loop could not
//! send in time is skipped, never sent late, and the bench counts it as
//! missed.

use anyhow::Context;
use bytes::Bytes;
use proto::msg::{CellId, Chunk, Message, Update};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the floor server runs.
#[derive(Clone, Debug)]
pub struct FloorConfig {
    /// QUIC address (port 0 picks one).
    pub listen: SocketAddr,
    /// Data directory of the development CA (shared with the bench).
    pub data_dir: PathBuf,
    /// Bytes of each datagram (the relay's mean update size).
    pub size: usize,
    /// Ticks per second.
    pub rate: u32,
    /// Time of tick 0, microseconds since the UNIX epoch.
    pub epoch_us: u64,
}

impl FloorConfig {
    /// Microseconds between ticks.
    pub fn period_us(&self) -> u64 {
        1_000_000 / u64::from(self.rate.max(1))
    }

    /// The tick due at `now_us`.
    pub fn tick_at(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.epoch_us) / self.period_us()
    }
}

/// The datagram of tick `tick`, made at `origin_time_us`, `size` bytes long
/// (or as close above as the encoding allows; at least the smallest update).
pub fn datagram(tick: u64, origin_time_us: u64, size: usize) -> Bytes {
    let make = |pad: usize| {
        Message::Update(Update {
            tick,
            base: tick.checked_sub(1),
            predict_from: None,
            origin_time_us,
            hash: 0,
            chunks: vec![Chunk {
                cell: CellId::WORLD,
                data: Bytes::from(vec![0u8; pad]),
            }],
            dropped: Vec::new(),
        })
    };
    let empty = make(0).datagram_len();
    let mut pad = size.saturating_sub(empty);
    // The chunk's length prefix grows with the padding.
    while pad > 0 && make(pad).datagram_len() > size {
        pad -= 1;
    }
    transport::framed::encode_datagram(&make(pad)).unwrap_or_default()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Binds the floor server; returns its address and the future that serves
/// until `stop` resolves.
pub fn bind(
    config: FloorConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let tls = transport::Trust::dev(&config.data_dir)
        .load()
        .context("floor: cannot load the development CA")?;
    let endpoint =
        transport::server_endpoint(config.listen, tls.server_config(&[transport::ALPN_CLIENT])?)
            .with_context(|| format!("floor: cannot listen on {}", config.listen))?;
    let addr = endpoint.local_addr()?;
    let conns: Arc<Mutex<Vec<quinn::Connection>>> = Arc::default();
    let serve = {
        let conns = conns.clone();
        let endpoint = endpoint.clone();
        async move {
            let accept = tokio::spawn(accept_loop(endpoint.clone(), conns.clone()));
            tokio::select! {
                () = stop => {}
                () = send_loop(&config, &conns) => {}
            }
            accept.abort();
            endpoint.close(0u32.into(), b"floor stopping");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    };
    Ok((addr, serve))
}

async fn accept_loop(endpoint: quinn::Endpoint, conns: Arc<Mutex<Vec<quinn::Connection>>>) {
    while let Some(incoming) = endpoint.accept().await {
        let conns = conns.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            conns.lock().expect("not poisoned").push(conn.clone());
            // The clients' acks: read and drop, as a relay reads them.
            while conn.read_datagram().await.is_ok() {}
        });
    }
}

async fn send_loop(config: &FloorConfig, conns: &Mutex<Vec<quinn::Connection>>) {
    let period = config.period_us();
    let mut tick = config.tick_at(now_us()) + 1;
    loop {
        let due = config.epoch_us + tick * period;
        let now = now_us();
        if due > now {
            tokio::time::sleep(Duration::from_micros(due - now)).await;
        }
        let bytes = datagram(tick, now_us(), config.size);
        {
            let mut conns = conns.lock().expect("not poisoned");
            conns.retain(|c| c.close_reason().is_none());
            for c in conns.iter() {
                let _ = c.send_datagram(bytes.clone());
            }
        }
        // Never send late ticks: skip to the next one due.
        tick = (tick + 1).max(config.tick_at(now_us()) + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_have_the_asked_size_and_decode() {
        for size in [40usize, 127, 128, 129, 200, 300, 1000] {
            let d = datagram(7, 123, size);
            // Exact, or one byte short where the length prefix grows.
            assert!(
                d.len() <= size && d.len() + 1 >= size,
                "size {size}: {}",
                d.len()
            );
            match Message::decode_datagram(d, proto::msg::VERSION).unwrap() {
                Message::Update(u) => {
                    assert_eq!(u.tick, 7);
                    assert_eq!(u.origin_time_us, 123);
                }
                other => panic!("{other:?}"),
            }
        }
        // Below the smallest update: the smallest update.
        assert!(datagram(7, 0, 1).len() > 1);
    }
}
