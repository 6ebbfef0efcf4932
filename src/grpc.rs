//! The gRPC layer: translates protobuf to domain types and back, and owns nothing else.

mod audit;
mod codec;
mod commands;
mod convert;
mod events;
mod keys;
mod usage;
mod verify;
mod verify_reply;
mod webhooks;

pub use codec::ServerCodec;
pub use keys::KeyServiceImpl;
pub use verify::{VerifyServiceImpl, verdict_code};
pub use verify_reply::VerifyKeyReply;
