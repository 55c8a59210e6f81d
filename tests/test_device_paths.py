"""On-device paths live in one module (maculaos_device.paths): the device code imports it, the initrd's /init is
rendered from it, and the OpenRC services source the shell file the SDK writes from it."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from maculaos_device import paths

from maculaos_sdk.contexts import write_node_files
from maculaos_sdk.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = tuple(str(p) for p in (paths.RUN, paths.STATE, paths.SHARE, paths.LIB, paths.K3S_IMAGES))


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a Python file that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_device_module_spells_an_on_device_path_of_its_own():
    spelled = [f"{f.name}:{line}: {text!r}" for f in sorted((ROOT / "device").glob("*.py")) if f.name != "paths.py"
               for line, text in _code_strings(f) if any(prefix in text for prefix in PREFIXES)]
    assert not spelled, spelled


def test_the_services_and_the_initrd_read_their_paths_from_the_module():
    scripts = [*sorted((ROOT / "overlay/etc/init.d").iterdir()), ROOT / "stages/40-initrd/init.j2"]
    spelled = [f"{s.name}:{n}: {line.strip()}" for s in scripts for n, line in enumerate(s.read_text().splitlines(), 1)
               if not line.lstrip().startswith("#") and any(prefix in line for prefix in PREFIXES)
               and line.strip() != f". {paths.SHELL_PATHS}"]
    assert not spelled, spelled


def test_the_shell_file_is_the_module(tmp_path):
    write_node_files(load_profile("core"), tmp_path)
    shell = tmp_path / str(paths.SHELL_PATHS).lstrip("/")
    out = subprocess.run(["sh", "-c", f'. "{shell}" && echo "$MACULAOS_RUN $MACULAOS_K3S_TOKEN $MACULAOS_DATA"'],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(paths.RUN), str(paths.K3S_TOKEN), str(paths.DATA)]
