"""The programs the on-device tool runs are declared in one list, which the rootfs stage checks in the image.

trixie moved `resizepart` out of util-linux: the growdata service then failed on the first boot of a bigger
disk, and only a QEMU test on a grown drive noticed. Here every run([...]) of the device code is read from
its source, so a new program is either added to the list (and so checked at build time) or this test fails."""

from __future__ import annotations

import ast
from pathlib import Path

from maculaos_device.system import COMMANDS, OPTIONAL_COMMANDS

DEVICE = Path(__file__).resolve().parents[1] / "device"
RUNNERS = {"run", "Popen", "check_output", "check_call", "call", "_command"}  # _command: diag's


def program_names(node: ast.expr) -> list[str]:
    """The program(s) a run([...]) argument can start: the first element of a list literal (either branch of
    a conditional expression)."""
    if isinstance(node, ast.IfExp):
        return program_names(node.body) + program_names(node.orelse)
    if isinstance(node, ast.List) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
        if isinstance(first, ast.IfExp):
            return [v for b in (first.body, first.orelse) if isinstance(b, ast.Constant) for v in [b.value]]
    return []


def programs_run_by(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in RUNNERS:
                found.update(program_names(node.args[0]))
    return found


def test_every_program_the_device_code_runs_is_declared():
    used = set().union(*(programs_run_by(p) for p in sorted(DEVICE.glob("*.py"))))
    assert "sfdisk" in used and "partx" in used and "reboot" in used and "poweroff" in used  # the reader sees them
    declared = set(COMMANDS) | set(OPTIONAL_COMMANDS)
    assert used <= declared, f"run by the device code but not in system.COMMANDS: {sorted(used - declared)}"


def test_the_walker_sees_a_conditional_and_a_plain_call(tmp_path):
    p = tmp_path / "sample.py"
    p.write_text('import subprocess\nsubprocess.run(["a" if x else "b", "-f"])\nrun(["c", "d"], "why")\nfoo(["e"])\n')
    assert programs_run_by(p) == {"a", "b", "c"}


def test_the_layer_stage_checks_the_list_in_the_image():
    script = (DEVICE.parent / "stages/45-layer/make-layer.sh.j2").read_text()
    assert "maculaos_device.system import COMMANDS" in script
