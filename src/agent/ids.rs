//! Validated identifiers. Ids end up in LV names, file names, tgt IQNs and command lines, so
//! they are restricted to characters that are safe in all of them.

use std::fmt;

use super::AgentError;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A validated ", $what, " id: 1-64 characters of `[a-z0-9-]`, not starting with `-`.")]
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `s`.
            pub fn parse(s: &str) -> Result<Self, AgentError> {
                if valid_id(s) {
                    Ok($name(s.to_owned()))
                } else {
                    Err(AgentError::InvalidArgument(format!(
                        concat!($what, " id {:?} must be 1-64 characters of [a-z0-9-]"),
                        s
                    )))
                }
            }

            /// The id text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(VolumeId, "volume");
id_type!(SnapshotId, "snapshot");
id_type!(BackupId, "backup");

/// An iSCSI qualified name (initiator or target), checked for the characters tgtadm and
/// iscsiadm accept: `iqn.` followed by `[a-z0-9.:-]` (RFC 3720 names are lower case).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iqn(String);

impl Iqn {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, AgentError> {
        let ok = s.len() <= 223
            && s.starts_with("iqn.")
            && s.len() > 4
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".:-".contains(&b));
        if ok {
            Ok(Iqn(s.to_owned()))
        } else {
            Err(AgentError::InvalidArgument(format!(
                "{s:?} is not an iSCSI qualified name (iqn.yyyy-mm.domain:name, lower case)"
            )))
        }
    }

    /// The name text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Iqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefix of every target IQN this project creates.
pub const TARGET_IQN_PREFIX: &str = "iqn.2026-01.dev.cinderblock:";

/// The target IQN of a volume's export.
pub fn target_iqn(id: &VolumeId) -> String {
    format!("{TARGET_IQN_PREFIX}volume-{id}")
}

/// The volume id of one of our target IQNs, if it is one.
pub fn volume_of_target(iqn: &str) -> Option<VolumeId> {
    iqn.strip_prefix(TARGET_IQN_PREFIX)?
        .strip_prefix("volume-")
        .and_then(|id| VolumeId::parse(id).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(VolumeId::parse("5f0c-ab12").unwrap().as_str(), "5f0c-ab12");
        for bad in [
            "",
            "-a",
            "A",
            "a b",
            "a;rm -rf",
            "a/b",
            "$(x)",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(VolumeId::parse(bad), Err(AgentError::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn iqns() {
        assert!(Iqn::parse("iqn.1993-08.org.debian:01:abc123").is_ok());
        for bad in ["", "iqn.", "eui.1234", "iqn.x y", "iqn.UPPER", "iqn.a;b"] {
            assert!(Iqn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn target_names_round_trip() {
        let id = VolumeId::parse("0f1e2d").unwrap();
        let iqn = target_iqn(&id);
        assert_eq!(iqn, "iqn.2026-01.dev.cinderblock:volume-0f1e2d");
        assert_eq!(volume_of_target(&iqn), Some(id));
        assert_eq!(volume_of_target("iqn.2010-10.org.openstack:volume-1"), None);
    }
}
