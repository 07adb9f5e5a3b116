//! Background tasks a component cannot do without (timer sweeps, inventories, event watchers):
//! the first one to end or panic while the component runs stops the component with an error,
//! instead of leaving it running silently degraded; its supervisor (systemd, compose, Kubernetes)
//! then restarts it whole.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio::task::JoinSet;

/// A set of named background tasks.
#[derive(Default)]
pub struct Background {
    tasks: JoinSet<Ended>,
}

/// Which task ended, and whether it panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub task: &'static str,
    pub panicked: bool,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(formatter, "the {} {how} while its component was running", self.task)
    }
}

impl std::error::Error for Ended {}

impl Background {
    pub fn new() -> Background {
        Background { tasks: JoinSet::new() }
    }

    /// Runs `task` in the background under `name`. It should run until its component stops.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            let panicked = AssertUnwindSafe(task).catch_unwind().await.is_err();
            Ended { task: name, panicked }
        });
    }

    /// Completes when the first task ends; never, when there are none.
    pub async fn first_ended(&mut self) -> Ended {
        match self.tasks.join_next().await {
            Some(Ok(ended)) => ended,
            // Tasks catch their own panics, and nobody aborts them before `stop`.
            Some(Err(_)) => Ended { task: "background task", panicked: false },
            None => std::future::pending().await,
        }
    }

    /// Waits for every task to end (after telling them to stop).
    pub async fn join_all(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Cancels every task (for tasks that have no stop signal of their own) and waits for them.
    pub async fn abort_all(&mut self) {
        self.tasks.abort_all();
        self.join_all().await;
    }
}

/// Completes once its component is told to stop (by its shutdown, or because a background task
/// ended). Cheap to clone: one per consumer.
#[derive(Clone)]
pub struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    pub async fn stopped(mut self) {
        // An error means the supervisor is gone, which also means stop.
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

impl Background {
    /// Runs `work` (given the [`Stop`] it must honour) until it returns, telling it to stop when
    /// `shutdown` completes or when a background task ends; then cancels the background tasks.
    /// The background task that ended, if one did, is the error.
    pub async fn supervise<T, Work>(mut self, shutdown: impl Future<Output = ()>, work: impl FnOnce(Stop) -> Work) -> Result<T, Ended>
    where
        Work: Future<Output = T>,
    {
        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        let work = work(Stop(stop_receiver));
        tokio::pin!(work, shutdown);
        let (mut stopping, mut ended) = (false, None);
        let output = loop {
            tokio::select! {
                output = &mut work => break output,
                () = &mut shutdown, if !stopping => stopping = true,
                task = self.first_ended(), if !stopping => {
                    tracing::error!(task = task.task, panicked = task.panicked, "a background task ended; stopping");
                    (stopping, ended) = (true, Some(task));
                }
            }
            if stopping {
                let _ = stop_sender.send(true);
            }
        };
        self.abort_all().await;
        match ended {
            Some(task) => Err(task),
            None => Ok(output),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_or_panic_is_named() {
        let mut background = Background::new();
        background.spawn("forever", std::future::pending());
        background.spawn("sweeper", async { tokio::time::sleep(Duration::from_millis(20)).await });
        assert_eq!(background.first_ended().await, Ended { task: "sweeper", panicked: false });
        background.spawn("listener", async { panic!("a bug") });
        assert_eq!(background.first_ended().await, Ended { task: "listener", panicked: true });
        background.abort_all().await;
        let ended = Ended { task: "timer sweeper", panicked: true };
        assert_eq!(ended.to_string(), "the timer sweeper panicked while its component was running");
    }

    #[tokio::test]
    async fn supervised_work_stops_at_shutdown_or_when_a_task_ends() {
        let work = |stop: Stop| async move {
            stop.stopped().await;
            "stopped cleanly"
        };
        let mut background = Background::new();
        background.spawn("inventory", std::future::pending());
        let at_shutdown = background.supervise(tokio::time::sleep(Duration::from_millis(20)), work).await;
        assert_eq!(at_shutdown, Ok("stopped cleanly"));

        let mut background = Background::new();
        background.spawn("inventory", std::future::pending());
        background.spawn("watcher", async { tokio::time::sleep(Duration::from_millis(20)).await });
        let task_ended = background.supervise(std::future::pending(), work).await;
        assert_eq!(task_ended, Err(Ended { task: "watcher", panicked: false }));
    }

    #[tokio::test]
    async fn without_tasks_nothing_ends() {
        let mut background = Background::new();
        let waited = tokio::time::timeout(Duration::from_millis(50), background.first_ended()).await;
        assert!(waited.is_err());
    }
}
