//! The gRPC layer: translates protobuf to domain types and back, and owns nothing else.

mod convert;
mod keys;
mod verify;

pub use keys::KeyServiceImpl;
pub use verify::VerifyServiceImpl;
