//! End-to-end tests of the client crate against the real key-authority server, started in this
//! process on a fresh SQLite database: the typed client, its error details, request ids, UpdateKey
//! and the audit trail, WatchKeyEvents (plain, and resuming across a restart), webhooks (a real
//! receiver, signatures checked with WebhookVerifier), and VerifyKeyLayer
//! protecting a small gRPC service (and a plain HTTP one).

mod client;
mod harness;
mod layer;
#[cfg(feature = "local-verifier")]
mod local;
mod update;
mod watch;
mod webhooks;
