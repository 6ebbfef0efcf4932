//! The error of every client call: the gRPC status with its decoded `google.rpc` details.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorInfo, StatusExt as _};

/// A call to key-authority that did not succeed: the service refused it (with a stable
/// [`reason`](Self::reason)) or could not be reached.
///
/// key-authority attaches a `google.rpc.ErrorInfo` (domain `keyauthority.v1`) to every refusal and
/// a `google.rpc.RetryInfo` to the ones a retry can fix; both are decoded here. Errors that never
/// reached the service (connection refused, local timeout) have a code but no reason.
///
/// A verification that the service could not decide is an error with code
/// [`Code::Unavailable`]: never read it as "the key is invalid".
///
/// Two refusals concern safe retries and updates: [`Code::Aborted`] with the reason
/// [`ETAG_MISMATCH`](Self::ETAG_MISMATCH) (an UpdateKey whose `key.etag` is stale: the key changed
/// since it was read, so read it again and redo the change; [`is_etag_mismatch`](Self::is_etag_mismatch)),
/// and [`Code::FailedPrecondition`] with the reason
/// [`IDEMPOTENCY_KEY_REUSED`](Self::IDEMPOTENCY_KEY_REUSED) (a `request_id` sent again with other
/// parameters; [`is_idempotency_key_reused`](Self::is_idempotency_key_reused)). Neither is
/// [retryable](Self::is_retryable) as it stands.
///
/// A watch of key events that starts before the oldest event still kept is [`Code::OutOfRange`]
/// with the reason [`EVENTS_PRUNED`](Self::EVENTS_PRUNED)
/// ([`is_events_pruned`](Self::is_events_pruned)); its [`message`](Self::message) names the oldest
/// position still available. Watching again from the same position fails again: resynchronise
/// (read the keys with ListKeys), then watch `from_now` or after that position.
#[derive(Clone)]
pub struct Error(Box<Inner>);

#[derive(Clone)]
struct Inner {
    status: Status,
    error_info: Option<ErrorInfo>,
    retry_delay: Option<Duration>,
}

impl Error {
    /// The reason of an UpdateKey refused because `key.etag` is stale (`ABORTED`).
    pub const ETAG_MISMATCH: &'static str = "ETAG_MISMATCH";
    /// The reason of a call whose `request_id` was used before with other parameters
    /// (`FAILED_PRECONDITION`).
    pub const IDEMPOTENCY_KEY_REUSED: &'static str = "IDEMPOTENCY_KEY_REUSED";
    /// The reason of a WatchKeyEvents that starts before the oldest event still kept
    /// (`OUT_OF_RANGE`): the events it asks for were pruned.
    pub const EVENTS_PRUNED: &'static str = "EVENTS_PRUNED";

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        self.0.status.code()
    }

    /// The status message: meant for people and logs, not for matching.
    pub fn message(&self) -> &str {
        self.0.status.message()
    }

    /// The stable `ErrorInfo.reason`, such as `IP_RATE_LIMITED` or `KEY_NOT_FOUND` (README.md,
    /// "Errors", lists them); `None` when the error did not come from key-authority.
    pub fn reason(&self) -> Option<&str> {
        self.0.error_info.as_ref().map(|info| info.reason.as_str())
    }

    /// The whole decoded `google.rpc.ErrorInfo`: reason, domain and metadata (for field errors,
    /// `metadata["field"]` names the field).
    pub fn error_info(&self) -> Option<&ErrorInfo> {
        self.0.error_info.as_ref()
    }

    /// How long to wait before retrying, from `google.rpc.RetryInfo`, when the service sent one.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.0.retry_delay
    }

    /// True when the same call may succeed later: the service said when (`RetryInfo`), or it
    /// could not be reached or decide (`UNAVAILABLE`), or the call lost a race (`ABORTED`) or ran
    /// out of time (`DEADLINE_EXCEEDED`). A stale etag ([`is_etag_mismatch`](Self::is_etag_mismatch))
    /// is `ABORTED` too, but the same call fails again: it is not retryable.
    pub fn is_retryable(&self) -> bool {
        if self.is_etag_mismatch() {
            return false;
        }
        self.0.retry_delay.is_some()
            || matches!(
                self.code(),
                Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
            )
    }

    /// True for an UpdateKey refused because the key changed since its `etag` was read
    /// (`ABORTED`, reason `ETAG_MISMATCH`): read the key again and redo the change.
    pub fn is_etag_mismatch(&self) -> bool {
        self.code() == Code::Aborted && self.reason() == Some(Self::ETAG_MISMATCH)
    }

    /// True for a call whose `request_id` was used before with other parameters
    /// (`FAILED_PRECONDITION`, reason `IDEMPOTENCY_KEY_REUSED`): a new operation needs a new id.
    pub fn is_idempotency_key_reused(&self) -> bool {
        self.code() == Code::FailedPrecondition
            && self.reason() == Some(Self::IDEMPOTENCY_KEY_REUSED)
    }

    /// True for a WatchKeyEvents that starts (or, reading too slowly, fell) behind the oldest
    /// event still kept (`OUT_OF_RANGE`, reason `EVENTS_PRUNED`): the events in between are gone,
    /// so resynchronise, then watch from now or from the oldest position the message names.
    pub fn is_events_pruned(&self) -> bool {
        self.code() == Code::OutOfRange && self.reason() == Some(Self::EVENTS_PRUNED)
    }

    /// The underlying status, with its metadata and raw details.
    pub fn status(&self) -> &Status {
        &self.0.status
    }

    /// Gives back the underlying status, e.g. to return it from a gRPC handler.
    pub fn into_status(self) -> Status {
        self.0.status
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Status::invalid_argument(message).into()
    }

    pub(crate) fn transport(context: &str, source: tonic::transport::Error) -> Self {
        let mut status = Status::unavailable(format!("{context}: {source}"));
        status.set_source(Arc::new(source));
        status.into()
    }

    pub(crate) fn timeout(after: Duration) -> Self {
        Status::deadline_exceeded(format!(
            "no answer from key-authority within {} ms",
            after.as_millis()
        ))
        .into()
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let error_info = status.get_details_error_info();
        let retry_delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay);
        Self(Box::new(Inner {
            status,
            error_info,
            retry_delay,
        }))
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        error.into_status()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message())?;
        if let Some(reason) = self.reason() {
            write!(f, " ({reason})")?;
        }
        if let Some(delay) = self.retry_delay() {
            write!(f, ", retry in {} ms", delay.as_millis())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("code", &self.code())
            .field("message", &self.message())
            .field("reason", &self.reason())
            .field("retry_delay", &self.retry_delay())
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn decodes_error_info_and_retry_info() {
        let mut details = ErrorDetails::with_error_info(
            "IP_RATE_LIMITED",
            "keyauthority.v1",
            std::collections::HashMap::new(),
        );
        details.set_retry_info(Some(Duration::from_secs(12)));
        let status = Status::with_error_details(Code::ResourceExhausted, "rate limited", details);
        let error = Error::from(status);
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert_eq!(error.reason(), Some("IP_RATE_LIMITED"));
        assert_eq!(error.error_info().unwrap().domain, "keyauthority.v1");
        assert_eq!(error.retry_delay(), Some(Duration::from_secs(12)));
        assert!(error.is_retryable());
        assert_eq!(
            error.to_string(),
            "ResourceExhausted: rate limited (IP_RATE_LIMITED), retry in 12000 ms"
        );
    }

    #[test]
    fn a_stale_etag_is_a_conflict_not_a_retry() {
        let details = ErrorDetails::with_error_info(
            "ETAG_MISMATCH",
            "keyauthority.v1",
            std::collections::HashMap::new(),
        );
        let error = Error::from(Status::with_error_details(
            Code::Aborted,
            "the key changed",
            details,
        ));
        assert!(error.is_etag_mismatch());
        assert!(!error.is_idempotency_key_reused());
        assert!(!error.is_retryable());
        // Any other ABORTED lost a race and may be retried.
        assert!(Error::from(Status::aborted("lost a race")).is_retryable());
        assert!(!Error::from(Status::aborted("lost a race")).is_etag_mismatch());
    }

    #[test]
    fn a_reused_request_id_is_recognised() {
        let details = ErrorDetails::with_error_info(
            "IDEMPOTENCY_KEY_REUSED",
            "keyauthority.v1",
            std::collections::HashMap::new(),
        );
        let error = Error::from(Status::with_error_details(
            Code::FailedPrecondition,
            "request id reused",
            details,
        ));
        assert!(error.is_idempotency_key_reused());
        assert!(!error.is_etag_mismatch());
        assert!(!error.is_retryable());
        assert_eq!(error.reason(), Some(Error::IDEMPOTENCY_KEY_REUSED));
    }

    #[test]
    fn pruned_events_are_recognised_and_final() {
        let details = ErrorDetails::with_error_info(
            "EVENTS_PRUNED",
            "keyauthority.v1",
            std::collections::HashMap::new(),
        );
        let error = Error::from(Status::with_error_details(
            Code::OutOfRange,
            "events up to position 7 were pruned",
            details,
        ));
        assert!(error.is_events_pruned());
        assert!(!error.is_retryable());
        assert_eq!(error.reason(), Some(Error::EVENTS_PRUNED));
        assert!(!Error::from(Status::out_of_range("too large")).is_events_pruned());
    }

    #[test]
    fn a_bare_status_has_no_details() {
        let error = Error::from(Status::not_found("no such key"));
        assert_eq!(error.code(), Code::NotFound);
        assert_eq!(error.reason(), None);
        assert_eq!(error.retry_delay(), None);
        assert!(!error.is_retryable());
    }
}
