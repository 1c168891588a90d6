//! Cinderblock: a Kubernetes CSI driver with OpenStack Cinder's block-storage semantics.
//!
//! The binary (`src/main.rs`) only parses arguments and starts a role; everything else lives
//! here so that `tests/` can reach it. Folders are the architecture (see `docs/design.md`):
//! transport (`csi`, `operator`, `transport`) is thin, the domain (`scheduler`, `agent`,
//! `controller`, `node`) never sees wire types, and `exec` is the only place that
//! spawns a process.

pub mod agent;
pub mod agent_rpc;
pub mod backup;
pub mod cli;
pub mod config;
pub mod controller;
pub mod csi;
pub mod exec;
pub mod health;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod ops;
pub mod proto;
pub mod roles;
pub mod scheduler;
pub mod tls;
pub mod transport;
pub mod types;
