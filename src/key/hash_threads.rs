//! The threads that run argon2: a fixed number, created once, at a scheduling priority of their
//! own. Never tokio's blocking pool, which grows on demand and runs at the priority of the
//! request workers: a flood of wrong secrets would then take CPU from every warm verify.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
};

use crate::error::Error;

/// How the argon2 threads compete for CPU with the threads that answer requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HashPriority {
    /// The same priority as the request workers.
    Normal,
    /// The lowest `nice` (19): a request worker that wants the core gets about 98 % of it, and
    /// argon2 still progresses however busy the machine is.
    #[default]
    Low,
    /// Linux `SCHED_IDLE`: argon2 runs only on CPU time no other thread of the machine wants
    /// (ours or any other process's). Warm verifies are the least affected by a flood; a cold
    /// verify can wait indefinitely on a machine kept busy (README.md, "Abuse controls").
    Idle,
}

impl HashPriority {
    /// Applies this priority to the calling thread.
    fn apply_to_current_thread(self) -> Result<(), thread_priority::Error> {
        let (policy, priority) = match self {
            Self::Normal => return Ok(()),
            Self::Low => (
                NormalThreadSchedulePolicy::Other,
                // The bottom of the crate's 0..=99 scale is the weakest nice value, 19.
                ThreadPriority::Crossplatform(ThreadPriorityValue::MIN),
            ),
            Self::Idle => (NormalThreadSchedulePolicy::Idle, ThreadPriority::Min),
        };
        thread_priority::set_thread_priority_and_policy(
            thread_priority::thread_native_id(),
            priority,
            ThreadSchedulePolicy::Normal(policy),
        )
    }
}

/// A fixed set of threads for CPU-heavy hashing. Cheap to clone.
#[derive(Clone)]
pub struct HashThreads {
    pool: Arc<rayon::ThreadPool>,
    priority: HashPriority,
    /// False when the operating system refused the priority on some thread (it then runs at
    /// normal priority); reported once in the log.
    priority_applied: Arc<AtomicBool>,
}

impl std::fmt::Debug for HashThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashThreads")
            .field("threads", &self.pool.current_num_threads())
            .field("priority", &self.priority)
            .finish()
    }
}

impl HashThreads {
    pub fn new(threads: usize, priority: HashPriority) -> Result<Self, Error> {
        let priority_applied = Arc::new(AtomicBool::new(true));
        let applied = priority_applied.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|index| format!("argon2-{index}"))
            // Without a handler rayon aborts the process on a panic; with one, the panicking
            // work's result sender is dropped and its caller gets an error.
            .panic_handler(|_| tracing::error!("an argon2 computation panicked"))
            .start_handler(move |_| {
                if let Err(error) = priority.apply_to_current_thread()
                    && applied.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(
                        ?priority,
                        ?error,
                        "could not lower the argon2 threads' priority; they run at normal priority"
                    );
                }
            })
            .build()
            .map_err(|error| Error::Internal(format!("argon2 threads: {error}")))?;
        Ok(Self {
            pool: Arc::new(pool),
            priority,
            priority_applied,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Whether every thread started so far runs at the configured priority.
    pub fn priority_applied(&self) -> bool {
        self.priority_applied.load(Ordering::Relaxed)
    }

    /// Runs `work` on one of the threads and waits for it without blocking the caller's thread.
    /// The work runs to its end even if the caller stops waiting.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            // The caller may be gone; the result then has nobody to go to.
            let _ = sender.send(work());
        });
        receiver
            .await
            .map_err(|_| Error::Internal("an argon2 computation panicked".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (scheduling policy, nice) of the calling thread, from /proc.
    fn current_policy_and_nice() -> (i32, i64) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name, which is in parentheses and may contain spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // stat(5): nice is field 19, policy field 41; `fields` starts at field 3.
        (
            fields[41 - 3].parse().unwrap(),
            fields[19 - 3].parse().unwrap(),
        )
    }

    const SCHED_OTHER: i32 = 0;
    const SCHED_IDLE: i32 = 5;

    #[tokio::test]
    async fn threads_run_at_the_configured_priority() {
        for (priority, expected) in [
            (HashPriority::Normal, (SCHED_OTHER, 0)),
            (HashPriority::Low, (SCHED_OTHER, 19)),
            (HashPriority::Idle, (SCHED_IDLE, 0)),
        ] {
            let threads = HashThreads::new(1, priority).unwrap();
            let (policy, nice) = threads.run(current_policy_and_nice).await.unwrap();
            assert!(threads.priority_applied(), "{priority:?}");
            assert_eq!((policy, nice), expected, "{priority:?}");
            let name = threads
                .run(|| std::thread::current().name().map(str::to_owned))
                .await
                .unwrap();
            assert_eq!(name.as_deref(), Some("argon2-0"));
        }
        // The caller's own thread is untouched.
        assert_eq!(current_policy_and_nice(), (SCHED_OTHER, 0));
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_hang() {
        let threads = HashThreads::new(1, HashPriority::Normal).unwrap();
        let outcome = threads.run(|| -> u32 { panic!("boom") }).await;
        assert!(matches!(outcome, Err(Error::Internal(_))), "{outcome:?}");
        // The pool survives it.
        assert_eq!(threads.run(|| 7).await.unwrap(), 7);
    }
}
