//! A client that stays connected: it probes the candidate relays, connects
//! to the best one, and moves to the next best when its relay fails, drains
//! or is clearly beaten, resuming its session where it was.
//!
//! ## The model
//!
//! A [`Roamer`] owns three things:
//!
//! - a **prober**: a background task with one UDP socket that drives a
//!   [`Selector`] (staggered probe rounds, estimates, scores, hysteresis;
//!   see [`crate::select`]) for as long as the roamer lives, re-probing every
//!   [`select::Config::reprobe_every`];
//! - the **current [`Session`]** with one relay, whose events it passes on;
//! - at most one **move in progress**: a handshake with another relay,
//!   running in its own task while the current session keeps applying
//!   updates.
//!
//! **First pick.** [`Roamer::connect`] sends the first round of pings and
//! decides as soon as the answers allow: every probed candidate answered, or
//! half the best RTT seen has passed again without an answer from the rest
//! (a relay that has not answered by then is slower than the best by that
//! much, so waiting for it costs more than it could win), or
//! [`Config::first_pick_timeout`]. The handshake with the first relay to
//! answer starts as soon as it answers, while the others still may: it is
//! most often the one picked, and then the wait costs nothing. Otherwise
//! that handshake is abandoned, and the roamer connects down the failover
//! order until one relay welcomes it.
//!
//! **Moves.** Three things make the roamer move:
//!
//! - *loss* ([`MoveReason::Lost`]): the session ended (the connection was
//!   closed or timed out), or no update applied for the
//!   [`Config::stall_timeout`] (a crashed relay sends nothing, and QUIC's
//!   idle timeout is far longer than a real-time client can wait);
//! - *goaway* ([`MoveReason::Goaway`]): the relay drains;
//! - *better* ([`MoveReason::Better`]): the selector's hysteresis says
//!   another relay has beaten the current one by the margin for the hold
//!   time ([`Selector::poll_switch`]).
//!
//! A goaway or a better relay is *make before break*: the handshake runs
//! while the old session still delivers, and the roamer switches once the
//! new relay has welcomed it, so the gap in updates is about one tick. A
//! loss is *break before make*: the dead session is dropped at once and the
//! roamer resumes on the next relay of the failover order.
//!
//! **Directories.** A relay may name other relays of the network
//! ([`SessionEvent::Directory`]); the ones not yet known become candidates,
//! probed from the next round on and part of the failover order.
//!
//! **Resume.** Every move resumes: the new session's hello carries the
//! session id, the last tick applied and the cells held
//! ([`Session::resume_token`]), and the replica carries over, so a relay
//! that still holds that tick (ticks are global per world, and every relay
//! keeps about a second of them) continues with a delta instead of a
//! keyframe. [`RoamStats::resumed_without_keyframe`] counts the moves where
//! that worked.
//!
//! **Give up.** When no relay takes the client, the roamer backs off (with
//! jitter, up to 2 s) and tries again until [`Config::give_up_after`]; then
//! [`RoamError::NoRelay`] says what each relay answered. A refusal that
//! moving cannot fix (a bad token, an unknown world) ends the roamer at once
//! ([`RoamError::Session`]).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use proto::msg::{Area, Message, Retry, VERSION};
use proto::{ErrorCode, StateHash};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::coords::{Guide, GuideConfig};
use crate::replica::{Event, Replica};
use crate::select::{self, Candidate, Selector};
use crate::session::{self, Session, SessionError, SessionEvent};

/// How a [`Roamer`] joins, probes and moves.
#[derive(Clone, Debug)]
pub struct Config {
    /// The world to join.
    pub world: String,
    /// The name every relay's certificate is checked against. Default
    /// `localhost`, which the development CA's certificates carry.
    pub server_name: String,
    /// The signed token (empty when relays do not check tokens).
    pub token: Bytes,
    /// The area of interest (`None`: the whole world).
    pub interest: Option<Area>,
    /// Compute entity events for every applied tick. Default off.
    pub events: bool,
    /// Applied ticks the replica keeps as baselines. Default 128 (see
    /// [`session::Config::history`]).
    pub history: usize,
    /// How the selector probes and scores. Default: the selector's defaults
    /// (five pings a round, a round every 5 s, at most 8 relays probed).
    pub select: select::Config,
    /// With more candidates that publish network coordinates (DNS TXT
    /// `coords=`, a relay's directory) than the selector probes at once
    /// ([`select::Config::max_probed`]), a [`Guide`] picks which to probe:
    /// a few far apart first, then the most promising, within its budget
    /// (see [`crate::coords`]). The first pick waits for the guided rounds.
    /// `None`: the selector ranks by hints alone. Default: the guide's
    /// defaults (at most 8 relays).
    pub guide: Option<GuideConfig>,
    /// No update applied for this long: the relay counts as lost. `None`
    /// (the default): eight ticks at the world's tick rate, at least 300 ms
    /// (400 ms at 20 Hz). Well above one lost datagram or a slow tick, well
    /// below QUIC's idle timeout.
    pub stall_timeout: Option<Duration>,
    /// Longest wait for the first probe answers before connecting anyway.
    /// Default 1.5 s (the selector's probe timeout plus its round).
    pub first_pick_timeout: Duration,
    /// Longest wait for one relay's welcome when moving or connecting.
    /// Default 2 s: a live relay answers within a few RTTs; a dead one
    /// should not hold up the next.
    pub handshake_timeout: Duration,
    /// Move when the selector finds a clearly better relay. Default on.
    pub switch_to_better: bool,
    /// How long to keep trying when no relay takes the client (`None`:
    /// forever). Default 30 s.
    pub give_up_after: Option<Duration>,
}

impl Config {
    /// The defaults for joining `world`.
    pub fn new(world: impl Into<String>) -> Config {
        Config {
            world: world.into(),
            server_name: "localhost".to_owned(),
            token: Bytes::new(),
            interest: None,
            events: false,
            history: 128,
            select: select::Config::default(),
            guide: Some(GuideConfig::default()),
            stall_timeout: None,
            first_pick_timeout: Duration::from_millis(1500),
            handshake_timeout: Duration::from_secs(2),
            switch_to_better: true,
            give_up_after: Some(Duration::from_secs(30)),
        }
    }

    fn session(&self, relay: SocketAddr) -> session::Config {
        let mut config = session::Config::new(relay, self.world.clone());
        config.server_name = self.server_name.clone();
        config.token = self.token.clone();
        config.interest = self.interest;
        config.history = self.history;
        config.events = self.events;
        config.handshake_timeout = self.handshake_timeout;
        config
    }

    fn stall(&self, tick_rate: u32) -> Duration {
        self.stall_timeout.unwrap_or_else(|| {
            let eight_ticks = Duration::from_secs(8) / tick_rate.max(1);
            eight_ticks.max(Duration::from_millis(300))
        })
    }
}

/// Why a roamer cannot go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoamError {
    /// No candidate relays were given.
    #[error("no candidate relays to choose from")]
    NoCandidates,
    /// The probe socket could not be bound.
    #[error("cannot bind the probe socket: {0}")]
    Io(#[from] std::io::Error),
    /// No relay took the client within [`Config::give_up_after`].
    #[error("no relay took the session: {}", describe_attempts(.attempts))]
    NoRelay {
        /// The last answer of each relay tried (address, what happened).
        attempts: Vec<(SocketAddr, String)>,
    },
    /// A relay refused the session for a reason moving cannot fix (bad
    /// token, unknown world, a broken client).
    #[error(transparent)]
    Session(SessionError),
}

fn describe_attempts(attempts: &[(SocketAddr, String)]) -> String {
    if attempts.is_empty() {
        return "no relay answered the probes".to_owned();
    }
    attempts
        .iter()
        .map(|(addr, why)| format!("{addr}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a roamer moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum MoveReason {
    /// The relay was lost: the session ended, or no update came for the
    /// stall timeout. The text says which.
    Lost(String),
    /// The relay is draining and asked the client to go.
    Goaway,
    /// Another relay has been clearly better for the hold time.
    Better,
}

impl std::fmt::Display for MoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MoveReason::Lost(why) => write!(f, "lost: {why}"),
            MoveReason::Goaway => f.write_str("goaway"),
            MoveReason::Better => f.write_str("better relay"),
        }
    }
}

/// One move from a relay to another.
#[derive(Clone, Debug, Serialize)]
pub struct Move {
    /// When the move was decided, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Milliseconds from [`Roamer::connect`] to the decision.
    pub at_ms: f64,
    /// The relay left (its QUIC address).
    pub from: SocketAddr,
    /// The relay joined.
    pub to: SocketAddr,
    /// The region of the relay left, from its welcome.
    pub from_region: String,
    /// The region of the relay joined.
    pub to_region: String,
    /// Why.
    pub reason: MoveReason,
    /// Milliseconds from the last update applied on the old relay to the
    /// first on the new one.
    pub gap_ms: f64,
    /// Whether the first update on the new relay was a keyframe (`false`:
    /// the session resumed from its last acknowledged tick).
    pub keyframe: bool,
    /// Relays tried before one took the session.
    pub attempts: u32,
}

/// The relay in use now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RelayNow {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its probe address (its name in the selector).
    pub probe: SocketAddr,
    /// Its region, from its welcome.
    pub region: String,
    /// Its id, from its welcome.
    pub relay_id: String,
}

/// What [`Roamer::next_event`] reports.
#[derive(Clone, Debug)]
pub enum RoamEvent {
    /// An update was applied and its hash checked (as
    /// [`SessionEvent::Applied`]).
    Applied {
        /// The tick now held.
        tick: u64,
        /// Whether it was a keyframe.
        keyframe: bool,
        /// Microseconds from the origin making the tick to its application.
        latency_us: Option<u64>,
        /// Entity events, when [`Config::events`] asks for them.
        events: Vec<Event>,
    },
    /// An update did not reproduce the origin's hash (as
    /// [`SessionEvent::Divergence`]); the next update repairs it.
    Divergence {
        /// The update's tick.
        tick: u64,
        /// The hash the update carried.
        expected: StateHash,
        /// The hash of the state it produced.
        got: StateHash,
    },
    /// The roamer moved to another relay; reported when the first update
    /// from the new relay applied (just before its `Applied`).
    Moved(Move),
}

/// Counters over a roamer's life.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoamStats {
    /// The relay in use (QUIC address), if connected.
    pub relay: Option<String>,
    /// Its region.
    pub region: Option<String>,
    /// Its id.
    pub relay_id: Option<String>,
    /// Moves so far.
    pub relay_switches: u64,
    /// Every move, oldest first (the last 64).
    pub moves: Vec<Move>,
    /// Moves whose first update was a delta from the resumed baseline.
    pub resumed_without_keyframe: u64,
    /// Moves whose first update was a keyframe.
    pub resumed_with_keyframe: u64,
    /// Longest time between two applied updates, in milliseconds (moves
    /// included).
    pub longest_gap_ms: f64,
    /// Milliseconds from [`Roamer::connect`] to the first applied update.
    pub first_update_ms: Option<f64>,
    /// Pings sent by the prober.
    pub pings_sent: u64,
    /// Pongs received in time.
    pub pongs_received: u64,
    /// Inputs dropped because no session was up (between relays).
    pub inputs_dropped: u64,
    /// Candidates learnt from relays' directories (beyond those given).
    pub directory_candidates: u64,
    /// The sessions' counters, summed over every relay used.
    #[serde(flatten)]
    pub session: session::Stats,
}

/// Most moves kept in [`RoamStats::moves`].
const MAX_MOVES_KEPT: usize = 64;
/// Longest backoff between two rounds of connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a relay that failed is tried only after the others.
const FAILED_PENALTY: Duration = Duration::from_secs(10);

/// A move waiting for its first update.
#[derive(Debug)]
struct PendingMove {
    at: Instant,
    at_unix_ms: u64,
    from: RelayNow,
    reason: MoveReason,
    attempts: u32,
}

/// A connection attempt running in its own task, so that dropping a
/// [`Roamer::next_event`] call loses nothing.
struct Attempt {
    task: JoinHandle<Outcome>,
    reason: MoveReason,
    /// Make before break (beside the current session, with a clone of its
    /// replica) or break before make (no session; the replica of the lost
    /// one travels with the attempt and comes back on failure).
    beside: bool,
}

/// Where reconnecting after a loss stands.
#[derive(Debug, Default)]
struct Backoff {
    /// Not before this instant (backoff between rounds).
    at: Option<Instant>,
    /// The next backoff.
    backoff: Duration,
    /// Rounds since the loss.
    rounds: u32,
    /// Give up after this instant.
    give_up_at: Option<Instant>,
    /// The last answer of each relay tried since the loss.
    answers: HashMap<SocketAddr, String>,
}

/// What a connection attempt task hands back.
struct Outcome {
    result: Result<(Session, RelayNow), Vec<(SocketAddr, SessionError)>>,
    replica: Option<Replica>,
    tried: u32,
}

/// A client that keeps itself connected to the best relay; see the
/// [module documentation](self).
pub struct Roamer {
    endpoint: quinn::Endpoint,
    config: Config,
    prober: Prober,
    session: Option<Session>,
    relay: Option<RelayNow>,
    /// The replica of a lost session, waiting for the next relay.
    orphan: Option<Replica>,
    /// What resuming the lost session needs.
    resume: Option<proto::msg::Resume>,
    attempt: Option<Attempt>,
    retry: Backoff,
    pending: Option<PendingMove>,
    failed: HashMap<SocketAddr, Instant>,
    queue: VecDeque<RoamEvent>,
    started: Instant,
    last_applied: Option<Instant>,
    /// When the current session started (the stall clock before its first
    /// update).
    session_since: Instant,
    stats: RoamStats,
    /// Counters of sessions that ended.
    past: session::Stats,
    /// Set once the roamer has failed for good.
    fatal: Option<String>,
}

impl std::fmt::Debug for Roamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roamer")
            .field("world", &self.config.world)
            .field("relay", &self.relay)
            .field("switches", &self.stats.relay_switches)
            .finish_non_exhaustive()
    }
}

impl Roamer {
    /// Probes `candidates` (named by their probe address, see
    /// [`Candidate`]), connects to the best one that takes the session, and
    /// returns once it has welcomed the client. `endpoint` needs a default
    /// client configuration ([`session::endpoint`]); many roamers may share
    /// one.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        candidates: Vec<Candidate>,
        config: Config,
    ) -> Result<Roamer, RoamError> {
        if candidates.is_empty() {
            return Err(RoamError::NoCandidates);
        }
        let started = Instant::now();
        let guide = config
            .guide
            .clone()
            .and_then(|g| guide_for(&candidates, config.select.max_probed, g));
        let guided = guide.is_some();
        let prober = Prober::start(candidates, config.select.clone(), guide).await?;
        // The first relay to answer is most often the one picked: start its
        // handshake at once, while the others have their chance to answer.
        // Not when guided: the first answers come from relays chosen far
        // apart, to place the client, not to be picked.
        let first = if guided {
            None
        } else {
            prober.first_answer(config.first_pick_timeout).await
        };
        let speculative = first.and_then(|probe| {
            let connect = prober.selector().candidate(probe)?.connect;
            let configs = vec![(probe, config.session(connect))];
            Some((
                probe,
                tokio::spawn(connect_any(endpoint.clone(), configs, None)),
            ))
        });
        prober.first_pick(started, config.first_pick_timeout).await;
        let best = prober.selector().best();
        let mut roamer = Roamer {
            endpoint: endpoint.clone(),
            config,
            prober,
            session: None,
            relay: None,
            orphan: None,
            resume: None,
            attempt: None,
            retry: Backoff::default(),
            pending: None,
            failed: HashMap::new(),
            queue: VecDeque::new(),
            started,
            last_applied: None,
            session_since: started,
            stats: RoamStats::default(),
            past: session::Stats::default(),
            fatal: None,
        };
        if let Some((probe, task)) = speculative {
            if Some(probe) == best {
                if let Ok(Outcome {
                    result: Ok((session, relay)),
                    ..
                }) = task.await
                {
                    roamer.install(session, relay);
                    return Ok(roamer);
                }
            } else {
                task.abort();
            }
        }
        while roamer.session.is_none() {
            roamer.reconnect_step().await?;
        }
        Ok(roamer)
    }

    /// The relay in use, if connected.
    pub fn relay(&self) -> Option<&RelayNow> {
        self.relay.as_ref()
    }

    /// QUIC's RTT estimate to the current relay.
    pub fn rtt(&self) -> Option<Duration> {
        self.session.as_ref().map(Session::rtt)
    }

    /// The current session, if connected.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// What the selector knows of every candidate now.
    pub fn estimates(&self) -> Vec<select::Estimate> {
        self.prober.selector().estimates()
    }

    /// Counters, as of the last [`Roamer::next_event`].
    pub fn stats(&self) -> RoamStats {
        let mut stats = self.stats.clone();
        let mut total = self.past.clone();
        if let Some(session) = &self.session {
            add_stats(&mut total, session.stats());
        }
        stats.session = total;
        let probe = self.prober.selector().stats();
        stats.pings_sent = probe.pings_sent;
        stats.pongs_received = probe.pongs_matched;
        stats
    }

    /// Sends an input through the current session (see
    /// [`Session::send_input`]). Between relays it is dropped and counted
    /// ([`RoamStats::inputs_dropped`]): inputs are latest-wins too.
    pub fn send_input(&mut self, input: &[u8]) -> Result<(), SessionError> {
        match &mut self.session {
            Some(session) => match session.send_input(input) {
                Err(e @ SessionError::InputTooLarge { .. }) => Err(e),
                // A session that just ended shows up at the next event.
                Err(_) => {
                    self.stats.inputs_dropped += 1;
                    Ok(())
                }
                Ok(()) => Ok(()),
            },
            None => {
                if input.len() > proto::msg::MAX_INPUT_LEN {
                    return Err(SessionError::InputTooLarge {
                        len: input.len(),
                        max: proto::msg::MAX_INPUT_LEN,
                    });
                }
                self.stats.inputs_dropped += 1;
                Ok(())
            }
        }
    }

    /// Waits for the next thing that happens, moving between relays as
    /// needed (see the [module documentation](self)).
    ///
    /// Cancel safe: a dropped call loses nothing; a move in progress goes
    /// on at the next call.
    pub async fn next_event(&mut self) -> Result<RoamEvent, RoamError> {
        loop {
            if let Some(why) = &self.fatal {
                return Err(RoamError::NoRelay {
                    attempts: vec![(
                        self.relay.as_ref().map_or(unspecified(), |r| r.addr),
                        why.clone(),
                    )],
                });
            }
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            if self.session.is_none() {
                self.reconnect_step().await?;
                continue;
            }
            let stall = self
                .config
                .stall(self.session.as_ref().map_or(20, |s| s.welcome().tick_rate));
            let stall_at = match self.last_applied {
                Some(last) if last >= self.session_since => last + stall,
                // A new session's first update may be a large keyframe.
                _ => self.session_since + stall.max(self.config.handshake_timeout),
            };
            let probe_changed = self.prober.changed.clone();
            let moving = self.attempt.is_some();
            let watch_switch = self.config.switch_to_better && !moving;
            let session = self.session.as_mut().expect("checked above");
            let attempt = self.attempt.as_mut();
            tokio::select! {
                event = session.next_event() => self.on_session_event(event)?,
                outcome = async { (&mut attempt.expect("guarded").task).await }, if moving => {
                    self.on_attempt(outcome);
                }
                _ = tokio::time::sleep_until(stall_at) => {
                    let why = format!("no update for {} ms", stall.as_millis());
                    self.lose_session(why);
                }
                _ = probe_changed.notified(), if watch_switch => {
                    self.consider_switch();
                }
            }
        }
    }

    /// Closes the current session (and any move in progress). Keep the
    /// endpoint alive until `endpoint.wait_idle()` so relays hear of it.
    pub async fn close(mut self) {
        if let Some(attempt) = self.attempt.take() {
            attempt.task.abort();
        }
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }

    fn on_session_event(
        &mut self,
        event: Result<SessionEvent, SessionError>,
    ) -> Result<(), RoamError> {
        match event {
            Ok(SessionEvent::Applied {
                tick,
                keyframe,
                latency_us,
                events,
            }) => {
                let now = Instant::now();
                if let Some(last) = self.last_applied {
                    let gap = ms(now - last);
                    if gap > self.stats.longest_gap_ms {
                        self.stats.longest_gap_ms = gap;
                    }
                }
                if self.stats.first_update_ms.is_none() {
                    self.stats.first_update_ms = Some(ms(now - self.started));
                }
                if let Some(pending) = self.pending.take() {
                    let to = self.relay.clone().expect("a session has its relay");
                    let gap_from = self.last_applied.unwrap_or(pending.at);
                    if keyframe {
                        self.stats.resumed_with_keyframe += 1;
                    } else {
                        self.stats.resumed_without_keyframe += 1;
                    }
                    let moved = Move {
                        at_unix_ms: pending.at_unix_ms,
                        at_ms: ms(pending.at - self.started),
                        from: pending.from.addr,
                        to: to.addr,
                        from_region: pending.from.region,
                        to_region: to.region,
                        reason: pending.reason,
                        gap_ms: ms(now - gap_from),
                        keyframe,
                        attempts: pending.attempts,
                    };
                    if self.stats.moves.len() == MAX_MOVES_KEPT {
                        self.stats.moves.remove(0);
                    }
                    self.stats.moves.push(moved.clone());
                    self.queue.push_back(RoamEvent::Moved(moved));
                }
                self.last_applied = Some(now);
                self.queue.push_back(RoamEvent::Applied {
                    tick,
                    keyframe,
                    latency_us,
                    events,
                });
            }
            Ok(SessionEvent::Divergence {
                tick,
                expected,
                got,
            }) => self.queue.push_back(RoamEvent::Divergence {
                tick,
                expected,
                got,
            }),
            Ok(SessionEvent::Goaway(goaway)) => {
                tracing::debug!(reason = %goaway.reason, "goaway: moving");
                if self.attempt.is_none() {
                    self.start_move(MoveReason::Goaway);
                }
            }
            Ok(SessionEvent::Closed { code, reason }) => {
                if code.is_some_and(|c| c.retry() == Retry::Never && c != ErrorCode::Normal) {
                    return Err(self.fail(SessionError::Closed { code, reason }));
                }
                self.lose_session(reason);
            }
            Err(error) => {
                if !error.is_retry_safe() {
                    return Err(self.fail(error));
                }
                self.lose_session(error.to_string());
            }
            Ok(SessionEvent::Directory(directory)) => {
                let found = crate::discover::from_directory(&directory);
                for skipped in &found.skipped {
                    tracing::debug!(relay = %skipped.host, reason = %skipped.reason, "directory entry left out");
                }
                let mut selector = self.prober.selector();
                let added = found
                    .candidates
                    .into_iter()
                    .filter(|c| selector.add_candidate(c.clone()))
                    .count();
                drop(selector);
                if added > 0 {
                    tracing::debug!(added, "candidates from the relay's directory");
                    self.stats.directory_candidates += added as u64;
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: SessionError) -> RoamError {
        self.fatal = Some(error.to_string());
        RoamError::Session(error)
    }

    /// The current session is gone: keep its replica and state for the
    /// next relay.
    fn lose_session(&mut self, why: String) {
        let Some(session) = self.session.take() else {
            return;
        };
        tracing::debug!(relay = %session.relay(), %why, "relay lost");
        add_stats(&mut self.past, session.stats());
        if let Some(relay) = &self.relay {
            self.failed.insert(relay.probe, Instant::now());
        }
        self.resume = session.resume_token();
        self.orphan = Some(session.into_replica());
        let from = self.relay.clone();
        if self.pending.is_none()
            && let Some(from) = from
        {
            self.pending = Some(PendingMove {
                at: Instant::now(),
                at_unix_ms: unix_ms(),
                from,
                reason: MoveReason::Lost(why),
                attempts: 0,
            });
        }
        // A make-before-break move in progress carries on: its outcome is
        // taken by `reconnect`.
    }

    /// Asks the selector whether another relay has won clearly enough.
    fn consider_switch(&mut self) {
        let now = std::time::Instant::now();
        let target = self.prober.selector().poll_switch(now);
        if let Some(target) = target
            && self.relay.as_ref().is_some_and(|r| r.probe != target)
        {
            self.start_move_to(vec![target], MoveReason::Better);
        }
    }

    /// Starts a make-before-break move down the failover order.
    fn start_move(&mut self, reason: MoveReason) {
        let order = self.order();
        self.start_move_to(order, reason);
    }

    fn start_move_to(&mut self, order: Vec<SocketAddr>, reason: MoveReason) {
        let Some(session) = &self.session else {
            return;
        };
        if order.is_empty() {
            tracing::debug!(%reason, "no other relay to move to");
            return;
        }
        let replica = session.replica().clone();
        let resume = session.resume_token();
        let configs = self.session_configs(&order, resume);
        let endpoint = self.endpoint.clone();
        let task = tokio::spawn(connect_any(endpoint, configs, Some(replica)));
        self.attempt = Some(Attempt {
            task,
            reason,
            beside: true,
        });
    }

    fn on_attempt(&mut self, outcome: Result<Outcome, tokio::task::JoinError>) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!("a connection attempt failed: {e}");
                return;
            }
        };
        match outcome.result {
            Ok((session, relay)) => {
                let from = self.relay.clone().expect("moving from a relay");
                if let Some(old) = self.session.take() {
                    add_stats(&mut self.past, old.stats());
                    // The old session is closed in the background: its
                    // close frame needs no waiting for.
                    drop(old.into_replica());
                }
                self.pending = Some(PendingMove {
                    at: Instant::now(),
                    at_unix_ms: unix_ms(),
                    from,
                    reason: attempt.reason,
                    attempts: outcome.tried,
                });
                self.install(session, relay);
            }
            Err(errors) => {
                for (addr, error) in &errors {
                    tracing::debug!(%addr, %error, "move failed");
                    self.mark_failed_connect(*addr);
                }
                // The selector took the target as current: it is not.
                let current = self.relay.as_ref().map(|r| r.probe);
                self.prober.selector().set_current(current);
            }
        }
    }

    fn mark_failed_connect(&mut self, connect: SocketAddr) {
        let selector = self.prober.selector();
        let probe = selector
            .candidates()
            .find(|c| c.connect == connect)
            .map(|c| c.addr);
        drop(selector);
        if let Some(probe) = probe {
            self.failed.insert(probe, Instant::now());
        }
    }

    fn install(&mut self, session: Session, relay: RelayNow) {
        let probe = relay.probe;
        self.stats.relay = Some(relay.addr.to_string());
        self.stats.region = Some(relay.region.clone());
        self.stats.relay_id = Some(relay.relay_id.clone());
        if self.relay.is_some() {
            self.stats.relay_switches += 1;
        }
        tracing::debug!(relay = %relay.addr, region = %relay.region, "connected");
        self.relay = Some(relay);
        self.session = Some(session);
        self.session_since = Instant::now();
        self.prober.selector().set_current(Some(probe));
    }

    /// Candidates to try, best first: the selector's failover order minus
    /// the current relay, relays that failed lately after the others, then
    /// candidates that never answered.
    fn order(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let current = self.relay.as_ref().map(|r| r.probe);
        let selector = self.prober.selector();
        let mut order = selector.failover_order();
        for c in selector.candidates() {
            if !order.contains(&c.addr) {
                order.push(c.addr);
            }
        }
        drop(selector);
        order.retain(|a| Some(*a) != current);
        let recently_failed = |a: &SocketAddr| {
            self.failed
                .get(a)
                .is_some_and(|t| now - *t < FAILED_PENALTY)
        };
        let (mut fresh, failed): (Vec<_>, Vec<_>) =
            order.into_iter().partition(|a| !recently_failed(a));
        fresh.extend(failed);
        fresh
    }

    fn session_configs(
        &self,
        order: &[SocketAddr],
        resume: Option<proto::msg::Resume>,
    ) -> Vec<(SocketAddr, session::Config)> {
        let selector = self.prober.selector();
        order
            .iter()
            .filter_map(|probe| {
                let connect = selector.candidate(*probe)?.connect;
                let mut config = self.config.session(connect);
                config.resume = resume.clone();
                Some((*probe, config))
            })
            .collect()
    }

    /// One step towards a session while there is none: waits out the
    /// backoff, starts or awaits a connection attempt down the failover
    /// order, and takes its outcome. Cancel safe: everything in progress
    /// lives in `self` (the attempt in its task, the replica with it).
    async fn reconnect_step(&mut self) -> Result<(), RoamError> {
        if let Some(at) = self.retry.at {
            tokio::time::sleep_until(at).await;
            self.retry.at = None;
        }
        if self.attempt.is_none() {
            self.start_reconnect();
        }
        let attempt = self.attempt.as_mut().expect("started above");
        let outcome = (&mut attempt.task).await;
        let attempt = self.attempt.take().expect("awaited above");
        self.take_reconnect(attempt, outcome)
    }

    fn start_reconnect(&mut self) {
        if self.retry.give_up_at.is_none() {
            self.retry.give_up_at = self.config.give_up_after.map(|d| Instant::now() + d);
            self.retry.backoff = Duration::from_millis(100);
        }
        let order = self.order();
        let resume = self.orphan.as_ref().and(self.resume.clone());
        let configs = self.session_configs(&order, resume);
        let reason = match &self.pending {
            Some(p) => p.reason.clone(),
            None => MoveReason::Lost("not connected".to_owned()),
        };
        let task = tokio::spawn(connect_any(
            self.endpoint.clone(),
            configs,
            self.orphan.take(),
        ));
        self.attempt = Some(Attempt {
            task,
            reason,
            beside: false,
        });
    }

    fn take_reconnect(
        &mut self,
        attempt: Attempt,
        outcome: Result<Outcome, tokio::task::JoinError>,
    ) -> Result<(), RoamError> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                // A panicked attempt took its replica along: the next one
                // joins afresh (a keyframe).
                tracing::warn!("a connection attempt failed: {e}");
                Outcome {
                    result: Err(Vec::new()),
                    replica: None,
                    tried: 0,
                }
            }
        };
        if !attempt.beside {
            // The lost session's replica comes back; a make-before-break
            // attempt's is an older clone and goes.
            self.orphan = outcome.replica.or(self.orphan.take());
        }
        match outcome.result {
            Ok((session, relay)) => {
                if let Some(p) = &mut self.pending {
                    p.attempts += outcome.tried;
                    if attempt.beside {
                        p.reason = attempt.reason;
                    }
                }
                self.orphan = None;
                self.resume = None;
                self.retry = Backoff::default();
                self.install(session, relay);
                Ok(())
            }
            Err(errors) => {
                for (addr, error) in errors {
                    self.mark_failed_connect(addr);
                    if !error.is_retry_safe() {
                        return Err(self.fail(error));
                    }
                    self.retry.answers.insert(addr, error.to_string());
                }
                self.retry.rounds += 1;
                let backoff = self.retry.backoff;
                if self
                    .retry
                    .give_up_at
                    .is_some_and(|t| Instant::now() + backoff >= t)
                {
                    let mut attempts: Vec<_> = self.retry.answers.drain().collect();
                    attempts.sort();
                    tracing::warn!(rounds = self.retry.rounds, "no relay took the session");
                    self.fatal = Some(describe_attempts(&attempts));
                    return Err(RoamError::NoRelay { attempts });
                }
                // Jitter: a crowd of clients losing the same relay should
                // not knock on the next one in lockstep.
                let jitter =
                    jitter_fraction(self.started.elapsed().subsec_nanos() ^ self.retry.rounds);
                self.retry.at = Some(Instant::now() + backoff.mul_f64(0.5 + 0.5 * jitter));
                self.retry.backoff = (backoff * 2).min(MAX_BACKOFF);
                Ok(())
            }
        }
    }
}

impl Drop for Roamer {
    fn drop(&mut self) {
        if let Some(attempt) = &self.attempt {
            attempt.task.abort();
        }
    }
}

/// Tries each relay in turn; the first that welcomes the session wins.
/// With a replica, resumes (the replica goes to the new session); without,
/// joins afresh.
async fn connect_any(
    endpoint: quinn::Endpoint,
    configs: Vec<(SocketAddr, session::Config)>,
    mut replica: Option<Replica>,
) -> Outcome {
    let mut errors = Vec::new();
    let mut tried = 0;
    for (probe, mut config) in configs {
        tried += 1;
        let relay = config.relay;
        let result = match &mut replica {
            Some(replica) if config.resume.is_some() => {
                Session::resume(&endpoint, config, replica).await
            }
            _ => {
                config.resume = None;
                Session::connect(&endpoint, config).await
            }
        };
        match result {
            Ok(session) => {
                let welcome = session.welcome();
                let now = RelayNow {
                    addr: relay,
                    probe,
                    region: welcome.region.clone(),
                    relay_id: welcome.relay_id.clone(),
                };
                return Outcome {
                    result: Ok((session, now)),
                    replica: None,
                    tried,
                };
            }
            Err(error) => {
                tracing::debug!(%relay, %error, "relay did not take the session");
                let fatal = !error.is_retry_safe();
                errors.push((relay, error));
                if fatal {
                    break;
                }
            }
        }
    }
    Outcome {
        result: Err(errors),
        replica,
        tried,
    }
}

/// A guide for `candidates` when more of them publish coordinates than the
/// selector probes at once; `None` otherwise (the selector's own ranking
/// covers the few).
fn guide_for(candidates: &[Candidate], max_probed: usize, config: GuideConfig) -> Option<Guide> {
    let known: Vec<(SocketAddr, proto::msg::Coords)> = candidates
        .iter()
        .filter_map(|c| Some((c.addr, c.coords?)))
        .collect();
    if known.len() <= max_probed.max(1) || config.budget == 0 {
        return None;
    }
    let published = candidates
        .iter()
        .filter_map(|c| Some((c.addr, c.origin_rtt?)));
    Some(Guide::new(config, known).with_origin_rtts(published))
}

/// The probing task and the selector it drives.
struct Prober {
    selector: Arc<Mutex<Selector>>,
    /// Notified after every batch of probe traffic (a pong, a timeout).
    changed: Arc<Notify>,
    /// While a [`Guide`] steers the first rounds.
    guiding: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Prober {
    async fn start(
        candidates: Vec<Candidate>,
        config: select::Config,
        guide: Option<Guide>,
    ) -> std::io::Result<Prober> {
        let v6 = candidates.iter().any(|c| c.addr.is_ipv6());
        let bind: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            ([0, 0, 0, 0], 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        let selector = Arc::new(Mutex::new(Selector::new(
            config,
            candidates,
            std::time::Instant::now(),
        )));
        let changed = Arc::new(Notify::new());
        // Started before the selector's first transmit, as the guide needs.
        let guide = guide.and_then(|mut g| {
            let mut s = selector.lock().unwrap_or_else(|e| e.into_inner());
            (g.start(&mut s, std::time::Instant::now()) > 0).then_some(g)
        });
        let guiding = Arc::new(AtomicBool::new(guide.is_some()));
        let task = tokio::spawn(probe_loop(
            socket,
            v6,
            selector.clone(),
            changed.clone(),
            guide.map(|g| (g, guiding.clone())),
        ));
        Ok(Prober {
            selector,
            changed,
            guiding,
            task,
        })
    }

    fn selector(&self) -> MutexGuard<'_, Selector> {
        self.selector.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the first live answer of a probed candidate, at most
    /// `timeout`; returns that candidate.
    async fn first_answer(&self, timeout: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let first = self
                .selector()
                .estimates()
                .into_iter()
                .filter(|e| e.alive)
                .min_by_key(|e| e.rtt_min)
                .map(|e| e.addr);
            if first.is_some() {
                return first;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Waits until the first round's answers are enough to pick (see the
    /// module documentation), or `timeout` after `start` (when the prober
    /// started: the first pings went then, all together).
    async fn first_pick(&self, start: Instant, timeout: Duration) {
        let deadline = start + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Guided: the guide's last round decides (it ends on a
            // completed round, so the pick has every answer it asked for).
            let mut until = deadline;
            if !self.guiding.load(Ordering::Acquire) {
                let wait_until = {
                    let selector = self.selector();
                    let estimates = selector.estimates();
                    let probed: Vec<_> = estimates.iter().filter(|e| e.probed).collect();
                    let best = probed
                        .iter()
                        .filter(|e| e.alive)
                        .filter_map(|e| e.rtt_min)
                        .min();
                    match best {
                        Some(_) if probed.iter().all(|e| e.answered) => return,
                        // The first pings went together at `start` (see
                        // `select`): a relay silent at 1.5 x the best RTT
                        // is slower than the best by half of it at least.
                        Some(best) => start + best + best / 2 + Duration::from_millis(2),
                        None => deadline,
                    }
                };
                until = wait_until.min(deadline);
                if Instant::now() >= until || selector_round_done(&self.selector) {
                    return;
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

fn selector_round_done(selector: &Mutex<Selector>) -> bool {
    selector
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .rounds_completed()
        >= 1
}

/// Drives the selector over one UDP socket for as long as the roamer lives.
async fn probe_loop(
    socket: UdpSocket,
    v6: bool,
    selector: Arc<Mutex<Selector>>,
    changed: Arc<Notify>,
    mut guide: Option<(Guide, Arc<AtomicBool>)>,
) {
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::with_capacity(proto::msg::PING_LEN);
    let mut pings = Vec::new();
    loop {
        let wake = {
            let mut s = selector.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            s.handle_timeout(now);
            if let Some((g, guiding)) = guide.as_mut() {
                g.poll(&mut s, now);
                if g.is_done() {
                    guiding.store(false, Ordering::Release);
                    guide = None;
                }
            }
            while let Some(ping) = s.poll_transmit(now) {
                pings.push(ping);
            }
            s.poll_timeout()
        };
        for (to, ping) in pings.drain(..) {
            out.clear();
            if Message::Ping(ping).encode_datagram(&mut out).is_err() {
                continue;
            }
            let to = if v6 { select::mapped(to) } else { to };
            if let Err(e) = socket.send_to(&out, to).await {
                // Counted as lost when it times out.
                tracing::trace!(%to, error = %e, "ping not sent");
            }
        }
        changed.notify_waiters();
        // A selector always has a next timeout while it probes; a minute is
        // only a bound against a bug.
        let wake = wake
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => {
                    if let Ok(Message::Pong(pong)) = Message::decode_datagram(&buf[..len], VERSION) {
                        let from = select::canonical(from);
                        selector
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .handle_pong(from, &pong, std::time::Instant::now());
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "probe socket receive error");
                    // An ICMP error surfaces here on some systems: do not spin.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn unspecified() -> SocketAddr {
    ([0, 0, 0, 0], 0).into()
}

/// Adds the counters of `s` to `total` (the tick and its latency
/// histogram too).
fn add_stats(total: &mut session::Stats, s: &session::Stats) {
    total.ticks_applied += s.ticks_applied;
    total.hash_checked += s.hash_checked;
    total.divergences += s.divergences;
    total.keyframes += s.keyframes;
    total.bytes_received += s.bytes_received;
    total.updates_received += s.updates_received;
    total.updates_on_streams += s.updates_on_streams;
    total.stale += s.stale;
    total.missing_base += s.missing_base;
    total.decode_errors += s.decode_errors;
    total.superseded += s.superseded;
    total.overflowed += s.overflowed;
    total.stream_resets += s.stream_resets;
    total.streams_truncated += s.streams_truncated;
    total.acks_sent += s.acks_sent;
    total.inputs_sent += s.inputs_sent;
    total.inputs_deferred += s.inputs_deferred;
    total.tick = s.tick.max(total.tick);
    total.latency_ms.merge(&s.latency_ms);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A number in [0, 1) from a few bits of noise (splitmix64's finalizer).
fn jitter_fraction(seed: u32) -> f64 {
    let mut z = u64::from(seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
