//! Error codes carried by [`super::Error`] messages and QUIC close frames.

use std::fmt;

/// Why a session, subscription or connection ends. The numbers are stable
/// wire values ([`ErrorCode::to_code`]); a code this build does not know
/// decodes to [`ErrorCode::Unknown`], never to an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 0: closed on purpose, nothing went wrong.
    Normal,
    /// 1: the peer does not speak the requested protocol version.
    UnsupportedVersion,
    /// 2: the token (or a relay's upstream credential) is not valid.
    BadToken,
    /// 3: the token was valid but has expired.
    TokenExpired,
    /// 4: no such world.
    UnknownWorld,
    /// 5: bytes that do not decode.
    Malformed,
    /// 6: a message or a field above its limit.
    TooLarge,
    /// 7: too many messages, inputs or connections.
    RateLimited,
    /// 8: the node has no capacity for another session.
    Overloaded,
    /// 9: the node is shutting down; a `Goaway` usually came first.
    Draining,
    /// 10: the relay lost its upstream (origin or parent relay).
    UpstreamLost,
    /// 11: a bug or an unexpected failure inside the node.
    Internal,
    /// 12: state rebuilt from updates does not match the hash they carry.
    HashMismatch,
    /// 13: a well-formed message that is not allowed at this point (an
    /// update before the welcome, a second hello, ...).
    ProtocolViolation,
    /// 14: the peer was silent for too long.
    IdleTimeout,
    /// A code this build does not know (sent by a newer peer).
    Unknown(u16),
}

/// Whether and where a failed request may be tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retry {
    /// The same request fails anywhere: report it, do not retry.
    Never,
    /// Retry (anywhere) once a fresh token has been obtained.
    NewToken,
    /// Retry the same node after a backoff.
    Later,
    /// Move to another node (the next relay of the failover list) now.
    Elsewhere,
}

/// Whose doing an error is, from the point of view of the message: the
/// node that *sends* the code, or the one that *receives* it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Nobody's: a normal close.
    Nobody,
    /// The receiver of the code sent something wrong (bad bytes, bad
    /// credentials, too much traffic, silence).
    Recipient,
    /// The sender of the code cannot serve (overloaded, draining, lost its
    /// upstream, internal failure).
    Sender,
    /// An unknown code: no one can tell.
    Unknown,
}

impl ErrorCode {
    /// Every named code, in numeric order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::Normal,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadToken,
        ErrorCode::TokenExpired,
        ErrorCode::UnknownWorld,
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Draining,
        ErrorCode::UpstreamLost,
        ErrorCode::Internal,
        ErrorCode::HashMismatch,
        ErrorCode::ProtocolViolation,
        ErrorCode::IdleTimeout,
    ];

    /// The stable wire number.
    pub const fn to_code(self) -> u16 {
        match self {
            ErrorCode::Normal => 0,
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::BadToken => 2,
            ErrorCode::TokenExpired => 3,
            ErrorCode::UnknownWorld => 4,
            ErrorCode::Malformed => 5,
            ErrorCode::TooLarge => 6,
            ErrorCode::RateLimited => 7,
            ErrorCode::Overloaded => 8,
            ErrorCode::Draining => 9,
            ErrorCode::UpstreamLost => 10,
            ErrorCode::Internal => 11,
            ErrorCode::HashMismatch => 12,
            ErrorCode::ProtocolViolation => 13,
            ErrorCode::IdleTimeout => 14,
            ErrorCode::Unknown(code) => code,
        }
    }

    /// The code for a wire number; numbers this build does not know give
    /// [`ErrorCode::Unknown`].
    pub const fn from_code(code: u16) -> ErrorCode {
        match code {
            0 => ErrorCode::Normal,
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::BadToken,
            3 => ErrorCode::TokenExpired,
            4 => ErrorCode::UnknownWorld,
            5 => ErrorCode::Malformed,
            6 => ErrorCode::TooLarge,
            7 => ErrorCode::RateLimited,
            8 => ErrorCode::Overloaded,
            9 => ErrorCode::Draining,
            10 => ErrorCode::UpstreamLost,
            11 => ErrorCode::Internal,
            12 => ErrorCode::HashMismatch,
            13 => ErrorCode::ProtocolViolation,
            14 => ErrorCode::IdleTimeout,
            other => ErrorCode::Unknown(other),
        }
    }

    /// Whether and where to retry after this error.
    pub const fn retry(self) -> Retry {
        match self {
            ErrorCode::Normal
            | ErrorCode::UnsupportedVersion
            | ErrorCode::UnknownWorld
            | ErrorCode::Malformed
            | ErrorCode::TooLarge
            | ErrorCode::ProtocolViolation => Retry::Never,
            ErrorCode::BadToken | ErrorCode::TokenExpired => Retry::NewToken,
            ErrorCode::RateLimited | ErrorCode::IdleTimeout | ErrorCode::Unknown(_) => Retry::Later,
            ErrorCode::Overloaded
            | ErrorCode::Draining
            | ErrorCode::UpstreamLost
            | ErrorCode::Internal
            | ErrorCode::HashMismatch => Retry::Elsewhere,
        }
    }

    /// Whether a client should move to another relay at once, resuming its
    /// session there.
    pub const fn retry_elsewhere(self) -> bool {
        matches!(self.retry(), Retry::Elsewhere)
    }

    /// Whose doing the error is.
    pub const fn fault(self) -> Fault {
        match self {
            ErrorCode::Normal => Fault::Nobody,
            ErrorCode::UnsupportedVersion
            | ErrorCode::BadToken
            | ErrorCode::TokenExpired
            | ErrorCode::UnknownWorld
            | ErrorCode::Malformed
            | ErrorCode::TooLarge
            | ErrorCode::RateLimited
            | ErrorCode::HashMismatch
            | ErrorCode::ProtocolViolation
            | ErrorCode::IdleTimeout => Fault::Recipient,
            ErrorCode::Overloaded
            | ErrorCode::Draining
            | ErrorCode::UpstreamLost
            | ErrorCode::Internal => Fault::Sender,
            ErrorCode::Unknown(_) => Fault::Unknown,
        }
    }

    /// A short snake_case name, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::Normal => "normal",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::UnknownWorld => "unknown_world",
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Draining => "draining",
            ErrorCode::UpstreamLost => "upstream_lost",
            ErrorCode::Internal => "internal",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> ErrorCode {
        ErrorCode::from_code(code)
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.to_code()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.to_code())
    }
}
