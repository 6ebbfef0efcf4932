//! Request bodies for h2load, a load generator written in C that knows nothing of gRPC: one
//! length-prefixed gRPC message per file, posted as is by `h2load -d FILE`. Issues one key and
//! warms it first, so the VerifyKey body verifies a warm key, as in `loadgen warm`.

use std::path::Path;

use key_authority::pb;
use prost::Message as _;

use crate::client::{self, Net, Result};

/// Writes `check.bin` (an empty grpc.health.v1.HealthCheckRequest) and `verify.bin` (a
/// VerifyKeyRequest for a fresh, warmed key) into `out`.
pub async fn write(net: &Net, target: &str, out: &Path) -> Result<()> {
    let channel = net.connect(target).await?;
    let key = client::issue_warm_key(net, channel, "loadgen h2load").await?;
    let verify = pb::VerifyKeyRequest {
        key: key.secret,
        ..Default::default()
    };
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("check.bin"), grpc_frame(&[]))?;
    std::fs::write(out.join("verify.bin"), grpc_frame(&verify.encode_to_vec()))?;
    println!(
        "wrote {}/check.bin and {}/verify.bin",
        out.display(),
        out.display()
    );
    Ok(())
}

/// A gRPC message on the wire: not compressed (0), its length (big-endian u32), its bytes.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let length = u32::try_from(message.len()).expect("a small message");
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}
