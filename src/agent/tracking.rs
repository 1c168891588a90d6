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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let file = File::open(path).map_err(AgentError::io("map extents of", path))?;
    extents_of(&file, path)
}

/// The mapped extents of `file` (opened from `path`), in file order (`FIEMAP`).
fn extents_of(file: &File, path: &Path) -> Result<Vec<Extent>, AgentError> {
    let mut out = Vec::new();
    for e in fiemap::Fiemap::new(file) {
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

/// What identifies one state of a file's extent map: the inode, its size and allocation,
/// and its modification and change times. Writing, punching, truncating, cloning onto the
/// file or replacing it under its name changes one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    blocks: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of the file now at `path`.
    fn of(path: &Path) -> Result<Stamp, AgentError> {
        std::fs::metadata(path)
            .map(|m| Stamp::from(&m))
            .map_err(AgentError::io("stat", path))
    }

    /// The stamp of the open `file` (opened from `path`).
    fn of_file(file: &File, path: &Path) -> Result<Stamp, AgentError> {
        file.metadata()
            .map(|m| Stamp::from(&m))
            .map_err(AgentError::io("stat", path))
    }

    /// Whether the file's last change is at least `settled` old.
    fn settled(&self, settled: Duration) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        now.saturating_sub(u64::try_from(self.ctime.0).unwrap_or(0)) >= settled.as_secs()
    }
}

impl From<&std::fs::Metadata> for Stamp {
    fn from(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            blocks: m.blocks(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A file's extent map, as [`ExtentCache`] hands it out (shared with the cache).
pub type Map = Arc<Vec<Extent>>;

/// Extent maps of files kept while the files do not change, so that reading a pool's
/// allocation (every few seconds, for the controller and the metrics) maps only the images
/// written since. On XFS with reflinks, `FIEMAP` looks up each extent's sharing in the
/// refcount tree: a pool of 20 images of 1 GiB with 35,000 extents each took 2.4–2.7 s per
/// reading, nearly all of it in the kernel.
///
/// A map is kept only when it cannot go stale unseen. Its file must have been left alone
/// for `settled`, before and after a flush (a write in progress has changed the times
/// already, but its data may not be in the page cache yet). The file's data is flushed
/// before mapping: a rewrite of a block shared with a snapshot gets its new block when
/// written back, later and without touching the times, so a map read before that would keep
/// the old block. The file's stamp is read after the flush and again after mapping, and a
/// change in between discards the map. Maps with a location the file system does not give
/// (delayed allocation) are not kept either.
///
/// Kept maps take memory (32 bytes an extent) and are bounded: past `max_extents` in all,
/// further files are mapped at every call, as without the cache.
#[derive(Debug)]
pub struct ExtentCache {
    settled: Duration,
    max_extents: usize,
    // The kept maps and their generation. Locked for a lookup or an update, never while a
    // file is mapped.
    kept: Mutex<Kept>,
    // Files mapped (not taken from the cache) since the cache was made.
    mapped: AtomicU64,
}

/// Kept maps by path, with the stamp each was read at, their extents in all, and a
/// generation counted up at every change of them.
#[derive(Debug, Default)]
struct Kept {
    maps: HashMap<PathBuf, (Stamp, Map)>,
    extents: usize,
    generation: u64,
}

impl Kept {
    /// Keeps `map` for `path` (instead of what was kept for it), when it fits in `max`
    /// extents in all; else drops what was kept for `path`.
    fn put(&mut self, path: &Path, entry: Option<(Stamp, Map)>, max: usize) {
        let old = self.maps.remove(path);
        let mut changed = old.is_some();
        if let Some((_, m)) = &old {
            self.extents -= m.len();
        }
        if let Some((stamp, map)) = entry.filter(|(_, m)| self.extents + m.len() <= max) {
            self.extents += map.len();
            self.maps.insert(path.to_owned(), (stamp, map));
            changed = true;
        }
        self.generation += u64::from(changed);
    }

    /// Drops the maps of files not in `paths`.
    fn keep_only(&mut self, paths: &[PathBuf]) {
        let counted: HashSet<&PathBuf> = paths.iter().collect();
        let n = self.maps.len();
        self.maps.retain(|p, _| counted.contains(p));
        if self.maps.len() != n {
            self.extents = self.maps.values().map(|(_, m)| m.len()).sum();
            self.generation += 1;
        }
    }
}

impl ExtentCache {
    /// How long a file must have been left alone before its map is kept.
    pub const SETTLED: Duration = Duration::from_secs(10);

    /// Most extents kept in all by default (128 MiB of maps).
    pub const MAX_EXTENTS: usize = 4 << 20;

    /// An empty cache that keeps the maps of files unchanged for `settled`, up to
    /// `max_extents` extents in all.
    pub fn new(settled: Duration, max_extents: usize) -> Self {
        ExtentCache {
            settled,
            max_extents,
            kept: Mutex::new(Kept::default()),
            mapped: AtomicU64::new(0),
        }
    }

    /// The extent maps of `paths` (distinct), in order. Kept maps of other files are dropped:
    /// `paths` is every file the caller counts. With them, when the cache now holds exactly
    /// these maps, its generation: a later call given the same generation got the same maps,
    /// so whatever was computed from them still holds. Blocking: `FIEMAP` and `fdatasync`.
    pub fn maps(&self, paths: &[PathBuf]) -> Result<(Vec<Map>, Option<u64>), AgentError> {
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let before = Stamp::of(p)?;
            let kept = self
                .lock()
                .maps
                .get(p)
                .filter(|(s, _)| *s == before)
                .map(|(_, m)| m.clone());
            if let Some(m) = kept {
                out.push(m);
                continue;
            }
            // One open file for the flush, the stamps and the map: all of one inode.
            let file = File::open(p).map_err(AgentError::io("map extents of", p))?;
            // Flushed (when it may be kept): its stamp then, as writing back may change the
            // allocation, is the one kept.
            let (keep, flushed) = if before.settled(self.settled) {
                file.sync_data().map_err(AgentError::io("flush", p))?;
                let flushed = Stamp::of_file(&file, p)?;
                (flushed.settled(self.settled), flushed)
            } else {
                (false, before)
            };
            let map = Arc::new(extents_of(&file, p)?);
            self.mapped.fetch_add(1, Ordering::Relaxed);
            let keep =
                keep && !map.iter().any(|e| e.unknown) && Stamp::of_file(&file, p)? == flushed;
            let entry = keep.then(|| (flushed, map.clone()));
            self.lock().put(p, entry, self.max_extents);
            out.push(map);
        }
        let mut kept = self.lock();
        kept.keep_only(paths);
        let exactly = kept.maps.len() == paths.len()
            && paths
                .iter()
                .zip(&out)
                .all(|(p, m)| kept.maps.get(p).is_some_and(|(_, k)| Arc::ptr_eq(k, m)));
        Ok((out, exactly.then_some(kept.generation)))
    }

    /// Files mapped since the cache was made (the others came from it).
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
    use std::io::Write;

    use super::*;

    /// A file of `blocks` 4 KiB blocks of data under `dir`.
    fn image(dir: &Path, name: &str, blocks: usize) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![7u8; blocks * 4096]).unwrap();
        p
    }

    #[test]
    fn kept_maps_are_reused_until_their_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (image(dir.path(), "a", 4), image(dir.path(), "b", 2));
        let cache = ExtentCache::new(Duration::ZERO, ExtentCache::MAX_EXTENTS);
        let both = [a.clone(), b.clone()];

        let (maps, first) = cache.maps(&both).unwrap();
        assert_eq!(cache.mapped(), 2);
        let sizes: Vec<u64> = maps.iter().map(|m| m.iter().map(|e| e.len).sum()).collect();
        assert_eq!(
            sizes,
            [4 * 4096, 2 * 4096],
            "flushed first: every block is placed"
        );
        assert!(first.is_some(), "both maps are kept");

        let (again, second) = cache.maps(&both).unwrap();
        assert_eq!((cache.mapped(), second), (2, first), "nothing mapped again");
        assert!(Arc::ptr_eq(&maps[0], &again[0]));

        // Appending to a: only a is mapped again, and what was computed before is stale.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&a)
            .and_then(|mut f| f.write_all(&[1u8; 4096]))
            .unwrap();
        let (maps, third) = cache.maps(&both).unwrap();
        assert_eq!(cache.mapped(), 3);
        assert_eq!(maps[0].iter().map(|e| e.len).sum::<u64>(), 5 * 4096);
        assert!(third.is_some() && third != first);

        // A file replaced under its name (another inode) is mapped again.
        let tmp = image(dir.path(), "b.new", 3);
        std::fs::rename(&tmp, &b).unwrap();
        let (maps, fourth) = cache.maps(&both).unwrap();
        assert_eq!(cache.mapped(), 4);
        assert_eq!(maps[1].iter().map(|e| e.len).sum::<u64>(), 3 * 4096);
        assert!(fourth.is_some() && fourth != third);

        // Counting b alone drops a's map: a different set, a different generation, which
        // then holds while nothing changes.
        let (_, fifth) = cache.maps(std::slice::from_ref(&b)).unwrap();
        assert_eq!(cache.mapped(), 4);
        assert!(fifth.is_some() && fifth != fourth);
        let (_, sixth) = cache.maps(std::slice::from_ref(&b)).unwrap();
        assert_eq!((cache.mapped(), sixth), (4, fifth));
        cache.maps(&both).unwrap();
        assert_eq!(
            cache.mapped(),
            5,
            "a's map was dropped, so it is read again"
        );
    }

    #[test]
    fn maps_of_files_changed_lately_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = [image(dir.path(), "a", 2)];
        let cache = ExtentCache::new(Duration::from_secs(3600), ExtentCache::MAX_EXTENTS);
        for n in 1..=3 {
            let (maps, generation) = cache.maps(&a).unwrap();
            assert_eq!((cache.mapped(), generation), (n, None));
            assert_eq!(maps.len(), 1);
        }
        let err = cache.maps(&[dir.path().join("gone")]).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn maps_past_the_bound_are_read_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (image(dir.path(), "a", 2), image(dir.path(), "b", 2));
        let one = extents(&a).unwrap().len();
        let cache = ExtentCache::new(Duration::ZERO, one);
        let both = [a.clone(), b.clone()];
        for n in [2, 3, 4] {
            let (maps, generation) = cache.maps(&both).unwrap();
            assert_eq!((cache.mapped(), generation), (n, None), "only a's map fits");
            assert_eq!(maps.len(), 2);
        }
        // Without b, a's map is all that is counted, and kept.
        let (_, generation) = cache.maps(std::slice::from_ref(&a)).unwrap();
        assert_eq!(cache.mapped(), 4);
        assert!(generation.is_some());
    }

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
