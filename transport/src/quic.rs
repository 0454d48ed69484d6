//! QUIC transport tuning and endpoints.
//!
//! [`TransportTuning`] is what every statecast connection carries: datagrams
//! on, keep-alives frequent enough that a dead relay is noticed within the
//! idle timeout, and room for many short unidirectional streams (one per
//! update too large for a datagram). [`server_endpoint`] and
//! [`client_endpoint`] bind UDP sockets with multi-MiB kernel buffers,
//! since the Linux default (about 208 KiB) drops bursts silently, and say in
//! the log when the kernel caps the request.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Transport parameters of statecast's QUIC connections.
///
/// Start from [`TransportTuning::default`] and change fields; pass it to
/// [`crate::TlsConfig::with_transport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportTuning {
    /// Interval of keep-alive packets. Default 1 s: well inside the idle
    /// timeout, so an idle but live connection never times out, and cheap
    /// (one small packet a second).
    pub keep_alive: Duration,
    /// A connection that hears nothing for this long is dead; zero disables
    /// the timeout. Default 5 s: the client fails over to another relay
    /// after at most this long, while five missed keep-alives in a row are
    /// needed to get there.
    pub idle_timeout: Duration,
    /// Bytes of received datagrams quinn buffers before dropping new ones.
    /// Default 4 MiB: several ticks of full-world keyframes for a slow
    /// reader.
    pub datagram_receive_buffer: usize,
    /// Bytes of outgoing datagrams quinn buffers; when full it drops the
    /// oldest, which suits latest-wins state. Default 256 KiB: larger only
    /// lets stale updates wait longer behind congestion control.
    pub datagram_send_buffer: usize,
    /// Unidirectional streams the peer may have open at once. Default 256:
    /// updates too large for a datagram each take a short stream, and
    /// superseded ones are reset, so few are open at a time, but a burst
    /// must never block on stream credit.
    pub max_concurrent_uni_streams: u32,
    /// Bidirectional streams the peer may have open at once. Default 16:
    /// statecast uses one control stream per connection.
    pub max_concurrent_bidi_streams: u32,
}

impl Default for TransportTuning {
    fn default() -> TransportTuning {
        TransportTuning {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            datagram_receive_buffer: 4 << 20,
            datagram_send_buffer: 256 << 10,
            max_concurrent_uni_streams: 256,
            max_concurrent_bidi_streams: 16,
        }
    }
}

impl TransportTuning {
    /// The quinn transport configuration.
    pub fn to_quinn(&self) -> quinn::TransportConfig {
        let mut config = quinn::TransportConfig::default();
        let idle_ms = u32::try_from(self.idle_timeout.as_millis()).unwrap_or(u32::MAX);
        config
            .keep_alive_interval((!self.keep_alive.is_zero()).then_some(self.keep_alive))
            .max_idle_timeout(
                (idle_ms > 0).then(|| quinn::IdleTimeout::from(quinn::VarInt::from_u32(idle_ms))),
            )
            .datagram_receive_buffer_size(Some(self.datagram_receive_buffer))
            .datagram_send_buffer_size(self.datagram_send_buffer)
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(self.max_concurrent_uni_streams))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_bidi_streams));
        config
    }
}

/// Options of a UDP socket for QUIC.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketOptions {
    /// SO_RCVBUF to ask for. Default 8 MiB: a burst of a few thousand
    /// full-size packets (acks and inputs from many clients at once).
    pub recv_buffer: usize,
    /// SO_SNDBUF to ask for. Default 8 MiB: one tick's fan-out to many
    /// clients leaves in one burst.
    pub send_buffer: usize,
    /// SO_REUSEPORT, so several endpoints (one per core) can share a port
    /// and the kernel spreads clients over them. Default off.
    pub reuse_port: bool,
}

impl Default for SocketOptions {
    fn default() -> SocketOptions {
        SocketOptions {
            recv_buffer: 8 << 20,
            send_buffer: 8 << 20,
            reuse_port: false,
        }
    }
}

/// Kernel buffer sizes a socket actually got. Linux reports twice the usable
/// size (it counts its bookkeeping), so a granted value at or above the
/// request means the request was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// SO_RCVBUF as the kernel reports it.
    pub recv: usize,
    /// SO_SNDBUF as the kernel reports it.
    pub send: usize,
}

/// Binds a non-blocking UDP socket on `addr` with `options`, and reports the
/// buffer sizes the kernel granted. Logs a warning (once per process and
/// direction) when the kernel capped a buffer below the request.
///
/// An unspecified IPv6 address (`[::]`) binds dual-stack where the system
/// allows it.
pub fn bind_udp(
    addr: SocketAddr,
    options: &SocketOptions,
) -> io::Result<(std::net::UdpSocket, SocketBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Best effort: some systems refuse dual-stack sockets.
        let _ = socket.set_only_v6(false);
    }
    if options.reuse_port {
        #[cfg(all(
            unix,
            not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
        ))]
        socket.set_reuse_port(true)?;
        #[cfg(not(all(
            unix,
            not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
        )))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_REUSEPORT is not available on this system",
        ));
    }
    // A refused size is not fatal: the socket works with the default, and
    // the check below says so.
    let _ = socket.set_recv_buffer_size(options.recv_buffer);
    let _ = socket.set_send_buffer_size(options.send_buffer);
    let buffers = SocketBuffers {
        recv: socket.recv_buffer_size()?,
        send: socket.send_buffer_size()?,
    };
    static RECV_WARNED: AtomicBool = AtomicBool::new(false);
    static SEND_WARNED: AtomicBool = AtomicBool::new(false);
    report_cap(
        &RECV_WARNED,
        "receive",
        "net.core.rmem_max",
        options.recv_buffer,
        buffers.recv,
    );
    report_cap(
        &SEND_WARNED,
        "send",
        "net.core.wmem_max",
        options.send_buffer,
        buffers.send,
    );
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok((socket.into(), buffers))
}

fn report_cap(warned: &AtomicBool, dir: &str, sysctl: &str, asked: usize, got: usize) {
    if got >= asked {
        tracing::debug!(direction = dir, asked, got, "UDP socket buffer");
    } else if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            direction = dir,
            asked,
            got,
            "the kernel capped the UDP {dir} buffer below the request; bursts may be dropped. \
             Raise the cap with `sysctl -w {sysctl}={asked}`"
        );
    } else {
        tracing::debug!(
            direction = dir,
            asked,
            got,
            "UDP socket buffer capped by the kernel"
        );
    }
}

/// A QUIC server endpoint on `addr` (port 0 picks a free port; read it back
/// with `endpoint.local_addr()`), with [`SocketOptions::default`].
///
/// Must be called inside a Tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    server_endpoint_with(addr, config, &SocketOptions::default())
}

/// [`server_endpoint`] with explicit socket options (for instance
/// SO_REUSEPORT, to run one endpoint per core on one port).
pub fn server_endpoint_with(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    options: &SocketOptions,
) -> io::Result<quinn::Endpoint> {
    let (socket, _) = bind_udp(addr, options)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A QUIC client endpoint bound to `bind` (typically `0.0.0.0:0` or
/// `[::]:0`), with [`SocketOptions::default`]. Connect with
/// `endpoint.connect_with(tls.client_config(alpn)?, addr, server_name)`.
///
/// Must be called inside a Tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> io::Result<quinn::Endpoint> {
    let (socket, _) = bind_udp(bind, &SocketOptions::default())?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_udp_reports_buffers() {
        let (socket, buffers) =
            bind_udp("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        assert!(socket.local_addr().unwrap().port() != 0);
        assert!(buffers.recv > 0 && buffers.send > 0);
    }

    #[test]
    fn reuse_port_lets_two_sockets_share_a_port() {
        let options = SocketOptions {
            reuse_port: true,
            ..SocketOptions::default()
        };
        let (a, _) = bind_udp("127.0.0.1:0".parse().unwrap(), &options).unwrap();
        let (b, _) = bind_udp(a.local_addr().unwrap(), &options).unwrap();
        assert_eq!(a.local_addr().unwrap(), b.local_addr().unwrap());
    }
}
