//! A crew of threads that run one job together: the fan-out's threads.
//!
//! A world's fan-out runs on its own threads rather than on the async
//! runtime's workers: there a tick's fan-out queued behind a thousand quinn
//! connection drivers woken by the previous tick, and its two shards (one
//! task per core) waited for each other's turn. Threads that sleep between
//! ticks are what the kernel's scheduler wakes first, as a server's
//! latency-critical work should be, and a job that every thread of the crew
//! runs at once (coding a tick's chunks, then a shard of its clients each)
//! keeps both cores on the tick until it is out.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A job: called once on every thread of the crew, with the thread's index
/// (0 is the thread calling [`Crew::run`]).
pub type Job = Arc<dyn Fn(usize) + Send + Sync>;

/// `size - 1` helper threads and the caller of [`Crew::run`].
pub struct Crew {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
}

struct State {
    /// Bumped for every job.
    generation: u64,
    job: Option<Job>,
    /// Helpers still running the current job.
    running: usize,
    stop: bool,
}

impl Crew {
    /// A crew of `size` threads (at least 1): spawns `size - 1` helpers
    /// named `name`, each running `setup` first (it returns what the thread
    /// keeps for its life, e.g. a runtime guard).
    pub fn new<G: 'static>(
        size: usize,
        name: &str,
        setup: impl Fn() -> G + Send + Sync + 'static,
    ) -> std::io::Result<Crew> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                running: 0,
                stop: false,
            }),
            start: Condvar::new(),
            done: Condvar::new(),
        });
        let setup = Arc::new(setup);
        let mut helpers = Vec::new();
        for index in 1..size.max(1) {
            let (mine, setup) = (shared.clone(), setup.clone());
            let spawned = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    let _kept = setup();
                    helper(&mine, index);
                });
            match spawned {
                Ok(handle) => helpers.push(handle),
                Err(e) => {
                    // Stop the ones already running.
                    drop(Crew { shared, helpers });
                    return Err(e);
                }
            }
        }
        Ok(Crew { shared, helpers })
    }

    /// Threads in the crew, the caller of [`Crew::run`] included.
    pub fn size(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job` on every thread of the crew at once (this one is index 0)
    /// and returns when all of them have finished it. A job that panics on
    /// a helper ends that call only.
    pub fn run(&self, job: Job) {
        {
            let mut state = self.shared.state.lock().expect("not poisoned");
            state.generation += 1;
            state.job = Some(job.clone());
            state.running = self.helpers.len();
        }
        self.shared.start.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut state = self.shared.state.lock().expect("not poisoned");
        while state.running > 0 {
            state = self.shared.done.wait(state).expect("not poisoned");
        }
        state.job = None;
        drop(state);
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
    }
}

fn helper(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let job = {
            let mut state = shared.state.lock().expect("not poisoned");
            while state.generation == seen && !state.stop {
                state = shared.start.wait(state).expect("not poisoned");
            }
            if state.stop {
                return;
            }
            seen = state.generation;
            state.job.clone()
        };
        if let Some(job) = job {
            let _ = catch_unwind(AssertUnwindSafe(|| job(index)));
        }
        let mut state = shared.state.lock().expect("not poisoned");
        state.running -= 1;
        if state.running == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
        }
        self.shared.start.notify_all();
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every job runs once on every thread, the caller included, and `run`
    /// returns only once all of them are done; a panicking job does not
    /// stop the crew; dropping the crew ends its threads.
    #[test]
    fn every_thread_runs_every_job_once() {
        let setups = Arc::new(AtomicUsize::new(0));
        let counted = setups.clone();
        let crew = Crew::new(3, "crew-test", move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert_eq!(crew.size(), 3);
        for round in 0..50usize {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = seen.clone();
            crew.run(Arc::new(move |i| {
                record.lock().unwrap().push((round, i));
            }));
            let mut seen = seen.lock().unwrap().clone();
            seen.sort_unstable();
            assert_eq!(seen, vec![(round, 0), (round, 1), (round, 2)]);
        }
        crew.run(Arc::new(|i| {
            if i == 2 {
                panic!("helper job panics");
            }
        }));
        let after = Arc::new(AtomicUsize::new(0));
        let count = after.clone();
        crew.run(Arc::new(move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(after.load(Ordering::SeqCst), 3);
        assert_eq!(setups.load(Ordering::SeqCst), 2);
        drop(crew);
        let alone = Crew::new(1, "crew-test", || ()).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let count = ran.clone();
        alone.run(Arc::new(move |i| {
            count.fetch_add(i + 1, Ordering::SeqCst);
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
