//! Per-volume CHAP credentials derived from a node-local master key, so no secret is stored
//! per volume: `secret = HMAC-SHA256(master key, "chap:" + volume id)`, rendered as text.
//! Whoever holds the key (the agent, and the node service when it is given the same key) can
//! derive a volume's secret; nobody else can.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::VolumeId;

/// Length of a derived secret in characters (96 bits, within iSCSI initiators' 12..=255).
pub const SECRET_LEN: usize = 24;

/// The master key. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct ChapKey(Vec<u8>);

impl std::fmt::Debug for ChapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChapKey(***)")
    }
}

/// A volume's incoming CHAP credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// User name (not secret).
    pub username: String,
    /// Secret (never logged).
    pub secret: String,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChapCredentials {{ username: {:?}, secret: *** }}",
            self.username
        )
    }
}

impl ChapKey {
    /// A key from raw bytes (at least 16).
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= 16).then_some(ChapKey(bytes))
    }

    /// A fresh random key (used when no key file is configured: secrets then change when
    /// the agent restarts, which reconciliation handles by re-creating the accounts).
    pub fn random() -> Self {
        use rand::RngCore;
        let mut b = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        ChapKey(b)
    }

    /// Reads a key file (trailing whitespace ignored); `None` when shorter than 16 bytes.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Option<Self>> {
        let raw = std::fs::read(path)?;
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Ok(Self::new(raw[..end].to_vec()))
    }

    /// The credentials of one volume.
    pub fn credentials(&self, id: &VolumeId) -> ChapCredentials {
        // new_from_slice only fails for zero-length keys with some MACs; HMAC takes any key.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"chap:");
        mac.update(id.as_str().as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut secret = hex::encode(digest);
        secret.truncate(SECRET_LEN);
        // The user name is public but must be unique per volume (tgtd accounts are global):
        // a prefix of the id for readability plus a hash of the whole id.
        let short: String = id.as_str().chars().filter(|c| *c != '-').take(8).collect();
        let whole = hex::encode(<Sha256 as sha2::Digest>::digest(id.as_str().as_bytes()));
        ChapCredentials {
            username: format!("cb-{short}-{}", &whole[..8]),
            secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_per_volume_and_stable() {
        let k = ChapKey::new(b"0123456789abcdef0123".to_vec()).unwrap();
        let a = VolumeId::parse("aaaa-1111").unwrap();
        let b = VolumeId::parse("bbbb-2222").unwrap();
        let ca = k.credentials(&a);
        assert_eq!(ca, k.credentials(&a), "stable");
        assert_ne!(ca.secret, k.credentials(&b).secret, "per volume");
        assert_eq!(ca.secret.len(), SECRET_LEN);
        assert!(ca.username.starts_with("cb-aaaa1111-"), "{}", ca.username);
        assert_eq!(ca.username.len(), "cb-aaaa1111-".len() + 8);
        let long1 = VolumeId::parse("0123456789abcdef0123-x").unwrap();
        let long2 = VolumeId::parse("0123456789abcdef0123-y").unwrap();
        assert_ne!(
            k.credentials(&long1).username,
            k.credentials(&long2).username
        );
        let other = ChapKey::new(b"another key, also long".to_vec()).unwrap();
        assert_ne!(ca.secret, other.credentials(&a).secret, "per key");
        assert!(!format!("{ca:?}").contains(&ca.secret), "Debug redacts");
        assert_eq!(format!("{k:?}"), "ChapKey(***)");
    }

    #[test]
    fn short_keys_rejected() {
        assert!(ChapKey::new(b"short".to_vec()).is_none());
    }
}
