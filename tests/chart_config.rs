//! The Helm chart's generated configuration files against the real configuration schema:
//! every `<name>-{controller,node,agent}.toml` that `tests/kube/chart.sh` renders (default
//! values, the options fixture, the README's example) is parsed by the roles' own parser and
//! validated, so a key the chart writes that `src/config.rs` does not know (or a value it
//! refuses) fails here rather than in a crash-looping pod.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use cinderblock::config::{self, AgentConfig, ConfigError, ControllerConfig, NodeConfig};

/// Where chart.sh leaves the rendered TOML files.
const DIR_VAR: &str = "CINDERBLOCK_CHART_TOML_DIR";

fn check(path: &Path) -> Result<&'static str, ConfigError> {
    let text = std::fs::read_to_string(path).expect("read rendered TOML");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if name.ends_with("-controller.toml") {
        config::parse::<ControllerConfig>(path, &text)?.validate("")?;
        Ok("controller")
    } else if name.ends_with("-node.toml") {
        config::parse::<NodeConfig>(path, &text)?.validate("")?;
        Ok("node")
    } else if name.ends_with("-agent.toml") {
        config::parse::<AgentConfig>(path, &text)?.validate("")?;
        Ok("agent")
    } else {
        panic!("{}: not a role's file", path.display())
    }
}

#[test]
#[ignore = "needs the chart rendered by tests/kube/chart.sh, which sets CINDERBLOCK_CHART_TOML_DIR"]
fn chart_configs_parse_and_validate() {
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect(DIR_VAR));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read the TOML directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut roles: Vec<&str> = Vec::new();
    let mut failures = Vec::new();
    for f in &files {
        match check(f) {
            Ok(role) => roles.push(role),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert_eq!(failures, Vec::<String>::new(), "rendered configs refused");
    // Each rendering yields one file per role: the check saw all three of each.
    let count = |r: &str| roles.iter().filter(|x| **x == r).count();
    assert!(!files.is_empty(), "no TOML files in {}", dir.display());
    assert_eq!(
        (count("controller"), count("node"), count("agent")),
        (files.len() / 3, files.len() / 3, files.len() / 3)
    );
}
