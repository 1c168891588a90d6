//! The one mapping from agent domain errors to gRPC codes.

use tonic::{Code, Status};

use crate::agent::AgentError;

/// The gRPC code of each agent error. Exhaustive on purpose: a new variant must be placed.
pub fn code(e: &AgentError) -> Code {
    match e {
        AgentError::InvalidArgument(_) => Code::InvalidArgument,
        AgentError::PoolNotFound(_)
        | AgentError::VolumeNotFound(_)
        | AgentError::SnapshotNotFound(_) => Code::NotFound,
        AgentError::AlreadyExists { .. } => Code::AlreadyExists,
        AgentError::HasSnapshots { .. }
        | AgentError::Exported { .. }
        | AgentError::ExtendNeedsDetach(_)
        | AgentError::Precondition(_) => Code::FailedPrecondition,
        AgentError::Shrink { .. } => Code::OutOfRange,
        AgentError::InsufficientCapacity { .. } => Code::ResourceExhausted,
        AgentError::Busy(_) => Code::Aborted,
        AgentError::TgtUnavailable(_) => Code::Unavailable,
        AgentError::Exec { .. } | AgentError::Parse { .. } | AgentError::Io { .. } => {
            Code::Internal
        }
    }
}

/// The status sent for an agent error: its code and its message with causes.
pub fn to_status(e: AgentError) -> Status {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Status::new(code(&e), msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{SnapshotId, VolumeId};
    use crate::types::Bytes;

    #[test]
    fn table() {
        let v = VolumeId::parse("v1").unwrap();
        let cases = [
            (
                AgentError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (AgentError::PoolNotFound("p".into()), Code::NotFound),
            (AgentError::VolumeNotFound(v.clone()), Code::NotFound),
            (
                AgentError::SnapshotNotFound(SnapshotId::parse("s").unwrap()),
                Code::NotFound,
            ),
            (
                AgentError::AlreadyExists {
                    what: "v".into(),
                    reason: "r".into(),
                },
                Code::AlreadyExists,
            ),
            (
                AgentError::HasSnapshots {
                    id: v.clone(),
                    count: 1,
                },
                Code::FailedPrecondition,
            ),
            (
                AgentError::Exported {
                    id: v.clone(),
                    initiators: vec![],
                },
                Code::FailedPrecondition,
            ),
            (
                AgentError::ExtendNeedsDetach(v.clone()),
                Code::FailedPrecondition,
            ),
            (
                AgentError::Precondition("p".into()),
                Code::FailedPrecondition,
            ),
            (
                AgentError::Shrink {
                    id: v.clone(),
                    current: Bytes(2),
                    requested: Bytes(1),
                },
                Code::OutOfRange,
            ),
            (
                AgentError::InsufficientCapacity {
                    pool: "p".into(),
                    needed: Bytes(2),
                    free: Bytes(1),
                },
                Code::ResourceExhausted,
            ),
            (AgentError::Busy("v1".into()), Code::Aborted),
            (AgentError::TgtUnavailable("down".into()), Code::Unavailable),
            (
                AgentError::Parse {
                    tool: "lvs",
                    reason: "r".into(),
                },
                Code::Internal,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(code(&err), want, "{err}");
        }
    }

    #[test]
    fn message_keeps_causes() {
        let e = AgentError::io("open", "/x")(std::io::Error::from(std::io::ErrorKind::NotFound));
        let s = to_status(e);
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "open /x: entity not found");
    }
}
