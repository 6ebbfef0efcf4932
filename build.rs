//! Compiles the protos with protox (pure Rust, so building needs no system protoc) and writes the
//! file descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/keyauthority/v1/key.proto",
    "proto/keyauthority/v1/key_service.proto",
    "proto/keyauthority/v1/verify_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // protox does not write the descriptor set itself; reflection loads it from OUT_DIR.
    fs::write(
        out_dir.join("keyauthority_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
