//! The deadline of the gRPC call being served, for the code below the handler: the overload layer
//! runs every call's future inside `scope`, and the store bounds its wait for the database by
//! what is left, so a caller hears UNAVAILABLE from a database that does not answer instead of
//! DEADLINE_EXCEEDED (README.md, "Faults").

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `future` with `deadline` as the call's deadline.
pub fn scope<F: Future>(
    deadline: Instant,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<Instant, F> {
    DEADLINE.scope(deadline, future)
}

/// How long is left before the current call's deadline; `None` outside a call (background work).
pub fn remaining() -> Option<Duration> {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .ok()
}
