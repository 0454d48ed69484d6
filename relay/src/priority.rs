//! The fan-out's threads: one per core, pinned, at a priority above the
//! connection drivers'.
//!
//! A tick's fan-out (split into cells, chunks coded, updates built and
//! handed to quinn) is a few milliseconds of work that every client waits
//! for; the connection drivers beside it (encrypting, sending, reading
//! acks) can wait those milliseconds without anyone noticing. Left to the
//! scheduler, measured on two cores with 1,000 clients:
//!
//! - on runtime threads, a thread woken by another lands on the waker's
//!   core (wake-affine placement): the second half of a tick's coding
//!   started 1.5 to 2 ms after the first, i.e. after it;
//! - at normal priority (or even at nice -10), the fan-out threads waited
//!   for their core 2 to 3 ms of a 3 to 5 ms fan-out while the relay's own
//!   drivers and other processes ran (run-queue delay from
//!   `/proc/thread-self/schedstat`).
//!
//! So the fan-out runs on threads of its own ([`Helpers`]), each pinned to
//! one of the cores the process may use, scheduled `SCHED_FIFO` at the
//! lowest real-time priority (`fanout_realtime`), or failing that at a
//! lower nice value (`fanout_nice`), or failing that as any thread. A
//! real-time thread runs until it blocks; the fan-out's work per tick is
//! bounded (and the kernel's real-time throttling keeps 5 % of every
//! second for the rest regardless). Both need `CAP_SYS_NICE` (root, or
//! `AmbientCapabilities=CAP_SYS_NICE` in the systemd unit, or the
//! capability added to the container); the relay says at start which one
//! it got.

use std::sync::mpsc;

/// How the fan-out's threads ask to be scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    /// `SCHED_FIFO` at priority 1.
    pub realtime: bool,
    /// Otherwise this nice value (when it is lower than the thread's own).
    pub nice: Option<i32>,
}

/// What a fan-out thread got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_FIFO`, priority 1.
    Realtime,
    /// Normal scheduling at this nice value.
    Nice(i32),
    /// As the thread was (nothing asked, or nothing allowed).
    Unchanged,
}

impl Scheduling {
    /// How much it asks of the scheduler: real-time, then lower nice
    /// values, then nothing.
    fn strength(&self) -> (u8, i32) {
        match *self {
            Scheduling::Realtime => (2, 0),
            Scheduling::Nice(n) => (1, -n),
            Scheduling::Unchanged => (0, 0),
        }
    }
}

impl std::fmt::Display for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scheduling::Realtime => f.write_str("real-time (SCHED_FIFO 1)"),
            Scheduling::Nice(n) => write!(f, "nice {n}"),
            Scheduling::Unchanged => f.write_str("normal priority"),
        }
    }
}

#[cfg(target_os = "linux")]
fn get_nice() -> Option<i32> {
    // On Linux, PRIO_PROCESS with a thread id reads (and sets) that
    // thread's nice value alone.
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
}

#[cfg(target_os = "linux")]
fn set_nice(nice: i32) -> bool {
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn get_nice() -> Option<i32> {
    None
}

#[cfg(not(target_os = "linux"))]
fn set_nice(_: i32) -> bool {
    false
}

#[cfg(unix)]
fn set_realtime() -> bool {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
    };
    let Ok(lowest) = ThreadPriorityValue::try_from(1u8) else {
        return false;
    };
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Crossplatform(lowest),
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    )
    .is_ok()
}

#[cfg(not(unix))]
fn set_realtime() -> bool {
    false
}

/// Applies `priority` to the calling thread, as far as it is allowed.
pub fn apply(priority: Priority) -> Scheduling {
    if priority.realtime && set_realtime() {
        return Scheduling::Realtime;
    }
    if let (Some(nice), Some(own)) = (priority.nice, get_nice())
        && nice < own
        && set_nice(nice)
    {
        return Scheduling::Nice(nice);
    }
    Scheduling::Unchanged
}

/// A job for a fan-out thread.
type Job = Box<dyn FnOnce() + Send>;

/// The fan-out's threads (see the module's documentation). They end when
/// this is dropped.
pub struct Helpers {
    senders: Vec<std::sync::Mutex<mpsc::Sender<Job>>>,
    scheduling: Scheduling,
    pinned: bool,
}

/// The CPUs this thread may run on, in order (empty if unknown).
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    use rustix::thread::CpuSet;
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(target_os = "linux")]
fn pin(cpu: usize) -> bool {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

#[cfg(not(target_os = "linux"))]
fn pin(_: usize) -> bool {
    false
}

/// The CPUs to pin threads to (empty: unknown, no pinning) and how many
/// threads: one per CPU the process may run on, but no more than
/// [`std::thread::available_parallelism`] (which also reads a container's
/// CPU quota: 2 cores of quota on a 64-CPU host are 2 threads).
fn plan() -> (Vec<usize>, usize) {
    let cpus = allowed_cpus();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let count = if cpus.is_empty() {
        cores
    } else {
        cpus.len().min(cores)
    };
    (cpus, count.max(1))
}

impl Helpers {
    /// Starts one thread (named `statecast-fanout-N`) per core ([`plan`]),
    /// each pinned to one of the CPUs this thread may run on and scheduled
    /// as `priority` allows, in the context of `runtime` (jobs may spawn
    /// tasks on it). Where the CPUs cannot be read, unpinned.
    pub fn start(priority: Priority, runtime: tokio::runtime::Handle) -> std::io::Result<Helpers> {
        let (cpus, count) = plan();
        let mut senders = Vec::with_capacity(count);
        let (report, reports) = mpsc::channel();
        for i in 0..count {
            let (tx, rx) = mpsc::channel::<Job>();
            let runtime = runtime.clone();
            let cpu = cpus.get(i).copied();
            let report = report.clone();
            std::thread::Builder::new()
                .name(format!("statecast-fanout-{}", i + 1))
                .spawn(move || {
                    let pinned = cpu.is_some_and(pin);
                    let _ = report.send((apply(priority), pinned));
                    drop(report);
                    let _runtime = runtime.enter();
                    while let Ok(job) = rx.recv() {
                        // A job that panics loses its result (the caller
                        // sees its receiver fail), not the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })?;
            senders.push(std::sync::Mutex::new(tx));
        }
        drop(report);
        // Every thread reports once, first thing; the least any got.
        let reports: Vec<(Scheduling, bool)> = reports.iter().collect();
        Ok(Helpers {
            senders,
            scheduling: reports
                .iter()
                .map(|&(got, _)| got)
                .min_by_key(Scheduling::strength)
                .unwrap_or(Scheduling::Unchanged),
            pinned: !cpus.is_empty() && reports.iter().all(|&(_, pinned)| pinned),
        })
    }

    /// Threads.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// How the threads are scheduled (the least any of them got).
    pub fn scheduling(&self) -> Scheduling {
        self.scheduling
    }

    /// Whether every thread is pinned to its own CPU.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Runs `job` on thread `i` (modulo their number); the returned
    /// receiver completes with its result. Jobs given to one thread run in
    /// order.
    pub fn run<T: Send + 'static>(
        &self,
        i: usize,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(job());
        });
        if let Some(sender) = self.senders.get(i % self.senders.len().max(1)) {
            // A send fails only once the thread is gone: the receiver then
            // reports the job as lost.
            let _ = sender.lock().expect("not poisoned").send(job);
        }
        result
    }

    /// Runs `job(i)` for every `i` in `0..parts`: part 0 on the calling
    /// thread, part `i` on thread `i` (`parts` is capped at [`Helpers::len`]),
    /// and returns the results in order; `None` if a part panicked. Call it
    /// from thread 0 or from outside the threads: a thread handed a part of
    /// its own would wait for itself.
    pub fn spread<T: Send + 'static>(
        &self,
        parts: usize,
        job: impl Fn(usize) -> T + Send + Sync + 'static,
    ) -> Option<Vec<T>> {
        let parts = parts.clamp(1, self.len().max(1));
        let job = std::sync::Arc::new(job);
        let (done, results) = mpsc::channel();
        for i in 1..parts {
            let (job, done) = (job.clone(), done.clone());
            // Its completion comes through `done`.
            drop(self.run(i, move || {
                let _ = done.send((i, job(i)));
            }));
        }
        drop(done);
        let mut out: Vec<Option<T>> = (0..parts).map(|_| None).collect();
        out[0] = Some(job(0));
        for (i, result) in results.iter() {
            out[i] = Some(result);
        }
        out.into_iter().collect()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn is_fifo() -> bool {
        thread_priority::unix::thread_schedule_policy().is_ok_and(|p| {
            p == thread_priority::ThreadSchedulePolicy::Realtime(
                thread_priority::RealtimeThreadSchedulePolicy::Fifo,
            )
        })
    }

    #[test]
    fn apply_changes_this_thread_only_and_says_what_it_got() {
        std::thread::spawn(|| {
            let before = get_nice().expect("readable");
            let (go, wait) = mpsc::channel::<()>();
            let other = std::thread::spawn(move || {
                wait.recv().expect("told to look");
                (get_nice(), is_fifo())
            });
            let got = apply(Priority {
                realtime: false,
                nice: Some(before - 1),
            });
            match got {
                Scheduling::Nice(n) => {
                    assert_eq!(n, before - 1);
                    assert_eq!(get_nice(), Some(before - 1));
                }
                // No CAP_SYS_NICE here: nothing changed.
                Scheduling::Unchanged => assert_eq!(get_nice(), Some(before)),
                Scheduling::Realtime => panic!("not asked for"),
            }
            assert!(!is_fifo());
            let got = apply(Priority {
                realtime: true,
                nice: None,
            });
            assert_eq!(
                got == Scheduling::Realtime,
                is_fifo(),
                "{got} reported as got"
            );
            // Read by the other thread after this one changed.
            go.send(()).expect("other thread waits");
            assert_eq!(
                other.join().expect("joins"),
                (Some(before), false),
                "other thread untouched"
            );
            // Not lower than the thread's own: nothing to do.
            std::thread::spawn(move || {
                let own = get_nice().expect("readable");
                let got = apply(Priority {
                    realtime: false,
                    nice: Some(own + 1),
                });
                assert_eq!(got, Scheduling::Unchanged);
                assert_eq!(get_nice(), Some(own));
            })
            .join()
            .expect("joins");
        })
        .join()
        .expect("test thread");
    }

    #[tokio::test]
    async fn helpers_run_jobs_in_order_on_their_cores() {
        let priority = Priority {
            realtime: true,
            nice: Some(-5),
        };
        let helpers = Helpers::start(priority, tokio::runtime::Handle::current()).expect("start");
        let (cpus, expected) = plan();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            expected >= 1 && expected <= cores,
            "{expected} threads, {cores} cores"
        );
        if !cpus.is_empty() {
            assert!(expected <= cpus.len());
        }
        assert_eq!(helpers.len(), expected, "one thread per core");
        assert_eq!(helpers.pinned(), !cpus.is_empty());
        let n = helpers.len();
        let mut results = Vec::new();
        for i in 0..3 * n {
            results.push(helpers.run(i, move || {
                let name = std::thread::current().name().map(str::to_owned);
                (i, is_fifo(), name, allowed_cpus())
            }));
        }
        let mut by_thread: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for r in results {
            let (i, fifo, name, on) = r.await.expect("job ran");
            assert_eq!(fifo, helpers.scheduling() == Scheduling::Realtime);
            if !cpus.is_empty() {
                assert_eq!(on, vec![cpus[i % n]], "thread {name:?} pinned to its core");
            }
            by_thread.entry(name.expect("named")).or_default().push(i);
        }
        for k in 0..n {
            let expected: Vec<usize> = (0..3 * n).filter(|i| i % n == k).collect();
            let name = format!("statecast-fanout-{}", k + 1);
            assert_eq!(by_thread[&name], expected, "in order");
        }
        assert!(!is_fifo(), "the caller's thread is untouched");
        // A job may spawn on the runtime; one that panics leaves its thread
        // serving.
        let spawned = helpers.run(0, || tokio::spawn(async { 7 }));
        assert_eq!(spawned.await.expect("ran").await.expect("task ran"), 7);
        let lost = helpers.run(n - 1, || panic!("job fails"));
        assert!(lost.await.is_err(), "a panicked job reports no result");
        assert_eq!(helpers.run(n - 1, || 8).await.expect("still serves"), 8);
        // Parts spread over the threads come back in order, each run on its
        // own thread; a panicking part makes the whole `None`.
        let names = helpers.spread(n + 1, |i| {
            (i, std::thread::current().name().map(str::to_owned))
        });
        let names = names.expect("no part panicked");
        assert_eq!(names.len(), n, "capped at one part per thread");
        for (k, (i, name)) in names.iter().enumerate() {
            assert_eq!(*i, k);
            if k > 0 {
                assert_eq!(
                    name.as_deref(),
                    Some(format!("statecast-fanout-{}", k + 1).as_str())
                );
            }
        }
        if n > 1 {
            assert!(
                helpers
                    .spread(n, |i| if i == 1 { panic!("part fails") } else { i })
                    .is_none()
            );
        }
    }
}
