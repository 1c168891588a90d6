//! Generated wire types. Nothing outside the transport folders (`csi/`, `agent_rpc/`,
//! `operator/`) and the operator CLI should need these; the domain works on its own types.

/// The CSI v1.12 wire contract (`proto/csi.proto`, package `csi.v1`).
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The storage agent's API (`proto/agent.proto`, package `cinderblock.agent.v1`).
#[allow(clippy::all, missing_docs)]
pub mod agent {
    tonic::include_proto!("cinderblock.agent.v1");
}

/// The operator API (`proto/operator.proto`, package `cinderblock.operator.v1`).
#[allow(clippy::all, missing_docs)]
pub mod operator {
    tonic::include_proto!("cinderblock.operator.v1");
}

/// The encoded `FileDescriptorSet` of every proto file, as `protox` compiled it at build time.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
