//! Cinder's volume and snapshot statuses, derived rather than stored: Cinderblock has no
//! database holding a `status` column, so the status shown to operators is computed from what
//! the agent reports (its own status, the export list, the marks the controller keeps in the
//! volume's metadata) and from the operation the controller has in flight on the object.

use std::fmt;

use super::guard::Operation;
use crate::agent_rpc::client::AgentVolumeStatus;

/// Cinder's volume statuses (the subset Cinderblock can be in), spelled as Cinder spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CinderStatus {
    /// Being created (or its content still being copied in).
    Creating,
    /// Not attached anywhere.
    Available,
    /// Being exported to a node.
    Attaching,
    /// Exported to at least one node.
    InUse,
    /// Being unexported from a node.
    Detaching,
    /// Being deleted.
    Deleting,
    /// Being extended.
    Extending,
    /// Being retyped (retag in place, or migration to another pool).
    Retyping,
    /// A backup is reading it.
    BackingUp,
    /// A backup is being restored into it.
    RestoringBackup,
    /// Taken out of service on its agent.
    Maintenance,
    /// Failed.
    Error,
}

impl CinderStatus {
    /// Every status, in the order operators read them.
    pub const ALL: [CinderStatus; 12] = [
        CinderStatus::Creating,
        CinderStatus::Available,
        CinderStatus::Attaching,
        CinderStatus::InUse,
        CinderStatus::Detaching,
        CinderStatus::Deleting,
        CinderStatus::Extending,
        CinderStatus::Retyping,
        CinderStatus::BackingUp,
        CinderStatus::RestoringBackup,
        CinderStatus::Maintenance,
        CinderStatus::Error,
    ];

    /// Cinder's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CinderStatus::Creating => "creating",
            CinderStatus::Available => "available",
            CinderStatus::Attaching => "attaching",
            CinderStatus::InUse => "in-use",
            CinderStatus::Detaching => "detaching",
            CinderStatus::Deleting => "deleting",
            CinderStatus::Extending => "extending",
            CinderStatus::Retyping => "retyping",
            CinderStatus::BackingUp => "backing-up",
            CinderStatus::RestoringBackup => "restoring-backup",
            CinderStatus::Maintenance => "maintenance",
            CinderStatus::Error => "error",
        }
    }

    /// The status spelled `text` (Cinder's spelling; `_` is accepted for `-`, as the Cinder
    /// API itself writes `in_use` in places).
    pub fn parse(text: &str) -> Option<CinderStatus> {
        let text = text.trim().to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for CinderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a volume's status is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusInputs {
    /// The agent's own status.
    pub agent: AgentVolumeStatus,
    /// The agent reports at least one initiator in the export's ACL.
    pub exported: bool,
    /// Its content is still being copied in from another pool (`csi.populating` mark).
    pub populating: bool,
    /// It is the target copy of an unfinished retype migration (`csi.migration` mark).
    pub migration_target: bool,
    /// The controller operation in flight on the volume (its guard), if any.
    pub in_flight: Option<Operation>,
}

/// Cinder's status of a volume. In order: an agent-reported error wins; then what the
/// controller is doing right now; then what the agent is doing; then the controller's marks
/// left by an unfinished copy or migration; then exported or not.
pub fn volume_status(i: StatusInputs) -> CinderStatus {
    use AgentVolumeStatus as A;
    if i.agent == A::Error {
        return CinderStatus::Error;
    }
    if let Some(op) = i.in_flight {
        return match op {
            Operation::Create => CinderStatus::Creating,
            Operation::Delete => CinderStatus::Deleting,
            Operation::Extend => CinderStatus::Extending,
            Operation::Publish => CinderStatus::Attaching,
            Operation::Unpublish => CinderStatus::Detaching,
            Operation::Retype => CinderStatus::Retyping,
        };
    }
    match i.agent {
        A::Creating => return CinderStatus::Creating,
        A::Deleting => return CinderStatus::Deleting,
        A::Extending => return CinderStatus::Extending,
        A::BackingUp => return CinderStatus::BackingUp,
        A::Restoring => return CinderStatus::RestoringBackup,
        A::Maintenance => return CinderStatus::Maintenance,
        A::Available | A::InUse | A::Other | A::Error => {}
    }
    if i.populating {
        // An interrupted cross-pool copy: the CO's retry of CreateVolume finishes it.
        return CinderStatus::Creating;
    }
    if i.migration_target {
        return CinderStatus::Retyping;
    }
    if i.exported || i.agent == A::InUse {
        CinderStatus::InUse
    } else {
        CinderStatus::Available
    }
}

/// Cinder's snapshot statuses (the subset Cinderblock can be in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SnapshotStatus {
    /// Being taken.
    Creating,
    /// Usable as a content source.
    Available,
    /// Being deleted.
    Deleting,
}

impl SnapshotStatus {
    /// Cinder's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Creating => "creating",
            SnapshotStatus::Available => "available",
            SnapshotStatus::Deleting => "deleting",
        }
    }
}

impl fmt::Display for SnapshotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cinder's status of a snapshot: what the controller is doing, else whether the agent says
/// it is ready to use.
pub fn snapshot_status(ready_to_use: bool, in_flight: Option<Operation>) -> SnapshotStatus {
    match in_flight {
        Some(Operation::Delete) => SnapshotStatus::Deleting,
        Some(Operation::Create) => SnapshotStatus::Creating,
        Some(Operation::Extend | Operation::Publish | Operation::Unpublish | Operation::Retype)
        | None => {
            if ready_to_use {
                SnapshotStatus::Available
            } else {
                SnapshotStatus::Creating
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AgentVolumeStatus as A;
    use CinderStatus as C;

    fn inputs(agent: A) -> StatusInputs {
        StatusInputs {
            agent,
            exported: false,
            populating: false,
            migration_target: false,
            in_flight: None,
        }
    }

    #[test]
    fn volume_status_table() {
        let exported = |agent| StatusInputs {
            exported: true,
            ..inputs(agent)
        };
        let doing = |agent, op| StatusInputs {
            in_flight: Some(op),
            ..inputs(agent)
        };
        let populating = StatusInputs {
            populating: true,
            ..inputs(A::Available)
        };
        let migrating = StatusInputs {
            migration_target: true,
            ..inputs(A::Available)
        };
        // (inputs, want)
        let cases = [
            (inputs(A::Available), C::Available),
            (inputs(A::Other), C::Available),
            (exported(A::Available), C::InUse),
            (exported(A::Other), C::InUse),
            (inputs(A::InUse), C::InUse),
            (inputs(A::Creating), C::Creating),
            (inputs(A::Deleting), C::Deleting),
            (exported(A::Extending), C::Extending),
            (inputs(A::BackingUp), C::BackingUp),
            (inputs(A::Restoring), C::RestoringBackup),
            (exported(A::Maintenance), C::Maintenance),
            (inputs(A::Error), C::Error),
            (exported(A::Error), C::Error),
            (doing(A::Error, Operation::Delete), C::Error),
            (doing(A::Available, Operation::Create), C::Creating),
            (doing(A::Available, Operation::Delete), C::Deleting),
            (doing(A::InUse, Operation::Extend), C::Extending),
            (doing(A::Available, Operation::Publish), C::Attaching),
            (doing(A::InUse, Operation::Unpublish), C::Detaching),
            (doing(A::Available, Operation::Retype), C::Retyping),
            (doing(A::Maintenance, Operation::Retype), C::Retyping),
            (populating, C::Creating),
            (
                StatusInputs {
                    exported: true,
                    ..populating
                },
                C::Creating,
            ),
            (migrating, C::Retyping),
            (
                StatusInputs {
                    agent: A::Deleting,
                    ..migrating
                },
                C::Deleting,
            ),
        ];
        for (i, want) in cases {
            assert_eq!(volume_status(i), want, "{i:?}");
        }
    }

    #[test]
    fn spelling_round_trips_and_accepts_underscores() {
        for s in CinderStatus::ALL {
            assert_eq!(CinderStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        let cases = [
            ("in_use", Some(C::InUse)),
            ("IN-USE", Some(C::InUse)),
            (" available ", Some(C::Available)),
            ("restoring_backup", Some(C::RestoringBackup)),
            ("attached", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(CinderStatus::parse(text), want, "{text:?}");
        }
    }

    #[test]
    fn snapshot_status_table() {
        let cases = [
            (true, None, SnapshotStatus::Available),
            (false, None, SnapshotStatus::Creating),
            (true, Some(Operation::Delete), SnapshotStatus::Deleting),
            (false, Some(Operation::Delete), SnapshotStatus::Deleting),
            (true, Some(Operation::Create), SnapshotStatus::Creating),
        ];
        for (ready, op, want) in cases {
            assert_eq!(snapshot_status(ready, op), want, "{ready} {op:?}");
            assert_eq!(want.to_string(), want.as_str());
        }
    }
}
