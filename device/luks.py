"""The Python side of the data partition's LUKS2 volume: luks.sh's functions run from `maculaos` (the installer
makes a volume; an update seals a tpm key for the slot it wrote), their messages logged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from . import encryption, layout, paths
from .system import Device, DeviceError, log


def run_function(function: str, args: list[str], env: dict[str, str] | None = None) -> bool:
    """Run luks.sh's `function` with `args` (after paths.sh and encryption.sh); its messages are logged."""
    script = f". {paths.SHELL_PATHS}; . {paths.ENCRYPTION_SH}; . {paths.LUKS_LIB}; {function} \"$@\""
    proc = subprocess.run(["sh", "-c", script, function, *args], env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        log(line.removeprefix("maculaos-luks: "))
    return proc.returncode == 0


def secret_file(path: Path, data: bytes) -> Path:
    """`data` in a new file only root reads (in tmpfs: the caller removes it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def token_types(part: Path) -> list[str]:
    """The token types in the LUKS2 header of `part` ([] when it is not a LUKS2 volume)."""
    proc = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(part)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return []
    try:
        return [str(t.get("type")) for t in json.loads(proc.stdout).get("tokens", {}).values()]
    except (ValueError, AttributeError):
        return []


def seal_for_slot(dev: Device, slot: str, running: str) -> None:
    """When the data partition has tpm keys: seal one for `slot` (just written) to the PCRs its boot
    loader and kernel will give, unlocked for the purpose by the running slot's own tpm key. Never fails the
    update: a slot without a tpm key asks the node's other key sources at its boot."""
    try:
        part = dev.partition(layout.PART_DATA)
    except DeviceError:
        return
    if encryption.KeySource.tpm.token_type not in token_types(part):
        return
    from . import measured_boot

    loaders = sorted((dev.esp / "EFI/BOOT").glob("BOOT*.EFI"))
    try:
        if len(loaders) != 1:
            raise measured_boot.MeasurementError("the ESP has no single boot loader")
        values = measured_boot.sealing_values_for(encryption.TPM_PCRS, loaders[0], dev.esp / slot / "vmlinuz")
    except measured_boot.MeasurementError as exc:
        log(f"slot {slot} gets no tpm key ({exc}): its boot asks the other key sources")
        return
    file = secret_file(dev.run / "luks-tpm-values", values)
    try:
        run_function("luks_tpm_enroll", [str(part), slot, str(file), running])
    finally:
        file.unlink()
