//! Volume-type extra specs as requirements on pool capabilities: parsing (once per request) and
//! matching (once per pool).
//!
//! # Which keys count
//!
//! A key without a scope (`media`) or with the `capabilities:` scope (`capabilities:media`) names
//! a capability. A key with any other scope (`qos:read_iops`, `provisioning:type`) is not a
//! capability requirement and is skipped. `capabilities:a:b` names the capability `a:b`.
//!
//! # Value syntax
//!
//! A value is a plain string or starts with an operator word, separated by whitespace:
//!
//! | value | the capability matches when |
//! |---|---|
//! | `ssd` | it equals `ssd`; `True`/`False` compare as booleans, ignoring case |
//! | `<is> True` | it is the boolean `True` (`true`, `TRUE`, …); `<is> False` likewise |
//! | `<in> fast` | it contains the substring `fast` |
//! | `<or> a <or> b` | it equals one of `a`, `b` (alternatives may contain spaces) |
//! | `<all-in> a b` | every word `a`, `b` is one of its items (split on whitespace, `,`, `[`, `]`, quotes) |
//! | `== 10` / `!= 10` | as a number, it equals / differs from 10 |
//! | `>= 10` / `<= 10` | as a number, it is at least / at most 10 |
//! | `= 10` | as a number, it is at least 10 (Cinder's historical meaning of `=`) |
//! | `s== x` `s!= x` `s< x` `s<= x` `s> x` `s>= x` | as a string, byte-wise, it compares so with `x` |
//!
//! A word in angle brackets that is not one of these operators, an operator without its
//! operand, a numeric operator whose operand is not a finite number, a second numeric operand,
//! `<is>` with something other than a boolean and an empty `<or>` alternative are all
//! [`ExtraSpecError`]s: the volume type is wrong, whatever the pools say.

use std::collections::BTreeMap;
use std::num::ParseFloatError;

use super::pool::BuiltIn;
use super::SchedulerError;

/// Why an extra spec's value cannot be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtraSpecError {
    /// A word in angle brackets that is not a known operator (`<xor> a`).
    #[error("unknown operator {operator}")]
    UnknownOperator {
        /// The word as written.
        operator: String,
    },
    /// An operator with nothing after it (`>=`).
    #[error("operator {operator} needs an operand")]
    MissingOperand {
        /// The operator.
        operator: &'static str,
    },
    /// A single-operand operator followed by more words (`>= 10 20`).
    #[error("operator {operator} takes one operand, found extra {extra:?}")]
    ExtraOperand {
        /// The operator.
        operator: &'static str,
        /// What followed the operand.
        extra: String,
    },
    /// A numeric operator whose operand does not parse as a number (`>= ten`).
    #[error("operand {operand:?} of {operator} is not a number")]
    NotANumber {
        /// The operator.
        operator: &'static str,
        /// The operand as written.
        operand: String,
        /// The parser's complaint.
        #[source]
        source: ParseFloatError,
    },
    /// A numeric operator whose operand is NaN or infinite.
    #[error("operand {operand:?} of {operator} is not a finite number")]
    NotFinite {
        /// The operator.
        operator: &'static str,
        /// The operand as written.
        operand: String,
    },
    /// `<is>` followed by something other than `True` or `False`.
    #[error("operand {operand:?} of <is> is not True or False")]
    NotABoolean {
        /// The operand as written.
        operand: String,
    },
    /// An `<or>` list with an empty alternative (`<or> a <or>`).
    #[error("<or> has an empty alternative")]
    EmptyAlternative,
    /// `provisioning:type` is neither `thin` nor `thick`.
    #[error("provisioning type must be \"thin\" or \"thick\"")]
    UnknownProvisioningType,
}

/// A numeric comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NumOp {
    Eq,
    Ne,
    Ge,
    Le,
}

/// A string comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StrOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed requirement on one capability value. Borrows from the request's extra specs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Matcher<'a> {
    /// Plain value: string equality, boolean-aware.
    Equals(&'a str),
    /// `<is>`.
    Is(bool),
    /// `<in>`.
    Contains(&'a str),
    /// `<or>`.
    AnyOf(Vec<&'a str>),
    /// `<all-in>`.
    AllIn(Vec<&'a str>),
    /// `==`, `!=`, `>=`, `<=`, `=`.
    Num(NumOp, f64),
    /// `s==`, `s!=`, `s<`, `s<=`, `s>`, `s>=`.
    Str(StrOp, &'a str),
}

/// How one capability value fared against a [`Matcher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Match,
    Mismatch,
    NotNumeric,
    NotBoolean,
}

/// `True`/`False` in any case.
fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Splits `s` into its first word and the trimmed rest.
fn first_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    }
}

impl<'a> Matcher<'a> {
    /// Parses one extra-spec value (see the module docs for the syntax).
    pub(crate) fn parse(raw: &'a str) -> Result<Self, ExtraSpecError> {
        let value = raw.trim();
        let (op, rest) = first_word(value);
        let num = |op: NumOp, name: &'static str| Self::number(op, name, rest);
        let string = |op: StrOp, name: &'static str| {
            if rest.is_empty() {
                Err(ExtraSpecError::MissingOperand { operator: name })
            } else {
                Ok(Matcher::Str(op, rest))
            }
        };
        match op {
            "<is>" => {
                let (word, extra) = first_word(rest);
                if word.is_empty() {
                    return Err(ExtraSpecError::MissingOperand { operator: "<is>" });
                }
                if !extra.is_empty() {
                    return Err(ExtraSpecError::ExtraOperand {
                        operator: "<is>",
                        extra: extra.to_string(),
                    });
                }
                parse_bool(word)
                    .map(Matcher::Is)
                    .ok_or_else(|| ExtraSpecError::NotABoolean {
                        operand: word.to_string(),
                    })
            }
            "<in>" if rest.is_empty() => Err(ExtraSpecError::MissingOperand { operator: "<in>" }),
            "<in>" => Ok(Matcher::Contains(rest)),
            "<or>" if rest.is_empty() => Err(ExtraSpecError::MissingOperand { operator: "<or>" }),
            "<or>" => {
                let alternatives: Vec<&str> = rest.split("<or>").map(str::trim).collect();
                if alternatives.iter().any(|a| a.is_empty()) {
                    return Err(ExtraSpecError::EmptyAlternative);
                }
                Ok(Matcher::AnyOf(alternatives))
            }
            "<all-in>" if rest.is_empty() => Err(ExtraSpecError::MissingOperand {
                operator: "<all-in>",
            }),
            "<all-in>" => Ok(Matcher::AllIn(rest.split_whitespace().collect())),
            "==" => num(NumOp::Eq, "=="),
            "!=" => num(NumOp::Ne, "!="),
            ">=" => num(NumOp::Ge, ">="),
            "<=" => num(NumOp::Le, "<="),
            "=" => num(NumOp::Ge, "="),
            "s==" => string(StrOp::Eq, "s=="),
            "s!=" => string(StrOp::Ne, "s!="),
            "s<" => string(StrOp::Lt, "s<"),
            "s<=" => string(StrOp::Le, "s<="),
            "s>" => string(StrOp::Gt, "s>"),
            "s>=" => string(StrOp::Ge, "s>="),
            w if w.len() > 2 && w.starts_with('<') && w.ends_with('>') => {
                Err(ExtraSpecError::UnknownOperator {
                    operator: w.to_string(),
                })
            }
            _ => Ok(Matcher::Equals(value)),
        }
    }

    fn number(op: NumOp, name: &'static str, rest: &str) -> Result<Self, ExtraSpecError> {
        let (word, extra) = first_word(rest);
        if word.is_empty() {
            return Err(ExtraSpecError::MissingOperand { operator: name });
        }
        if !extra.is_empty() {
            return Err(ExtraSpecError::ExtraOperand {
                operator: name,
                extra: extra.to_string(),
            });
        }
        let n: f64 = word.parse().map_err(|source| ExtraSpecError::NotANumber {
            operator: name,
            operand: word.to_string(),
            source,
        })?;
        if !n.is_finite() {
            return Err(ExtraSpecError::NotFinite {
                operator: name,
                operand: word.to_string(),
            });
        }
        Ok(Matcher::Num(op, n))
    }

    /// Checks one capability value.
    pub(crate) fn check(&self, actual: &str) -> Outcome {
        let verdict = |ok: bool| {
            if ok {
                Outcome::Match
            } else {
                Outcome::Mismatch
            }
        };
        match self {
            Matcher::Equals(want) => match (parse_bool(want), parse_bool(actual)) {
                (Some(w), Some(a)) => verdict(w == a),
                _ => verdict(actual == *want),
            },
            Matcher::Is(want) => match parse_bool(actual.trim()) {
                Some(a) => verdict(a == *want),
                None => Outcome::NotBoolean,
            },
            Matcher::Contains(sub) => verdict(actual.contains(sub)),
            Matcher::AnyOf(alternatives) => verdict(alternatives.contains(&actual)),
            Matcher::AllIn(words) => {
                let is_separator =
                    |c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '\'' | '"');
                verdict(words.iter().all(|w| {
                    actual
                        .split(is_separator)
                        .filter(|item| !item.is_empty())
                        .any(|item| item == *w)
                }))
            }
            Matcher::Num(op, want) => match actual.trim().parse::<f64>() {
                Ok(a) if !a.is_nan() => verdict(match op {
                    NumOp::Eq => a == *want,
                    NumOp::Ne => a != *want,
                    NumOp::Ge => a >= *want,
                    NumOp::Le => a <= *want,
                }),
                _ => Outcome::NotNumeric,
            },
            Matcher::Str(op, want) => {
                let a = actual;
                let w = *want;
                verdict(match op {
                    StrOp::Eq => a == w,
                    StrOp::Ne => a != w,
                    StrOp::Lt => a < w,
                    StrOp::Le => a <= w,
                    StrOp::Gt => a > w,
                    StrOp::Ge => a >= w,
                })
            }
        }
    }
}

/// One capability requirement, parsed once per request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CapabilitySpec<'a> {
    /// The capability's name, scope removed.
    pub(crate) name: &'a str,
    /// `name` resolved to a built-in once, so pools skip the name comparison.
    pub(crate) built_in: Option<BuiltIn>,
    /// The value as the volume type wrote it, for rejection messages.
    pub(crate) raw: &'a str,
    /// The parsed requirement.
    pub(crate) matcher: Matcher<'a>,
}

/// The capability name a key addresses, or `None` if the key has another scope.
fn capability_name(key: &str) -> Option<&str> {
    match key.split_once(':') {
        None => Some(key),
        Some(("capabilities", name)) => Some(name),
        Some(_) => None,
    }
}

/// Parses every capability requirement among `extra_specs`, in key order.
pub(crate) fn parse_specs(
    extra_specs: &BTreeMap<String, String>,
) -> Result<Vec<CapabilitySpec<'_>>, SchedulerError> {
    let mut specs = Vec::new();
    for (key, value) in extra_specs {
        let Some(name) = capability_name(key) else {
            continue;
        };
        let matcher = Matcher::parse(value).map_err(|source| SchedulerError::InvalidExtraSpec {
            key: key.clone(),
            value: value.clone(),
            source,
        })?;
        specs.push(CapabilitySpec {
            name,
            built_in: BuiltIn::from_name(name),
            raw: value,
            matcher,
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: Vec<(&str, Matcher<'_>)> = vec![
            ("ssd", Matcher::Equals("ssd")),
            ("  fast ssd ", Matcher::Equals("fast ssd")),
            ("True", Matcher::Equals("True")),
            ("", Matcher::Equals("")),
            ("<is> True", Matcher::Is(true)),
            ("<is> false", Matcher::Is(false)),
            ("<in> nvme", Matcher::Contains("nvme")),
            (
                "<or> a <or> b c <or> d",
                Matcher::AnyOf(vec!["a", "b c", "d"]),
            ),
            ("<all-in> x y", Matcher::AllIn(vec!["x", "y"])),
            ("== 10", Matcher::Num(NumOp::Eq, 10.0)),
            ("!= 1.5", Matcher::Num(NumOp::Ne, 1.5)),
            (">= 100", Matcher::Num(NumOp::Ge, 100.0)),
            ("<= -3", Matcher::Num(NumOp::Le, -3.0)),
            ("= 7", Matcher::Num(NumOp::Ge, 7.0)),
            ("s== abc", Matcher::Str(StrOp::Eq, "abc")),
            ("s!= abc", Matcher::Str(StrOp::Ne, "abc")),
            ("s< m", Matcher::Str(StrOp::Lt, "m")),
            ("s<= m", Matcher::Str(StrOp::Le, "m")),
            ("s> m", Matcher::Str(StrOp::Gt, "m")),
            ("s>= m", Matcher::Str(StrOp::Ge, "m")),
            // An operator glued to its operand is not an operator: Cinder compares it as text.
            (">=10", Matcher::Equals(">=10")),
        ];
        for (raw, want) in cases {
            assert_eq!(Matcher::parse(raw), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn parse_error_table() {
        let cases = [
            ("<xor> a", "unknown operator <xor>"),
            (">=", "operator >= needs an operand"),
            ("<is>", "operator <is> needs an operand"),
            ("<in>", "operator <in> needs an operand"),
            ("<or>", "operator <or> needs an operand"),
            ("<all-in>", "operator <all-in> needs an operand"),
            ("s==", "operator s== needs an operand"),
            (
                ">= 10 20",
                "operator >= takes one operand, found extra \"20\"",
            ),
            (
                "<is> True False",
                "operator <is> takes one operand, found extra \"False\"",
            ),
            (">= ten", "operand \"ten\" of >= is not a number"),
            ("== nan", "operand \"nan\" of == is not a finite number"),
            ("<is> yes", "operand \"yes\" of <is> is not True or False"),
            ("<or> a <or>", "<or> has an empty alternative"),
            ("<or> <or> b", "<or> has an empty alternative"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                Matcher::parse(raw).map_err(|e| e.to_string()),
                Err(want.to_string()),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn check_table() {
        use Outcome::{Match, Mismatch, NotBoolean, NotNumeric};
        // (spec, capability value, outcome): each operator both ways.
        let cases = [
            ("ssd", "ssd", Match),
            ("ssd", "hdd", Mismatch),
            ("ssd", "SSD", Mismatch),
            ("True", "true", Match),
            ("true", "True", Match),
            ("True", "False", Mismatch),
            ("<is> True", "True", Match),
            ("<is> True", "true", Match),
            ("<is> True", "False", Mismatch),
            ("<is> False", "false", Match),
            ("<is> False", "True", Mismatch),
            ("<is> True", "maybe", NotBoolean),
            ("<in> nvme", "fast-nvme-ssd", Match),
            ("<in> nvme", "sata", Mismatch),
            ("<or> a <or> b", "b", Match),
            ("<or> a <or> b", "c", Mismatch),
            ("<all-in> x y", "[x, y, z]", Match),
            ("<all-in> x y", "x z", Mismatch),
            ("<all-in> x", "xx", Mismatch),
            ("== 10", "10.0", Match),
            ("== 10", "11", Mismatch),
            ("!= 10", "11", Match),
            ("!= 10", "10", Mismatch),
            (">= 100", "150", Match),
            (">= 100", "100", Match),
            (">= 100", "99", Mismatch),
            ("<= 100", "99", Match),
            ("<= 100", "101", Mismatch),
            ("= 100", "150", Match),
            ("= 100", "99", Mismatch),
            (">= 100", "lots", NotNumeric),
            (">= 100", "NaN", NotNumeric),
            ("s== abc", "abc", Match),
            ("s== abc", "abd", Mismatch),
            ("s!= abc", "abd", Match),
            ("s!= abc", "abc", Mismatch),
            ("s< b", "a", Match),
            ("s< b", "b", Mismatch),
            ("s<= b", "b", Match),
            ("s<= b", "c", Mismatch),
            ("s> b", "c", Match),
            ("s> b", "b", Mismatch),
            ("s>= b", "b", Match),
            ("s>= b", "a", Mismatch),
            // String comparison is byte-wise, not numeric.
            ("s< 9", "10", Match),
        ];
        for (spec, actual, want) in cases {
            let m = Matcher::parse(spec);
            assert_eq!(
                m.map(|m| m.check(actual)),
                Ok(want),
                "{spec:?} vs {actual:?}"
            );
        }
    }

    #[test]
    fn scopes_table() {
        let specs: BTreeMap<String, String> = [
            ("media", "ssd"),
            ("capabilities:multiattach", "<is> True"),
            ("capabilities:a:b", "x"),
            ("qos:read_iops", "<bogus> but ignored"),
            ("provisioning:type", "thin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let parsed = parse_specs(&specs).map(|v| {
            v.iter()
                .map(|s| (s.name, s.raw))
                .collect::<Vec<(&str, &str)>>()
        });
        assert_eq!(
            parsed.map_err(|e| e.to_string()),
            Ok(vec![
                ("a:b", "x"),
                ("multiattach", "<is> True"),
                ("media", "ssd")
            ])
        );
    }

    #[test]
    fn bad_spec_is_a_typed_error() {
        let specs: BTreeMap<String, String> =
            [("capabilities:iops".to_string(), ">= fast".to_string())].into();
        match parse_specs(&specs) {
            Err(SchedulerError::InvalidExtraSpec { key, value, source }) => {
                assert_eq!(key, "capabilities:iops");
                assert_eq!(value, ">= fast");
                assert!(
                    matches!(source, ExtraSpecError::NotANumber { operator: ">=", .. }),
                    "{source:?}"
                );
            }
            other => panic!("expected InvalidExtraSpec, got {other:?}"),
        }
    }
}
