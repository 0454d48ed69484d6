//! Session set-up and tear-down: hello, welcome, error, goaway, subscribe.

use bytes::{Buf, BufMut, Bytes};

use super::state::{Area, CellId};
use super::{
    Body, ErrorCode, MAX_ADDR_LEN, MAX_AGENT_LEN, MAX_REGION_LEN, MAX_RELAY_ID_LEN,
    MAX_RESUME_CELLS, MAX_SCHEMA_LEN, MAX_TEXT_LEN, MAX_TICK_RATE, MAX_TOKEN_LEN, MAX_WORLD_LEN,
    MessageType, get_version,
};
use crate::schema::Schema;
use crate::wire::{
    DecodeError, EncodeError, bytes_len, check_len, check_varint, get, get_bytes, get_count,
    get_flag, get_len, get_string, get_varint, get_varint_u32, put_bytes, put_varint, varint_len,
};

/// Client → relay: the first message of a client connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    /// Protocol version the client speaks.
    pub version: u32,
    /// Signed token (world, session, expiry), at most
    /// [`MAX_TOKEN_LEN`](super::MAX_TOKEN_LEN) bytes.
    pub token: Bytes,
    /// World to join, at most [`MAX_WORLD_LEN`](super::MAX_WORLD_LEN) bytes.
    pub world: String,
    /// Set when the client continues a session (after failover or a drain).
    pub resume: Option<Resume>,
    /// Client software name and version, at most
    /// [`MAX_AGENT_LEN`](super::MAX_AGENT_LEN) bytes.
    pub agent: String,
    /// The area the client wants (`None`: the whole world).
    pub interest: Option<Area>,
}

/// What a client continuing a session tells its new relay.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Resume {
    /// Session id from the previous relay's [`Welcome`].
    pub session: u64,
    /// Newest tick the client applied: the baseline the new relay may code
    /// against if it still holds that tick (ticks are global per world).
    pub last_ack: u64,
    /// The non-empty cells the client holds at `last_ack`, at most
    /// [`MAX_RESUME_CELLS`](super::MAX_RESUME_CELLS): with them the new relay
    /// knows exactly what the client holds.
    pub cells: Vec<CellId>,
}

impl Body for Hello {
    const TYPE: MessageType = MessageType::Hello;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("hello token", self.token.len(), MAX_TOKEN_LEN)?;
        check_len("world name", self.world.len(), MAX_WORLD_LEN)?;
        if let Some(resume) = &self.resume {
            check_varint("resume last_ack", resume.last_ack)?;
            check_len("resume cells", resume.cells.len(), MAX_RESUME_CELLS)?;
        }
        if let Some(area) = &self.interest {
            area.check()?;
        }
        check_len("agent", self.agent.len(), MAX_AGENT_LEN)
    }

    fn body_len(&self) -> usize {
        varint_len(self.version.into())
            + bytes_len(self.token.len())
            + bytes_len(self.world.len())
            + 1
            + self.resume.as_ref().map_or(0, |r| {
                8 + varint_len(r.last_ack)
                    + varint_len(r.cells.len() as u64)
                    + r.cells.iter().map(|c| c.encoded_len()).sum::<usize>()
            })
            + bytes_len(self.agent.len())
            + 1
            + self.interest.map_or(0, |_| Area::LEN)
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.version.into());
        put_bytes(out, &self.token);
        put_bytes(out, self.world.as_bytes());
        match &self.resume {
            None => out.put_u8(0),
            Some(resume) => {
                out.put_u8(1);
                out.put_u64(resume.session);
                put_varint(out, resume.last_ack);
                put_varint(out, resume.cells.len() as u64);
                for cell in &resume.cells {
                    cell.encode(out);
                }
            }
        }
        put_bytes(out, self.agent.as_bytes());
        Area::encode_opt(self.interest.as_ref(), out);
    }

    fn decode_body<B: Buf>(buf: &mut B, version: u32) -> Result<Hello, DecodeError> {
        let version = get_version(buf, version)?;
        let token = get_bytes(buf, MAX_TOKEN_LEN, "hello token")?;
        let world = get_string(buf, MAX_WORLD_LEN, "world name")?;
        let resume = if get_flag(buf, "hello resume flag")? {
            let session = get(buf)?;
            let last_ack = get_varint(buf)?;
            let count = get_count(buf, MAX_RESUME_CELLS, 1, "resume cells")?;
            let mut cells = Vec::with_capacity(count);
            for _ in 0..count {
                cells.push(CellId::decode(buf)?);
            }
            Some(Resume {
                session,
                last_ack,
                cells,
            })
        } else {
            None
        };
        let agent = get_string(buf, MAX_AGENT_LEN, "agent")?;
        let interest = Area::decode_opt(buf)?;
        Ok(Hello {
            version,
            token,
            world,
            resume,
            agent,
            interest,
        })
    }
}

/// Relay → client after a [`Hello`], and origin (or parent relay) → relay
/// after a [`Subscribe`]: the session is open and this is the world.
#[derive(Clone, Debug, PartialEq)]
pub struct Welcome {
    /// Protocol version of the session.
    pub version: u32,
    /// Session id, to resume with (0 when an origin answers a relay).
    pub session: u64,
    /// World name.
    pub world: String,
    /// The world's schema. It travels postcard-encoded in at most
    /// [`MAX_SCHEMA_LEN`](super::MAX_SCHEMA_LEN) bytes, and the decoder
    /// checks that it compiles ([`Schema::layout`]).
    pub schema: Schema,
    /// Ticks per second, 1 to [`MAX_TICK_RATE`](super::MAX_TICK_RATE).
    pub tick_rate: u32,
    /// The world's current tick.
    pub tick: u64,
    /// Id of the node that answers (the relay, or the origin).
    pub relay_id: String,
    /// Region of the node that answers.
    pub region: String,
}

impl Welcome {
    fn schema_len(&self) -> usize {
        postcard::experimental::serialized_size(&self.schema).unwrap_or(0)
    }
}

impl Body for Welcome {
    const TYPE: MessageType = MessageType::Welcome;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("world name", self.world.len(), MAX_WORLD_LEN)?;
        let schema_len = postcard::experimental::serialized_size(&self.schema)
            .map_err(EncodeError::SchemaEncoding)?;
        check_len("schema", schema_len, MAX_SCHEMA_LEN)?;
        self.schema.layout()?;
        if self.tick_rate == 0 || self.tick_rate > MAX_TICK_RATE {
            return Err(EncodeError::BadValue {
                what: "tick rate (must be 1 to 1000)",
            });
        }
        check_varint("tick", self.tick)?;
        check_len("relay id", self.relay_id.len(), MAX_RELAY_ID_LEN)?;
        check_len("region", self.region.len(), MAX_REGION_LEN)
    }

    fn body_len(&self) -> usize {
        varint_len(self.version.into())
            + 8
            + bytes_len(self.world.len())
            + bytes_len(self.schema_len())
            + varint_len(self.tick_rate.into())
            + varint_len(self.tick)
            + bytes_len(self.relay_id.len())
            + bytes_len(self.region.len())
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.version.into());
        out.put_u64(self.session);
        put_bytes(out, self.world.as_bytes());
        // `check` has serialized the schema once already; this cannot fail.
        let schema = postcard::to_allocvec(&self.schema).unwrap_or_default();
        put_bytes(out, &schema);
        put_varint(out, self.tick_rate.into());
        put_varint(out, self.tick);
        put_bytes(out, self.relay_id.as_bytes());
        put_bytes(out, self.region.as_bytes());
    }

    fn decode_body<B: Buf>(buf: &mut B, version: u32) -> Result<Welcome, DecodeError> {
        let version = get_version(buf, version)?;
        let session = get(buf)?;
        let world = get_string(buf, MAX_WORLD_LEN, "world name")?;
        let len = get_len(buf, MAX_SCHEMA_LEN, "schema")?;
        let raw = buf.copy_to_bytes(len);
        let (schema, rest) =
            postcard::take_from_bytes::<Schema>(&raw).map_err(DecodeError::SchemaEncoding)?;
        if !rest.is_empty() {
            return Err(DecodeError::BadValue {
                what: "schema (trailing bytes)",
            });
        }
        schema.layout()?;
        let tick_rate = get_varint_u32(buf, "tick rate")?;
        if tick_rate == 0 || tick_rate > MAX_TICK_RATE {
            return Err(DecodeError::BadValue {
                what: "tick rate (must be 1 to 1000)",
            });
        }
        let tick = get_varint(buf)?;
        let relay_id = get_string(buf, MAX_RELAY_ID_LEN, "relay id")?;
        let region = get_string(buf, MAX_REGION_LEN, "region")?;
        Ok(Welcome {
            version,
            session,
            world,
            schema,
            tick_rate,
            tick,
            relay_id,
            region,
        })
    }
}

/// Any direction: why the sender is about to close the session (or refuses
/// a request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// Stable code; says whose fault it is and whether to retry.
    pub code: ErrorCode,
    /// Text for humans, at most [`MAX_TEXT_LEN`](super::MAX_TEXT_LEN) bytes.
    pub message: String,
}

impl Body for Error {
    const TYPE: MessageType = MessageType::Error;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("error message", self.message.len(), MAX_TEXT_LEN)
    }

    fn body_len(&self) -> usize {
        varint_len(self.code.to_code().into()) + bytes_len(self.message.len())
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.code.to_code().into());
        put_bytes(out, self.message.as_bytes());
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Error, DecodeError> {
        let code = get_varint(buf)?;
        let code = u16::try_from(code).map_err(|_| DecodeError::TooLarge {
            what: "error code",
            len: code,
            max: u16::MAX.into(),
        })?;
        let message = get_string(buf, MAX_TEXT_LEN, "error message")?;
        Ok(Error {
            code: ErrorCode::from_code(code),
            message,
        })
    }
}

/// Relay → client (or origin → relay): this node is draining; move before
/// the deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goaway {
    /// Text for humans, at most [`MAX_TEXT_LEN`](super::MAX_TEXT_LEN) bytes.
    pub reason: String,
    /// Where to go instead (`host:port`), at most
    /// [`MAX_ADDR_LEN`](super::MAX_ADDR_LEN) bytes; `None`: pick the next
    /// relay of the failover list.
    pub redirect: Option<String>,
    /// Milliseconds until the node closes the session.
    pub deadline_ms: u32,
}

impl Body for Goaway {
    const TYPE: MessageType = MessageType::Goaway;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("goaway reason", self.reason.len(), MAX_TEXT_LEN)?;
        if let Some(redirect) = &self.redirect {
            check_len("redirect address", redirect.len(), MAX_ADDR_LEN)?;
        }
        Ok(())
    }

    fn body_len(&self) -> usize {
        bytes_len(self.reason.len())
            + 1
            + self.redirect.as_ref().map_or(0, |r| bytes_len(r.len()))
            + varint_len(self.deadline_ms.into())
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_bytes(out, self.reason.as_bytes());
        match &self.redirect {
            None => out.put_u8(0),
            Some(redirect) => {
                out.put_u8(1);
                put_bytes(out, redirect.as_bytes());
            }
        }
        put_varint(out, self.deadline_ms.into());
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Goaway, DecodeError> {
        let reason = get_string(buf, MAX_TEXT_LEN, "goaway reason")?;
        let redirect = if get_flag(buf, "goaway redirect flag")? {
            Some(get_string(buf, MAX_ADDR_LEN, "redirect address")?)
        } else {
            None
        };
        let deadline_ms = get_varint_u32(buf, "goaway deadline")?;
        Ok(Goaway {
            reason,
            redirect,
            deadline_ms,
        })
    }
}

/// Relay → origin (or parent relay): subscribe to a world's updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// Protocol version the relay speaks.
    pub version: u32,
    /// World to subscribe to.
    pub world: String,
    /// The relay's credential for the upstream, at most
    /// [`MAX_TOKEN_LEN`](super::MAX_TOKEN_LEN) bytes (empty with mTLS).
    pub auth: Bytes,
    /// Id of the subscribing relay.
    pub relay_id: String,
}

impl Body for Subscribe {
    const TYPE: MessageType = MessageType::Subscribe;

    fn check(&self) -> Result<(), EncodeError> {
        check_len("world name", self.world.len(), MAX_WORLD_LEN)?;
        check_len("subscribe auth", self.auth.len(), MAX_TOKEN_LEN)?;
        check_len("relay id", self.relay_id.len(), MAX_RELAY_ID_LEN)
    }

    fn body_len(&self) -> usize {
        varint_len(self.version.into())
            + bytes_len(self.world.len())
            + bytes_len(self.auth.len())
            + bytes_len(self.relay_id.len())
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.version.into());
        put_bytes(out, self.world.as_bytes());
        put_bytes(out, &self.auth);
        put_bytes(out, self.relay_id.as_bytes());
    }

    fn decode_body<B: Buf>(buf: &mut B, version: u32) -> Result<Subscribe, DecodeError> {
        let version = get_version(buf, version)?;
        let world = get_string(buf, MAX_WORLD_LEN, "world name")?;
        let auth = get_bytes(buf, MAX_TOKEN_LEN, "subscribe auth")?;
        let relay_id = get_string(buf, MAX_RELAY_ID_LEN, "relay id")?;
        Ok(Subscribe {
            version,
            world,
            auth,
            relay_id,
        })
    }
}
