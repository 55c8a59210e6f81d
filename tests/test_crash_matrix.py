"""The crash matrix (issue 26, part 2): every durable step that `maculaos upgrade --apply`, `--rollback`, the
boot-time confirm and `maculaos factory-reset` take on a node with file-backed slots, recorded; for every prefix of
those steps, and with the next step's write torn half-way, the node as a power cut would leave it; on it, the real
boot decision (the decision part of `stages/55-bootloader/grub.cfg.j2`, run by GRUB itself under `grub-emu` on a FAT
image of the ESP), then the boot service's `confirm` on the slot GRUB chose. A row is bad when the node boots a
slot whose record does not verify, no copy of the GRUB environment parses, a file on the data partition is left
torn, or the boot service fails. The test writes docs/crash-matrix.md and fails on any bad row.

The model is ordered: a cut keeps every step before it and none after (the steps are separated by fsync or by a
rename, which the updater fsyncs around). The kernel and initrd are fetched on a thread beside the slot write; here
they are fetched first, one of the orders the two may take (each lands by a rename, so the order changes no
verdict)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import jinja2
import pytest
from device_fixtures import FileDevice, file_device, make_bundle, make_key, make_node
from maculaos_device import bootenv, installer, updater
from maculaos_device.source import Source

from maculaos_sdk.paths import sdk_root

GRUB_CFG = sdk_root() / "stages/55-bootloader/grub.cfg.j2"
MATRIX_DOC = sdk_root() / "docs/crash-matrix.md"
USER_FILE = "data/data/photos/cat.jpg"  # users' data: no operation here may touch it
State = dict[str, bytes]  # path under the node's folder -> content


# --- recording ------------------------------------------------------------------------------------
@dataclass
class Step:
    what: str
    after: State


@dataclass
class Recording:
    """The node's files after each durable step of one operation."""

    root: Path
    start: State
    steps: list[Step] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def boundary(self) -> None:
        with self.lock:
            last = self.steps[-1].after if self.steps else self.start
            now = snapshot(self.root, last)
            if now != last:
                self.steps.append(Step(describe(last, now), now))


def snapshot(root: Path, last: State) -> State:
    """Every file under `root` but run/ (a tmpfs: a power cut empties it); a content equal to `last`'s is
    `last`'s object (so recordings stay small)."""
    state: State = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if rel.startswith("run/"):
            continue
        data = path.read_bytes()
        state[rel] = last[rel] if last.get(rel) == data else data
    return state


def describe(old: State, new: State) -> str:
    gone = [p for p in old if p not in new]
    changed = [p for p in new if old.get(p) != new[p]]
    renamed = [(s, d) for s in gone for d in changed if old[s] == new[d]]
    if len(renamed) == 1 and len(gone) == len(changed) == 1:
        return f"rename {renamed[0][0]} -> {Path(renamed[0][1]).name}"
    parts = [f"remove {p}" for p in gone]
    parts += [f"write {p} ({len(new[p])} B)" if p not in old else f"write {p}" for p in changed]
    return ", ".join(parts)


class _FetchFirst(threading.Thread):
    """updater.write_payload's boot-file thread, run at its start() (a deterministic order); other threads as
    usual."""

    def start(self) -> None:
        if getattr(self, "_target", None) is not None and self._target.__name__ == "fetch_boot":
            self.ran_inline = True
            self.run()
        else:
            super().start()

    def join(self, timeout: float | None = None) -> None:
        if not getattr(self, "ran_inline", False):
            super().join(timeout)


def record(monkeypatch: pytest.MonkeyPatch, root: Path, operation: Callable[[], object]) -> Recording:
    """Run `operation` with a snapshot of the node around every call that makes writes durable or visible:
    fsync, sync, rename, unlink and raw writes (the slot); buffered writes show at the next of them."""
    rec = Recording(root, snapshot(root, {}))
    for name in ("fsync", "sync", "replace", "rename", "unlink", "write"):
        real = getattr(os, name)

        def traced(*args, _real=real, **kw):
            rec.boundary()
            try:
                return _real(*args, **kw)
            finally:
                rec.boundary()

        monkeypatch.setattr(os, name, traced)
    monkeypatch.setattr(updater.threading, "Thread", _FetchFirst)
    try:
        operation()
    finally:
        monkeypatch.undo()
    rec.boundary()
    return rec


# --- the cuts -------------------------------------------------------------------------------------
def torn(old: State, new: State) -> State | None:
    """`new` with its one rewritten file cut half-way through the bytes that change (None when the step is a
    rename or a removal: those land whole or not at all)."""
    changed = [p for p in new if old.get(p) != new[p]]
    if len(changed) != 1 or any(p not in new for p in old):
        return None
    path = changed[0]
    before, after = old.get(path, b""), new[path]
    first = _same_prefix(before, after)
    last = len(after) - _same_prefix(before[::-1], after[::-1]) if len(before) == len(after) else len(after)
    middle = first + (last - first) // 2
    return {**new, path: after[:middle] + before[middle:len(after)]}


def _same_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes `a` and `b` share (a binary search over slices: slot images are megabytes)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if a[:mid] == b[:mid] else (low, mid - 1)
    return low


@dataclass(frozen=True)
class Cut:
    step: int  # steps kept
    torn: bool  # and the next step's write torn
    what: str
    state: State


def cuts(rec: Recording) -> list[Cut]:
    states = [rec.start, *(s.after for s in rec.steps)]
    out = [Cut(0, False, "before the first step", rec.start)]
    for n, step in enumerate(rec.steps, start=1):
        half = torn(states[n - 1], step.after)
        if half is not None:
            out.append(Cut(n - 1, True, f"{step.what}: torn", half))
        out.append(Cut(n, False, step.what, step.after))
    return out


# --- the next boot: GRUB, then the boot service ----------------------------------------------------
def grub_decision_cfg() -> str:
    """The decision part of the real grub.cfg (the environment read, validated, the try counted), then which
    entry GRUB can boot: the chosen slot's, else (fallback) the committed slot's."""
    text = GRUB_CFG.read_text()
    begin, end = text.index("set envfile="), text.index("set fallback=1")
    decision = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text[begin:end]).render(
        max_tries=bootenv.MAX_TRIES)
    return decision + """
set chosen=""
for s in $boot $active; do
  if [ -z "$chosen" ]; then if [ -f /$s/vmlinuz ]; then if [ -f /$s/initrd.img ]; then set chosen=$s; fi; fi; fi
done
echo "matrix: envfile=$envfile boot=$boot chosen=$chosen"
reboot
"""


@dataclass(frozen=True)
class Boot:
    envfile: str
    chosen: str
    esp: State  # the ESP after GRUB (its save_env)


def grub_boot(esp: State, folder: Path) -> Boot:
    """GRUB (grub-emu) on a FAT image holding `esp` (paths relative to the ESP)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    image = folder / "esp.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.vfat", "-n", "ESP", str(image)], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", str(image), "::/grub", *(f"::/{d}" for d in sorted(
        {str(Path(p).parent) for p in esp} - {".", "grub"}))], check=True)
    for rel, data in {**esp, "grub/grub.cfg": grub_decision_cfg().encode()}.items():
        (folder / "file").write_bytes(data)
        subprocess.run(["mcopy", "-i", str(image), str(folder / "file"), f"::/{rel}"], check=True)
    (folder / "device.map").write_text(f"(hd0) {image}\n")
    out = subprocess.run(["grub-emu", "-m", str(folder / "device.map"), "-r", "hd0", "-d", "/grub"],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60).stdout.decode(errors="replace")
    found = re.search(r"matrix: envfile=(\S*) boot=(\S*) chosen=([AB]?)", out)
    assert found, f"grub-emu printed no decision:\n{out}"
    after = {rel: subprocess.run(["mtype", "-i", str(image), f"::/{rel}"], check=True, capture_output=True).stdout
             for rel in esp if rel.startswith("grub/grubenv")}
    return Boot(found.group(1), found.group(3), {**esp, **after})


def restore(state: State, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for rel, data in state.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@dataclass(frozen=True)
class Verdict:
    boots: str  # what the next boot does
    problems: tuple[str, ...]


def next_boot(cut: Cut, ends: tuple[State, State], good_boot_files: dict[str, tuple[bytes, bytes]],
              work: Path, public_key: Path, grub_cache: dict) -> Verdict:
    state, problems = cut.state, []
    esp = {p.removeprefix("esp/"): d for p, d in state.items() if p.startswith("esp/")}
    key = tuple(sorted((p, hashlib.sha256(d).digest()) for p, d in esp.items()))
    if key not in grub_cache:
        grub_cache[key] = grub_boot(esp, work / "grub")
    boot: Boot = grub_cache[key]
    if not any(bootenv.parse(esp.get(f"grub/{n}", b"")[:bootenv.BLOCK_BYTES]) for n in ("grubenv", "grubenv.bak")):
        problems.append("no copy of the GRUB environment parses")
    for rel in sorted(p for p in set(state) | set(ends[0]) | set(ends[1]) if p.startswith("data/")):
        if not rel.endswith(".tmp") and state.get(rel) not in (ends[0].get(rel), ends[1].get(rel)):
            problems.append(f"{rel} is torn")
    if not boot.chosen:
        return Verdict("GRUB finds no slot to boot", (*problems, "nothing boots"))
    restore({**state, **{f"esp/{p}": d for p, d in boot.esp.items()}}, work / "node")
    dev = file_device(work / "node", public_key)
    dev.run.mkdir()
    (dev.run / "mode").write_text("disk\n")  # as the initrd records it at every boot
    record = updater.slot_record(dev, boot.chosen)
    files = tuple((dev.esp / boot.chosen / n).read_bytes() for n in updater.BOOT_FILES)
    if record is None:
        problems.append(f"slot {boot.chosen} has no record")
    elif updater.read_back_sha256(dev.slot_device(boot.chosen), record.size) != record.sha256:
        problems.append(f"slot {boot.chosen} does not read back as its record")
    elif files != good_boot_files.get(record.version):
        problems.append(f"slot {boot.chosen}'s kernel or initrd is not {record.version}'s")
    if problems:
        return Verdict(f"GRUB boots {boot.chosen}", tuple(problems))
    dev.boot(boot.chosen, record.version)
    env = dev.envs.load()
    how = "trial" if env.trial == boot.chosen else "committed"
    if boot.envfile.endswith(".bak"):
        how += ", from grubenv.bak"
    try:
        done = updater.confirm(dev)
    except Exception as exc:  # noqa: BLE001 - a verdict, reported below
        return Verdict(f"GRUB boots {boot.chosen} ({how})", (f"the boot service failed: {exc}",))
    if dev.envs.primary.read_bytes() != dev.envs.backup.read_bytes():
        problems.append("the boot service left the two environment copies different")
    return Verdict(f"GRUB boots {boot.chosen} ({how}); the boot service: {done}", tuple(problems))


# --- the operations -------------------------------------------------------------------------------
@dataclass
class Node:
    dev: FileDevice
    secret: Path
    public: Path
    bundles: Path

    def bundle(self, version: str) -> Source:
        folder = self.bundles / version
        if not folder.exists():
            # a fixed size, so that the matrix reads the same on every run
            make_bundle(folder, self.secret, version, rootfs=os.urandom(3 << 20))
        return Source(str(folder))


def fresh_node(tmp_path: Path) -> Node:
    tmp_path.mkdir(parents=True)
    secret, public = make_key(tmp_path)
    dev = make_node(tmp_path / "node", public)
    (dev.data_root / "data/photos").mkdir(parents=True)
    (dev.data_root / "data/photos/cat.jpg").write_bytes(b"\xff\xd8 a cat")
    return Node(dev, secret, public, tmp_path / "bundles")


def _updated(node: Node) -> None:  # 0.2.0 applied, booted, committed: B active, A holds 0.1.0
    updater.apply(node.dev, node.bundle("0.2.0"))
    node.dev.boot("B", "0.2.0")
    updater.confirm(node.dev)


def _pending(node: Node) -> None:
    updater.apply(node.dev, node.bundle("0.2.0"))


def _trial_booted(node: Node) -> None:
    _pending(node)
    node.dev.boot("B", "0.2.0")


# name: (set-up before the recording, the recorded operation)
OPERATIONS: dict[str, tuple[Callable[[Node], None], Callable[[Node], object]]] = {
    "upgrade --apply (A committed, B blank)": (lambda n: None, lambda n: updater.apply(n.dev, n.bundle("0.2.0"))),
    "confirm (the trial B booted, healthy)": (_trial_booted, lambda n: updater.confirm(n.dev)),
    "upgrade --rollback (B committed, A holds 0.1.0)": (_updated, lambda n: updater.rollback(n.dev)),
    "upgrade --apply over an older system (A holds 0.1.0)": (_updated,
                                                             lambda n: updater.apply(n.dev, n.bundle("0.3.0"))),
    "factory-reset --keep-data (B pending)": (_pending, lambda n: installer.factory_reset(n.dev, keep_data=True)),
}


def matrix_rows(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Verdict]]:
    node = fresh_node(tmp_path / "setup")
    prepare, operation = OPERATIONS[name]
    prepare(node)
    rec = record(monkeypatch, node.dev.esp.parent, lambda: operation(node))
    assert rec.steps, f"{name}: no step recorded"
    good = {"0.1.0": (b"vmlinuz", b"initrd.img"),
            **{v: (b"kernel " + v.encode(), b"initrd " + v.encode()) for v in ("0.2.0", "0.3.0")}}
    ends, grub_cache = (rec.start, rec.steps[-1].after), {}
    rows = []
    for cut in cuts(rec):
        verdict = next_boot(cut, ends, good, tmp_path / "work", node.public, grub_cache)
        rows.append((f"{cut.step}{'+torn' if cut.torn else ''}: {cut.what}", verdict))
    return rows


def table(name: str, rows: list[tuple[str, Verdict]]) -> list[str]:
    lines = [f"### {name}", "", "| cut after step | the next boot | verdict |", "|---|---|---|"]
    lines += [f"| {where.replace('|', '/')} | {v.boots} | {'; '.join(v.problems) or 'ok'} |" for where, v in rows]
    return [*lines, ""]


def test_every_cut_of_every_update_step_boots_a_verified_slot_and_keeps_data(tmp_path, monkeypatch):
    doc = ["# The crash matrix", "",
           "Generated by `tests/test_crash_matrix.py` (do not edit): each operation's durable steps on a node with",
           "file-backed slots, a power cut after every step and inside every write (`+torn`: the next write half",
           "done), and what the next boot does: GRUB's own decision (the real `grub.cfg` under `grub-emu`, on a FAT",
           "image of the ESP), then the boot service's `confirm` on the slot GRUB chose. `ok` means the slot booted",
           "verifies against its record, a copy of the GRUB environment parses, no file on the data partition is torn",
           "and the boot service leaves both environment copies equal. Not covered here: the installer (a cut",
           "install leaves a disk to install again) and the initrd's part of a factory reset.", ""]
    bad = []
    for n, name in enumerate(OPERATIONS):
        rows = matrix_rows(name, tmp_path / f"op{n}", monkeypatch)
        doc += table(name, rows)
        bad += [f"{name}, cut {where}: {'; '.join(v.problems)}" for where, v in rows if v.problems]
    MATRIX_DOC.write_text("\n".join(doc))
    assert not bad, "\n".join(bad)


GARBAGE = b"garbage" * 100


@pytest.mark.parametrize("primary, backup, boots, envfile", [
    (bootenv.BootEnv(), bootenv.BootEnv(trial="B"), "A", "/grub/grubenv"),  # the primary counts while it parses
    (GARBAGE, bootenv.BootEnv(trial="B"), "B", "/grub/grubenv.bak"),
    (GARBAGE, GARBAGE, "A", "/grub/grubenv.bak"),
    (bootenv.BootEnv(active="B", trial="A", tries=2), None, "A", "/grub/grubenv"),
    (bootenv.BootEnv(active="B", trial="A", tries=3), None, "B", "/grub/grubenv"),  # tries used up: rolled back
    (b"# GRUB Environment Block\nactive=C\ntrial=A\ntries=7\n", None, "A", "/grub/grubenv"),
])
def test_grubs_decision_matches_what_the_device_reads(tmp_path, primary, backup, boots, envfile):
    """The matrix's verdicts rest on GRUB and the device tool reading the environment alike: the state the tool
    loads (EnvStore.load, as `maculaos upgrade --status` shows it) is the one GRUB acts on."""
    esp = {"A/vmlinuz": b"k", "A/initrd.img": b"i", "B/vmlinuz": b"k", "B/initrd.img": b"i"}
    for name, env in (("grubenv", primary), ("grubenv.bak", backup)):
        if env is not None:
            esp[f"grub/{name}"] = env.render() if isinstance(env, bootenv.BootEnv) else env
    boot = grub_boot(esp, tmp_path / "grub")
    assert (boot.chosen, boot.envfile) == (boots, envfile)
    restore({f"esp/{p}": d for p, d in esp.items()}, tmp_path / "before")
    model = bootenv.EnvStore(tmp_path / "before/esp/grub").load()
    assert (model.trial if model.trial and model.tries < bootenv.MAX_TRIES else model.active) == boots
    restore({f"esp/{p}": d for p, d in boot.esp.items()}, tmp_path / "after")
    counted = bootenv.EnvStore(tmp_path / "after/esp/grub").load()
    if model.trial and model.tries < bootenv.MAX_TRIES:  # GRUB counted the try it booted, in the copy it read
        assert counted == replace(model, tries=model.tries + 1)
    elif model.trial:  # and gave up on a trial whose tries were used up
        assert counted == replace(model, trial="", tries=0, rolledback=model.trial)
