//! Every message statecast nodes exchange, and how it is framed.
//!
//! ## Messages
//!
//! | type | message | from → to | carried on |
//! | --- | --- | --- | --- |
//! | 0x01 | [`Hello`] | client → relay | stream |
//! | 0x02 | [`Welcome`] | relay → client, origin → relay | stream |
//! | 0x03 | [`Error`] | any → any, before closing | stream |
//! | 0x04 | [`Goaway`] | relay → client, origin → relay | stream |
//! | 0x05 | [`Subscribe`] | relay → origin or parent relay | stream |
//! | 0x10 | [`Update`] | origin → relay → client | stream or datagram |
//! | 0x11 | [`Ack`] | client → relay | stream or datagram |
//! | 0x12 | [`Input`] | client → relay | stream or datagram |
//! | 0x13 | [`InputBatch`] | relay → origin or parent relay | stream |
//! | 0x14 | [`Interest`] | client → relay | stream |
//! | 0x20 | [`Directory`] | relay → client | stream |
//! | 0x30 | [`Ping`] | client → relay probe port | datagram (plain UDP) |
//! | 0x31 | [`Pong`] | relay probe port → client | datagram (plain UDP) |
//!
//! ## Framing
//!
//! On a stream: `frame = varint(len) | type: u8 | body`, where `len` counts
//! the type byte and the body, is at least 1, at most [`MAX_FRAME`] and at
//! most the type's own limit ([`MessageType::max_len`]). A reader refuses an
//! oversized frame as soon as it has seen its length and type, before the
//! body arrives and before it allocates anything.
//!
//! As a datagram: `type: u8 | body`, the same body with no length prefix;
//! only types with [`MessageType::datagram`] may travel so.
//!
//! Within a body: integers that count (ticks, lengths, counts, versions) are
//! QUIC varints; hashes, session ids and wall-clock times are fixed 64-bit
//! big-endian; strings and byte strings are varint-length-prefixed with a
//! per-field maximum; optional parts have a one-byte 0/1 flag. A body must
//! be consumed exactly: trailing bytes are an error.
//!
//! ## Versions
//!
//! The protocol version is an argument of every decoder, never a global.
//! This build speaks [`VERSION`] only. Messages that state a version
//! ([`Hello`], [`Welcome`], [`Subscribe`], [`Ping`]) carry it first, and a
//! decoder refuses one that differs from the version it decodes with by
//! [`DecodeError::UnsupportedVersion`], which maps to
//! [`ErrorCode::UnsupportedVersion`].
//!
//! ## Encoding
//!
//! Encoders check every limit that the decoder checks before they write a
//! byte ([`Message::check`]), so what one node encodes the other decodes.

mod code;
mod probe;
mod session;
mod state;

use bytes::{Buf, BufMut, BytesMut};

pub use self::code::{ErrorCode, Fault, Retry};
pub use self::probe::{Coords, Directory, MAX_PONG_LEN, PING_LEN, Ping, Pong, RelayInfo};
pub use self::session::{Error, Goaway, Hello, Resume, Subscribe, Welcome};
pub use self::state::{
    Ack, Area, CellId, Chunk, Input, InputBatch, Interest, SessionInput, Update,
};
pub use crate::wire::{DecodeError, EncodeError};

use crate::wire::{self, bytes_len, put_varint, varint_len};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Largest frame: the `len` of `varint(len) | type | body`, which counts the
/// type byte and the body. Each type has a smaller or equal limit.
pub const MAX_FRAME: usize = 4 << 20;
/// Longest client token or upstream credential.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest world name.
pub const MAX_WORLD_LEN: usize = 64;
/// Longest client agent string (name and version of the client software).
pub const MAX_AGENT_LEN: usize = 128;
/// Longest relay (or origin) id.
pub const MAX_RELAY_ID_LEN: usize = 32;
/// Longest region name.
pub const MAX_REGION_LEN: usize = 24;
/// Longest network address (`host:port`, or a URL).
pub const MAX_ADDR_LEN: usize = 256;
/// Longest human-readable text in [`Error`] and [`Goaway`].
pub const MAX_TEXT_LEN: usize = 512;
/// Longest postcard-encoded schema in a [`Welcome`].
pub const MAX_SCHEMA_LEN: usize = 32 << 10;
/// Highest tick rate, in ticks per second.
pub const MAX_TICK_RATE: u32 = 1000;
/// Most chunks in one [`Update`].
pub const MAX_CHUNKS: usize = 4096;
/// Longest chunk payload (the whole update is bounded by [`MAX_FRAME`]).
pub const MAX_CHUNK_LEN: usize = MAX_FRAME;
/// Longest single input.
pub const MAX_INPUT_LEN: usize = 64;
/// Most inputs in one [`Input`]: the newest and up to three older ones.
pub const MAX_INPUT_REDUNDANCY: usize = 4;
/// Most inputs in one [`InputBatch`]; a relay with more sends several.
pub const MAX_BATCH_INPUTS: usize = 16384;
/// Most cells a resuming client lists in its [`Hello`].
pub const MAX_RESUME_CELLS: usize = 1024;
/// Most relays in one [`Directory`].
pub const MAX_RELAYS: usize = 256;
/// Largest ping datagram a relay answers.
pub const MAX_PING_LEN: usize = 1200;

/// Bytes of a varint that holds any `u32`.
const U32_VARINT: usize = 8;
/// Bytes of a varint that holds any tick (or any `u62`).
const U62_VARINT: usize = 8;

const HELLO_MAX: usize = 1
    + U32_VARINT
    + bytes_len(MAX_TOKEN_LEN)
    + bytes_len(MAX_WORLD_LEN)
    + 1
    + 8
    + U62_VARINT
    + varint_len(MAX_RESUME_CELLS as u64)
    + MAX_RESUME_CELLS * 16
    + bytes_len(MAX_AGENT_LEN)
    + 1
    + 12;
const INTEREST_MAX: usize = 1 + 1 + 12;
const WELCOME_MAX: usize = 1
    + U32_VARINT
    + 8
    + bytes_len(MAX_WORLD_LEN)
    + bytes_len(MAX_SCHEMA_LEN)
    + varint_len(MAX_TICK_RATE as u64)
    + U62_VARINT
    + bytes_len(MAX_RELAY_ID_LEN)
    + bytes_len(MAX_REGION_LEN);
const ERROR_MAX: usize = 1 + varint_len(u16::MAX as u64) + bytes_len(MAX_TEXT_LEN);
const GOAWAY_MAX: usize = 1 + bytes_len(MAX_TEXT_LEN) + 1 + bytes_len(MAX_ADDR_LEN) + U32_VARINT;
const SUBSCRIBE_MAX: usize = 1
    + U32_VARINT
    + bytes_len(MAX_WORLD_LEN)
    + bytes_len(MAX_TOKEN_LEN)
    + bytes_len(MAX_RELAY_ID_LEN);
const ACK_MAX: usize = 1 + U62_VARINT;
const INPUT_MAX: usize = 1
    + U32_VARINT
    + varint_len(MAX_INPUT_REDUNDANCY as u64)
    + MAX_INPUT_REDUNDANCY * bytes_len(MAX_INPUT_LEN);
const INPUT_BATCH_MAX: usize = 1
    + U62_VARINT
    + varint_len(MAX_BATCH_INPUTS as u64)
    + MAX_BATCH_INPUTS * (8 + U32_VARINT + bytes_len(MAX_INPUT_LEN));
const DIRECTORY_MAX: usize = 1 + varint_len(MAX_RELAYS as u64) + MAX_RELAYS * probe::RELAY_INFO_MAX;

const _: () = assert!(INPUT_BATCH_MAX <= MAX_FRAME && DIRECTORY_MAX <= MAX_FRAME);
const _: () = assert!(WELCOME_MAX <= MAX_FRAME && MAX_PING_LEN >= PING_LEN);

/// The type byte of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MessageType {
    /// [`Hello`], 0x01.
    Hello,
    /// [`Welcome`], 0x02.
    Welcome,
    /// [`Error`], 0x03.
    Error,
    /// [`Goaway`], 0x04.
    Goaway,
    /// [`Subscribe`], 0x05.
    Subscribe,
    /// [`Update`], 0x10.
    Update,
    /// [`Ack`], 0x11.
    Ack,
    /// [`Input`], 0x12.
    Input,
    /// [`InputBatch`], 0x13.
    InputBatch,
    /// [`Interest`], 0x14.
    Interest,
    /// [`Directory`], 0x20.
    Directory,
    /// [`Ping`], 0x30.
    Ping,
    /// [`Pong`], 0x31.
    Pong,
}

impl MessageType {
    /// Every type, in type-byte order.
    pub const ALL: [MessageType; 13] = [
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::Error,
        MessageType::Goaway,
        MessageType::Subscribe,
        MessageType::Update,
        MessageType::Ack,
        MessageType::Input,
        MessageType::InputBatch,
        MessageType::Interest,
        MessageType::Directory,
        MessageType::Ping,
        MessageType::Pong,
    ];

    /// The stable type byte.
    pub const fn to_u8(self) -> u8 {
        match self {
            MessageType::Hello => 0x01,
            MessageType::Welcome => 0x02,
            MessageType::Error => 0x03,
            MessageType::Goaway => 0x04,
            MessageType::Subscribe => 0x05,
            MessageType::Update => 0x10,
            MessageType::Ack => 0x11,
            MessageType::Input => 0x12,
            MessageType::InputBatch => 0x13,
            MessageType::Interest => 0x14,
            MessageType::Directory => 0x20,
            MessageType::Ping => 0x30,
            MessageType::Pong => 0x31,
        }
    }

    /// The type with this byte, if any.
    pub const fn from_u8(byte: u8) -> Option<MessageType> {
        Some(match byte {
            0x01 => MessageType::Hello,
            0x02 => MessageType::Welcome,
            0x03 => MessageType::Error,
            0x04 => MessageType::Goaway,
            0x05 => MessageType::Subscribe,
            0x10 => MessageType::Update,
            0x11 => MessageType::Ack,
            0x12 => MessageType::Input,
            0x13 => MessageType::InputBatch,
            0x14 => MessageType::Interest,
            0x20 => MessageType::Directory,
            0x30 => MessageType::Ping,
            0x31 => MessageType::Pong,
            _ => return None,
        })
    }

    /// Largest encoding of this type, type byte and body (the `len` of its
    /// frame, or the size of its datagram). Derived from the field limits.
    pub const fn max_len(self) -> usize {
        match self {
            MessageType::Hello => HELLO_MAX,
            MessageType::Welcome => WELCOME_MAX,
            MessageType::Error => ERROR_MAX,
            MessageType::Goaway => GOAWAY_MAX,
            MessageType::Subscribe => SUBSCRIBE_MAX,
            MessageType::Update => MAX_FRAME,
            MessageType::Ack => ACK_MAX,
            MessageType::Input => INPUT_MAX,
            MessageType::InputBatch => INPUT_BATCH_MAX,
            MessageType::Interest => INTEREST_MAX,
            MessageType::Directory => DIRECTORY_MAX,
            MessageType::Ping => MAX_PING_LEN,
            MessageType::Pong => MAX_PONG_LEN,
        }
    }

    /// Whether the type may travel as a datagram: latest-wins traffic that
    /// tolerates loss (updates, acks, inputs) and the UDP probe.
    pub const fn datagram(self) -> bool {
        matches!(
            self,
            MessageType::Update
                | MessageType::Ack
                | MessageType::Input
                | MessageType::Ping
                | MessageType::Pong
        )
    }

    /// The message name, for errors and logs.
    pub const fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "hello",
            MessageType::Welcome => "welcome",
            MessageType::Error => "error",
            MessageType::Goaway => "goaway",
            MessageType::Subscribe => "subscribe",
            MessageType::Update => "update",
            MessageType::Ack => "ack",
            MessageType::Input => "input",
            MessageType::InputBatch => "input_batch",
            MessageType::Interest => "interest",
            MessageType::Directory => "directory",
            MessageType::Ping => "ping",
            MessageType::Pong => "pong",
        }
    }
}

/// The body of one message type: what each message struct implements.
trait Body: Sized {
    /// Its type.
    const TYPE: MessageType;
    /// Checks every field against the limits the decoder enforces.
    fn check(&self) -> Result<(), EncodeError>;
    /// Exact encoded length of the body (for a message that passes `check`).
    fn body_len(&self) -> usize;
    /// Writes the body (of a message that passes `check`).
    fn encode_body<B: BufMut>(&self, out: &mut B);
    /// Reads a body from `buf`, which holds at most the body.
    fn decode_body<B: Buf>(buf: &mut B, version: u32) -> Result<Self, DecodeError>;
}

/// Any statecast message.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Error`].
    Error(Error),
    /// See [`Goaway`].
    Goaway(Goaway),
    /// See [`Subscribe`].
    Subscribe(Subscribe),
    /// See [`Update`].
    Update(Update),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Input`].
    Input(Input),
    /// See [`InputBatch`].
    InputBatch(InputBatch),
    /// See [`Interest`].
    Interest(Interest),
    /// See [`Directory`].
    Directory(Directory),
    /// See [`Ping`].
    Ping(Ping),
    /// See [`Pong`].
    Pong(Pong),
}

/// Applies `$body` to the message struct inside `$msg`, bound as `$m`.
macro_rules! each {
    ($msg:expr, $m:ident => $body:expr) => {
        match $msg {
            Message::Hello($m) => $body,
            Message::Welcome($m) => $body,
            Message::Error($m) => $body,
            Message::Goaway($m) => $body,
            Message::Subscribe($m) => $body,
            Message::Update($m) => $body,
            Message::Ack($m) => $body,
            Message::Input($m) => $body,
            Message::InputBatch($m) => $body,
            Message::Interest($m) => $body,
            Message::Directory($m) => $body,
            Message::Ping($m) => $body,
            Message::Pong($m) => $body,
        }
    };
}

macro_rules! from_struct {
    ($($name:ident),*) => {
        $(
            impl From<$name> for Message {
                fn from(m: $name) -> Message {
                    Message::$name(m)
                }
            }
        )*
    };
}

from_struct!(
    Hello, Welcome, Error, Goaway, Subscribe, Update, Ack, Input, InputBatch, Interest, Directory,
    Ping, Pong
);

/// Fails unless this build speaks `version`.
fn check_version(version: u32) -> Result<(), DecodeError> {
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    Ok(())
}

/// Reads a version field and refuses one other than `version`.
fn get_version<B: Buf>(buf: &mut B, version: u32) -> Result<u32, DecodeError> {
    let stated = wire::get_varint(buf)?;
    let stated = u32::try_from(stated).unwrap_or(u32::MAX);
    if stated != version {
        return Err(DecodeError::UnsupportedVersion(stated));
    }
    Ok(stated)
}

/// Checks a frame's declared `len` and its type byte against the limits.
fn check_frame(len: u64, ty: u8) -> Result<MessageType, DecodeError> {
    let ty = MessageType::from_u8(ty).ok_or(DecodeError::UnknownType(ty))?;
    if len > ty.max_len() as u64 {
        return Err(DecodeError::TooLarge {
            what: ty.name(),
            len,
            max: ty.max_len() as u64,
        });
    }
    Ok(ty)
}

/// Checks a frame's declared `len` before its type byte is known.
fn check_frame_len(len: u64) -> Result<(), DecodeError> {
    if len == 0 {
        return Err(DecodeError::BadValue {
            what: "frame length 0 (no type byte)",
        });
    }
    if len > MAX_FRAME as u64 {
        return Err(DecodeError::TooLarge {
            what: "frame",
            len,
            max: MAX_FRAME as u64,
        });
    }
    Ok(())
}

/// The head of a frame: `varint(len) | type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of the length prefix.
    pub prefix_len: usize,
    /// The declared length: type byte and body.
    pub len: usize,
    /// The message type.
    pub ty: MessageType,
}

impl FrameHeader {
    /// Bytes of the whole frame, prefix included.
    pub fn frame_len(&self) -> usize {
        self.prefix_len + self.len
    }

    /// Reads and checks the head of the frame at the start of `bytes`:
    /// `Ok(None)` if more bytes are needed to see it, an error as soon as the
    /// length or the type is refused (before the body arrives).
    pub fn peek(bytes: &[u8]) -> Result<Option<FrameHeader>, DecodeError> {
        let mut cur = bytes;
        let len = match wire::get_varint(&mut cur) {
            Ok(len) => len,
            Err(DecodeError::Incomplete) => return Ok(None),
            Err(e) => return Err(e),
        };
        check_frame_len(len)?;
        let Some(&ty) = cur.first() else {
            return Ok(None);
        };
        let ty = check_frame(len, ty)?;
        Ok(Some(FrameHeader {
            prefix_len: bytes.len() - cur.len(),
            len: len as usize,
            ty,
        }))
    }
}

impl Message {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        fn ty<T: Body>(_: &T) -> MessageType {
            T::TYPE
        }
        each!(self, m => ty(m))
    }

    /// Checks every field against the limits the decoder enforces, and the
    /// whole message against its type's [`MessageType::max_len`].
    pub fn check(&self) -> Result<(), EncodeError> {
        each!(self, m => m.check())?;
        let ty = self.message_type();
        wire::check_len(ty.name(), 1 + self.body_len(), ty.max_len())
    }

    fn body_len(&self) -> usize {
        each!(self, m => m.body_len())
    }

    /// Bytes of the framed encoding, length prefix included (for a message
    /// that passes [`Message::check`]).
    pub fn encoded_len(&self) -> usize {
        let len = 1 + self.body_len();
        varint_len(len as u64) + len
    }

    /// Bytes of the datagram encoding (for a message that passes
    /// [`Message::check`]).
    pub fn datagram_len(&self) -> usize {
        1 + self.body_len()
    }

    /// Appends the message as a frame, `varint(len) | type | body`. Checks
    /// the message first and writes nothing if it fails.
    pub fn encode<B: BufMut>(&self, out: &mut B) -> Result<(), EncodeError> {
        self.check()?;
        let len = 1 + self.body_len();
        let need = varint_len(len as u64) + len;
        if out.remaining_mut() < need {
            return Err(EncodeError::BufferTooSmall {
                need,
                room: out.remaining_mut(),
            });
        }
        let before = out.remaining_mut();
        put_varint(out, len as u64);
        out.put_u8(self.message_type().to_u8());
        each!(self, m => m.encode_body(out));
        debug_assert_eq!(before - out.remaining_mut(), need, "{self:?}");
        Ok(())
    }

    /// Appends the message as a datagram, `type | body`. Fails for types that
    /// may not travel as datagrams; writes nothing on failure.
    pub fn encode_datagram<B: BufMut>(&self, out: &mut B) -> Result<(), EncodeError> {
        let ty = self.message_type();
        if !ty.datagram() {
            return Err(EncodeError::NotDatagram(ty.to_u8()));
        }
        self.check()?;
        let need = self.datagram_len();
        if out.remaining_mut() < need {
            return Err(EncodeError::BufferTooSmall {
                need,
                room: out.remaining_mut(),
            });
        }
        let before = out.remaining_mut();
        out.put_u8(ty.to_u8());
        each!(self, m => m.encode_body(out));
        debug_assert_eq!(before - out.remaining_mut(), need, "{self:?}");
        Ok(())
    }

    /// Decodes the frame at the front of `buf` and advances past it.
    ///
    /// [`DecodeError::Incomplete`] means that `buf` ends before the frame; on
    /// any error the position of `buf` is unspecified (part of the header may
    /// have been consumed), so stream readers use [`decode_frame`] or
    /// [`FrameReader`], which consume nothing until a whole frame is there.
    /// Zero-copy for byte fields when `buf` is a [`bytes::Bytes`].
    pub fn decode<B: Buf>(buf: &mut B, version: u32) -> Result<Message, DecodeError> {
        check_version(version)?;
        let len = wire::get_varint(buf)?;
        check_frame_len(len)?;
        if !buf.has_remaining() {
            return Err(DecodeError::Incomplete);
        }
        let ty = check_frame(len, buf.chunk()[0])?;
        if (buf.remaining() as u64) < len {
            return Err(DecodeError::Incomplete);
        }
        buf.advance(1);
        let mut body = buf.take(len as usize - 1);
        Message::decode_body(ty, &mut body, version)
    }

    /// Decodes one datagram, `type | body`, which must hold exactly one
    /// message. Zero-copy for byte fields when `datagram` is a
    /// [`bytes::Bytes`].
    pub fn decode_datagram<B: Buf>(mut datagram: B, version: u32) -> Result<Message, DecodeError> {
        check_version(version)?;
        let total = datagram.remaining();
        let ty: u8 = wire::get(&mut datagram).map_err(DecodeError::complete)?;
        let ty = MessageType::from_u8(ty).ok_or(DecodeError::UnknownType(ty))?;
        if !ty.datagram() {
            return Err(DecodeError::NotDatagram(ty.to_u8()));
        }
        if total > ty.max_len() {
            return Err(DecodeError::TooLarge {
                what: ty.name(),
                len: total as u64,
                max: ty.max_len() as u64,
            });
        }
        Message::decode_body(ty, &mut datagram, version)
    }

    /// Decodes a body that `buf` holds exactly: running out of bytes is
    /// [`DecodeError::Truncated`], bytes left over [`DecodeError::TrailingBytes`].
    fn decode_body<B: Buf>(
        ty: MessageType,
        buf: &mut B,
        version: u32,
    ) -> Result<Message, DecodeError> {
        fn body<T: Body, B: Buf>(buf: &mut B, version: u32) -> Result<T, DecodeError> {
            T::decode_body(buf, version).map_err(DecodeError::complete)
        }
        let msg = match ty {
            MessageType::Hello => Message::Hello(body(buf, version)?),
            MessageType::Welcome => Message::Welcome(body(buf, version)?),
            MessageType::Error => Message::Error(body(buf, version)?),
            MessageType::Goaway => Message::Goaway(body(buf, version)?),
            MessageType::Subscribe => Message::Subscribe(body(buf, version)?),
            MessageType::Update => Message::Update(body(buf, version)?),
            MessageType::Ack => Message::Ack(body(buf, version)?),
            MessageType::Input => Message::Input(body(buf, version)?),
            MessageType::InputBatch => Message::InputBatch(body(buf, version)?),
            MessageType::Interest => Message::Interest(body(buf, version)?),
            MessageType::Directory => Message::Directory(body(buf, version)?),
            MessageType::Ping => Message::Ping(body(buf, version)?),
            MessageType::Pong => Message::Pong(body(buf, version)?),
        };
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes(buf.remaining()));
        }
        Ok(msg)
    }
}

/// Decodes the frame at the start of `bytes` without consuming anything:
/// `Ok(None)` until `bytes` holds a whole frame, then the message and the
/// number of bytes it took. A frame whose declared length or type is refused
/// fails as soon as its header is seen.
pub fn decode_frame(bytes: &[u8], version: u32) -> Result<Option<(Message, usize)>, DecodeError> {
    check_version(version)?;
    let Some(header) = FrameHeader::peek(bytes)? else {
        return Ok(None);
    };
    let total = header.frame_len();
    let Some(frame) = bytes.get(..total) else {
        return Ok(None);
    };
    let mut body = &frame[header.prefix_len + 1..];
    let msg = Message::decode_body(header.ty, &mut body, version)?;
    Ok(Some((msg, total)))
}

/// Reassembles frames from the bytes of a stream.
///
/// Push bytes as they arrive ([`FrameReader::extend_from_slice`], or read
/// straight into [`FrameReader::buffer_mut`]), then call
/// [`FrameReader::next_message`] until it returns `Ok(None)`. Byte fields of
/// the messages it returns share the reader's buffer (no copy). After an
/// error the stream is unusable: close it with [`DecodeError::code`]. The
/// reader never holds more than one frame's worth of bytes plus what the
/// caller pushes beyond it, since an oversized frame fails at its header.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    version: u32,
}

impl FrameReader {
    /// A reader that decodes protocol `version`.
    pub fn new(version: u32) -> FrameReader {
        FrameReader {
            buf: BytesMut::new(),
            version,
        }
    }

    /// Appends received bytes.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer, to read into directly (`AsyncReadExt::read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        check_version(self.version)?;
        let Some(header) = FrameHeader::peek(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < header.frame_len() {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(header.frame_len()).freeze();
        frame.advance(header.prefix_len + 1);
        Message::decode_body(header.ty, &mut frame, self.version).map(Some)
    }
}
