//! CSI transport: thin tonic handlers that parse requests into domain types, call the domain
//! and map its errors to gRPC codes in one place.

pub mod controller;
pub mod deadline;
pub mod identity;
pub mod node;
pub mod status;

/// The CSI driver name (`GetPluginInfo`, CSIDriver object, PV `spec.csi.driver`).
pub const DRIVER_NAME: &str = "csi.cinderblock.dev";

/// The topology key carrying a volume's or node's availability zone.
pub const TOPOLOGY_ZONE_KEY: &str = "topology.cinderblock.dev/zone";
pub mod leader_gate;
pub mod metrics;
