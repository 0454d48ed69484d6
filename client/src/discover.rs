//! Relay discovery through DNS.
//!
//! A statecast network publishes its relays under one domain:
//!
//! ```text
//! _statecast._udp.example.net.  30 IN SRV 10 50 4434 relay1.example.net.
//! relay1.example.net.           30 IN TXT "region=eu-west" "probe=4435" "v=1"
//! relay1.example.net.           30 IN A   192.0.2.10
//! ```
//!
//! - each SRV record names a relay: its host and QUIC port;
//! - a TXT record at that host carries `key=value` strings (one per
//!   string, or several in one string separated by spaces): `probe=PORT`,
//!   the UDP probe port (required: a relay that cannot be probed cannot be
//!   chosen); `region=NAME`; `v=N`, the protocol version (relays that speak
//!   another version than this client are skipped); `coords=X,Y,H`, network
//!   coordinates in milliseconds; `origin=MS`, the relay's RTT to its
//!   origin in milliseconds (what its pongs report; a client ranks relays it
//!   has not probed by predicted RTT plus this, see
//!   [`Guide::with_origin_rtts`](crate::coords::Guide::with_origin_rtts)).
//!   Unknown keys are ignored;
//! - the host's A/AAAA records give its address.
//!
//! A relay whose records are incomplete is skipped with the reason
//! ([`Discovery::skipped`]); the lookup fails only when the domain has no
//! relays at all, and then says why ([`DiscoverError`]): no such name, no
//! SRV records, a timeout (never a hang: the whole discovery has one
//! deadline), or another DNS error. TTLs are respected: the resolver caches
//! records no longer than their TTL, and [`Discovery::valid_until`] says
//! when the answer expires, so a long-running client asks again then.
//!
//! The other two sources of candidates: a relay's [`Directory`] (sent on
//! the control stream, [`SessionEvent::Directory`](crate::SessionEvent)),
//! through [`from_directory`] (literal addresses only, no lookups) or
//! [`Discoverer::from_directory`] (host names resolved by the deadline), and
//! a static list, through [`from_static`]. Entries that cannot be used are
//! skipped with the reason ([`Candidates::skipped`]), never fatal.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use proto::msg::{Coords, Directory, MAX_ADDR_LEN, MAX_RELAYS, VERSION};
use tokio::task::JoinSet;

use crate::select::Candidate;

/// The service label relays are published under: `_statecast._udp.DOMAIN`.
pub const SERVICE: &str = "_statecast._udp";

/// Why discovery found no relays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// The domain is not a valid DNS name.
    #[error("{domain:?} is not a valid domain name: {reason}")]
    BadName {
        /// The domain given.
        domain: String,
        /// Why.
        reason: String,
    },
    /// The name does not exist (NXDOMAIN).
    #[error("no such name: {name}")]
    NoSuchName {
        /// The name asked for.
        name: String,
    },
    /// The name exists but has no SRV records (or only the "." target,
    /// which says that the service is not offered there).
    #[error("no relays published at {name} (no SRV records)")]
    NoRecords {
        /// The name asked for.
        name: String,
    },
    /// No answer before the deadline.
    #[error("DNS lookup of {name} timed out after {after:?}")]
    Timeout {
        /// The name asked for.
        name: String,
        /// The deadline.
        after: Duration,
    },
    /// Every relay published was unusable; the reasons, by host.
    #[error("no usable relay at {name}: {}", describe(.skipped))]
    NoUsableRelay {
        /// The name asked for.
        name: String,
        /// Each relay and why it was skipped.
        skipped: Vec<Skipped>,
    },
    /// The DNS server could not be reached or answered with an error.
    #[error("DNS lookup of {name} failed: {source}")]
    Dns {
        /// The name asked for.
        name: String,
        /// The resolver's error.
        source: NetError,
    },
    /// The system's resolver configuration could not be read.
    #[error("cannot read the system's DNS configuration: {0}")]
    SystemConfig(NetError),
}

fn describe(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(|s| format!("{}: {}", s.host, s.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A relay found in DNS.
#[derive(Clone, Debug, PartialEq)]
pub struct Relay {
    /// Its host name (the SRV target, without the final dot).
    pub host: String,
    /// Its QUIC address.
    pub connect: SocketAddr,
    /// Its UDP probe address.
    pub probe: SocketAddr,
    /// Its region, if published.
    pub region: Option<String>,
    /// The protocol version it published, if any.
    pub version: Option<u32>,
    /// Its network coordinates, if published.
    pub coords: Option<Coords>,
    /// Its RTT to the origin, if published (TXT `origin=MS`).
    pub origin_rtt: Option<Duration>,
    /// SRV priority (lower first).
    pub priority: u16,
    /// SRV weight.
    pub weight: u16,
}

impl Relay {
    /// The relay as a [`Selector`](crate::select::Selector) candidate, with
    /// an RTT estimate if the caller has one (from coordinates or region).
    pub fn candidate(&self, hint: Option<Duration>) -> Candidate {
        Candidate {
            addr: self.probe,
            connect: self.connect,
            region: self.region.clone(),
            hint,
            coords: self.coords,
            origin_rtt: self.origin_rtt,
        }
    }
}

/// A relay left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its host name.
    pub host: String,
    /// Why it was left out.
    pub reason: String,
}

/// What a discovery found.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// Usable relays, by SRV priority, then weight (heaviest first).
    pub relays: Vec<Relay>,
    /// Published relays that were left out.
    pub skipped: Vec<Skipped>,
    /// When the first record used expires: discover again after this.
    pub valid_until: Instant,
}

/// Looks relays up in DNS.
#[derive(Clone)]
pub struct Discoverer {
    resolver: TokioResolver,
    deadline: Duration,
}

impl std::fmt::Debug for Discoverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discoverer")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Route candidates from a directory or a static list, and the entries left
/// out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    /// Usable candidates, in the order given (duplicates of a probe address
    /// dropped).
    pub candidates: Vec<Candidate>,
    /// Entries left out, and why (`host` is the relay id for a directory
    /// entry, the entry itself for a static one).
    pub skipped: Vec<Skipped>,
}

/// A `host:port` string: a literal address, or a name to look up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPort {
    Addr(SocketAddr),
    Name(String, u16),
}

/// Parses `host:port` (`[v6]:port` for IPv6); never looks anything up.
fn host_port(s: &str) -> Result<HostPort, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty address".into());
    }
    if s.len() > MAX_ADDR_LEN {
        return Err(format!("address longer than {MAX_ADDR_LEN} bytes"));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err(format!("port 0 in {s:?}"))
        } else {
            Ok(HostPort::Addr(addr))
        };
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port in {s:?}"))?;
    // A name: letters, digits, '-', '.', '_' (no brackets, colons, spaces).
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid || Name::from_utf8(host).is_err() {
        return Err(format!("{host:?} is neither an IP address nor a host name"));
    }
    Ok(HostPort::Name(host.trim_end_matches('.').to_owned(), port))
}

/// One entry to turn into a candidate.
struct Entry {
    label: String,
    connect: HostPort,
    probe: HostPort,
    region: Option<String>,
    coords: Option<Coords>,
    origin_rtt: Option<Duration>,
}

/// Parses a directory's entries (at most [`MAX_RELAYS`], as the decoder
/// allows), skipping the malformed ones.
fn directory_entries(directory: &Directory, skipped: &mut Vec<Skipped>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for relay in directory.relays.iter().take(MAX_RELAYS) {
        let label = if relay.id.is_empty() {
            relay.addr.clone()
        } else {
            relay.id.clone()
        };
        let skip = |reason: String| Skipped {
            host: label.clone(),
            reason,
        };
        let parsed = host_port(&relay.addr)
            .map_err(|e| format!("address: {e}"))
            .and_then(|connect| {
                if relay.probe_addr.trim().is_empty() {
                    return Err("no probe address: it cannot be probed".into());
                }
                let probe =
                    host_port(&relay.probe_addr).map_err(|e| format!("probe address: {e}"))?;
                Ok((connect, probe))
            });
        match parsed {
            Ok((connect, probe)) => entries.push(Entry {
                label: label.clone(),
                connect,
                probe,
                region: (!relay.region.is_empty()).then(|| relay.region.clone()),
                coords: relay.coords.filter(|c| c.iter().all(|v| v.is_finite())),
                origin_rtt: (relay.origin_rtt_us != u32::MAX)
                    .then(|| Duration::from_micros(relay.origin_rtt_us.into())),
            }),
            Err(reason) => skipped.push(skip(reason)),
        }
    }
    entries
}

/// Parses static entries: `CONNECT` (the probe port is the next one, as a
/// relay's defaults are: 4434 and 4435), `CONNECT/PROBE_PORT` or
/// `CONNECT/PROBE_HOST:PORT`.
fn static_entries(list: &[&str], skipped: &mut Vec<Skipped>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for item in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let parsed = (|| {
            let (connect, probe) = match item.split_once('/') {
                Some((c, p)) => (c, Some(p.trim())),
                None => (item, None),
            };
            let connect = host_port(connect)?;
            let port = match &connect {
                HostPort::Addr(a) => a.port(),
                HostPort::Name(_, p) => *p,
            };
            let with_port = |p: u16| match &connect {
                HostPort::Addr(a) => HostPort::Addr(SocketAddr::new(a.ip(), p)),
                HostPort::Name(n, _) => HostPort::Name(n.clone(), p),
            };
            let probe = match probe {
                None => with_port(
                    port.checked_add(1)
                        .ok_or_else(|| format!("no port after {port} for the probe"))?,
                ),
                Some(p) => match p.parse::<u16>() {
                    Ok(0) => return Err("probe port 0".to_string()),
                    Ok(p) => with_port(p),
                    Err(_) => host_port(p).map_err(|e| format!("probe address: {e}"))?,
                },
            };
            Ok((connect, probe))
        })();
        match parsed {
            Ok((connect, probe)) => entries.push(Entry {
                label: item.to_owned(),
                connect,
                probe,
                region: None,
                coords: None,
                origin_rtt: None,
            }),
            Err(reason) => skipped.push(Skipped {
                host: item.to_owned(),
                reason,
            }),
        }
    }
    entries
}

/// Builds candidates from entries, addresses looked up in `resolved`.
fn build(
    entries: Vec<Entry>,
    resolved: &std::collections::HashMap<String, Result<IpAddr, String>>,
    mut skipped: Vec<Skipped>,
) -> Candidates {
    let lookup = |hp: &HostPort| -> Result<SocketAddr, String> {
        match hp {
            HostPort::Addr(a) => Ok(*a),
            HostPort::Name(name, port) => match resolved.get(name) {
                Some(Ok(ip)) => Ok(SocketAddr::new(*ip, *port)),
                Some(Err(e)) => Err(format!("{name}: {e}")),
                None => Err(format!(
                    "{name} is a host name: it needs a DNS lookup \
                     (a Discoverer resolves names)"
                )),
            },
        }
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut seen = HashSet::new();
    for entry in entries {
        match lookup(&entry.connect).and_then(|c| Ok((c, lookup(&entry.probe)?))) {
            Ok((connect, probe)) => {
                if seen.insert(probe) {
                    candidates.push(Candidate {
                        region: entry.region,
                        coords: entry.coords,
                        origin_rtt: entry.origin_rtt,
                        ..Candidate::new(probe, connect)
                    });
                } else {
                    skipped.push(Skipped {
                        host: entry.label,
                        reason: format!("probe address {probe} listed twice"),
                    });
                }
            }
            Err(reason) => skipped.push(Skipped {
                host: entry.label,
                reason,
            }),
        }
    }
    Candidates {
        candidates,
        skipped,
    }
}

fn names(entries: &[Entry]) -> Vec<String> {
    let mut names: Vec<String> = entries
        .iter()
        .flat_map(|e| [&e.connect, &e.probe])
        .filter_map(|hp| match hp {
            HostPort::Name(n, _) => Some(n.clone()),
            HostPort::Addr(_) => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Candidates from a relay's directory, without any lookup: entries whose
/// addresses are IP literals become candidates (probe address, client
/// address, region); entries naming hosts are skipped with the reason (use
/// [`Discoverer::from_directory`] to resolve them), as are malformed ones
/// (no probe address, no port, not an address).
pub fn from_directory(directory: &Directory) -> Candidates {
    let mut skipped = Vec::new();
    let entries = directory_entries(directory, &mut skipped);
    build(entries, &Default::default(), skipped)
}

/// Candidates from a static list, without any lookup. Each entry is a
/// relay's client address `IP:PORT`, optionally followed by its probe
/// address: `/PORT` (same host) or `/IP:PORT`; without it, the probe port
/// is the next port (a relay's defaults: 4434 and 4435). Entries naming
/// hosts, and malformed ones, are skipped with the reason.
pub fn from_static(list: &[&str]) -> Candidates {
    let mut skipped = Vec::new();
    let entries = static_entries(list, &mut skipped);
    build(entries, &Default::default(), skipped)
}

/// Resolver options: `deadline` bounds a whole discovery; each query gets a
/// third of it per attempt, two attempts.
fn options(deadline: Duration) -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.timeout = (deadline / 3).max(Duration::from_millis(50));
    opts.attempts = 2;
    opts
}

impl Discoverer {
    /// Asks the name servers of the system's configuration
    /// (`/etc/resolv.conf`); `deadline` bounds each discovery.
    pub fn system(deadline: Duration) -> Result<Discoverer, DiscoverError> {
        let mut builder = TokioResolver::builder(TokioRuntimeProvider::default())
            .map_err(DiscoverError::SystemConfig)?;
        let wanted = options(deadline);
        let opts = builder.options_mut();
        opts.timeout = wanted.timeout;
        opts.attempts = wanted.attempts;
        let resolver = builder.build().map_err(DiscoverError::SystemConfig)?;
        Ok(Discoverer { resolver, deadline })
    }

    /// Asks the name server at `server` only (UDP, falling back to TCP for
    /// truncated answers); `deadline` bounds each discovery.
    pub fn with_server(server: SocketAddr, deadline: Duration) -> Discoverer {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
        let mut opts = options(deadline);
        // Only what the server says: no /etc/hosts.
        opts.use_hosts_file = ResolveHosts::Never;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![name_server]),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .expect("a resolver with an explicit name server always builds");
        Discoverer { resolver, deadline }
    }

    /// Candidates from a relay's directory, like [`from_directory`], with
    /// host names looked up (A/AAAA, first address) through this
    /// discoverer's name servers. All lookups together end by the deadline;
    /// a name that fails or does not answer in time is skipped with the
    /// reason, the others are kept.
    pub async fn from_directory(&self, directory: &Directory) -> Candidates {
        let mut skipped = Vec::new();
        let entries = directory_entries(directory, &mut skipped);
        let resolved = self.resolve_names(names(&entries)).await;
        build(entries, &resolved, skipped)
    }

    /// Candidates from a static list, like [`from_static`], with host names
    /// looked up as [`Discoverer::from_directory`] does.
    pub async fn from_static(&self, list: &[&str]) -> Candidates {
        let mut skipped = Vec::new();
        let entries = static_entries(list, &mut skipped);
        let resolved = self.resolve_names(names(&entries)).await;
        build(entries, &resolved, skipped)
    }

    async fn resolve_names(
        &self,
        names: Vec<String>,
    ) -> std::collections::HashMap<String, Result<IpAddr, String>> {
        let mut lookups = JoinSet::new();
        for name in names.iter().cloned() {
            let resolver = self.resolver.clone();
            let deadline = self.deadline;
            lookups.spawn(async move {
                // Fully qualified: no search domains.
                let fqdn = format!("{name}.");
                let result = match tokio::time::timeout(deadline, resolver.lookup_ip(fqdn)).await {
                    Ok(Ok(ips)) => ips.iter().next().ok_or_else(|| "no address".to_string()),
                    Ok(Err(e)) => Err(classify(&name, deadline, e).to_string()),
                    Err(_) => Err(format!("no address within {deadline:?}")),
                };
                (name, result)
            });
        }
        let mut resolved: std::collections::HashMap<String, Result<IpAddr, String>> = names
            .into_iter()
            .map(|n| {
                let e = Err(format!("no address within {:?}", self.deadline));
                (n, e)
            })
            .collect();
        let collect = async {
            while let Some(joined) = lookups.join_next().await {
                if let Ok((name, result)) = joined {
                    resolved.insert(name, result);
                }
            }
        };
        // Each lookup has its own timeout; this bounds the whole set too.
        let _ = tokio::time::timeout(self.deadline + Duration::from_millis(100), collect).await;
        resolved
    }

    /// The relays published for `domain` (under `_statecast._udp.DOMAIN`).
    pub async fn discover(&self, domain: &str) -> Result<Discovery, DiscoverError> {
        let name = service_name(domain)?;
        let shown = name.to_utf8();
        match tokio::time::timeout(self.deadline, self.lookup(name)).await {
            Ok(result) => result,
            Err(_) => Err(DiscoverError::Timeout {
                name: shown,
                after: self.deadline,
            }),
        }
    }

    async fn lookup(&self, name: Name) -> Result<Discovery, DiscoverError> {
        let shown = name.to_utf8();
        let srv = self
            .resolver
            .srv_lookup(name)
            .await
            .map_err(|e| classify(&shown, self.deadline, e))?;
        let mut valid_until = srv.valid_until();
        let mut targets: Vec<(u16, u16, u16, Name)> = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                // RFC 2782: a target of "." means "not offered here".
                RData::SRV(s) if !s.target.is_root() => {
                    Some((s.priority, s.weight, s.port, s.target.clone()))
                }
                _ => None,
            })
            .collect();
        if targets.is_empty() {
            return Err(DiscoverError::NoRecords { name: shown });
        }
        targets.sort_by_key(|t| (t.0, std::cmp::Reverse(t.1)));
        let mut seen = HashSet::new();
        targets.retain(|t| seen.insert((t.3.clone(), t.2)));
        targets.truncate(MAX_RELAYS);

        let mut lookups = JoinSet::new();
        for (i, (priority, weight, port, target)) in targets.into_iter().enumerate() {
            let resolver = self.resolver.clone();
            let deadline = self.deadline;
            lookups.spawn(async move {
                let found = relay(&resolver, deadline, priority, weight, port, target).await;
                (i, found)
            });
        }
        let mut found = Vec::new();
        while let Some(joined) = lookups.join_next().await {
            found.push(joined.expect("relay lookups do not panic"));
        }
        found.sort_by_key(|(i, _)| *i);
        let mut relays = Vec::new();
        let mut skipped = Vec::new();
        for (_, result) in found {
            match result {
                Ok((relay, until)) => {
                    valid_until = valid_until.min(until);
                    relays.push(relay);
                }
                Err(skip) => skipped.push(skip),
            }
        }
        if relays.is_empty() {
            return Err(DiscoverError::NoUsableRelay {
                name: shown,
                skipped,
            });
        }
        Ok(Discovery {
            relays,
            skipped,
            valid_until,
        })
    }
}

/// `_statecast._udp.DOMAIN.`, fully qualified (no search domains).
fn service_name(domain: &str) -> Result<Name, DiscoverError> {
    let domain = domain.trim().trim_end_matches('.');
    let bad = |reason: String| DiscoverError::BadName {
        domain: domain.to_string(),
        reason,
    };
    if domain.is_empty() {
        return Err(bad("empty".into()));
    }
    Name::from_utf8(format!("{SERVICE}.{domain}.")).map_err(|e| bad(e.to_string()))
}

fn classify(name: &str, deadline: Duration, e: NetError) -> DiscoverError {
    if e.is_nx_domain() {
        DiscoverError::NoSuchName {
            name: name.to_string(),
        }
    } else if e.is_no_records_found() {
        DiscoverError::NoRecords {
            name: name.to_string(),
        }
    } else if matches!(e, NetError::Timeout) {
        DiscoverError::Timeout {
            name: name.to_string(),
            after: deadline,
        }
    } else {
        DiscoverError::Dns {
            name: name.to_string(),
            source: e,
        }
    }
}

/// What a relay's TXT records say.
#[derive(Default, Debug, PartialEq)]
struct Txt {
    probe: Option<u16>,
    region: Option<String>,
    version: Option<u32>,
    coords: Option<Coords>,
    origin_rtt: Option<Duration>,
}

/// Parses `key=value` strings (several per string, separated by spaces).
/// The first value of a key wins; bad values are reported.
fn parse_txt<'a>(strings: impl IntoIterator<Item = &'a [u8]>) -> Result<Txt, String> {
    let mut txt = Txt::default();
    for string in strings {
        let string = String::from_utf8_lossy(string);
        for pair in string.split_whitespace() {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            match key {
                "probe" if txt.probe.is_none() => {
                    let port = value
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("bad probe port {value:?}"))?;
                    txt.probe = Some(port);
                }
                "region" if txt.region.is_none() => {
                    if value.is_empty() || value.len() > proto::msg::MAX_REGION_LEN {
                        return Err(format!("bad region {value:?}"));
                    }
                    txt.region = Some(value.to_string());
                }
                "v" if txt.version.is_none() => {
                    let v = value
                        .parse::<u32>()
                        .map_err(|_| format!("bad protocol version {value:?}"))?;
                    txt.version = Some(v);
                }
                "coords" if txt.coords.is_none() => {
                    let parts: Vec<f32> = value
                        .split(',')
                        .map(|p| p.parse::<f32>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| format!("bad coordinates {value:?}"))?;
                    match parts[..] {
                        [x, y, h] if parts.iter().all(|v| v.is_finite()) => {
                            txt.coords = Some([x, y, h]);
                        }
                        _ => return Err(format!("bad coordinates {value:?}")),
                    }
                }
                "origin" if txt.origin_rtt.is_none() => {
                    let ms = value
                        .parse::<f64>()
                        .ok()
                        .filter(|ms| {
                            ms.is_finite() && (0.0..=crate::coords::MAX_RTT_MS).contains(ms)
                        })
                        .ok_or_else(|| format!("bad origin RTT {value:?}"))?;
                    txt.origin_rtt = Some(Duration::from_secs_f64(ms / 1000.0));
                }
                _ => {}
            }
        }
    }
    Ok(txt)
}

/// Looks up one relay's TXT and address records.
async fn relay(
    resolver: &TokioResolver,
    deadline: Duration,
    priority: u16,
    weight: u16,
    port: u16,
    target: Name,
) -> Result<(Relay, Instant), Skipped> {
    let host = target.to_utf8().trim_end_matches('.').to_string();
    let skip = |reason: String| Skipped {
        host: host.clone(),
        reason,
    };
    let (txt, ips) = tokio::join!(
        resolver.txt_lookup(target.clone()),
        resolver.lookup_ip(target.clone())
    );
    let txt = txt.map_err(|e| skip(format!("TXT: {}", classify(&host, deadline, e))))?;
    let ips = ips.map_err(|e| skip(format!("address: {}", classify(&host, deadline, e))))?;
    let strings = txt.answers().iter().flat_map(|r| match &r.data {
        RData::TXT(t) => t.txt_data.iter().map(|s| &s[..]).collect::<Vec<_>>(),
        _ => Vec::new(),
    });
    let parsed = parse_txt(strings).map_err(|e| skip(format!("TXT: {e}")))?;
    if let Some(v) = parsed.version
        && v != VERSION
    {
        return Err(skip(format!(
            "speaks protocol version {v}, this client {VERSION}"
        )));
    }
    let probe = parsed
        .probe
        .ok_or_else(|| skip("no probe port in its TXT record (probe=PORT)".into()))?;
    let ip: IpAddr = ips.iter().next().ok_or_else(|| skip("no address".into()))?;
    if port == 0 {
        return Err(skip("SRV port 0".into()));
    }
    let relay = Relay {
        host: host.clone(),
        connect: SocketAddr::new(ip, port),
        probe: SocketAddr::new(ip, probe),
        region: parsed.region,
        version: parsed.version,
        coords: parsed.coords,
        origin_rtt: parsed.origin_rtt,
        priority,
        weight,
    };
    Ok((relay, txt.valid_until().min(ips.valid_until())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(strings: &[&str]) -> Result<Txt, String> {
        parse_txt(strings.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn txt_strings_are_key_value_pairs() {
        let t = txt(&[
            "region=eu-west",
            "probe=4435 v=1",
            "coords=1.5,-2,0.25 other=x origin=12.5",
        ])
        .unwrap();
        assert_eq!(
            t,
            Txt {
                probe: Some(4435),
                region: Some("eu-west".into()),
                version: Some(1),
                coords: Some([1.5, -2.0, 0.25]),
                origin_rtt: Some(Duration::from_micros(12_500)),
            }
        );
        // The first value wins; words without '=' are ignored.
        let t = txt(&["probe=1 probe=2 hello"]).unwrap();
        assert_eq!(t.probe, Some(1));
        assert_eq!(txt(&[]).unwrap(), Txt::default());
        for bad in [
            "probe=0",
            "probe=70000",
            "probe=x",
            "v=-1",
            "coords=1,2",
            "coords=1,2,NaN",
            "coords=a,b,c",
            "origin=-1",
            "origin=NaN",
            "origin=fast",
            "origin=1e9",
            "region=",
        ] {
            assert!(txt(&[bad]).is_err(), "{bad}");
        }
        let long = format!("region={}", "x".repeat(proto::msg::MAX_REGION_LEN + 1));
        assert!(txt(&[&long]).is_err());
    }

    #[test]
    fn service_names_are_fully_qualified() {
        assert_eq!(
            service_name("zone.test").unwrap().to_utf8(),
            "_statecast._udp.zone.test."
        );
        assert_eq!(
            service_name("zone.test.").unwrap().to_utf8(),
            "_statecast._udp.zone.test."
        );
        assert!(matches!(
            service_name(" "),
            Err(DiscoverError::BadName { .. })
        ));
        assert!(matches!(
            service_name(&"a".repeat(300)),
            Err(DiscoverError::BadName { .. })
        ));
    }
}
