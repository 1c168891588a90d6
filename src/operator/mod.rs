//! The operator API's transport (`proto/operator.proto`): thin tonic handlers over the
//! controller's inventory queries ([`crate::controller::Controller::inventory_volumes`] and
//! its siblings). Domain errors are mapped by the controller's one table,
//! [`crate::csi::status`], so a code means the same on both APIs.

pub mod backups;
pub mod service;

pub use service::OperatorService;
