//! The one error type of the domain, and its one mapping to gRPC status codes.
//!
//! Every refusal carries a `google.rpc.ErrorInfo` whose `reason` is a stable UPPER_SNAKE code
//! (README.md, "Errors" lists them all), and `google.rpc.RetryInfo` where retrying can succeed.
//! Internal details are logged, never sent.
//!
//! Database errors become `Conflict`, `Unavailable` or `Internal` in `store/`, where each
//! database classifies its own error codes.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every ErrorInfo this service sends.
pub const ERROR_DOMAIN: &str = "keyauthority.v1";

/// The RetryInfo delay of an OVERLOADED refusal: a few slow (argon2) calls' worth, long enough
/// for slots to free up, short enough that a retrying client loses little.
const OVERLOADED_RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's bytes are not a message of its type (a string field that is not UTF-8, a
    /// truncated or garbled encoding). Raised by the servers' codec before any handler runs.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// A request field broke a rule; the message names the field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A page token that this service did not issue for this listing.
    #[error("invalid page_token: {0}")]
    InvalidPageToken(&'static str),
    /// No key with this id in this workspace.
    #[error("key not found")]
    KeyNotFound,
    /// The key is revoked, so the operation cannot apply.
    #[error("key {0} is revoked")]
    KeyRevoked(String),
    /// The key is expired, so the operation cannot apply.
    #[error("key {0} is expired")]
    KeyExpired(String),
    /// The key is disabled, so the operation cannot apply until it is enabled again.
    #[error("key {0} is disabled")]
    KeyDisabled(String),
    /// UpdateKey's etag names a version of the key that is no longer current.
    #[error("the key changed since the etag was read: read it again and retry")]
    EtagMismatch,
    /// A request id already used, within the idempotency window, for a different request.
    #[error("request id {} was already used for a different request ({})", excerpt(.0), .1)]
    IdempotencyKeyReused(String, &'static str),
    /// A mutation found its request id claimed by one that committed first: the caller answers
    /// with that request's result. Never leaves the service.
    #[error("the request id was claimed by a concurrent request")]
    DuplicateRequest,
    /// A watch asked for events that the pruning deleted already.
    #[error(
        "events through position {pruned_through} were pruned: the oldest kept is position {} \
         or later; watch with after_position {pruned_through} or later, or from_now",
        .pruned_through + 1
    )]
    EventsPruned { pruned_through: i64 },
    /// A webhook URL whose address this server must not send requests to.
    #[error("invalid url: {0}")]
    WebhookTargetForbidden(String),
    /// No webhook with this id in this workspace.
    #[error("webhook not found")]
    WebhookNotFound,
    /// No stored event with this id in this workspace (never written, or pruned).
    #[error("event not found: it is not an event of this workspace, or it was pruned")]
    EventNotFound,
    /// The webhook has as many redeliveries pending as it may.
    #[error("the webhook already has {0} redeliveries pending: retry once they are sent")]
    RedeliveriesPending(u32),
    /// The workspace has as many webhooks as a workspace may.
    #[error("the workspace already has {0} webhooks, the most it may have: delete one first")]
    TooManyWebhooks(usize),
    /// The key was already rotated; rotate its successor instead.
    #[error("key {key_id} was already rotated to {successor}")]
    KeyAlreadyRotated { key_id: String, successor: String },
    /// No `authorization: Bearer <token>` metadata.
    #[error("missing credentials: send the metadata `authorization: Bearer <token>`")]
    MissingCredentials,
    /// The token is not an admin token, a valid JWT or a valid API key of this service.
    #[error("invalid credentials: {0}")]
    InvalidCredentials(&'static str),
    /// The caller's role does not allow this.
    #[error("permission denied: {0}")]
    InsufficientRole(String),
    /// The caller named a workspace other than its own.
    #[error("permission denied: the caller cannot act in workspace {}", excerpt(.0))]
    WorkspaceMismatch(String),
    /// Too many requests of this kind from this caller; retry after the delay.
    #[error("rate limited: retry in {} s", whole_seconds_up(.0))]
    RateLimited(Duration),
    /// Too many requests from this client IP; retry after the delay.
    #[error("rate limited for this client IP: retry in {} s", whole_seconds_up(.0))]
    IpRateLimited(Duration),
    /// Too many secrets nobody has proven yet are being checked on this replica: the argon2
    /// budget for them is spent. The service did not decide; retry after the delay.
    #[error("too many unrecognised keys are being checked right now: retry in {} ms", .0.as_millis().max(1))]
    VerifyBusy(Duration),
    /// The operator switched trial keys off (`--trial-keys false`).
    #[error("trial keys are switched off on this server")]
    TrialKeysDisabled,
    /// The operator allows no trial keys per client IP (`--trial-limit-per-minute 0`).
    #[error("this server issues no trial keys")]
    TrialKeysPaused,
    /// A concurrent change won; the caller may retry.
    #[error("a concurrent change to the same key won, retry")]
    Conflict,
    /// The server is already working on as many requests as it allows; nothing was done, so any
    /// call (IssueKey included) may be retried, here or on another replica.
    #[error("the server is overloaded, retry shortly")]
    Overloaded,
    /// The caller's deadline (`grpc-timeout`) passed before the answer was ready.
    #[error("the deadline passed before the request was answered")]
    DeadlineExceeded,
    /// The database cannot be reached or is overloaded; the caller may retry.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected database answer. The detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<std::convert::Infallible> for Error {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Caller-supplied text quoted in a message: escaped as a Rust string literal (control characters
/// show as escapes) and cut to its first 32 characters, so that no request can make an answer's
/// `grpc-message` large.
pub fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 32;
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(MAX_CHARS).collect();
    match chars.next() {
        None => format!("{head:?}"),
        Some(_) => format!("{head:?}…"),
    }
}

/// A delay in whole seconds, rounded up, so a client reading the message never retries early.
fn whole_seconds_up(delay: &Duration) -> u64 {
    delay.as_secs() + u64::from(delay.subsec_nanos() > 0)
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The stable reason code sent in ErrorInfo.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MalformedRequest(_) => "MALFORMED_REQUEST",
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::InvalidPageToken(_) => "INVALID_PAGE_TOKEN",
            Self::KeyNotFound => "KEY_NOT_FOUND",
            Self::KeyRevoked(_) => "KEY_REVOKED",
            Self::KeyExpired(_) => "KEY_EXPIRED",
            Self::KeyAlreadyRotated { .. } => "KEY_ALREADY_ROTATED",
            Self::KeyDisabled(_) => "KEY_DISABLED",
            Self::EtagMismatch => "ETAG_MISMATCH",
            Self::EventsPruned { .. } => "EVENTS_PRUNED",
            Self::WebhookTargetForbidden(_) => "WEBHOOK_TARGET_FORBIDDEN",
            Self::WebhookNotFound => "WEBHOOK_NOT_FOUND",
            Self::EventNotFound => "EVENT_NOT_FOUND",
            Self::TooManyWebhooks(_) => "TOO_MANY_WEBHOOKS",
            Self::RedeliveriesPending(_) => "REDELIVERIES_PENDING",
            Self::IdempotencyKeyReused(..) => "IDEMPOTENCY_KEY_REUSED",
            Self::DuplicateRequest => "DUPLICATE_REQUEST",
            Self::MissingCredentials => "MISSING_AUTH_HEADER",
            Self::InvalidCredentials(_) => "INVALID_CREDENTIALS",
            Self::InsufficientRole(_) => "INSUFFICIENT_ROLE",
            Self::WorkspaceMismatch(_) => "WORKSPACE_MISMATCH",
            Self::RateLimited(_) => "RATE_LIMITED",
            Self::IpRateLimited(_) => "IP_RATE_LIMITED",
            Self::TrialKeysDisabled => "TRIAL_KEYS_DISABLED",
            Self::VerifyBusy(_) => "VERIFY_BUSY",
            Self::TrialKeysPaused => "TRIAL_KEYS_PAUSED",
            Self::Conflict => "CONCURRENT_MODIFICATION",
            Self::Overloaded => "OVERLOADED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Unavailable(_) => "DATABASE_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::MalformedRequest(_)
            | Self::InvalidArgument { .. }
            | Self::InvalidPageToken(_)
            | Self::WebhookTargetForbidden(_) => Code::InvalidArgument,
            Self::KeyNotFound | Self::WebhookNotFound | Self::EventNotFound => Code::NotFound,
            Self::TooManyWebhooks(_) => Code::FailedPrecondition,
            Self::KeyRevoked(_)
            | Self::KeyExpired(_)
            | Self::KeyAlreadyRotated { .. }
            | Self::KeyDisabled(_)
            | Self::IdempotencyKeyReused(..) => Code::FailedPrecondition,
            Self::EtagMismatch | Self::DuplicateRequest => Code::Aborted,
            Self::EventsPruned { .. } => Code::OutOfRange,
            Self::MissingCredentials | Self::InvalidCredentials(_) => Code::Unauthenticated,
            Self::InsufficientRole(_) | Self::WorkspaceMismatch(_) => Code::PermissionDenied,
            Self::RateLimited(_)
            | Self::RedeliveriesPending(_)
            | Self::IpRateLimited(_)
            | Self::TrialKeysPaused
            | Self::VerifyBusy(_) => Code::ResourceExhausted,
            Self::TrialKeysDisabled => Code::Unimplemented,
            Self::Conflict => Code::Aborted,
            // UNAVAILABLE, not RESOURCE_EXHAUSTED: the caller exceeded no quota of its own
            // (RATE_LIMITED says that), the server is momentarily full. UNAVAILABLE is the code
            // gRPC retry policies and proxies retry, on another replica if there is one.
            Self::Overloaded => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// How long to wait before retrying, for the refusals where a retry can succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Conflict => Some(Duration::from_millis(50)),
            Self::RateLimited(delay) | Self::IpRateLimited(delay) | Self::VerifyBusy(delay) => {
                Some(*delay)
            }
            Self::Unavailable(_) => Some(Duration::from_secs(1)),
            Self::Overloaded => Some(OVERLOADED_RETRY_DELAY),
            _ => None,
        }
    }

    fn public_message(&self) -> String {
        match self {
            // Never send database or internal details to the caller.
            Self::Unavailable(_) => "the database is unavailable, retry later".to_owned(),
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            Error::Unavailable(detail) => tracing::warn!(error = %detail, "database unavailable"),
            // Under overload this runs per refused call: no louder than debug.
            _ => tracing::debug!(reason = error.reason(), "request refused"),
        }
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        if let Error::InvalidArgument { field, reason } = &error {
            metadata.insert("field".to_owned(), (*field).to_owned());
            details.add_bad_request_violation(*field, reason.clone());
        }
        if let Error::WebhookTargetForbidden(reason) = &error {
            metadata.insert("field".to_owned(), "url".to_owned());
            details.add_bad_request_violation("url", reason.clone());
        }
        if let Error::InvalidPageToken(_) = &error {
            metadata.insert("field".to_owned(), "page_token".to_owned());
        }
        if let Error::EventsPruned { pruned_through } = &error {
            // Machine-readable, so a watcher can resume without parsing the message.
            let oldest_kept = pruned_through.saturating_add(1);
            metadata.insert("oldest_kept_position".to_owned(), oldest_kept.to_string());
            metadata.insert("after_position".to_owned(), pruned_through.to_string());
        }
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        if let Some(delay) = error.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(error.code(), error.public_message(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_pruned_names_the_oldest_kept_position() {
        let status = Status::from(Error::EventsPruned { pruned_through: 40 });
        assert_eq!(status.code(), Code::OutOfRange);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "EVENTS_PRUNED");
        let metadata = |key: &str| info.metadata.get(key).map(String::as_str);
        assert_eq!(metadata("oldest_kept_position"), Some("41"));
        assert_eq!(metadata("after_position"), Some("40"));
        assert!(
            status.message().contains("position 41"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(Error::invalid("name", "is required"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid name: is required");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.get("field").map(String::as_str), Some("name"));
    }

    #[test]
    fn malformed_request_is_invalid_argument_with_its_own_reason() {
        let status = Status::from(Error::MalformedRequest("bad UTF-8".to_owned()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "malformed request: bad UTF-8");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt("acme"), "\"acme\"");
        assert_eq!(excerpt("a\0b\u{1b}"), "\"a\\0b\\u{1b}\"");
        assert_eq!(excerpt(&"é".repeat(32)), format!("{:?}", "é".repeat(32)));
        assert_eq!(excerpt(&"é".repeat(33)), format!("{:?}…", "é".repeat(32)));
        let huge = Error::WorkspaceMismatch("w".repeat(60_000)).to_string();
        assert!(huge.len() < 120, "{huge}");
    }

    #[test]
    fn unavailable_hides_detail_and_says_retry() {
        let status = Status::from(Error::Unavailable("password=hunter2 host=db".to_owned()));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("hunter2"));
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn overloaded_is_unavailable_with_a_short_retry() {
        let status = Status::from(Error::Overloaded);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "OVERLOADED"
        );
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(OVERLOADED_RETRY_DELAY)
        );
    }
}
