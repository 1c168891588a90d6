#!/usr/bin/env python3
"""Checks the TOML configuration files a rendered chart carries.

    check_chart_toml.py RENDERED.yaml [VALUES.yaml]

Every `*.toml` entry of a ConfigMap (data) or Secret (stringData) must parse as TOML. With
VALUES (the values file the chart was rendered with, merged over the chart's values.yaml
only for the keys it sets), the generated tables must say exactly what the values say:
pools, backup repositories, [backup], [scheduler], static agents and volume types, each
value with its type (an integer stays an integer: the roles' u64 keys reject 10.0).
Exits non-zero naming the first difference.
"""
import sys
import tomllib

import yaml


def fail(msg):
    print(f"check_chart_toml: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def same(a, b, where):
    """a from the values, b from the TOML."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            fail(f"{where}: values say {a!r}, TOML says {b!r}")
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            fail(f"{where}: values say {a!r}, TOML says {b!r}")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, bool) or isinstance(b, bool):
        if a is not b:
            fail(f"{where}: values say {a!r}, TOML says {b!r}")
    elif isinstance(a, int) and not isinstance(b, int):
        fail(f"{where}: the integer {a!r} became {b!r} ({type(b).__name__})")
    elif a != b:
        fail(f"{where}: values say {a!r}, TOML says {b!r}")


def main():
    if len(sys.argv) not in (2, 3):
        fail("usage: check_chart_toml.py RENDERED.yaml [VALUES.yaml]")
    tomls = {}
    with open(sys.argv[1]) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") not in ("ConfigMap", "Secret"):
                continue
            data = doc.get("data") if doc["kind"] == "ConfigMap" else doc.get("stringData")
            for key, text in (data or {}).items():
                if key.endswith(".toml"):
                    try:
                        tomls[key] = tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        fail(f"{doc['metadata']['name']}/{key}: not TOML: {e}\n{text}")
    for role in ("controller.toml", "node.toml", "agent.toml"):
        if role not in tomls:
            fail(f"no {role} in the rendered chart")
    if len(sys.argv) == 3:
        with open(sys.argv[2]) as f:
            v = yaml.safe_load(f)
        ctl, agent, node = tomls["controller.toml"], tomls["agent.toml"], tomls["node.toml"]
        a = v.get("agent", {})
        if "pools" in a:
            same(a["pools"], agent.get("pools", []), "agent.pools")
        if "backupRepositories" in a:
            same(a["backupRepositories"], agent.get("backup_repositories", []),
                 "agent.backupRepositories")
        if a.get("backup"):
            same(a["backup"], agent.get("backup"), "agent.backup")
        c = v.get("controller", {}).get("config", {})
        if c.get("scheduler"):
            same(c["scheduler"], ctl.get("scheduler"), "controller.config.scheduler")
        if "agents" in c:
            same(c["agents"], ctl.get("agents", []), "controller.config.agents")
        if "defaultVolumeType" in c:
            same(c["defaultVolumeType"], ctl.get("default_volume_type"), "defaultVolumeType")
        for name, t in v.get("volumeTypes", {}).items():
            got = ctl.get("volume_types", {}).get(name)
            if got is None:
                fail(f"volume type {name} missing from controller.toml")
            same(t.get("description", ""), got.get("description"), f"volumeTypes.{name}.description")
            same(t.get("extraSpecs") or {}, got.get("extra_specs", {}), f"volumeTypes.{name}.extraSpecs")
        n = v.get("node", {})
        for vk, tk in (("zone", "zone"), ("execPrefix", "exec_prefix"),
                       ("maxVolumesPerNode", "max_volumes_per_node"),
                       ("attachTimeoutSecs", "attach_timeout_secs"),
                       ("sessionRepairAfterSecs", "session_repair_after_secs")):
            if vk in n:
                same(n[vk], node.get(tk), f"node.{vk}")
    print(f"check_chart_toml: {len(tomls)} TOML files parse"
          + (" and match the values" if len(sys.argv) == 3 else ""))


main()
