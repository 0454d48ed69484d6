//! [`proto::Message`]s over QUIC streams and datagrams.
//!
//! On a stream, messages travel as proto's frames (`varint(len) | type |
//! body`); [`FramedRecv`] reassembles them from whatever chunks QUIC delivers
//! and [`FramedSend`] writes them. Each side can hold a stream to a tighter
//! size limit than the protocol's [`proto::msg::MAX_FRAME`]: a frame above it
//! is refused as soon as its header arrives, before its body is buffered, so
//! a reader never holds more than one frame plus one read chunk
//! ([`READ_CHUNK`]).
//!
//! As a datagram, a message is `type | body` ([`send_datagram`],
//! [`read_datagram`]); only types that proto marks as datagram-capable may go
//! so, and only when the encoding fits the path's current datagram size.
//!
//! After any [`FrameError`] the stream is unusable: stop or reset it, or
//! close the connection with [`FrameError::code`] when the peer broke the
//! protocol.

use bytes::{Bytes, BytesMut};
use proto::msg::{FrameHeader, FrameReader, MAX_FRAME, Message};
use proto::{DecodeError, EncodeError, ErrorCode};

/// Most bytes read from a stream at once.
pub const READ_CHUNK: usize = 64 << 10;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Reading the stream failed (reset by the peer, connection lost).
    #[error("cannot read from the stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed (stopped by the peer, connection lost).
    #[error("cannot write to the stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection is gone (while waiting for a datagram).
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// quinn refused a datagram.
    #[error("cannot send the datagram: {0}")]
    SendDatagram(#[from] quinn::SendDatagramError),
    /// The peer sent bytes that are not a valid message.
    #[error("the peer sent a bad message: {0}")]
    Decode(#[from] DecodeError),
    /// The peer sent a frame above this stream's limit.
    #[error("the peer sent a {ty} frame of {len} bytes, above this stream's limit of {max}")]
    FrameTooLarge {
        /// The frame's message type.
        ty: &'static str,
        /// The frame's length, prefix included.
        len: usize,
        /// The stream's limit.
        max: usize,
    },
    /// The peer finished the stream in the middle of a frame.
    #[error("the stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
    /// A message to send fails proto's checks.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] EncodeError),
    /// A message to send is above this stream's limit.
    #[error("a {ty} message of {len} bytes is above this stream's limit of {max}")]
    MessageTooLarge {
        /// The message type.
        ty: &'static str,
        /// Its framed length.
        len: usize,
        /// The stream's limit.
        max: usize,
    },
    /// A datagram is larger than the path currently carries: send the
    /// message on a stream instead.
    #[error("a datagram of {len} bytes does not fit the path's limit of {max}")]
    DatagramTooLarge {
        /// The datagram's length.
        len: usize,
        /// The largest datagram the path carries now.
        max: usize,
    },
    /// The peer does not accept datagrams, or they are disabled locally.
    #[error("datagrams are not available on this connection")]
    DatagramsUnsupported,
}

impl FrameError {
    /// Whether the peer broke the protocol (as opposed to the network or
    /// this side failing).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            FrameError::Decode(_) | FrameError::FrameTooLarge { .. } | FrameError::Truncated { .. }
        )
    }

    /// The code to close the connection with: `Some` when the peer broke the
    /// protocol or this side failed to encode, `None` when the stream or
    /// connection already failed underneath (there is nobody to tell), or
    /// for a datagram that should simply go on a stream.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            FrameError::Decode(e) => Some(e.code()),
            FrameError::FrameTooLarge { .. } => Some(ErrorCode::TooLarge),
            FrameError::Truncated { .. } => Some(ErrorCode::Malformed),
            FrameError::Encode(_) | FrameError::MessageTooLarge { .. } => Some(ErrorCode::Internal),
            _ => None,
        }
    }
}

/// Reads the next message from `stream`, buffering partial frames in
/// `reader`. `Ok(None)` when the peer finished the stream at a frame
/// boundary. A frame longer than `max_frame` (prefix included) fails as soon
/// as its header is in.
pub async fn read_message(
    stream: &mut quinn::RecvStream,
    reader: &mut FrameReader,
    max_frame: usize,
) -> Result<Option<Message>, FrameError> {
    loop {
        if let Some(header) = FrameHeader::peek(&reader.buffer_mut()[..])? {
            let len = header.frame_len();
            if len > max_frame {
                return Err(FrameError::FrameTooLarge {
                    ty: header.ty.name(),
                    len,
                    max: max_frame,
                });
            }
        }
        if let Some(msg) = reader.next_message()? {
            return Ok(Some(msg));
        }
        match stream.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => reader.extend_from_slice(&chunk.bytes),
            None if reader.buffered() == 0 => return Ok(None),
            None => {
                return Err(FrameError::Truncated {
                    buffered: reader.buffered(),
                });
            }
        }
    }
}

/// Encodes `msg` as one frame.
pub fn encode_frame(msg: &Message) -> Result<Bytes, FrameError> {
    let mut buf = BytesMut::with_capacity(msg.encoded_len());
    msg.encode(&mut buf)?;
    Ok(buf.freeze())
}

/// Writes `msg` as one frame to `stream`. Does not finish the stream.
pub async fn write_message(
    stream: &mut quinn::SendStream,
    msg: &Message,
) -> Result<(), FrameError> {
    stream.write_chunk(encode_frame(msg)?).await?;
    Ok(())
}

/// The receiving half of a framed stream.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    reader: FrameReader,
    max_frame: usize,
}

impl FramedRecv {
    /// Reads protocol [`proto::VERSION`] with the protocol's frame limit.
    pub fn new(stream: quinn::RecvStream) -> FramedRecv {
        FramedRecv::with_version(stream, proto::VERSION)
    }

    /// Reads protocol `version`.
    pub fn with_version(stream: quinn::RecvStream, version: u32) -> FramedRecv {
        FramedRecv {
            stream,
            reader: FrameReader::new(version),
            max_frame: MAX_FRAME,
        }
    }

    /// Refuses frames longer than `max_frame` bytes (prefix included), for
    /// streams that only ever carry small messages.
    pub fn with_max_frame(mut self, max_frame: usize) -> FramedRecv {
        self.max_frame = max_frame;
        self
    }

    /// The next message; `Ok(None)` when the peer finished the stream at a
    /// frame boundary.
    pub async fn recv(&mut self) -> Result<Option<Message>, FrameError> {
        read_message(&mut self.stream, &mut self.reader, self.max_frame).await
    }

    /// The underlying stream (to stop it, or read its id).
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }

    /// The underlying stream; buffered bytes of an unfinished frame are lost.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.stream
    }
}

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FramedSend {
    stream: quinn::SendStream,
    buf: BytesMut,
    max_frame: usize,
}

impl FramedSend {
    /// Sends with the protocol's frame limit.
    pub fn new(stream: quinn::SendStream) -> FramedSend {
        FramedSend {
            stream,
            buf: BytesMut::new(),
            max_frame: MAX_FRAME,
        }
    }

    /// Refuses to send frames longer than `max_frame` bytes.
    pub fn with_max_frame(mut self, max_frame: usize) -> FramedSend {
        self.max_frame = max_frame;
        self
    }

    /// Writes `msg` as one frame; returns once quinn has taken all of it
    /// (flow control permitting), not once the peer has it.
    pub async fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        let len = msg.encoded_len();
        if len > self.max_frame {
            return Err(FrameError::MessageTooLarge {
                ty: msg.message_type().name(),
                len,
                max: self.max_frame,
            });
        }
        self.buf.reserve(len);
        msg.encode(&mut self.buf)?;
        let frame = self.buf.split().freeze();
        self.stream.write_chunk(frame).await?;
        Ok(())
    }

    /// Finishes the stream: the peer reads what was sent, then `Ok(None)`.
    /// Fails only if the stream was already finished or reset.
    pub fn finish(&mut self) -> Result<(), quinn::ClosedStream> {
        self.stream.finish()
    }

    /// The underlying stream (to reset it, set its priority, ...).
    pub fn stream_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }

    /// The underlying stream.
    pub fn into_inner(self) -> quinn::SendStream {
        self.stream
    }
}

/// Encodes `msg` as a datagram (`type | body`). Fails for types that may
/// not travel as datagrams.
pub fn encode_datagram(msg: &Message) -> Result<Bytes, FrameError> {
    let mut buf = BytesMut::with_capacity(msg.datagram_len());
    msg.encode_datagram(&mut buf)?;
    Ok(buf.freeze())
}

/// Sends `msg` as one datagram on `conn`. Fails with
/// [`FrameError::DatagramTooLarge`] when it does not fit the path now (send
/// it on a stream instead); never blocks. When quinn's send buffer is full it
/// drops the oldest datagram queued, which suits latest-wins state.
pub fn send_datagram(conn: &quinn::Connection, msg: &Message) -> Result<(), FrameError> {
    let datagram = encode_datagram(msg)?;
    let max = conn
        .max_datagram_size()
        .ok_or(FrameError::DatagramsUnsupported)?;
    if datagram.len() > max {
        return Err(FrameError::DatagramTooLarge {
            len: datagram.len(),
            max,
        });
    }
    conn.send_datagram(datagram)?;
    Ok(())
}

/// Waits for the next datagram on `conn` and decodes it as protocol
/// `version`.
pub async fn read_datagram(conn: &quinn::Connection, version: u32) -> Result<Message, FrameError> {
    let datagram = conn.read_datagram().await?;
    Ok(Message::decode_datagram(datagram, version)?)
}
