//! Newtypes shared by every role: identifiers and quantities. Sizes are `u64` bytes everywhere
//! and are converted only by the named functions here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A quantity of bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    /// One KiB.
    pub const KIB: u64 = 1024;
    /// One MiB.
    pub const MIB: u64 = 1024 * 1024;
    /// One GiB.
    pub const GIB: u64 = 1024 * 1024 * 1024;

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Bytes(n * Self::MIB)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Bytes(n * Self::GIB)
    }

    /// The raw count.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Rounds up to a multiple of `unit` (a pool's extent size). `None` on overflow or a zero unit.
    pub fn round_up(self, unit: Bytes) -> Option<Bytes> {
        if unit.0 == 0 {
            return None;
        }
        let rem = self.0 % unit.0;
        if rem == 0 {
            Some(self)
        } else {
            self.0.checked_add(unit.0 - rem).map(Bytes)
        }
    }

    /// This size as a floating point number of GiB (for weighers and tables).
    pub fn as_gib_f64(self) -> f64 {
        self.0 as f64 / Self::GIB as f64
    }
}

/// Why a size text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?}: use bytes or a number with K, M, G, T, Ki, Mi, Gi, Ti (optionally followed by B)")]
pub struct SizeError(pub String);

impl std::str::FromStr for Bytes {
    type Err = SizeError;

    /// `1073741824`, `1G`, `1GiB`, `512Mi`, `10M` (binary units: sizes of block devices).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || SizeError(text.to_owned());
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let n: u64 = num.parse().map_err(|_| err())?;
        let unit = unit.trim();
        let unit = unit.strip_suffix('B').unwrap_or(unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let mult: u64 = match unit {
            "" => 1,
            "K" | "k" => Self::KIB,
            "M" => Self::MIB,
            "G" => Self::GIB,
            "T" => Self::GIB * 1024,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Bytes).ok_or_else(err)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= Self::GIB && b.is_multiple_of(Self::GIB) {
            write!(f, "{}GiB", b / Self::GIB)
        } else if b >= Self::MIB && b.is_multiple_of(Self::MIB) {
            write!(f, "{}MiB", b / Self::MIB)
        } else {
            write!(f, "{b}B")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_up_table() {
        let ext = Bytes::mib(4);
        let cases = [
            (0, 0),
            (1, 4 * Bytes::MIB),
            (4 * Bytes::MIB, 4 * Bytes::MIB),
            (4 * Bytes::MIB + 1, 8 * Bytes::MIB),
        ];
        for (input, want) in cases {
            assert_eq!(
                Bytes(input).round_up(ext),
                Some(Bytes(want)),
                "input {input}"
            );
        }
        assert_eq!(Bytes(u64::MAX).round_up(ext), None);
        assert_eq!(Bytes(5).round_up(Bytes(0)), None);
    }

    #[test]
    fn parse_table() {
        let ok = [
            ("4096", 4096),
            ("1G", Bytes::GIB),
            ("1GiB", Bytes::GIB),
            ("512Mi", 512 * Bytes::MIB),
            ("3MB", 3 * Bytes::MIB),
            ("2T", 2048 * Bytes::GIB),
            ("8k", 8192),
        ];
        for (t, want) in ok {
            assert_eq!(t.parse::<Bytes>(), Ok(Bytes(want)), "{t}");
        }
        for bad in [
            "",
            "G",
            "1X",
            "-1",
            "1.5G",
            "99999999999999999999",
            "20000000000T",
        ] {
            assert_eq!(
                bad.parse::<Bytes>(),
                Err(SizeError(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn display() {
        assert_eq!(Bytes::gib(2).to_string(), "2GiB");
        assert_eq!(Bytes::mib(3).to_string(), "3MiB");
        assert_eq!(Bytes(7).to_string(), "7B");
    }
}
