//! Volume and snapshot descriptions kept in LVM tags: the durable state of an LVM pool.
//!
//! An LV is ours when it carries [`VERSION_TAG`]; other LVs of the VG are ignored. The schema
//! (version 1), one tag per fact:
//!
//! | tag | on | meaning |
//! |---|---|---|
//! | `cb.v=1` | all | managed by cinderblock, tag schema 1 |
//! | `cb.type=<enc>` | volume | volume type name |
//! | `cb.src=snap:<id>` / `cb.src=vol:<id>` | volume | content source |
//! | `cb.export=<iqn>` | volume | exported to this initiator (one tag each) |
//! | `cb.snapof=<volume id>` | snapshot | origin volume |
//! | `cb.size=<bytes>` | snapshot | origin size at snapshot time (a thick snapshot LV's own size is its COW area) |
//! | `cb.meta.<enc key>=<enc value>` | both | one caller metadata entry |
//! | `cb.state=creating` | both | not finished (a data copy or a resize is pending); `open()` removes it |
//!
//! Creation time is not a tag: LVM records it (`lv_time`).
//!
//! LVM accepts only `[A-Za-z0-9_+.\-/=!:&#]` in a tag. Free text (type names, metadata keys and
//! values) is encoded by [`encode`]: every byte of its UTF-8 outside that set, and `&` and `=`
//! themselves, becomes `&XX` (two upper-case hex digits). The encoding is reversible, keeps
//! plain text readable in `lvs -o lv_tags`, never produces `,` (the separator of `lv_tags`), and
//! a key never contains `=`, so the first `=` of a `cb.meta.` tag ends the key.
//! Ids and IQNs are validated to characters that are all allowed and are stored as they are.

use std::collections::BTreeMap;

use super::{AgentError, SnapshotId, VolumeId};
use crate::types::Bytes;

/// Marks an LV as ours, with the tag schema version.
pub const VERSION_TAG: &str = "cb.v=1";
/// Prefix of every tag we write.
pub const TAG_PREFIX: &str = "cb.";
/// Marks an LV whose creation is not finished.
pub const CREATING_TAG: &str = "cb.state=creating";
/// Longest tag LVM is documented to accept (`lvm(8)`: tags are at most 1024 characters).
pub const MAX_TAG_LEN: usize = 1024;

const VERSION_KEY: &str = "cb.v";
const TYPE_KEY: &str = "cb.type";
const SOURCE_KEY: &str = "cb.src";
const EXPORT_KEY: &str = "cb.export";
const SNAPOF_KEY: &str = "cb.snapof";
const SIZE_KEY: &str = "cb.size";
const STATE_KEY: &str = "cb.state";
const META_PREFIX: &str = "cb.meta.";
const ESCAPE: u8 = b'&';

/// True for bytes LVM accepts in a tag that [`encode`] keeps as they are.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_+.-/!:#".contains(&b)
}

/// Encodes free text for a tag (see the module documentation).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push(char::from(ESCAPE));
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode`]. `None` when `s` is not something [`encode`] produced.
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == ESCAPE {
            let hex = s.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Everything a volume's tags say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeTags {
    /// Volume type name.
    pub volume_type: String,
    /// Content source.
    pub source: Option<super::backend::Source>,
    /// Initiators the volume is exported to, sorted.
    pub exported_to: Vec<String>,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation not finished.
    pub creating: bool,
}

/// Everything a snapshot's tags say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTags {
    /// Origin volume.
    pub source_volume: VolumeId,
    /// Origin size at snapshot time.
    pub size: Bytes,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation not finished.
    pub creating: bool,
}

fn check_len(tags: Vec<String>) -> Result<Vec<String>, AgentError> {
    if let Some(t) = tags.iter().find(|t| t.len() > MAX_TAG_LEN) {
        return Err(AgentError::InvalidArgument(format!(
            "a metadata entry or type name is too long once encoded as an LVM tag ({} of at most {MAX_TAG_LEN} characters, starting {:?})",
            t.len(),
            &t[..40]
        )));
    }
    Ok(tags)
}

/// The tag of one metadata entry.
pub fn meta_tag(key: &str, value: &str) -> String {
    format!("{META_PREFIX}{}={}", encode(key), encode(value))
}

/// The tags describing `metadata`, in key order.
pub fn metadata_tags(metadata: &BTreeMap<String, String>) -> Vec<String> {
    metadata.iter().map(|(k, v)| meta_tag(k, v)).collect()
}

/// The tag of a volume type.
pub fn type_tag(volume_type: &str) -> String {
    format!("{TYPE_KEY}={}", encode(volume_type))
}

/// The tag of one export.
pub fn export_tag(initiator: &str) -> String {
    format!("{EXPORT_KEY}={}", encode(initiator))
}

impl VolumeTags {
    /// The full tag set, [`VERSION_TAG`] first; `InvalidArgument` when a tag would be too long.
    pub fn to_tags(&self) -> Result<Vec<String>, AgentError> {
        let mut tags = vec![VERSION_TAG.to_owned(), type_tag(&self.volume_type)];
        match &self.source {
            Some(super::backend::Source::Snapshot(s)) => {
                tags.push(format!("{SOURCE_KEY}=snap:{s}"))
            }
            Some(super::backend::Source::Volume(v)) => tags.push(format!("{SOURCE_KEY}=vol:{v}")),
            None => {}
        }
        tags.extend(self.exported_to.iter().map(|i| export_tag(i)));
        tags.extend(metadata_tags(&self.metadata));
        if self.creating {
            tags.push(CREATING_TAG.to_owned());
        }
        check_len(tags)
    }

    /// Reads a volume's tags (`lv_tags` split on `,`). `Ok(None)` when the LV is not ours.
    pub fn parse<S: AsRef<str>>(tags: &[S]) -> Result<Option<VolumeTags>, AgentError> {
        let Some(fields) = Fields::split(tags)? else {
            return Ok(None);
        };
        let mut v = VolumeTags {
            metadata: fields.metadata,
            creating: fields.creating,
            ..VolumeTags::default()
        };
        for (key, value) in fields.single {
            match key {
                TYPE_KEY => v.volume_type = decode_field(key, value)?,
                SOURCE_KEY => v.source = Some(parse_source(value)?),
                EXPORT_KEY => v.exported_to.push(decode_field(key, value)?),
                _ => {} // a snapshot's tag, or one a newer schema 1 writer added
            }
        }
        v.exported_to.sort();
        v.exported_to.dedup();
        Ok(Some(v))
    }
}

impl SnapshotTags {
    /// The full tag set, [`VERSION_TAG`] first.
    pub fn to_tags(&self) -> Result<Vec<String>, AgentError> {
        let mut tags = vec![
            VERSION_TAG.to_owned(),
            format!("{SNAPOF_KEY}={}", self.source_volume),
            format!("{SIZE_KEY}={}", self.size.get()),
        ];
        tags.extend(metadata_tags(&self.metadata));
        if self.creating {
            tags.push(CREATING_TAG.to_owned());
        }
        check_len(tags)
    }

    /// Reads a snapshot's tags. `Ok(None)` when the LV is not ours.
    pub fn parse<S: AsRef<str>>(tags: &[S]) -> Result<Option<SnapshotTags>, AgentError> {
        let Some(fields) = Fields::split(tags)? else {
            return Ok(None);
        };
        let mut source = None;
        let mut size = None;
        for (key, value) in fields.single {
            match key {
                SNAPOF_KEY => source = Some(VolumeId::parse(value).map_err(|_| bad(key, value))?),
                SIZE_KEY => size = Some(Bytes(value.parse().map_err(|_| bad(key, value))?)),
                _ => {}
            }
        }
        let missing = |k: &str| AgentError::Parse {
            tool: "lvm tags",
            reason: format!("snapshot has no {k} tag"),
        };
        Ok(Some(SnapshotTags {
            source_volume: source.ok_or_else(|| missing(SNAPOF_KEY))?,
            size: size.ok_or_else(|| missing(SIZE_KEY))?,
            metadata: fields.metadata,
            creating: fields.creating,
        }))
    }
}

/// Tags split into `key=value` pairs, metadata decoded.
struct Fields<'a> {
    single: Vec<(&'a str, &'a str)>,
    metadata: BTreeMap<String, String>,
    creating: bool,
}

impl<'a> Fields<'a> {
    /// `Ok(None)` without [`VERSION_TAG`]; an error for a newer schema version, so that an
    /// older agent never rewrites state it does not understand.
    fn split<S: AsRef<str>>(tags: &'a [S]) -> Result<Option<Fields<'a>>, AgentError> {
        let mut version = None;
        let mut f = Fields {
            single: Vec::new(),
            metadata: BTreeMap::new(),
            creating: false,
        };
        for tag in tags.iter().map(AsRef::as_ref) {
            if !tag.starts_with(TAG_PREFIX) {
                continue; // someone else's tag
            }
            let Some((key, value)) = tag.split_once('=') else {
                continue;
            };
            if let Some(enc_key) = key.strip_prefix(META_PREFIX) {
                f.metadata
                    .insert(decode_field(key, enc_key)?, decode_field(key, value)?);
            } else if key == VERSION_KEY {
                version = Some(value);
            } else if key == STATE_KEY {
                f.creating |= value == "creating";
            } else {
                f.single.push((key, value));
            }
        }
        match version {
            None => Ok(None),
            Some("1") => Ok(Some(f)),
            Some(other) => Err(AgentError::Parse {
                tool: "lvm tags",
                reason: format!("tag schema version {other} is newer than this agent's (1)"),
            }),
        }
    }
}

fn bad(key: &str, value: &str) -> AgentError {
    AgentError::Parse {
        tool: "lvm tags",
        reason: format!("bad {key} tag value {value:?}"),
    }
}

fn decode_field(key: &str, value: &str) -> Result<String, AgentError> {
    decode(value).ok_or_else(|| bad(key, value))
}

fn parse_source(value: &str) -> Result<super::backend::Source, AgentError> {
    use super::backend::Source;
    if let Some(id) = value.strip_prefix("snap:") {
        SnapshotId::parse(id)
            .map(Source::Snapshot)
            .map_err(|_| bad(SOURCE_KEY, value))
    } else if let Some(id) = value.strip_prefix("vol:") {
        VolumeId::parse(id)
            .map(Source::Volume)
            .map_err(|_| bad(SOURCE_KEY, value))
    } else {
        Err(bad(SOURCE_KEY, value))
    }
}

/// What `lvchange --addtag/--deltag` must do to turn tag set `have` into `want`, looking only
/// at tags for which `ours` is true: `(add, delete)`, each sorted.
pub fn diff<F: Fn(&str) -> bool>(
    have: &[String],
    want: &[String],
    ours: F,
) -> (Vec<String>, Vec<String>) {
    let mut add: Vec<String> = want
        .iter()
        .filter(|t| ours(t) && !have.contains(t))
        .cloned()
        .collect();
    let mut del: Vec<String> = have
        .iter()
        .filter(|t| ours(t) && !want.contains(t))
        .cloned()
        .collect();
    add.sort();
    add.dedup();
    del.sort();
    del.dedup();
    (add, del)
}

/// True for metadata tags.
pub fn is_meta_tag(t: &str) -> bool {
    t.starts_with(META_PREFIX)
}

/// True for the volume type tag.
pub fn is_type_tag(t: &str) -> bool {
    t.starts_with(TYPE_KEY) && t.as_bytes().get(TYPE_KEY.len()) == Some(&b'=')
}

/// True for export tags.
pub fn is_export_tag(t: &str) -> bool {
    t.starts_with(EXPORT_KEY) && t.as_bytes().get(EXPORT_KEY.len()) == Some(&b'=')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::super::backend::Source;
    use super::*;

    /// LVM's tag alphabet (`lvm(8)`, checked on LVM 2.03.16: `lvchange --addtag` accepts every
    /// one of these and rejects `@`, `,`, ` `, `%`, `~`).
    fn lvm_accepts(t: &str) -> bool {
        !t.is_empty()
            && t.len() <= MAX_TAG_LEN
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+.-/=!:&#".contains(&b))
    }

    #[test]
    fn encode_table() {
        let cases = [
            ("plain-text_1.2", "plain-text_1.2"),
            ("a b", "a&20b"),
            ("k=v", "k&3Dv"),
            ("&", "&26"),
            ("a,b", "a&2Cb"),
            ("é", "&C3&A9"),
            ("", ""),
            ("/path:x#y!z+", "/path:x#y!z+"),
        ];
        for (raw, enc) in cases {
            assert_eq!(encode(raw), enc, "{raw:?}");
            assert_eq!(decode(enc).as_deref(), Some(raw), "{enc:?}");
        }
    }

    #[test]
    fn round_trip_awkward_text() {
        let samples = [
            "spaces and\ttabs\nnewlines",
            "$(rm -rf /); `x` | y && z > /dev/null; 'q' \"d\" \\",
            "key=value=more",
            "&26 already escaped-looking &",
            "unicode: ünïcødé 日本語 🚀",
            "commas,in,text",
            "%~@^*()[]{}<>?",
            "\u{0}nul",
        ];
        for s in samples {
            let e = encode(s);
            assert!(lvm_accepts(&e), "{e:?}");
            assert!(!e.contains('=') && !e.contains(','), "{e:?}");
            assert_eq!(decode(&e).as_deref(), Some(s));
        }
    }

    #[test]
    fn decode_rejects_foreign_text() {
        for bad in ["&", "&2", "&zz", "&2g", "a b", "x=y", "&c3&a9", "&FF"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volume_tags_exact() {
        let v = VolumeTags {
            volume_type: "gold ssd".into(),
            source: Some(Source::Snapshot(SnapshotId::parse("s1").unwrap())),
            exported_to: vec!["iqn.1993-08.org.debian:01:abc".into()],
            metadata: md(&[("a=b", "c d"), ("k", "")]),
            creating: true,
        };
        assert_eq!(
            v.to_tags().unwrap(),
            vec![
                "cb.v=1",
                "cb.type=gold&20ssd",
                "cb.src=snap:s1",
                "cb.export=iqn.1993-08.org.debian:01:abc",
                "cb.meta.a&3Db=c&20d",
                "cb.meta.k=",
                "cb.state=creating",
            ]
        );
    }

    #[test]
    fn volume_tags_round_trip() {
        let v = VolumeTags {
            volume_type: "tÿpe=1 & more".into(),
            source: Some(Source::Volume(VolumeId::parse("v-0").unwrap())),
            exported_to: vec!["iqn.a:1".into(), "iqn.b:2".into()],
            metadata: md(&[
                ("", "empty key"),
                ("k=1", "v=2"),
                ("ü", "🚀"),
                ("$(x)", "`y`;|"),
            ]),
            creating: false,
        };
        let mut tags = v.to_tags().unwrap();
        assert!(tags.iter().all(|t| lvm_accepts(t)), "{tags:?}");
        // LVM reports tags sorted and mixed with other tools' tags.
        tags.push("foreign-tag".into());
        tags.push("cb.future=thing".into());
        tags.sort();
        assert_eq!(VolumeTags::parse(&tags).unwrap(), Some(v));
    }

    #[test]
    fn snapshot_tags_round_trip() {
        let s = SnapshotTags {
            source_volume: VolumeId::parse("vol-1").unwrap(),
            size: Bytes::gib(3),
            metadata: md(&[("name", "before upgrade")]),
            creating: false,
        };
        let tags = s.to_tags().unwrap();
        assert_eq!(
            tags,
            vec![
                "cb.v=1",
                "cb.snapof=vol-1",
                "cb.size=3221225472",
                "cb.meta.name=before&20upgrade"
            ]
        );
        assert_eq!(SnapshotTags::parse(&tags).unwrap(), Some(s));
    }

    #[test]
    fn not_ours_and_newer_schema() {
        assert_eq!(VolumeTags::parse(&["cb.type=x", "other"]).unwrap(), None);
        let empty: [&str; 0] = [];
        assert_eq!(SnapshotTags::parse(&empty).unwrap(), None);
        assert!(matches!(
            VolumeTags::parse(&["cb.v=2"]),
            Err(AgentError::Parse { .. })
        ));
    }

    #[test]
    fn malformed_values_are_parse_errors() {
        for tags in [
            vec!["cb.v=1", "cb.src=disk:1"],
            vec!["cb.v=1", "cb.src=vol:UPPER"],
            vec!["cb.v=1", "cb.meta.k=&zz"],
            vec!["cb.v=1", "cb.type=&4"],
        ] {
            assert!(
                matches!(VolumeTags::parse(&tags), Err(AgentError::Parse { .. })),
                "{tags:?}"
            );
        }
        for tags in [
            vec!["cb.v=1", "cb.snapof=v1"],
            vec!["cb.v=1", "cb.size=1"],
            vec!["cb.v=1", "cb.snapof=v1", "cb.size=-1"],
        ] {
            assert!(
                matches!(SnapshotTags::parse(&tags), Err(AgentError::Parse { .. })),
                "{tags:?}"
            );
        }
    }

    #[test]
    fn too_long_is_invalid_argument() {
        let v = VolumeTags {
            metadata: md(&[("k", &"x".repeat(MAX_TAG_LEN))]),
            ..VolumeTags::default()
        };
        assert!(matches!(v.to_tags(), Err(AgentError::InvalidArgument(_))));
        // Escapes count three times.
        let v = VolumeTags {
            metadata: md(&[("k", &" ".repeat(338))]),
            ..VolumeTags::default()
        };
        assert_eq!(v.to_tags().unwrap()[2].len(), "cb.meta.k=".len() + 3 * 338);
    }

    #[test]
    fn diff_touches_only_selected_tags() {
        let have: Vec<String> = ["cb.v=1", "cb.meta.a=1", "cb.meta.b=2", "cb.export=iqn.x"]
            .map(String::from)
            .to_vec();
        let want: Vec<String> = ["cb.meta.b=2", "cb.meta.c=3"].map(String::from).to_vec();
        let (add, del) = diff(&have, &want, is_meta_tag);
        assert_eq!(add, vec!["cb.meta.c=3"]);
        assert_eq!(del, vec!["cb.meta.a=1"]);
        assert!(is_type_tag("cb.type=x") && !is_type_tag("cb.typex=1"));
        assert!(is_export_tag("cb.export=iqn.a") && !is_export_tag("cb.exports=1"));
    }
}
