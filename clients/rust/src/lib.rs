//! A Rust client for [key-authority](https://github.com/): typed calls to every RPC, errors with
//! their decoded `google.rpc` details, and a tower layer that protects a tonic or axum service
//! with API keys.
//!
//! - [`pb`]: the generated messages and raw tonic stubs of `keyauthority.v1`.
//! - [`KeyAuthorityClient`]: `connect`, `with_bearer_token`, one method per RPC.
//! - [`KeyEventStream`]: WatchKeyEvents as a typed `Stream` of [`pb::KeyEvent`], plain or
//!   resuming by itself after a dropped connection.
//! - [`Error`]: the gRPC code, the `ErrorInfo` reason and the `RetryInfo` delay of a refusal.
//! - [`VerifyKeyLayer`]: verifies `authorization: Bearer <key>` with `VerifyKey` before the
//!   inner service runs, and hands it a [`VerifiedKey`].
//! - `LocalVerifier` (feature `local-verifier`): warm keys verified in this process, every
//!   change to them pushed by key-authority's event stream, usage reported in batches.
//! - [`verify_webhook`] and [`WebhookVerifier`]: check the signature and timestamp of a webhook
//!   request key-authority sent (Standard Webhooks), and parse its [`WebhookPayload`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod layer;
#[cfg(feature = "local-verifier")]
mod local;
mod watch;
mod webhook;

pub use client::KeyAuthorityClient;
pub use error::Error;
pub use layer::{ERROR_DOMAIN, MAX_CACHE_TTL, VerifiedKey, VerifyKeyLayer, VerifyKeyService};
#[cfg(feature = "local-verifier")]
pub use local::{FeedStatus, LocalStats, LocalVerifier, LocalVerifierBuilder, Verification};
/// The decoded `google.rpc` detail types that [`Error`] exposes.
pub use tonic_types::{ErrorInfo, RetryInfo};
pub use watch::KeyEventStream;
pub use webhook::{
    DEFAULT_WEBHOOK_TOLERANCE, WEBHOOK_SECRET_PREFIX, WebhookActor, WebhookError, WebhookEventData,
    WebhookFieldChange, WebhookPayload, WebhookVerifier, verify_webhook,
};

/// Generated protobuf messages and tonic client stubs of `keyauthority.v1` (no server code).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyauthority.v1");
}
