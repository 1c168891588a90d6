//! Compiles `proto/*.proto` with the pure-Rust `protox` compiler (no `protoc` needed on the
//! build machine), keeps the encoded descriptor set for the wire-contract test, and generates
//! tonic clients and servers for the CSI, agent and operator services.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/csi.proto",
    "proto/agent.proto",
    "proto/operator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
