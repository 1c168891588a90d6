//! Change tracking for incremental backups: which byte ranges of a volume may differ between
//! two snapshots of it, from the pool's own copy-on-write bookkeeping, so an incremental
//! backup reads only those and takes the rest from its parent unread.
//!
//! File pools on a file system with reflinks (XFS, btrfs): a snapshot shares every block
//! with its volume until one side rewrites it, and a rewrite moves the writer's range to new
//! blocks. Two snapshots therefore hold the same bytes wherever `FIEMAP` maps a range of both
//! to the same physical blocks: a shared block is never written in place while shared.
//! Ranges mapped in neither file are holes in both (zeros). Anything else (mapped in one file
//! only, mapped elsewhere, or with a location the file system does not report) counts as
//! changed, and is read and compared by digest as without tracking.

use std::path::Path;

use fiemap::FiemapExtentFlags;

use super::AgentError;

/// One mapped range of a file: `len` bytes at file offset `logical`, stored at `physical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Where the file system keeps it (comparable only within one file system).
    pub physical: u64,
    /// Length in bytes.
    pub len: u64,
    /// The location is unknown or pending (delayed allocation): never equal to anything.
    pub unknown: bool,
}

/// The mapped extents of a file, in file order (`FIEMAP`).
pub fn extents(path: &Path) -> Result<Vec<Extent>, AgentError> {
    let map = fiemap::fiemap(path).map_err(AgentError::io("map extents of", path))?;
    let mut out = Vec::new();
    for e in map {
        let e = e.map_err(AgentError::io("map extents of", path))?;
        let unknown = e
            .fe_flags
            .intersects(FiemapExtentFlags::UNKNOWN | FiemapExtentFlags::DELALLOC);
        out.push(Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            len: e.fe_length,
            unknown,
        });
    }
    Ok(out)
}

/// The ranges of `[0, size)` where a file mapped as `after` may differ from one mapped as
/// `before` (both `size` bytes), merged and in order.
pub fn changed(before: &[Extent], after: &[Extent], size: u64) -> Vec<(u64, u64)> {
    // Cut points: every extent boundary. Between two cuts each file is either mapped by one
    // extent or not at all, so one comparison decides the whole piece.
    let mut cuts: Vec<u64> = vec![0, size];
    for e in before.iter().chain(after) {
        for at in [e.logical, e.logical.saturating_add(e.len)] {
            if at < size {
                cuts.push(at);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (s, t) = (w[0], w[1]);
        let a = covering(before, &mut i, s);
        let b = covering(after, &mut j, s);
        let same = match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                !a.unknown
                    && !b.unknown
                    && a.physical.wrapping_sub(a.logical) == b.physical.wrapping_sub(b.logical)
            }
            _ => false,
        };
        if same {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = t,
            _ => out.push((s, t)),
        }
    }
    out
}

/// The extent of `map` (in order) covering `at`, moving `cursor` forward past extents that
/// end before it.
fn covering<'a>(map: &'a [Extent], cursor: &mut usize, at: u64) -> Option<&'a Extent> {
    while map
        .get(*cursor)
        .is_some_and(|e| e.logical.saturating_add(e.len) <= at)
    {
        *cursor += 1;
    }
    map.get(*cursor).filter(|e| e.logical <= at)
}

/// The bytes of storage `extents` occupy, each physical block counted once however many
/// files (or ranges of one file) share it. Extents without a known location count in full.
pub fn distinct_bytes<'a>(extents: impl IntoIterator<Item = &'a Extent>) -> u64 {
    let mut unknown = 0u64;
    let mut placed: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        if e.unknown {
            unknown = unknown.saturating_add(e.len);
        } else {
            placed.push((e.physical, e.physical.saturating_add(e.len)));
        }
    }
    placed.sort_unstable();
    let (mut total, mut end) = (0u64, 0u64);
    for (s, t) in placed {
        let s = s.max(end);
        if t > s {
            total += t - s;
            end = t;
        }
    }
    total.saturating_add(unknown)
}

/// `[0, size)` minus `ranges` (in order, not overlapping).
pub fn complement(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, t) in ranges {
        if s > at {
            out.push((at, s.min(size)));
        }
        at = at.max(t);
    }
    if at < size {
        out.push((at, size));
    }
    out.retain(|(s, t)| s < t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            unknown: false,
        }
    }

    #[test]
    fn shared_blocks_count_once() {
        // A volume, its reflinked snapshot (same blocks), and a rewrite that moved 50 bytes.
        let vol = [ext(0, 1000, 50), ext(50, 9000, 50), ext(100, 1100, 100)];
        let snap = [ext(0, 1000, 200)];
        assert_eq!(distinct_bytes(&snap), 200);
        assert_eq!(distinct_bytes(vol.iter().chain(&snap)), 250);
        // Overlaps that start inside an earlier range, and ranges inside others.
        let odd = [
            ext(0, 10, 100),
            ext(0, 50, 100),
            ext(0, 60, 10),
            ext(0, 400, 1),
        ];
        assert_eq!(distinct_bytes(&odd), 141);
        // Unplaced (delayed allocation) extents are never shared.
        let mut pending = ext(0, 1000, 30);
        pending.unknown = true;
        assert_eq!(distinct_bytes(snap.iter().chain([&pending, &pending])), 260);
        assert_eq!(distinct_bytes(&[]), 0);
    }

    #[test]
    fn identical_maps_have_no_changes() {
        let m = [ext(0, 1000, 100), ext(200, 5000, 300)];
        assert!(changed(&m, &m, 500).is_empty());
    }

    #[test]
    fn a_rewritten_range_moves_and_is_changed() {
        // The volume rewrote [40, 60): XFS gives it new blocks, so its extent splits.
        let before = [ext(0, 1000, 100)];
        let after = [ext(0, 1000, 40), ext(40, 9000, 20), ext(60, 1060, 40)];
        assert_eq!(changed(&before, &after, 100), vec![(40, 60)]);
    }

    #[test]
    fn extents_split_differently_but_mapping_the_same_blocks_are_unchanged() {
        let before = [ext(0, 1000, 50), ext(50, 1050, 50)];
        let after = [ext(0, 1000, 100)];
        assert!(changed(&before, &after, 100).is_empty());
    }

    #[test]
    fn holes_in_both_are_unchanged_and_in_one_only_changed() {
        // Before: data at [0, 10) and [50, 60). After: the first punched out, data written
        // at [80, 90).
        let before = [ext(0, 100, 10), ext(50, 500, 10)];
        let after = [ext(50, 500, 10), ext(80, 700, 10)];
        assert_eq!(changed(&before, &after, 100), vec![(0, 10), (80, 90)]);
    }

    #[test]
    fn unknown_locations_are_changed_even_when_they_match() {
        let mut pending = ext(0, 0, 64);
        pending.unknown = true;
        assert_eq!(changed(&[pending], &[pending], 64), vec![(0, 64)]);
    }

    #[test]
    fn same_physical_blocks_at_another_offset_are_changed() {
        // The same blocks, but mapped 10 bytes further: the content moved.
        let before = [ext(0, 1000, 100)];
        let after = [ext(10, 1000, 90)];
        assert_eq!(changed(&before, &after, 100), vec![(0, 100)]);
    }

    #[test]
    fn adjacent_changes_merge_and_extents_past_the_size_are_cut() {
        let before = [ext(0, 1000, 200)];
        let after = [ext(0, 2000, 30), ext(30, 3000, 30), ext(60, 1060, 140)];
        assert_eq!(changed(&before, &after, 100), vec![(0, 60)]);
    }

    #[test]
    fn complement_covers_the_rest() {
        assert_eq!(
            complement(&[(10, 20), (30, 100)], 100),
            vec![(0, 10), (20, 30)]
        );
        assert_eq!(complement(&[], 50), vec![(0, 50)]);
        assert_eq!(complement(&[(0, 50)], 50), Vec::<(u64, u64)>::new());
    }
}
