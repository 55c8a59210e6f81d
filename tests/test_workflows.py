"""The GitHub workflows are valid by GitHub's schema (check-jsonschema's vendored copy, no network), the release
workflow has the jobs the release process needs, and the Makefile has the spec's build commands (3.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))


def test_every_workflow_is_valid_by_githubs_schema():
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "release.yml"}
    check = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                            *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_workflow_with_a_mistake_is_refused():
    bad = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                          "-"], input="on: push\njobs:\n  x:\n    runs-on: [1, 2]\n    stepz: []\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0


def test_the_release_workflow_builds_every_arch_natively_signs_verifies_and_publishes():
    flow = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    jobs = flow["jobs"]
    matrix = jobs["build"]["strategy"]["matrix"]["include"]
    assert {(m["arch"], m["board"]) for m in matrix} == {("amd64", "generic"), ("amd64", "nuc"), ("arm64", "generic"),
                                                          ("arm64", "rpi4")}
    assert all(m["runner"].endswith("-arm") == (m["arch"] == "arm64") for m in matrix)  # arm64 on arm64 runners
    steps = " ".join(str(s.get("run", "")) for s in jobs["build"]["steps"])
    assert "--release" in steps and "--signing-key" in steps and "maculaos-sdk verify" in steps and "pytest" in steps
    assert set(jobs["publish"]["needs"]) == {"build", "compare"} and jobs["compare"]["needs"] == "reproducibility"
    assert "secrets.MACULAOS_SIGNING_KEY" in (ROOT / ".github/workflows/release.yml").read_text()


def test_the_spec_build_commands_exist():
    def dry(*args: str, **env: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin", **env}).stdout

    assert "--arch $arch" in dry("build") and "amd64 arm64" in dry("build")
    assert "for arch in arm64;" in dry("build", ARCH="arm64") and "for arch in arm64;" in dry("build", "ARCH=arm64")
    assert "--outputs tar" in dry("rootfs") and "--outputs iso" in dry("iso") and "vm start" in dry("qemu")
