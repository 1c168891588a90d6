//! Transport of the agent API (`proto/agent.proto`): the tonic server over
//! [`crate::agent::service::AgentService`] and the error-to-code mapping.

pub mod backups;
pub mod client;
pub mod metrics;
pub mod server;
pub mod status;
