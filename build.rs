//! Compiles the protos with protox (pure Rust, so building needs no system protoc) and writes the
//! file descriptor set that server reflection serves.
//!
//! Each service's client is generated with tonic-prost's codec and its server with ours
//! (`grpc::ServerCodec`), which answers an undecodable request as INVALID_ARGUMENT instead of
//! INTERNAL. tonic-prost-build takes one codec for both sides, hence two generators in one.

use std::{env, fs, path::PathBuf};

use prost::Message as _;
use prost_build::{Service, ServiceGenerator};

const PROTOS: &[&str] = &[
    "proto/keyauthority/v1/audit.proto",
    "proto/keyauthority/v1/event.proto",
    "proto/keyauthority/v1/key.proto",
    "proto/keyauthority/v1/key_service.proto",
    "proto/keyauthority/v1/verify_service.proto",
    "proto/keyauthority/v1/webhook.proto",
];

/// The servers' codec, as the generated code names it (it is included in `crate::pb`).
const SERVER_CODEC: &str = "crate::grpc::ServerCodec";

/// Responses whose server side is written with another Rust type of the same wire format:
/// VerifyKey answers with the key's view already encoded, once per cached key instead of once
/// per answer (`grpc::VerifyKeyReply`). Clients keep the generated message.
const SERVER_RESPONSE_TYPES: &[(&str, &str)] = &[("VerifyKey", "crate::grpc::VerifyKeyReply")];

/// Writes a service's client, then its server, each with its own generator.
struct ClientAndServer {
    client: Box<dyn ServiceGenerator>,
    server: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for ClientAndServer {
    fn generate(&mut self, service: Service, buf: &mut String) {
        self.client.generate(service.clone(), buf);
        let mut service = service;
        for method in &mut service.methods {
            if let Some((_, rust_type)) = SERVER_RESPONSE_TYPES
                .iter()
                .find(|(name, _)| *name == method.proto_name)
            {
                method.output_type = (*rust_type).to_owned();
            }
        }
        self.server.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.client.finalize(buf);
        self.server.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.client.finalize_package(package, buf);
        self.server.finalize_package(package, buf);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // protox does not write the descriptor set itself; reflection loads it from OUT_DIR.
    fs::write(
        out_dir.join("keyauthority_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let services = ClientAndServer {
        client: tonic_prost_build::configure()
            .build_client(true)
            .build_server(false)
            .service_generator(),
        server: tonic_prost_build::configure()
            .build_client(false)
            .build_server(true)
            .codec_path(SERVER_CODEC)
            .service_generator(),
    };
    let mut config = tonic_prost_build::Config::new();
    config.service_generator(Box::new(services));
    // Neither side here: the messages only, with `config`'s generator writing the services.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
