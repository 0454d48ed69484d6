//! The servers under test: a relay (a `statecast relay` process, or in this
//! process for the smoke test) and the floor server (a `fanout
//! --floor-server` process, or a task).

use super::floor::{self, FloorConfig};
use super::procfs::{ChildGuard, cpu_seconds, rss_bytes};
use super::prom::http_get;
use anyhow::{Context, anyhow, bail};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where the servers run.
#[derive(Clone, Debug)]
pub enum Runner {
    /// Separate processes, so their CPU and memory are theirs alone.
    Processes {
        /// The `statecast` binary (runs `statecast relay`).
        relay_bin: PathBuf,
        /// The bench binary (runs `fanout --floor-server`).
        floor_bin: PathBuf,
    },
    /// Inside the bench process (the smoke test): CPU and memory are the
    /// whole process's, so the figures only show that the tool works.
    InProcess,
}

enum Hold {
    Child(ChildGuard),
    Relay(Box<relay::RelayHandle>),
    Floor {
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    },
}

/// A running server under test.
pub struct Server {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Admin HTTP (relays only).
    pub admin: Option<SocketAddr>,
    /// Process whose CPU and memory are measured.
    pub pid: u32,
    /// Log file of a server process.
    pub log: Option<PathBuf>,
    /// The server process's nice value when it started (`None` in process).
    pub nice: Option<i32>,
    hold: Hold,
}

/// The nice value of process `pid` (its main thread), if it can be read.
fn nice_of(pid: u32) -> Option<i32> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::getpriority_process(Some(pid)).ok()
}

impl Server {
    /// CPU seconds the server's process has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid)
    }

    /// Resident memory of the server's process.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid)
    }

    /// Fails if a server process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Hold::Child(child) = &mut self.hold
            && let Some(status) = child.exited()
        {
            bail!(
                "{} exited ({status}){}",
                child.what(),
                log_tail(self.log.as_deref())
            );
        }
        Ok(())
    }

    /// Stops the server (kills a process).
    pub async fn stop(self) {
        match self.hold {
            Hold::Child(child) => drop(child),
            Hold::Relay(handle) => handle.shutdown().await,
            Hold::Floor { stop, task } => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            }
        }
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(log: Option<&Path>) -> String {
    let Some(path) = log else {
        return String::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n  ");
    if tail.is_empty() {
        format!("; its log {} is empty", path.display())
    } else {
        format!("; last lines of {}:\n  {tail}", path.display())
    }
}

/// A free port on 127.0.0.1 (UDP or TCP): bound, read and released. Another
/// process could take it in between; the callers retry on bind failures.
fn free_port(udp: bool) -> anyhow::Result<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    };
    Ok(port)
}

/// A command without any `STATECAST_*` variable of the bench's environment,
/// which would override the configuration given.
fn clean_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STATECAST_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// What a relay under test is configured with.
#[derive(Clone, Debug)]
pub struct RelaySpec {
    /// The origin's upstream address.
    pub upstream: SocketAddr,
    /// Development CA directory.
    pub data_dir: PathBuf,
    /// Share encoded chunks between clients.
    pub chunk_cache: bool,
    /// Interest cell size.
    pub cell_size: f64,
    /// How the relay schedules its fan-out threads.
    pub fanout_priority: relay::priority::Priority,
    /// Name of the run, for file names (`relay-1000`).
    pub name: String,
}

impl RelaySpec {
    fn config(&self, listen: SocketAddr, admin: SocketAddr) -> relay::Config {
        relay::Config {
            id: "bench-relay".into(),
            listen,
            upstream: self.upstream,
            upstream_name: "localhost".into(),
            admin,
            // Any free port: the default one may be taken by another relay
            // on this machine (nothing probes this relay).
            probe: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            cell_size: self.cell_size,
            max_clients: 100_000,
            chunk_cache: self.chunk_cache,
            fanout_realtime: self.fanout_priority.realtime,
            fanout_nice: self.fanout_priority.nice,
            data_dir: Some(self.data_dir.clone()),
            ..relay::Config::default()
        }
    }
}

/// Starts a relay.
pub async fn start_relay(runner: &Runner, spec: &RelaySpec) -> anyhow::Result<Server> {
    let bin = match runner {
        Runner::InProcess => {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let handle = relay::start(spec.config(any, any))
                .await
                .context("in-process relay failed to start")?;
            return Ok(Server {
                addr: handle.client_addr,
                admin: Some(handle.admin_addr),
                pid: std::process::id(),
                log: None,
                nice: None,
                hold: Hold::Relay(Box::new(handle)),
            });
        }
        Runner::Processes { relay_bin, .. } => relay_bin,
    };
    let mut last = anyhow!("not started");
    for attempt in 0..3 {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
        let config = spec.config(listen, admin);
        let path = spec.data_dir.join(format!("{}-{attempt}.toml", spec.name));
        let text = toml::to_string(&config).context("relay config to TOML")?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let log = spec.data_dir.join(format!("{}-{attempt}.log", spec.name));
        let log_file = std::fs::File::create(&log)?;
        let child = clean_command(bin)
            .arg("relay")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let mut server = Server {
            addr: listen,
            admin: Some(admin),
            pid: child.id(),
            log: Some(log.clone()),
            nice: nice_of(child.id()),
            hold: Hold::Child(ChildGuard::new(child, format!("relay {}", bin.display()))),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Err(e) = server.check_alive() {
                last = e;
                break;
            }
            if let Ok((200, _)) = http_get(admin, "/readyz").await {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "relay not ready within 20 s at {admin}{}",
                    log_tail(Some(&log))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Exited: retry only if a port was taken meanwhile.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("in use") {
            return Err(last);
        }
    }
    Err(last)
}

/// Starts the floor server.
pub async fn start_floor(
    runner: &Runner,
    config: FloorConfig,
    name: &str,
) -> anyhow::Result<Server> {
    let bin = match runner {
        Runner::InProcess => {
            let (stop, stopped) = oneshot::channel::<()>();
            let (addr, serve) = floor::bind(config, async {
                let _ = stopped.await;
            })?;
            return Ok(Server {
                addr,
                admin: None,
                pid: std::process::id(),
                log: None,
                nice: None,
                hold: Hold::Floor {
                    stop,
                    task: tokio::spawn(serve),
                },
            });
        }
        Runner::Processes { floor_bin, .. } => floor_bin,
    };
    let log = config.data_dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log)?;
    let mut child = clean_command(bin)
        .arg("--floor-server")
        .arg("--listen")
        .arg(config.listen.to_string())
        .arg("--data-dir")
        .arg(&config.data_dir)
        .arg("--size")
        .arg(config.size.to_string())
        .arg("--rate")
        .arg(config.rate.to_string())
        .arg("--epoch-us")
        .arg(config.epoch_us.to_string())
        .env("RUST_LOG", "warn")
        // The floor server exits when its stdin closes: when the bench ends,
        // however it ends.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let stdout = child.stdout.take().context("floor server stdout")?;
    let pid = child.id();
    let nice = nice_of(pid);
    let mut guard = ChildGuard::new(child, format!("floor server {}", bin.display()));
    // It prints `listening ADDR` once bound.
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = match tokio::time::timeout(Duration::from_secs(20), line).await {
        Ok(Ok(Ok(line))) => line,
        _ => {
            let status = guard.exited();
            bail!(
                "floor server did not start (status {status:?}){}",
                log_tail(Some(&log))
            );
        }
    };
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .with_context(|| {
            format!(
                "floor server said {line:?}, not `listening ADDR`{}",
                log_tail(Some(&log))
            )
        })?;
    Ok(Server {
        addr,
        admin: None,
        pid,
        log: Some(log),
        nice,
        hold: Hold::Child(guard),
    })
}
