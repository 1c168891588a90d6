//! The one mapping from controller domain errors to the gRPC codes the CSI spec names.

use tonic::{Code, Status};

use crate::agent_rpc::client::AgentErrorKind;
use crate::controller::ControllerError;

/// Longest status message sent (a NoValidPool message lists every pool).
const MAX_MESSAGE: usize = 4096;

/// The code of an agent failure passed through to the CO: the agent API uses the same codes
/// as CSI for the same situations (docs/agent-protocol.md).
fn agent_code(kind: AgentErrorKind) -> Code {
    match kind {
        AgentErrorKind::InvalidArgument => Code::InvalidArgument,
        AgentErrorKind::NotFound => Code::NotFound,
        AgentErrorKind::AlreadyExists => Code::AlreadyExists,
        AgentErrorKind::FailedPrecondition => Code::FailedPrecondition,
        AgentErrorKind::OutOfRange => Code::OutOfRange,
        AgentErrorKind::ResourceExhausted => Code::ResourceExhausted,
        AgentErrorKind::Aborted => Code::Aborted,
        AgentErrorKind::Unavailable => Code::Unavailable,
        AgentErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        AgentErrorKind::DataLoss => Code::DataLoss,
        AgentErrorKind::Internal | AgentErrorKind::Unknown => Code::Internal,
    }
}

/// The gRPC code of each controller error. Exhaustive on purpose: a new variant must be placed.
pub fn code(e: &ControllerError) -> Code {
    match e {
        ControllerError::InvalidArgument(_)
        | ControllerError::UnsupportedCapability(_)
        | ControllerError::UnknownVolumeType(_) => Code::InvalidArgument,
        ControllerError::VolumeNotFound(_)
        | ControllerError::SnapshotNotFound(_)
        | ControllerError::BackupNotFound(_)
        | ControllerError::SourceNotFound(_)
        | ControllerError::NodeNotFound(_) => Code::NotFound,
        ControllerError::AlreadyExists { .. } => Code::AlreadyExists,
        ControllerError::OutOfRange(_) => Code::OutOfRange,
        ControllerError::NoValidPool { .. } => Code::ResourceExhausted,
        ControllerError::HasSnapshots { .. }
        | ControllerError::Published { .. }
        | ControllerError::PublishedElsewhere { .. }
        | ControllerError::WrongStatus { .. }
        | ControllerError::RepositoryUnavailable(_) => Code::FailedPrecondition,
        ControllerError::Busy(_) | ControllerError::BadToken(_) => Code::Aborted,
        ControllerError::IndexIncomplete(_) => Code::Unavailable,
        ControllerError::Agent { source, .. } => agent_code(source.kind),
        ControllerError::Internal(_) => Code::Internal,
    }
}

/// The status sent for a controller error: its code and its message with causes, on one line.
pub fn to_status(e: ControllerError) -> Status {
    Status::new(code(&e), message(&e))
}

/// A status message: the error and its causes on one line, cut at [`MAX_MESSAGE`] bytes.
pub fn message(e: &dyn std::error::Error) -> String {
    let mut msg = crate::logging::error_chain(e);
    if msg.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push_str("...");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::VolumeId;
    use crate::agent_rpc::client::AgentClientError;
    use crate::scheduler::SchedulerError;

    #[test]
    fn table() {
        let v = || match VolumeId::parse("v1") {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        let agent = |kind| ControllerError::Agent {
            agent: "a".into(),
            op: "CreateVolume",
            source: AgentClientError::new(kind, "m"),
        };
        use AgentErrorKind as K;
        let cases = [
            (
                ControllerError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                ControllerError::UnsupportedCapability("x".into()),
                Code::InvalidArgument,
            ),
            (
                ControllerError::UnknownVolumeType("gold".into()),
                Code::InvalidArgument,
            ),
            (ControllerError::VolumeNotFound("v".into()), Code::NotFound),
            (
                ControllerError::SnapshotNotFound("s".into()),
                Code::NotFound,
            ),
            (ControllerError::SourceNotFound("s".into()), Code::NotFound),
            (ControllerError::BackupNotFound("b".into()), Code::NotFound),
            (
                ControllerError::WrongStatus {
                    what: "backup b".into(),
                    status: "creating".into(),
                    needed: "available",
                },
                Code::FailedPrecondition,
            ),
            (
                ControllerError::RepositoryUnavailable("nfs".into()),
                Code::FailedPrecondition,
            ),
            (ControllerError::NodeNotFound("n".into()), Code::NotFound),
            (
                ControllerError::AlreadyExists {
                    what: "volume",
                    name: "n".into(),
                    reason: "r".into(),
                },
                Code::AlreadyExists,
            ),
            (ControllerError::OutOfRange("r".into()), Code::OutOfRange),
            (
                ControllerError::NoValidPool {
                    source: SchedulerError::NoValidPool { reasons: vec![] },
                    last_failure: None,
                },
                Code::ResourceExhausted,
            ),
            (
                ControllerError::HasSnapshots { id: v(), count: 1 },
                Code::FailedPrecondition,
            ),
            (
                ControllerError::Published {
                    id: v(),
                    nodes: vec![],
                },
                Code::FailedPrecondition,
            ),
            (
                ControllerError::PublishedElsewhere {
                    id: v(),
                    other: "n".into(),
                },
                Code::FailedPrecondition,
            ),
            (ControllerError::Busy("volume:v1".into()), Code::Aborted),
            (ControllerError::BadToken("x".into()), Code::Aborted),
            (
                ControllerError::IndexIncomplete(vec!["a".into()]),
                Code::Unavailable,
            ),
            (ControllerError::Internal("x".into()), Code::Internal),
            (agent(K::InvalidArgument), Code::InvalidArgument),
            (agent(K::NotFound), Code::NotFound),
            (agent(K::AlreadyExists), Code::AlreadyExists),
            (agent(K::FailedPrecondition), Code::FailedPrecondition),
            (agent(K::OutOfRange), Code::OutOfRange),
            (agent(K::ResourceExhausted), Code::ResourceExhausted),
            (agent(K::Aborted), Code::Aborted),
            (agent(K::Unavailable), Code::Unavailable),
            (agent(K::DeadlineExceeded), Code::DeadlineExceeded),
            (agent(K::Internal), Code::Internal),
            (agent(K::Unknown), Code::Internal),
        ];
        for (err, want) in cases {
            assert_eq!(code(&err), want, "{err}");
        }
    }

    #[test]
    fn message_lists_pools_and_is_bounded() {
        let e = ControllerError::NoValidPool {
            source: SchedulerError::NoValidPool {
                reasons: vec![(
                    crate::scheduler::PoolRef::new("a", "p"),
                    "pool is unhealthy".into(),
                )],
            },
            last_failure: Some("b#q: disk full".into()),
        };
        let s = to_status(e);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "no pool can hold the volume: a#p: pool is unhealthy (last attempt: b#q: disk full)"
        );
        let long = to_status(ControllerError::InvalidArgument("x".repeat(10_000)));
        assert_eq!(long.message().len(), MAX_MESSAGE + 3);
    }
}
