//! The one mapping from agent domain errors to gRPC codes.

use tonic::{Code, Status};

use crate::agent::AgentError;
use crate::backup::{BackupError, RepoError};

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
        AgentError::Backup(b) => backup_code(b),
    }
}

/// The gRPC code of each backup error (part of the one table above).
fn backup_code(e: &BackupError) -> Code {
    match e {
        BackupError::NotFound(_) | BackupError::RepositoryNotFound(_) => Code::NotFound,
        BackupError::AlreadyExists { .. } => Code::AlreadyExists,
        BackupError::NoRepository
        | BackupError::InUse(_)
        | BackupError::NoParent { .. }
        | BackupError::HasDependents { .. }
        | BackupError::NotAvailable { .. }
        | BackupError::ChainBroken { .. } => Code::FailedPrecondition,
        BackupError::TargetTooSmall { .. } | BackupError::Record(_) => Code::InvalidArgument,
        BackupError::Corrupt { .. }
        | BackupError::MissingObject(_)
        | BackupError::Format { .. } => Code::DataLoss,
        BackupError::Repository { source, .. } => match source {
            RepoError::Full { .. } => Code::ResourceExhausted,
            RepoError::NotFound { .. } => Code::NotFound,
            RepoError::Config(_) => Code::FailedPrecondition,
            RepoError::Io { .. } | RepoError::Store { .. } => Code::Unavailable,
        },
        BackupError::Io { .. } | BackupError::Worker(_) => Code::Internal,
    }
}

/// The status sent for an agent error: its code and its message with causes.
pub fn to_status(e: AgentError) -> Status {
    status_of(&e)
}

/// [`to_status`] of a shared error (the outcome of a backup or restore task).
pub fn status_of(e: &AgentError) -> Status {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Status::new(code(e), msg)
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
    fn backup_table() {
        let b = crate::agent::BackupId::parse("b1").unwrap();
        let io = || std::io::Error::from(std::io::ErrorKind::Other);
        let repo = |source| BackupError::Repository {
            repository: "r".into(),
            source,
        };
        let cases = [
            (BackupError::NotFound(b.clone()), Code::NotFound),
            (BackupError::RepositoryNotFound("r".into()), Code::NotFound),
            (BackupError::NoRepository, Code::FailedPrecondition),
            (
                BackupError::AlreadyExists {
                    id: b.clone(),
                    reason: "r".into(),
                },
                Code::AlreadyExists,
            ),
            (BackupError::InUse("v".into()), Code::FailedPrecondition),
            (
                BackupError::NoParent {
                    volume: "v".into(),
                    repository: "r".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                BackupError::HasDependents {
                    id: b.clone(),
                    dependents: vec![],
                },
                Code::FailedPrecondition,
            ),
            (
                BackupError::NotAvailable {
                    id: b.clone(),
                    status: "creating".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                BackupError::ChainBroken {
                    id: b.clone(),
                    missing: b.clone(),
                    repository: "r".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                BackupError::TargetTooSmall {
                    volume: "v".into(),
                    size: 1,
                    id: b.clone(),
                    needed: 2,
                },
                Code::InvalidArgument,
            ),
            (BackupError::Record("x".into()), Code::InvalidArgument),
            (
                BackupError::Corrupt {
                    object: "o".into(),
                    reason: "r".into(),
                },
                Code::DataLoss,
            ),
            (BackupError::MissingObject("o".into()), Code::DataLoss),
            (
                BackupError::Format {
                    object: "o".into(),
                    reason: "r".into(),
                },
                Code::DataLoss,
            ),
            (
                repo(RepoError::Full {
                    key: "k".into(),
                    source: io(),
                }),
                Code::ResourceExhausted,
            ),
            (
                repo(RepoError::NotFound { key: "k".into() }),
                Code::NotFound,
            ),
            (
                repo(RepoError::Config("c".into())),
                Code::FailedPrecondition,
            ),
            (
                repo(RepoError::Io {
                    op: "write",
                    path: "/x".into(),
                    source: io(),
                }),
                Code::Unavailable,
            ),
            (
                BackupError::Io {
                    op: "read",
                    path: "/v".into(),
                    source: io(),
                },
                Code::Internal,
            ),
            (BackupError::Worker("w".into()), Code::Internal),
        ];
        for (err, want) in cases {
            let e = AgentError::Backup(err);
            assert_eq!(code(&e), want, "{e}");
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
