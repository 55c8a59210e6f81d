"""The on-device update state machine (maculaos_device.updater), every transition on file-backed slots:
apply, interrupted apply, bad hash, full ESP, confirm, stuck trial, watchdog, rollback, corrupted envs,
anti-rollback, and what a bundle must match (signature, arch, board, profile, form of every field)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from device_fixtures import file_device, make_bundle, make_key, make_node, sign
from maculaos_device import bootenv, manifest, updater
from maculaos_device.bootenv import BootEnv
from maculaos_device.source import Source
from maculaos_device.system import DeviceError

ZEROED = bytes(updater.INVALIDATE_BYTES)


@pytest.fixture
def key(tmp_path):
    return make_key(tmp_path)


@pytest.fixture
def node(tmp_path, key):
    return make_node(tmp_path / "node", key[1])


def bundle(tmp_path, key, version="0.2.0", name=None, **kw):
    return make_bundle(tmp_path / (name or f"b-{version}"), key[0], version, **kw)


def state(node):
    return node.envs.load()


def slot_b_forgotten(node) -> bool:
    b = node.esp / "B"
    leftovers = [p.name for p in b.iterdir()] if b.is_dir() else []
    return node.slots["B"].read_bytes()[: len(ZEROED)] == ZEROED and leftovers == []


def test_apply_writes_the_standby_slot_and_puts_it_on_trial(tmp_path, key, node):
    b = bundle(tmp_path, key)
    assert updater.apply(node, Source(str(b))) == "B"
    rootfs = (b / "rootfs.squashfs").read_bytes()
    assert node.slots["B"].read_bytes()[: len(rootfs)] == rootfs
    assert (node.esp / "B" / "vmlinuz").read_bytes() == (b / "vmlinuz").read_bytes()
    assert state(node) == BootEnv(active="A", trial="B", tries=0, rolledback="")
    assert node.envs.backup.read_bytes() == node.envs.primary.read_bytes()
    s = updater.status(node)
    assert (s["booted"], s["active"], s["trial"], s["slots"]) == \
        ("A", "A", "B", {"A": {"version": "0.1.0"}, "B": {"version": "0.2.0"}})
    with pytest.raises(DeviceError, match="pending"):
        updater.apply(node, Source(str(b)))


def test_a_healthy_trial_is_committed_and_raises_the_anti_rollback_floor(tmp_path, key, node):
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.boot("B", "0.2.0")
    assert updater.confirm(node) == "committed"
    assert state(node) == BootEnv(active="B")
    assert node.highest_file.read_text() == "0.2.0\n"
    assert node.reboots == []


def test_an_unhealthy_trial_reboots_without_committing(tmp_path, key, node):
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.boot("B", "0.2.0")
    node.envs.save(BootEnv(active="A", trial="B", tries=1))  # as GRUB counted the boot
    node.unhealthy = "health hook /x failed"
    assert updater.confirm(node) == "rebooting"
    assert node.reboots == [False]
    assert state(node) == BootEnv(active="A", trial="B", tries=1)
    assert not node.highest_file.exists()


def test_the_watchdog_reboots_only_a_trial_still_unconfirmed(tmp_path, key, node):
    updater.watchdog_expired(node, 20)
    assert node.reboots == []  # committed boot: nothing to do
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.boot("B", "0.2.0")
    updater.watchdog_expired(node, 20)
    assert node.reboots == [True]


def test_an_interrupted_download_leaves_the_slot_invalidated_and_the_env_untouched(tmp_path, key, node):
    b = bundle(tmp_path, key)
    before = node.envs.primary.read_bytes()
    with (b / "rootfs.squashfs").open("r+b") as f:  # the server's copy ends half-way
        f.truncate(1 << 20)
    with pytest.raises(DeviceError, match="ended after .*slot B invalidated, boot state unchanged"):
        updater.apply(node, Source(str(b)))
    assert slot_b_forgotten(node)
    assert node.envs.primary.read_bytes() == before == node.envs.backup.read_bytes()


def test_a_stream_longer_than_signed_is_refused(tmp_path, key, node):
    b = bundle(tmp_path, key)
    with (b / "rootfs.squashfs").open("ab") as f:
        f.write(b"more")
    with pytest.raises(DeviceError, match="more than the"):
        updater.apply(node, Source(str(b)))
    assert slot_b_forgotten(node) and state(node) == BootEnv()


@pytest.mark.parametrize(("chunk_bytes", "where"), [(1 << 20, 4096), (1 << 20, (3 << 20) + 1), (0, 4096)],
                         ids=["chunked-first", "chunked-last", "whole-file"])
def test_a_bad_hash_is_caught_by_the_read_back(tmp_path, key, node, chunk_bytes, where):
    b = bundle(tmp_path, key, chunk_bytes=chunk_bytes)
    with (b / "rootfs.squashfs").open("r+b") as f:
        f.seek(where)
        flipped = f.read(1)[0] ^ 1
        f.seek(where)
        f.write(bytes([flipped]))  # one bit: in the last chunk too, the file keeps its signed size
    with pytest.raises(DeviceError, match="does not read back"):
        updater.apply(node, Source(str(b)))
    assert slot_b_forgotten(node) and state(node) == BootEnv()
    assert updater.status(node)["slots"]["B"] == {"version": None}


def test_a_full_esp_fails_the_apply_with_nothing_left_behind(tmp_path, key, node, monkeypatch):
    real_replace = updater.os.replace

    def full(src, dst):
        if str(dst).endswith("initrd.img"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(updater.os, "replace", full)
    with pytest.raises(DeviceError, match="No space left.*slot B invalidated"):
        updater.apply(node, Source(str(bundle(tmp_path, key))))
    assert slot_b_forgotten(node) and state(node) == BootEnv()


def test_an_apply_killed_mid_way_still_invalidates_the_slot(tmp_path, key, node, monkeypatch):
    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(updater, "fetch_boot_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        updater.apply(node, Source(str(bundle(tmp_path, key))))
    assert slot_b_forgotten(node) and state(node) == BootEnv()


def test_a_power_cut_between_the_env_writes_is_repaired_to_the_primary(tmp_path, key, node, monkeypatch):
    """The node's files as the cut leaves them (copied at the fault point, before apply's own clean-up could run):
    the backup already says "trial B", the primary still the old state; the boot service makes them one again,
    taking the copy GRUB reads. tests/test_crash_matrix.py does this for every step."""
    cut_root = tmp_path / "cut"

    def cut(name):
        if name == "env-backup-written":
            shutil.copytree(node.esp.parent, cut_root)
            raise SystemExit("power cut")

    monkeypatch.setattr(bootenv, "fault_point", cut)
    with pytest.raises(SystemExit):
        updater.apply(node, Source(str(bundle(tmp_path, key))))
    monkeypatch.undo()
    left = file_device(cut_root, key[1])
    assert left.envs.backup.read_bytes() == BootEnv(trial="B").render()
    assert left.envs.primary.read_bytes() == BootEnv().render()
    assert updater.slot_record(left, "B").version == "0.2.0"  # written and recorded before the env
    assert state(left) == BootEnv()  # GRUB and the tool read the primary
    assert updater.confirm(left) == "nothing on trial"
    assert left.envs.backup.read_bytes() == left.envs.primary.read_bytes() == BootEnv().render()


def test_corrupted_envs(tmp_path, key, node):
    node.envs.save(BootEnv(active="B", rolledback="A"))
    node.envs.primary.write_bytes(b"garbage" * 100)
    assert state(node) == BootEnv(active="B", rolledback="A")  # the backup, as GRUB's fallback does
    node.boot("B", "0.1.0")
    updater.confirm(node)
    assert node.envs.primary.read_bytes() == node.envs.backup.read_bytes()
    node.envs.primary.write_bytes(b"x")
    node.envs.backup.write_bytes(b"y")
    assert state(node) == BootEnv()  # both gone: slot A, no trial, as grub.cfg decides
    assert bootenv.parse(b"# GRUB Environment Block\nactive=C\ntrial=A\ntries=7\nrolledback=Z\n") == BootEnv()
    assert bootenv.parse(b"# GRUB Environment Block\ntrial=B\ntries=2\ntrial=A\n") == BootEnv(trial="B", tries=2)


def test_rollback_is_a_counted_trial_of_a_verified_slot_only(tmp_path, key, node):
    with pytest.raises(DeviceError, match="no verified system"):
        updater.rollback(node)  # slot B holds nothing
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.boot("B", "0.2.0")
    updater.confirm(node)
    assert updater.rollback(node) == "A"
    assert state(node) == BootEnv(active="B", trial="A", tries=0, rolledback="B")
    node.boot("A", "0.1.0")
    assert updater.confirm(node) == "committed"
    assert state(node) == BootEnv(active="A", rolledback="B")
    with pytest.raises(DeviceError, match="last rolled back from"):
        updater.rollback(node)
    assert updater.rollback(node, force=True) == "B"


def test_rollback_refuses_the_slot_grub_gave_up_on_and_a_slot_that_changed(tmp_path, key, node):
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.envs.save(BootEnv(active="A", rolledback="B"))  # GRUB after the 3rd failed try of B
    with pytest.raises(DeviceError, match="last rolled back from"):
        updater.rollback(node)
    with node.slots["B"].open("r+b") as f:
        f.seek(100)
        f.write(b"bit rot")
    with pytest.raises(DeviceError, match="no longer reads back"):
        updater.rollback(node, force=True)
    assert state(node) == BootEnv(active="A", rolledback="B")


def test_rollback_after_a_failed_apply_is_refused(tmp_path, key, node):
    updater.apply(node, Source(str(bundle(tmp_path, key))))
    node.boot("B", "0.2.0")
    updater.confirm(node)  # B committed, A holds 0.1.0
    bad = bundle(tmp_path, key, "0.3.0")
    with (bad / "rootfs.squashfs").open("r+b") as f:
        f.write(b"bad")
    with pytest.raises(DeviceError, match="does not read back"):
        updater.apply(node, Source(str(bad)))
    with pytest.raises(DeviceError, match="no verified system"):
        updater.rollback(node)  # slot A was overwritten and invalidated: nothing to go back to
    assert updater.status(node)["slots"]["A"] == {"version": None}


def test_downgrades_and_replays_are_refused_unless_allowed(tmp_path, key, node):
    with pytest.raises(DeviceError, match="not newer than the running 0.1.0"):
        updater.apply(node, Source(str(bundle(tmp_path, key, "0.1.0"))))
    with pytest.raises(DeviceError, match="not newer than the running"):
        updater.apply(node, Source(str(bundle(tmp_path, key, "0.1.0~rc1"))))
    node.highest_file.write_text("0.3.0\n")  # committed once, then rolled back
    older = bundle(tmp_path, key, "0.2.0")
    assert updater.check(node, Source(str(older)))["update"] is False
    with pytest.raises(DeviceError, match="highest this node ever committed"):
        updater.apply(node, Source(str(older)))
    assert updater.apply(node, Source(str(older)), allow_downgrade=True) == "B"
    assert updater.check(node, Source(str(bundle(tmp_path, key, "0.10.0"))))["update"] is True


@pytest.mark.parametrize(("field", "value", "message"), [
    ("arch", "arm64", "is for arm64"),
    ("board", "rpi4", "is for board rpi4"),
    ("profile", "maculaos", "is for profile maculaos, this node runs test"),
    ("min_version", "0.2.0", "needs version >= 0.2.0"),
    ("version", ["0.2.0", "mkdir", "/tmp/pwned"], "not a valid bundle manifest"),
    ("version", "0.2.0; reboot", "not a valid bundle manifest"),
    ("signing_key_id", "$(reboot)", "not a valid bundle manifest"),
    ("signing_key_id", "0123456789ABCDEF", "manifest names signing key 0123456789ABCDEF, but this node's key is"),
    ("files", {"rootfs.squashfs": {"size": "1", "sha256": "0" * 64}}, "not a valid bundle manifest"),
])
def test_a_signed_bundle_that_does_not_fit_this_node_is_refused_before_any_write(tmp_path, key, node, field, value,
                                                                               message):
    b = make_bundle(tmp_path / "b", key[0], "0.2.0", overrides={field: value})
    with pytest.raises(DeviceError, match=message):
        updater.apply(node, Source(str(b)))
    assert node.slots["B"].read_bytes() == bytes(len(node.slots["B"].read_bytes()))  # not even invalidated
    assert state(node) == BootEnv()


def test_signatures_must_verify_with_the_key_in_the_root(tmp_path, key, node):
    b = bundle(tmp_path, key)
    m = json.loads((b / "manifest.json").read_text())
    m["min_version"] = "0.0.1"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeviceError, match="signature does not verify"):
        updater.apply(node, Source(str(b)))
    (tmp_path / "other").mkdir()
    other_secret, _ = make_key(tmp_path / "other")
    sign(other_secret, b / "manifest.json")
    with pytest.raises(DeviceError, match="signature does not verify"):
        updater.apply(node, Source(str(b)))
    node.update_key.unlink()
    with pytest.raises(DeviceError, match="no update key"):
        updater.check(node, Source(str(b)))


def test_plain_http_needs_the_lab_opt_in():
    with pytest.raises(DeviceError, match="plain http is refused"):
        Source("http://10.0.2.2:8080/good")
    assert Source("http://10.0.2.2:8080/good", allow_http=True).is_url
    assert Source("https://updates.example/good").is_url
    with pytest.raises(DeviceError, match="not a folder or an http"):
        Source("ftp://x/y")


def test_status_of_a_live_system_and_after_a_fresh_install(tmp_path, key, node):
    (node.run / "mode").write_text("live\n")
    assert updater.status(node) == {"mode": "live", "version": "0.1.0", "booted": None, "active": None,
                                    "trial": None, "tries": 0, "rolledback": None, "slots": {}}
    with pytest.raises(DeviceError, match="not an installed system"):
        updater.apply(node, Source(str(bundle(tmp_path, key))))


def test_the_read_back_hashes_what_the_slot_holds(tmp_path):
    f = tmp_path / "slot"
    data = b"x" * 5000
    f.write_bytes(data + b"tail")
    assert updater.read_back_sha256(f, len(data)) == hashlib.sha256(data).hexdigest()
    assert updater.read_back_sha256(f, 10**6) == ""  # shorter than asked: never a match


def read_back_chunks(device, entry, workers=0) -> bool:
    checker = updater.ChunkChecker(device, entry, workers)
    for i in range(len(entry.chunks)):
        checker.submit(i)
    return checker.finish()


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_chunked_read_back_checks_every_chunk_on_any_number_of_threads(tmp_path, workers):
    step = 8192
    data = os.urandom(5 * step + 100)
    entry = manifest.FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest(), chunk_bytes=step,
                               chunks=tuple(manifest.chunk_digest(data[i:i + step])
                                            for i in range(0, len(data), step)))
    f = tmp_path / "slot"
    f.write_bytes(data + bytes(3 * step))  # a slot is larger than its image
    assert read_back_chunks(f, entry, workers)
    for where in (0, 3 * step + 7, len(data) - 1):  # first, a middle and the last (short) chunk
        spoiled = bytearray(data)
        spoiled[where] ^= 1
        f.write_bytes(bytes(spoiled) + bytes(3 * step))
        assert not read_back_chunks(f, entry, workers)
    f.write_bytes(data[:-1])  # the slot ends before the image does
    assert not read_back_chunks(f, entry, workers)


@pytest.mark.parametrize(("field", "value"), [("chunk_bytes", 1000), ("chunk_bytes", True), ("chunk_bytes", 0),
                                              ("chunk_blake2b", ["0" * 64]), ("chunk_blake2b", "x"),
                                              ("chunk_blake2b", None)])
def test_a_malformed_chunk_list_refuses_the_manifest(tmp_path, key, field, value):
    b = bundle(tmp_path, key)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["rootfs.squashfs"][field] = value
    with pytest.raises(manifest.ManifestError, match="chunk"):
        manifest.parse(json.dumps(m).encode())


def test_the_bundle_stage_writes_the_chunk_list_the_device_checks(tmp_path):
    """The manifest's one writer (run here as the bundle stage runs it) and the device's parser agree."""
    data = os.urandom(2 * manifest.CHUNK_BYTES + 12345)
    for name, content in (("rootfs.squashfs", data), ("vmlinuz", b"k"), ("initrd.img", b"i")):
        (tmp_path / name).write_bytes(content)
    stage = [sys.executable, "-m", "maculaos_device.manifest", "bundle", ".", "test", "0.2.0", "amd64", "generic",
             "0.0.0"]
    out = subprocess.run([*stage, "ABCDEF0123456789", str(manifest.CHUNK_BYTES)], cwd=tmp_path, check=True,
                         capture_output=True).stdout
    rootfs = manifest.parse(out).files["rootfs.squashfs"]
    assert (rootfs.size, rootfs.sha256, rootfs.chunk_bytes, len(rootfs.chunks)) == \
        (len(data), hashlib.sha256(data).hexdigest(), manifest.CHUNK_BYTES, 3)
    assert read_back_chunks(tmp_path / "rootfs.squashfs", rootfs)
    # a field the parser would refuse fails the build: one line, exit 2
    bad = subprocess.run([*stage, "not-a-key-id", str(manifest.CHUNK_BYTES)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "signing key id 'not-a-key-id'" in bad.stderr and "Traceback" not in bad.stderr
    record = subprocess.run([sys.executable, "-m", "maculaos_device.manifest", "slot-record", "rootfs.squashfs",
                             "0.2.0", "test"], cwd=tmp_path, check=True, capture_output=True).stdout
    assert manifest.parse_slot_record(record) == manifest.SlotRecord("0.2.0", "test", len(data),
                                                                     hashlib.sha256(data).hexdigest())


def _chunked(data: bytes, step: int) -> manifest.FileEntry:
    return manifest.FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest(), chunk_bytes=step,
                              chunks=tuple(manifest.chunk_digest(data[i:i + step]) for i in range(0, len(data), step)))


def test_write_checked_reads_each_chunk_back_from_the_device_not_the_stream(tmp_path, monkeypatch):
    step = 8192
    data = os.urandom(6 * step + 5)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(10 * step))
    assert updater.write_checked(io.BytesIO(data), slot, _chunked(data, step))
    assert slot.read_bytes()[: len(data)] == data
    # the download differs from what was signed: caught
    spoiled = bytearray(data)
    spoiled[4 * step] ^= 1
    assert not updater.write_checked(io.BytesIO(bytes(spoiled)), slot, _chunked(data, step))
    # the right bytes, but the device keeps a stale chunk (a lost write): caught by the read-back
    real_write = updater.os.write
    calls = []

    def lossy(fd, view):
        calls.append(len(view))
        return len(view) if len(calls) == 3 else real_write(fd, view)

    slot.write_bytes(bytes(10 * step))
    monkeypatch.setattr(updater.os, "write", lossy)
    assert not updater.write_checked(io.BytesIO(data), slot, _chunked(data, step))


def test_a_factory_reset_forgets_the_other_slot_and_is_refused_on_a_trial_boot(tmp_path, key, node):
    """The other slot may hold an older system (a rollback target) or a pending update: after a factory reset
    the node comes back on the system it runs and nothing else."""
    from maculaos_device import installer

    updater.apply(node, Source(str(bundle(tmp_path, key))))  # 0.2.0 pending on B
    node.boot("B", "0.2.0")
    with pytest.raises(DeviceError, match="slot B is on trial"):
        installer.factory_reset(node, keep_data=False)
    assert not (node.data_root / ".factory-reset").exists()
    node.boot("A", "0.1.0")  # the trial was not confirmed: GRUB came back to A, B still pending
    installer.factory_reset(node, keep_data=True)
    assert state(node) == BootEnv(active="A", trial="", tries=0)
    assert slot_b_forgotten(node) and updater.status(node)["slots"]["B"] == {"version": None}
    assert (node.data_root / ".factory-reset").read_text() == "keep-data\n" and node.reboots == [False]
