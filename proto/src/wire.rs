//! Primitive wire encodings: QUIC variable-length integers, fixed-width
//! integers, and length-prefixed bytes and strings with explicit maxima.
//!
//! The [`Encode`]/[`Decode`] pair works over [`bytes::BufMut`]/[`bytes::Buf`],
//! after quinn-proto's `coding` module. Fixed-width integers and floats are
//! big-endian (network order). Lengths and counts are [`VarInt`]s.
//!
//! ## Decoding untrusted bytes
//!
//! Every decoder here returns [`DecodeError::Incomplete`] when the buffer ends
//! before the value does, and a real protocol error otherwise. A decoder checks
//! a declared length or count against its maximum *and* against the bytes that
//! remain before it allocates, so no input can make it reserve more than the
//! declared maxima or more than the input could fill. None panics and none
//! loops more often than the input has bytes.
//!
//! "Incomplete" only means "wait for more bytes" to a reader of a stream that
//! has not yet seen a whole frame. Inside a frame whose length is known, or in
//! a datagram, more bytes never come: [`crate::msg`] turns it into
//! [`DecodeError::Truncated`].

use bytes::{Buf, BufMut, Bytes};
use std::fmt;

use crate::msg::ErrorCode;
use crate::schema::SchemaError;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ends before the value: not an error on a stream that is
    /// still receiving; read more bytes and try again.
    #[error("need more bytes")]
    Incomplete,
    /// A frame or datagram ends before its last field (its own length says
    /// that no more bytes belong to it).
    #[error("message ends before its last field")]
    Truncated,
    /// A declared length, count or value is above its limit.
    #[error("{what} is {len}, above the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The declared length, count or value.
        len: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Which string.
        what: &'static str,
    },
    /// The message type byte names no known message.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The message type is known but may not travel as a datagram.
    #[error("message type {0:#04x} may not be sent as a datagram")]
    NotDatagram(u8),
    /// A field holds a value outside its domain (a flag other than 0 or 1,
    /// a baseline after its tick, a non-finite coordinate, ...).
    #[error("bad {what}")]
    BadValue {
        /// Which field, and what is wrong with it.
        what: &'static str,
    },
    /// The peer speaks, or the decoder was asked for, a protocol version this
    /// build does not support.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u32),
    /// Bytes are left over inside a frame or datagram after its last field.
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    /// The embedded schema is not valid postcard.
    #[error("schema is not valid postcard: {0}")]
    SchemaEncoding(postcard::Error),
    /// The embedded schema decodes but does not compile to a layout.
    #[error("bad schema: {0}")]
    Schema(#[from] SchemaError),
}

impl DecodeError {
    /// Whether this only means "read more bytes and try again".
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete)
    }

    /// The error code to close a connection with after this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        }
    }

    /// Maps [`DecodeError::Incomplete`] to [`DecodeError::Truncated`]: for
    /// bytes that are known to be the whole input.
    pub(crate) fn complete(self) -> DecodeError {
        match self {
            DecodeError::Incomplete => DecodeError::Truncated,
            other => other,
        }
    }
}

/// Why a message could not be encoded. The encoder refuses what the decoder
/// would refuse, so that nothing invalid reaches the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field is longer (or a list holds more items) than its limit.
    #[error("{what} is {len}, above the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length, count or value.
        len: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A field holds a value outside its domain.
    #[error("bad {what}")]
    BadValue {
        /// Which field, and what is wrong with it.
        what: &'static str,
    },
    /// The message type may not travel as a datagram.
    #[error("message type {0:#04x} may not be sent as a datagram")]
    NotDatagram(u8),
    /// The output buffer has no room for the encoding.
    #[error("output buffer has room for {room} bytes, the encoding needs {need}")]
    BufferTooSmall {
        /// Bytes the encoding needs.
        need: usize,
        /// Bytes the buffer can take.
        room: usize,
    },
    /// A probe reply would be larger than the request it answers.
    #[error("reply of {reply} bytes would be larger than the {request}-byte request")]
    Amplification {
        /// Size of the reply.
        reply: usize,
        /// Size of the request.
        request: usize,
    },
    /// The schema does not compile to a layout.
    #[error("bad schema: {0}")]
    Schema(#[from] SchemaError),
    /// The schema could not be serialized.
    #[error("schema could not be serialized: {0}")]
    SchemaEncoding(postcard::Error),
}

/// A value that can be read from the wire.
pub trait Decode: Sized {
    /// Reads one value from the front of `buf`.
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError>;
}

/// A value that can be written to the wire.
pub trait Encode {
    /// Exact number of bytes that [`Encode::encode`] writes.
    fn encoded_len(&self) -> usize;
    /// Appends the value to `out`, which must have room for
    /// [`Encode::encoded_len`] bytes (a `Vec<u8>` or `BytesMut` always has).
    fn encode<B: BufMut>(&self, out: &mut B);
}

macro_rules! fixed {
    ($ty:ty, $get:ident, $put:ident) => {
        impl Decode for $ty {
            fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
                if buf.remaining() < size_of::<$ty>() {
                    return Err(DecodeError::Incomplete);
                }
                Ok(buf.$get())
            }
        }

        impl Encode for $ty {
            fn encoded_len(&self) -> usize {
                size_of::<$ty>()
            }

            fn encode<B: BufMut>(&self, out: &mut B) {
                out.$put(*self);
            }
        }
    };
}

fixed!(u8, get_u8, put_u8);
fixed!(u16, get_u16, put_u16);
fixed!(u32, get_u32, put_u32);
fixed!(u64, get_u64, put_u64);
fixed!(f32, get_f32, put_f32);

/// An integer below 2^62 in QUIC's variable-length encoding (RFC 9000,
/// section 16): 1, 2, 4 or 8 bytes, the two top bits of the first byte
/// giving the length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarInt(u64);

/// A value above [`VarInt::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is above the largest varint, 2^62 - 1")]
pub struct VarIntBoundsExceeded(pub u64);

impl VarInt {
    /// The largest value: 2^62 - 1.
    pub const MAX: VarInt = VarInt((1 << 62) - 1);

    /// Wraps `x`, if it is at most [`VarInt::MAX`].
    pub const fn from_u64(x: u64) -> Result<VarInt, VarIntBoundsExceeded> {
        if x <= VarInt::MAX.0 {
            Ok(VarInt(x))
        } else {
            Err(VarIntBoundsExceeded(x))
        }
    }

    /// Wraps a `u32` (always in range).
    pub const fn from_u32(x: u32) -> VarInt {
        VarInt(x as u64)
    }

    /// The value.
    pub const fn into_inner(self) -> u64 {
        self.0
    }

    /// Bytes of the encoding: 1, 2, 4 or 8.
    pub const fn size(self) -> usize {
        varint_len(self.0)
    }
}

impl From<VarInt> for u64 {
    fn from(x: VarInt) -> u64 {
        x.0
    }
}

impl From<u32> for VarInt {
    fn from(x: u32) -> VarInt {
        VarInt::from_u32(x)
    }
}

impl TryFrom<u64> for VarInt {
    type Error = VarIntBoundsExceeded;

    fn try_from(x: u64) -> Result<VarInt, VarIntBoundsExceeded> {
        VarInt::from_u64(x)
    }
}

impl fmt::Display for VarInt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Decode for VarInt {
    fn decode<B: Buf>(buf: &mut B) -> Result<VarInt, DecodeError> {
        if !buf.has_remaining() {
            return Err(DecodeError::Incomplete);
        }
        let first = buf.chunk()[0];
        let len = 1usize << (first >> 6);
        if buf.remaining() < len {
            return Err(DecodeError::Incomplete);
        }
        let x = match len {
            1 => u64::from(buf.get_u8()),
            2 => u64::from(buf.get_u16()) & 0x3fff,
            4 => u64::from(buf.get_u32()) & 0x3fff_ffff,
            _ => buf.get_u64() & 0x3fff_ffff_ffff_ffff,
        };
        Ok(VarInt(x))
    }
}

impl Encode for VarInt {
    fn encoded_len(&self) -> usize {
        self.size()
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.0);
    }
}

/// Bytes of the varint encoding of `x` (which must be at most
/// [`VarInt::MAX`]; larger values count as 8).
pub const fn varint_len(x: u64) -> usize {
    if x < 1 << 6 {
        1
    } else if x < 1 << 14 {
        2
    } else if x < 1 << 30 {
        4
    } else {
        8
    }
}

/// Writes `x` as a varint. Callers check `x <= VarInt::MAX` first (message
/// encoders do so before writing anything); larger values lose their top
/// two bits rather than corrupt the stream's framing.
pub(crate) fn put_varint<B: BufMut>(out: &mut B, x: u64) {
    debug_assert!(x <= VarInt::MAX.0, "varint {x} out of range");
    match varint_len(x) {
        1 => out.put_u8(x as u8),
        2 => out.put_u16(0x4000 | x as u16),
        4 => out.put_u32(0x8000_0000 | x as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | (x & VarInt::MAX.0)),
    }
}

/// Reads a varint.
pub fn get_varint<B: Buf>(buf: &mut B) -> Result<u64, DecodeError> {
    VarInt::decode(buf).map(u64::from)
}

/// Reads a varint that must fit in a `u32`.
pub fn get_varint_u32<B: Buf>(buf: &mut B, what: &'static str) -> Result<u32, DecodeError> {
    let x = get_varint(buf)?;
    u32::try_from(x).map_err(|_| DecodeError::TooLarge {
        what,
        len: x,
        max: u32::MAX.into(),
    })
}

/// Reads a fixed-width value.
pub fn get<T: Decode, B: Buf>(buf: &mut B) -> Result<T, DecodeError> {
    T::decode(buf)
}

/// Reads a one-byte flag: 0 is `false`, 1 is `true`, anything else an error.
pub fn get_flag<B: Buf>(buf: &mut B, what: &'static str) -> Result<bool, DecodeError> {
    match u8::decode(buf)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::BadValue { what }),
    }
}

/// Reads a length prefix and checks it against `max` and against the bytes
/// that remain, before anyone allocates for it.
pub fn get_len<B: Buf>(buf: &mut B, max: usize, what: &'static str) -> Result<usize, DecodeError> {
    let len = get_varint(buf)?;
    if len > max as u64 {
        return Err(DecodeError::TooLarge {
            what,
            len,
            max: max as u64,
        });
    }
    let len = len as usize;
    if len > buf.remaining() {
        return Err(DecodeError::Incomplete);
    }
    Ok(len)
}

/// Reads an item count and checks it against `max`, and against the bytes
/// that remain given that every item takes at least `min_item_len` bytes, so
/// that `Vec::with_capacity(count)` is bounded by the input's size.
pub fn get_count<B: Buf>(
    buf: &mut B,
    max: usize,
    min_item_len: usize,
    what: &'static str,
) -> Result<usize, DecodeError> {
    let count = get_varint(buf)?;
    if count > max as u64 {
        return Err(DecodeError::TooLarge {
            what,
            len: count,
            max: max as u64,
        });
    }
    let count = count as usize;
    if count.saturating_mul(min_item_len) > buf.remaining() {
        return Err(DecodeError::Incomplete);
    }
    Ok(count)
}

/// Reads length-prefixed bytes of at most `max` bytes. Zero-copy when `buf`
/// is a [`Bytes`].
pub fn get_bytes<B: Buf>(
    buf: &mut B,
    max: usize,
    what: &'static str,
) -> Result<Bytes, DecodeError> {
    let len = get_len(buf, max, what)?;
    Ok(buf.copy_to_bytes(len))
}

/// Reads a length-prefixed UTF-8 string of at most `max` bytes.
pub fn get_string<B: Buf>(
    buf: &mut B,
    max: usize,
    what: &'static str,
) -> Result<String, DecodeError> {
    let len = get_len(buf, max, what)?;
    let mut bytes = vec![0; len];
    buf.copy_to_slice(&mut bytes);
    String::from_utf8(bytes).map_err(|_| DecodeError::BadUtf8 { what })
}

/// Writes length-prefixed bytes.
pub fn put_bytes<B: BufMut>(out: &mut B, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.put_slice(bytes);
}

/// Bytes of a length-prefixed field of `len` bytes.
pub const fn bytes_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

/// Checks a length against its limit before encoding.
pub fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), EncodeError> {
    if len > max {
        return Err(EncodeError::TooLarge {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Checks that a value fits a varint before encoding.
pub fn check_varint(what: &'static str, x: u64) -> Result<(), EncodeError> {
    if x > VarInt::MAX.0 {
        return Err(EncodeError::TooLarge {
            what,
            len: x,
            max: VarInt::MAX.0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries() {
        for (x, len) in [
            (0u64, 1),
            (63, 1),
            (64, 2),
            (16383, 2),
            (16384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (VarInt::MAX.0, 8),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, x);
            assert_eq!(out.len(), len, "{x}");
            assert_eq!(varint_len(x), len);
            assert_eq!(get_varint(&mut &out[..]).unwrap(), x);
            for cut in 0..len {
                assert_eq!(
                    get_varint(&mut &out[..cut]),
                    Err(DecodeError::Incomplete),
                    "{x} cut at {cut}"
                );
            }
        }
        // RFC 9000 appendix A.1 examples.
        assert_eq!(
            get_varint(&mut &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c][..]),
            Ok(151_288_809_941_952_652)
        );
        assert_eq!(
            get_varint(&mut &[0x9d, 0x7f, 0x3e, 0x7d][..]),
            Ok(494_878_333)
        );
        assert_eq!(get_varint(&mut &[0x7b, 0xbd][..]), Ok(15_293));
        assert_eq!(get_varint(&mut &[0x25][..]), Ok(37));
        assert!(VarInt::from_u64(1 << 62).is_err());
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        let mut out = Vec::new();
        put_varint(&mut out, 1 << 60);
        assert_eq!(
            get_bytes(&mut &out[..], 1024, "token"),
            Err(DecodeError::TooLarge {
                what: "token",
                len: 1 << 60,
                max: 1024
            })
        );
        let mut out = Vec::new();
        put_varint(&mut out, 1000);
        out.extend_from_slice(&[0; 10]);
        assert_eq!(
            get_string(&mut &out[..], 1024, "name"),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(
            get_count(&mut &out[..], 4096, 2, "chunks"),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(get_count(&mut &out[..], 4096, 0, "chunks"), Ok(1000));
    }

    #[test]
    fn strings_and_flags() {
        let mut out = Vec::new();
        put_bytes(&mut out, "héllo".as_bytes());
        assert_eq!(out.len(), bytes_len(6));
        assert_eq!(get_string(&mut &out[..], 6, "s").unwrap(), "héllo");
        assert!(matches!(
            get_string(&mut &out[..], 5, "s"),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(
            get_string(&mut &[2, 0xff, 0xfe][..], 8, "s"),
            Err(DecodeError::BadUtf8 { what: "s" })
        );
        assert_eq!(get_flag(&mut &[1][..], "f"), Ok(true));
        assert_eq!(
            get_flag(&mut &[2][..], "f"),
            Err(DecodeError::BadValue { what: "f" })
        );
        assert_eq!(get::<u16, _>(&mut &[1][..]), Err(DecodeError::Incomplete));
        assert_eq!(get::<u16, _>(&mut &[1, 2][..]), Ok(0x0102));
    }
}
