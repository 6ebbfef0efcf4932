//! Generates the client stubs of key-authority's API from the repository's protos, and the
//! client and server of the small `echo.v1` service that the example and the tests protect.
//! protox compiles in pure Rust, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/keyauthority");
    println!("cargo:rerun-if-changed=proto");

    let api = protox::compile(
        [
            "keyauthority/v1/audit.proto",
            "keyauthority/v1/event.proto",
            "keyauthority/v1/key.proto",
            "keyauthority/v1/key_service.proto",
            "keyauthority/v1/verify_service.proto",
            "keyauthority/v1/webhook.proto",
        ],
        ["../../proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(api)?;

    // Only the example and the tests include this one (`tonic::include_proto!("echo.v1")`).
    let echo = protox::compile(["echo/v1/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(echo)?;
    Ok(())
}
