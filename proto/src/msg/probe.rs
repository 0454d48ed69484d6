//! Route selection: the stateless UDP probe (ping, pong) and the relay
//! directory.

use bytes::{Buf, BufMut};

use super::{
    Body, MAX_ADDR_LEN, MAX_REGION_LEN, MAX_RELAY_ID_LEN, MAX_RELAYS, MessageType, get_version,
};
use crate::wire::{
    DecodeError, EncodeError, bytes_len, check_len, get, get_count, get_flag, get_string,
    put_bytes, put_varint, varint_len,
};

/// Vivaldi network coordinates: `[x, y, height]`, in milliseconds. Always
/// finite on the wire.
pub type Coords = [f32; 3];

/// Smallest ping datagram, type byte included. A relay answers nothing
/// smaller, and a [`Pong`] is never larger ([`MAX_PONG_LEN`]), so the probe
/// port cannot amplify traffic.
pub const PING_LEN: usize = 96;

/// Largest pong datagram, type byte included.
pub const MAX_PONG_LEN: usize =
    1 + 8 + 8 + bytes_len(MAX_RELAY_ID_LEN) + bytes_len(MAX_REGION_LEN) + 2 + 4 + COORDS_MAX;

const _: () = assert!(MAX_PONG_LEN <= PING_LEN, "a pong must never outgrow a ping");

/// Bytes of an optional coordinate triple at most: flag and three floats.
const COORDS_MAX: usize = 1 + 12;

pub(super) const RELAY_INFO_MAX: usize = bytes_len(MAX_RELAY_ID_LEN)
    + 2 * bytes_len(MAX_ADDR_LEN)
    + bytes_len(MAX_REGION_LEN)
    + 2
    + 4
    + COORDS_MAX;

/// Smallest relay entry: four empty strings, load, origin RTT, no
/// coordinates.
const MIN_RELAY_INFO_LEN: usize = 4 + 2 + 4 + 1;

fn coords_finite(coords: &Option<Coords>) -> bool {
    coords.is_none_or(|c| c.iter().all(|v| v.is_finite()))
}

fn coords_len(coords: &Option<Coords>) -> usize {
    if coords.is_some() { COORDS_MAX } else { 1 }
}

fn put_coords<B: BufMut>(out: &mut B, coords: &Option<Coords>) {
    match coords {
        None => out.put_u8(0),
        Some(c) => {
            out.put_u8(1);
            for v in c {
                out.put_f32(*v);
            }
        }
    }
}

fn get_coords<B: Buf>(buf: &mut B) -> Result<Option<Coords>, DecodeError> {
    if !get_flag(buf, "coordinates flag")? {
        return Ok(None);
    }
    let c: Coords = [get(buf)?, get(buf)?, get(buf)?];
    if !c.iter().all(|v| v.is_finite()) {
        return Err(DecodeError::BadValue {
            what: "coordinates (not finite)",
        });
    }
    Ok(Some(c))
}

fn check_coords(coords: &Option<Coords>) -> Result<(), EncodeError> {
    if !coords_finite(coords) {
        return Err(EncodeError::BadValue {
            what: "coordinates (not finite)",
        });
    }
    Ok(())
}

/// Client → relay probe port: a latency probe. Sent as a plain UDP datagram
/// padded with zeros to [`PING_LEN`] bytes; the relay keeps no state for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ping {
    /// Protocol version the client speaks.
    pub version: u32,
    /// Random value the pong echoes, to match replies and drop spoofs.
    pub nonce: u64,
    /// Client clock when sent, in microseconds (any epoch); echoed.
    pub sent_us: u64,
}

impl Body for Ping {
    const TYPE: MessageType = MessageType::Ping;

    fn check(&self) -> Result<(), EncodeError> {
        Ok(())
    }

    fn body_len(&self) -> usize {
        PING_LEN - 1
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        let fields = varint_len(self.version.into()) + 16;
        put_varint(out, self.version.into());
        out.put_u64(self.nonce);
        out.put_u64(self.sent_us);
        out.put_bytes(0, PING_LEN - 1 - fields);
    }

    // The padding (any content, for later versions to use) runs to the end
    // of the body, which must make the message at least `PING_LEN` bytes.
    fn decode_body<B: Buf>(buf: &mut B, version: u32) -> Result<Ping, DecodeError> {
        let body = buf.remaining();
        let version = get_version(buf, version)?;
        let nonce = get(buf)?;
        let sent_us = get(buf)?;
        if 1 + body < PING_LEN {
            return Err(DecodeError::BadValue {
                what: "ping (shorter than PING_LEN)",
            });
        }
        buf.advance(buf.remaining());
        Ok(Ping {
            version,
            nonce,
            sent_us,
        })
    }
}

/// Relay probe port → client: the answer to a [`Ping`], never larger than it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// The ping's `sent_us`, echoed.
    pub sent_us: u64,
    /// The relay's id, at most [`MAX_RELAY_ID_LEN`](super::MAX_RELAY_ID_LEN)
    /// bytes.
    pub relay_id: String,
    /// The relay's region, at most [`MAX_REGION_LEN`](super::MAX_REGION_LEN)
    /// bytes.
    pub region: String,
    /// Load in permille of capacity (1000: full; may exceed it).
    pub load: u16,
    /// The relay's own round-trip time to the origin, in microseconds
    /// (`u32::MAX`: unknown or no upstream).
    pub origin_rtt_us: u32,
    /// The relay's network coordinates, if it computes them.
    pub coords: Option<Coords>,
}

impl Pong {
    /// Appends the pong as a datagram answering a ping of `ping_len` bytes,
    /// and fails rather than send a reply larger than the request. Every
    /// valid pong fits any valid ping ([`MAX_PONG_LEN`] ≤ [`PING_LEN`]).
    pub fn encode_reply<B: BufMut>(&self, ping_len: usize, out: &mut B) -> Result<(), EncodeError> {
        self.check()?;
        let reply = 1 + self.body_len();
        if reply > ping_len {
            return Err(EncodeError::Amplification {
                reply,
                request: ping_len,
            });
        }
        if out.remaining_mut() < reply {
            return Err(EncodeError::BufferTooSmall {
                need: reply,
                room: out.remaining_mut(),
            });
        }
        out.put_u8(MessageType::Pong.to_u8());
        self.encode_body(out);
        Ok(())
    }
}

impl Body for Pong {
    const TYPE: MessageType = MessageType::Pong;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("relay id", self.relay_id.len(), MAX_RELAY_ID_LEN)?;
        check_len("region", self.region.len(), MAX_REGION_LEN)?;
        check_coords(&self.coords)
    }

    fn body_len(&self) -> usize {
        16 + bytes_len(self.relay_id.len())
            + bytes_len(self.region.len())
            + 2
            + 4
            + coords_len(&self.coords)
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        out.put_u64(self.nonce);
        out.put_u64(self.sent_us);
        put_bytes(out, self.relay_id.as_bytes());
        put_bytes(out, self.region.as_bytes());
        out.put_u16(self.load);
        out.put_u32(self.origin_rtt_us);
        put_coords(out, &self.coords);
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Pong, DecodeError> {
        Ok(Pong {
            nonce: get(buf)?,
            sent_us: get(buf)?,
            relay_id: get_string(buf, MAX_RELAY_ID_LEN, "relay id")?,
            region: get_string(buf, MAX_REGION_LEN, "region")?,
            load: get(buf)?,
            origin_rtt_us: get(buf)?,
            coords: get_coords(buf)?,
        })
    }
}

/// One relay in a [`Directory`].
#[derive(Clone, Debug, PartialEq)]
pub struct RelayInfo {
    /// Relay id.
    pub id: String,
    /// QUIC address (`host:port`) clients connect to.
    pub addr: String,
    /// UDP probe address (`host:port`).
    pub probe_addr: String,
    /// Region name.
    pub region: String,
    /// Load in permille of capacity.
    pub load: u16,
    /// Its RTT to the origin in microseconds, as in its pongs (`u32::MAX`:
    /// unknown), so that a client can rank relays it has not probed by
    /// client-relay estimate plus this.
    pub origin_rtt_us: u32,
    /// Network coordinates, if known.
    pub coords: Option<Coords>,
}

/// Relay → client: other relays of the network, as route candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct Directory {
    /// At most [`MAX_RELAYS`](super::MAX_RELAYS) relays.
    pub relays: Vec<RelayInfo>,
}

impl Body for Directory {
    const TYPE: MessageType = MessageType::Directory;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("directory relays", self.relays.len(), MAX_RELAYS)?;
        for relay in &self.relays {
            check_len("relay id", relay.id.len(), MAX_RELAY_ID_LEN)?;
            check_len("relay address", relay.addr.len(), MAX_ADDR_LEN)?;
            check_len("probe address", relay.probe_addr.len(), MAX_ADDR_LEN)?;
            check_len("region", relay.region.len(), MAX_REGION_LEN)?;
            check_coords(&relay.coords)?;
        }
        Ok(())
    }

    fn body_len(&self) -> usize {
        varint_len(self.relays.len() as u64)
            + self
                .relays
                .iter()
                .map(|r| {
                    bytes_len(r.id.len())
                        + bytes_len(r.addr.len())
                        + bytes_len(r.probe_addr.len())
                        + bytes_len(r.region.len())
                        + 2
                        + 4
                        + coords_len(&r.coords)
                })
                .sum::<usize>()
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.relays.len() as u64);
        for relay in &self.relays {
            put_bytes(out, relay.id.as_bytes());
            put_bytes(out, relay.addr.as_bytes());
            put_bytes(out, relay.probe_addr.as_bytes());
            put_bytes(out, relay.region.as_bytes());
            out.put_u16(relay.load);
            out.put_u32(relay.origin_rtt_us);
            put_coords(out, &relay.coords);
        }
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Directory, DecodeError> {
        let count = get_count(buf, MAX_RELAYS, MIN_RELAY_INFO_LEN, "directory relays")?;
        let mut relays = Vec::with_capacity(count);
        for _ in 0..count {
            relays.push(RelayInfo {
                id: get_string(buf, MAX_RELAY_ID_LEN, "relay id")?,
                addr: get_string(buf, MAX_ADDR_LEN, "relay address")?,
                probe_addr: get_string(buf, MAX_ADDR_LEN, "probe address")?,
                region: get_string(buf, MAX_REGION_LEN, "region")?,
                load: get(buf)?,
                origin_rtt_us: get(buf)?,
                coords: get_coords(buf)?,
            });
        }
        Ok(Directory { relays })
    }
}
