//! key-authority: the single authority for API keys. `main.rs` only parses configuration and
//! calls `server::serve`; everything else lives here so tests build the very same server.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod error;
pub mod events;
pub mod gateway;
pub mod grpc;
pub mod key;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timestamp;
pub mod verify;
pub mod webhooks;

/// Generated protobuf types and gRPC stubs of `keyauthority.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyauthority.v1");

    /// The encoded descriptors of our protos, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/keyauthority_descriptor.bin"));
}
