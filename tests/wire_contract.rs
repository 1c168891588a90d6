//! The CSI wire contract: `proto/csi.proto` must describe exactly the wire of CSI spec v1.12.0.
//!
//! `tests/fixtures/csi-v1.12.0-wire.tsv` lists the spec's wire facts (every rpc, message,
//! field, enum value and custom-option extension) one per line. This test compiles our
//! `proto/csi.proto`, derives the same facts from the compiled descriptors, and compares the
//! two sets. A renumbered field, a wrong type, a lost `csi_secret` tag or a missing enum value
//! shows up as one missing and/or one unexpected line.
//!
//! The descriptors come from `protox` + `prost-reflect` rather than from
//! `cinderblock::proto::FILE_DESCRIPTOR_SET`: that set is encoded through `prost_types`, which
//! drops the custom options (`csi_secret` = 1059, `alpha_*` = 1060) we need to see.

#![allow(
    clippy::expect_used,
    reason = "test helpers: a broken proto or fixture should abort the test with a message"
)]

use std::collections::BTreeSet;
use std::path::Path;

use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Value};

const CSI_PACKAGE: &str = "csi.v1";
const FIXTURE: &str = "tests/fixtures/csi-v1.12.0-wire.tsv";

/// Compiles `proto/csi.proto` (and the google/protobuf files it imports) into a pool that
/// keeps every option, including extensions.
fn compile_csi_proto() -> DescriptorPool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compiler = protox::Compiler::new([root.join("proto")]).expect("include path");
    compiler.include_imports(true);
    compiler
        .open_file("csi.proto")
        .unwrap_or_else(|e| panic!("proto/csi.proto does not compile: {e:?}"));
    compiler.descriptor_pool()
}

/// Reads the fixture's fact lines, skipping `#` comments and blank lines.
fn fixture_facts() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Derives the wire facts of package `csi.v1` from compiled descriptors, in the fixture's
/// line format (see the fixture's header).
fn derive_wire_facts(pool: &DescriptorPool) -> BTreeSet<String> {
    let mut facts = BTreeSet::new();

    for service in pool.services().filter(|s| s.package_name() == CSI_PACKAGE) {
        for method in service.methods() {
            facts.insert(format!(
                "rpc\t.{}\t{}\t.{}\t.{}\t{}{}",
                service.full_name(),
                method.name(),
                method.input().full_name(),
                method.output().full_name(),
                u8::from(method.is_client_streaming()),
                u8::from(method.is_server_streaming()),
            ));
        }
    }

    for message in pool
        .all_messages()
        .filter(|m| m.package_name() == CSI_PACKAGE)
    {
        facts.insert(format!("message\t.{}", message.full_name()));
        for field in message.fields() {
            facts.insert(field_fact(&field));
        }
    }

    for enumeration in pool.all_enums().filter(|e| e.package_name() == CSI_PACKAGE) {
        for value in enumeration.values() {
            facts.insert(format!(
                "enumvalue\t.{}\t{}\t{}",
                enumeration.full_name(),
                value.name(),
                value.number()
            ));
        }
    }

    for extension in pool
        .all_extensions()
        .filter(|x| x.package_name() == CSI_PACKAGE)
    {
        facts.insert(format!(
            "extension\t.{}\t{}\t{}\t{}",
            extension.containing_message().full_name(),
            extension.name(),
            extension.number(),
            extension.field_descriptor_proto().r#type().as_str_name(),
        ));
    }

    facts
}

/// `field MESSAGE NAME NUMBER TYPE TYPE_NAME LABEL ONEOF OPTIONS`. TYPE_NAME repeats TYPE for
/// scalars; OPTIONS lists the numbers of the custom options set on the field, ascending.
fn field_fact(field: &FieldDescriptor) -> String {
    let proto = field.field_descriptor_proto();
    let type_str = proto.r#type().as_str_name();
    let type_name = if proto.type_name().is_empty() {
        type_str
    } else {
        proto.type_name()
    };
    let oneof = field
        .containing_oneof()
        .map(|o| o.name().to_owned())
        .unwrap_or_default();
    let options = custom_option_numbers(&field.options())
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "field\t.{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        field.parent_message().full_name(),
        field.name(),
        field.number(),
        type_str,
        type_name,
        proto.label().as_str_name(),
        oneof,
        options,
    )
}

/// Numbers of the extension options present on an options message. Unknown fields count too,
/// so an option whose extension the pool cannot resolve is still visible.
fn custom_option_numbers(options: &DynamicMessage) -> BTreeSet<u32> {
    options
        .extensions()
        .map(|(ext, _)| ext.number())
        .chain(options.unknown_fields().map(|u| u.number()))
        .collect()
}

/// What the derived facts lack and what they have in excess, relative to the expected set.
#[derive(Debug, PartialEq, Eq)]
struct FactDiff {
    missing: Vec<String>,
    unexpected: Vec<String>,
}

impl FactDiff {
    fn between(expected: &BTreeSet<String>, actual: &BTreeSet<String>) -> Self {
        Self {
            missing: expected.difference(actual).cloned().collect(),
            unexpected: actual.difference(expected).cloned().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for line in &self.missing {
            out.push_str(&format!("missing:    {line}\n"));
        }
        for line in &self.unexpected {
            out.push_str(&format!("unexpected: {line}\n"));
        }
        out
    }
}

/// Re-encodes `pool` with one field's number replaced. Works on the encoded descriptors as a
/// `DynamicMessage`, because the `prost_types` structs would silently drop the custom options.
fn with_field_renumbered(
    pool: &DescriptorPool,
    file: &str,
    message: &str,
    field: &str,
    number: i32,
) -> DescriptorPool {
    let set_desc = pool
        .get_message_by_name("google.protobuf.FileDescriptorSet")
        .expect("descriptor.proto is imported by csi.proto");
    let mut set = DynamicMessage::decode(set_desc, pool.encode_to_vec().as_slice())
        .expect("pool re-decodes as a FileDescriptorSet");

    let files = list_mut(&mut set, "file");
    let file_msg = find_by_name(files, file);
    let message_msg = find_by_name(list_mut(file_msg, "message_type"), message);
    let field_msg = find_by_name(list_mut(message_msg, "field"), field);
    field_msg.set_field_by_name("number", Value::I32(number));

    DescriptorPool::decode(prost::Message::encode_to_vec(&set).as_slice())
        .expect("mutated descriptors still form a valid pool")
}

fn list_mut<'a>(msg: &'a mut DynamicMessage, field: &str) -> &'a mut Vec<Value> {
    match msg.get_field_by_name_mut(field) {
        Some(Value::List(items)) => items,
        other => panic!("{field} is not a repeated field: {other:?}"),
    }
}

fn find_by_name<'a>(items: &'a mut [Value], name: &str) -> &'a mut DynamicMessage {
    items
        .iter_mut()
        .filter_map(|v| match v {
            Value::Message(m) => Some(m),
            _ => None,
        })
        .find(|m| {
            m.get_field_by_name("name")
                .is_some_and(|n| n.as_str() == Some(name))
        })
        .unwrap_or_else(|| panic!("no element named {name}"))
}

#[test]
fn csi_proto_matches_spec_v1_12_0_wire_facts() {
    let expected = fixture_facts();
    let actual = derive_wire_facts(&compile_csi_proto());

    let diff = FactDiff::between(&expected, &actual);
    assert!(
        diff.is_empty(),
        "proto/csi.proto differs from {FIXTURE}:\n{}",
        diff.report()
    );
    // Guard against a vacuous pass (e.g. an empty fixture and an empty package).
    assert_eq!(actual.len(), expected.len());
    assert!(expected.len() > 400, "fixture looks truncated");
}

#[test]
fn wire_check_reports_a_renumbered_field() {
    let pool = compile_csi_proto();
    let broken = with_field_renumbered(&pool, "csi.proto", "CreateVolumeRequest", "name", 9);

    let diff = FactDiff::between(&fixture_facts(), &derive_wire_facts(&broken));

    let line = |number: u32| {
        format!(
            "field\t.csi.v1.CreateVolumeRequest\tname\t{number}\tTYPE_STRING\tTYPE_STRING\tLABEL_OPTIONAL\t\t"
        )
    };
    assert_eq!(
        diff,
        FactDiff {
            missing: vec![line(1)],
            unexpected: vec![line(9)],
        }
    );
}
