//! The crate's one error type, and the policy that turns an error into what happens to the task.

use protocol::Outcome;

/// Everything that can go wrong while handling a container task.
///
/// Failures of the container itself (a missing image, a readiness timeout, a refused pause) are not
/// errors: they are answered with a `container.failed` event. What remains here is what the task
/// cannot be answered for: bad input, an unreachable Docker engine, an unreachable broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task can never succeed (wrong agent, unknown action, malformed arguments).
    #[error("bad task {task_id}: {reason}")]
    BadTask { task_id: String, reason: String },
    /// The run-profile asks for something a workspace container must never have.
    #[error("unsafe container profile: `{field}`: {reason}")]
    UnsafeProfile { field: String, reason: String },
    /// The Docker engine could not be reached: the socket is gone, the connection was refused or
    /// broke, a request timed out (not an answer from it, which becomes an event).
    #[error("docker engine unreachable: {0}")]
    DockerUnreachable(#[source] bollard::errors::Error),
    /// Talking to Docker went wrong in a way that is neither an answer nor an outage (an
    /// unreadable reply, a broken stream): worth a bounded number of retries.
    #[error("docker request failed: {0}")]
    Docker(#[source] bollard::errors::Error),
    /// The broker refused or lost an answer event.
    #[error("could not publish the answer: {0}")]
    Publish(#[from] protocol::bus::BusError),
    /// The host directory of a session could not be created.
    #[error("workspace directory {path}: {source}")]
    WorkspaceDirectory { path: std::path::PathBuf, source: std::io::Error },
    /// A background task (the Docker event watcher, the inventory) ended: the agent stops.
    #[error("container agent stopped: {0}")]
    Stopped(protocol::supervise::Ended),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed Docker call that is not an answer from Docker, sorted into outage or transient.
    pub fn from_docker(error: bollard::errors::Error) -> Error {
        if is_docker_outage(&error) {
            Error::DockerUnreachable(error)
        } else {
            Error::Docker(error)
        }
    }

    /// What the consumer does with a task whose handler failed with this error.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::BadTask { .. } | Error::UnsafeProfile { .. } | Error::Stopped(_) => Outcome::DeadLetter(self.to_string()),
            // A dependency is down: wait for it without burning the task's attempts.
            Error::DockerUnreachable(_) | Error::Publish(_) => Outcome::RetryUnavailable,
            // Passing trouble: retried after a delay, a bounded number of times.
            Error::Docker(_) | Error::WorkspaceDirectory { .. } => Outcome::Retry,
        }
    }
}

/// Docker could not be asked at all: no socket, no connection, no answer in time.
pub(crate) fn is_docker_outage(error: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as Docker;
    matches!(
        error,
        Docker::SocketNotFoundError(_)
            | Docker::IOError { .. }
            | Docker::RequestTimeoutError
            | Docker::HyperResponseError { .. }
            | Docker::HyperLegacyError { .. }
    )
}

/// Docker answered with this HTTP status (404 gone, 409 conflict, 304 not modified, …).
pub(crate) fn docker_status(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Splits Docker failures into answers (the engine said no) and outages (it could not be asked).
pub(crate) fn is_docker_answer(error: &bollard::errors::Error) -> bool {
    docker_status(error).is_some()
}
