"""Encryption at rest without a VM: the config keys, what a profile or an image may never carry, the installer's
policy and stored config, and luks.sh's key-slot bookkeeping on a real LUKS2 header (cryptsetup on a file)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from maculaos_device import encryption, installer, nodeconfig, paths
from maculaos_device.system import DeviceError
from tang_server import TangServer

from maculaos_sdk.cli import main
from maculaos_sdk.paths import sdk_root
from maculaos_sdk.vm import free_port, port_is_free

BASE = "name: x\nextends: core\n"
LUKS_SH = sdk_root() / "overlay" / str(paths.LUKS_LIB).lstrip("/")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, what", [
    ("storage:\n  encryption:\n    key_sources: [usb, tpm2]\n", "storage.encryption.key_sources",
     "unknown value 'tpm2'"),
    ("storage:\n  encryption:\n    usb_label: 'key; reboot'\n", "storage.encryption.usb_label", "invalid value"),
    ("storage:\n  encryption:\n    cipher: aes-cbc-essiv\n", "storage.encryption.cipher", "unknown value"),
    ("storage:\n  encryption:\n    method: luks1\n", "storage.encryption.method", "unknown value 'luks1'"),
    ("storage:\n  encryption:\n    passphrase: short\n", "storage.encryption.passphrase",
     "invalid value (not shown: a secret)"),
    ("storage:\n  encryption:\n    enabled: 'yes'\n", "storage.encryption.enabled", "expected a boolean"),
    ("storage:\n  encryption:\n    tang_url: 'https://tang.lan'\n", "storage.encryption.tang_url", "invalid value"),
    ("storage:\n  encryption:\n    tang_url: 'http://tang.lan/$(reboot)'\n", "storage.encryption.tang_url",
     "invalid value"),
    ("storage:\n  encryption:\n    tang_thp: 'abc'\n", "storage.encryption.tang_thp", "invalid value"),
])
def test_the_encryption_keys_are_checked_like_every_other(tmp_path, text, key, what):
    problems = nodeconfig.validate_files([_config(tmp_path, text)])
    assert [(p.key, what in p.message) for p in problems] == [(key, True)], problems
    assert "short" not in str(problems[0])  # a passphrase is never echoed, even a wrong one


def test_the_policy_of_a_resolved_config(tmp_path):
    config = nodeconfig.resolve([_config(tmp_path, "storage:\n  encryption:\n    enabled: true\n"
                                                   "    key_sources: [usb, passphrase, usb]\n"
                                                   "    cipher: xchacha12,aes-adiantum-plain64\n")])
    policy = encryption.Policy.of(config)
    assert policy.sources == (encryption.KeySource.usb, encryption.KeySource.passphrase)  # each source once
    assert policy.shell_args() == ["xchacha12,aes-adiantum-plain64", encryption.USB_LABEL, "usb", "passphrase"]
    assert policy.problem() is None
    off = encryption.Policy.of(nodeconfig.resolve([]))
    assert not off.enabled and off.sources == (encryption.KeySource.passphrase,)
    empty = encryption.Policy.of(nodeconfig.resolve([_config(tmp_path, "storage:\n  encryption:\n    enabled: true\n"
                                                                        "    key_sources: []\n")]))
    assert "nothing could unlock" in (empty.problem() or "")


def test_a_profile_or_an_iso_install_config_never_carries_the_passphrase(write_profile, capsys, tmp_path):
    secret = "storage:\n  encryption:\n    enabled: true\n    passphrase: hunter2hunter2\n"
    path = write_profile(BASE + "config:\n" + "".join(f"  {line}\n" for line in secret.splitlines()))
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: config.storage.encryption.passphrase: a secret in an image" in err
    assert "hunter2" not in err and "Traceback" not in err
    (tmp_path / "node.yaml").write_text(secret)
    path = write_profile(BASE + "install:\n  config: node.yaml\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert f"{tmp_path / 'node.yaml'}:4: storage.encryption.passphrase: a secret in an image" in capsys.readouterr().err
    # enabling encryption without a secret is what a profile should do
    path = write_profile(BASE + "config:\n  storage:\n    encryption:\n      enabled: true\n      key_sources: [usb]\n")
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 0
    rendered = (tmp_path / "dry" / "45-layer" / "overlay" / str(paths.ENCRYPTION_SH).lstrip("/")).read_text()
    assert f"MACULAOS_LUKS_MAPPER='{encryption.MAPPER}'" in rendered


def test_the_installer_takes_the_passphrase_from_its_config_and_never_stores_it(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "DEFAULT_CONFIG", tmp_path / "absent.yaml")
    config = _config(tmp_path, "# my node\nmaculaos:\n  hostname: n1\nstorage:\n  encryption:\n    enabled: true\n"
                               "    passphrase: 'correct horse battery'\n")
    policy, passphrase = installer.data_policy(str(config))
    assert policy.enabled and passphrase == "correct horse battery"
    stored = tmp_path / "stored.yaml"
    installer.store_config(config, stored)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load(stored.read_text()) == {"maculaos": {"hostname": "n1"}, "storage": {"encryption": {
        "enabled": True}}}
    plain = _config(tmp_path, "# kept as written\nmaculaos:\n  hostname: n2\n")
    installer.store_config(plain, stored)
    assert stored.read_text() == plain.read_text()  # no secret: the file as given, comments and all
    # a passphrase source, no passphrase, no terminal: refused before any disk is touched
    nopass = _config(tmp_path, "storage:\n  encryption:\n    enabled: true\n")
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    with pytest.raises(DeviceError, match="no terminal can ask for it"):
        installer.data_policy(str(nopass))


def _luks(tmp_path: Path, *tokens: dict | str) -> Path:
    """A real LUKS2 header in a file (cryptsetup formats files without a loop device), with `tokens` imported."""
    dev = tmp_path / "data.img"
    subprocess.run(["truncate", "-s", "32M", str(dev)], check=True)
    key = tmp_path / "key"
    key.write_bytes(b"k" * encryption.KEY_BYTES)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(dev)], check=True)
    for i, token in enumerate(tokens):
        text = token if isinstance(token, str) else json.dumps(token)
        subprocess.run(["cryptsetup", "token", "import", "--token-id", str(i), "--json-file", "-", str(dev)],
                       input=text.encode(), check=True)
    return dev


def _luks_sh(tmp_path: Path, call: str) -> str:
    script = (f"MACULAOS_RUN={tmp_path}; {encryption.shell_file()}. {LUKS_SH}; {call}")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


def test_the_unlock_order_is_read_from_the_header_and_hostile_tokens_are_cut_down(tmp_path):
    dev = _luks(tmp_path,
                {"type": "maculaos-usb", "keyslots": ["0"], "label": "MYKEY_1"},
                {"type": "maculaos-passphrase", "keyslots": ["0"]},
                {"type": "clevis", "keyslots": ["0"]},  # another tool's: not ours to try
                {"type": "maculaos-usb", "keyslots": ["0"], "label": "$(reboot)"},  # a planted header
                {"type": "maculaos-passphrase;reboot", "keyslots": ["0"]},
                {"type": "maculaos-tpm", "keyslots": ["0"], "boot": "B", "pub": "AAAA", "priv": "AAAA"},
                {"type": "maculaos-tpm", "keyslots": ["0"], "boot": "B;reboot"})
    assert _luks_sh(tmp_path, f"luks_sources {dev}").splitlines() == \
        ["0 usb MYKEY_1 0", "0 passphrase - 1", "0 usb - 3", "0 tpm B 5", "0 tpm - 6"]
    assert _luks_sh(tmp_path, f"luks_cipher {dev}") == "aes-xts-plain64\n"


def test_a_disk_or_sd_image_cannot_ask_for_encryption_yet(write_profile, capsys):
    """Their first boot would keep the data partition plain: refused, not silently built."""
    path = write_profile(BASE + "outputs: [iso, disk]\nconfig:\n  storage:\n    encryption:\n      enabled: true\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert (f"{path}:4: config.storage.encryption.enabled: a disk or SD image cannot encrypt its data partition yet"
            in capsys.readouterr().err)


def test_an_iso_install_config_that_is_not_yaml_is_one_line_not_a_traceback(write_profile, capsys, tmp_path):
    """The secret check reads the install config only once the schema found it valid YAML."""
    (tmp_path / "node.yaml").write_text("storage: [\n")
    path = write_profile(BASE + "install:\n  config: node.yaml\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'node.yaml'}:2: config: invalid YAML" in err and "Traceback" not in err


@pytest.fixture
def swtpm(tmp_path):
    """A real TPM 2.0 (swtpm) on a local TCP port, as luks.sh's MACULAOS_LUKS_TPM_TCTI names it. Its PCRs start
    at zero: nothing measured a boot into it."""
    port = free_port()  # the swtpm TCTI takes the control channel on the next port
    while not port_is_free(port + 1):
        port = free_port()
    ctrl = port + 1
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tmp_path}",
                             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                             "--flags", "not-need-init,startup-clear"])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "swtpm did not start"
            time.sleep(0.05)
    yield f"swtpm:host=127.0.0.1,port={port}"
    proc.kill()
    proc.wait()


def _tpm_sh(tmp_path: Path, tcti: str, call: str) -> subprocess.CompletedProcess:
    script = (f"MACULAOS_RUN={tmp_path}; MACULAOS_LUKS_TPM_TCTI={tcti}; {encryption.shell_file()}. {LUKS_SH}; {call}")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


def _opens(dev: Path, slot: int, key: Path) -> bool:
    return subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-slot", str(slot), "--key-file", str(key),
                           str(dev)], capture_output=True).returncode == 0


def _tpm_tokens(dev: Path) -> dict[str, tuple[str, list[str]]]:
    header = json.loads(subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(dev)],
                                       capture_output=True, text=True, check=True).stdout)
    return {tid: (t["boot"], t["keyslots"]) for tid, t in header["tokens"].items() if t["type"] == "maculaos-tpm"}


def test_a_tpm_key_is_sealed_per_slot_to_predicted_pcrs_and_replaced_by_the_next_enrollment(tmp_path, swtpm):
    dev = _luks(tmp_path)  # key slot 0: the key "k" * KEY_BYTES, in tmp_path / "key"
    # the running slot A's tpm key: key slot 0's key, sealed to this boot's PCRs (token 0)
    sealed = tmp_path / "a.sealed"
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_seal {tmp_path / 'key'} '' {sealed}").returncode == 0
    token = _tpm_sh(tmp_path, swtpm, f"luks_tpm_fields A {sealed}").stdout
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "0", "--json-file", "-", str(dev)], check=True,
                   input=('{"type":"maculaos-tpm","keyslots":["0"]' + token + "}").encode())
    out = tmp_path / "unsealed"
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 0 {out}").returncode == 0
    assert out.read_bytes() == (tmp_path / "key").read_bytes()

    # an update writes slot B, whose kernel the firmware will measure into PCR 4: sealed to that predicted value
    kernel_digest = hashlib.sha256(b"slot B's kernel").digest()
    predicted = hashlib.sha256(bytes(32) + kernel_digest).digest()
    values = tmp_path / "values"
    values.write_bytes(predicted + bytes(32))  # PCRs 4 and 7, in that order
    enroll = _tpm_sh(tmp_path, swtpm, f"luks_tpm_enroll {dev} B {values} A")
    assert enroll.returncode == 0, enroll.stderr
    assert _tpm_tokens(dev) == {"0": ("A", ["0"]), "1": ("B", ["1"])}
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 1 {out}").returncode == 1  # not before B's boot
    # B "boots": the firmware measures its kernel; now B's key is released and opens its key slot, A's is not
    subprocess.run(["tpm2", "pcrextend", f"4:sha256={kernel_digest.hex()}"], check=True,
                   env={**os.environ, "TPM2TOOLS_TCTI": swtpm})
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 1 {out}").returncode == 0
    assert len(out.read_bytes()) == encryption.KEY_BYTES and _opens(dev, 1, out)
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 0 {tmp_path / 'a-now'}").returncode == 1

    # the next update of B (running B): a new key slot and token for B, the old ones dropped
    values.write_bytes(hashlib.sha256(predicted + kernel_digest).digest() + bytes(32))
    enroll = _tpm_sh(tmp_path, swtpm, f"luks_tpm_enroll {dev} A {values} B")
    assert enroll.returncode == 0, enroll.stderr
    assert _tpm_tokens(dev) == {"1": ("B", ["1"]), "2": ("A", ["2"])}
    assert not _opens(dev, 0, tmp_path / "key")  # A's old key slot is gone with its token


def test_without_a_key_for_the_running_slot_an_enrollment_changes_nothing(tmp_path, swtpm):
    dev = _luks(tmp_path, {"type": "maculaos-passphrase", "keyslots": ["0"]})
    values = tmp_path / "values"
    values.write_bytes(bytes(64))
    enroll = _tpm_sh(tmp_path, swtpm, f"luks_tpm_enroll {dev} B {values} A")
    assert enroll.returncode == 1 and "no tpm key for the running slot A" in enroll.stderr
    assert _tpm_tokens(dev) == {}


def test_an_enrollment_cut_off_by_a_power_cut_leaves_the_running_key_and_the_next_one_works(tmp_path, swtpm):
    dev = _luks(tmp_path)
    sealed = tmp_path / "a.sealed"
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_seal {tmp_path / 'key'} '' {sealed}").returncode == 0
    token = _tpm_sh(tmp_path, swtpm, f"luks_tpm_fields A {sealed}").stdout
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "0", "--json-file", "-", str(dev)], check=True,
                   input=('{"type":"maculaos-tpm","keyslots":["0"]' + token + "}").encode())
    # the power went after luksAddKey, before the token import: key slot 1 holds a key nobody has
    lost = tmp_path / "lost"
    lost.write_bytes(os.urandom(encryption.KEY_BYTES))
    subprocess.run(["cryptsetup", "luksAddKey", "--batch-mode", "--key-slot", "1", "--key-file", str(tmp_path / "key"),
                    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(dev), str(lost)], check=True)
    values = tmp_path / "values"
    values.write_bytes(bytes(64))
    enroll = _tpm_sh(tmp_path, swtpm, f"luks_tpm_enroll {dev} B {values} A")
    assert enroll.returncode == 0, enroll.stderr
    assert _tpm_tokens(dev) == {"0": ("A", ["0"]), "2": ("B", ["2"])}  # the next free key slot, the orphan kept
    out = tmp_path / "unsealed"
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 0 {out}").returncode == 0 and _opens(dev, 0, out)
    assert _opens(dev, 1, lost)  # an operator's own key slot without a token would be kept the same way


def test_the_installers_key_sealed_to_fewer_pcrs_is_replaced_by_one_sealed_to_all(tmp_path, swtpm):
    dev = _luks(tmp_path)
    sealed = tmp_path / "a.sealed"
    install = encryption.pcr_list(encryption.TPM_INSTALL_PCRS)
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_seal {tmp_path / 'key'} '' {sealed} {install}").returncode == 0
    token = _tpm_sh(tmp_path, swtpm, f"luks_tpm_fields A {sealed} {install}").stdout
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "0", "--json-file", "-", str(dev)], check=True,
                   input=('{"type":"maculaos-tpm","keyslots":["0"]' + token + "}").encode())
    # PCR 4 changes (the firmware starts GRUB): the installer's key is still released, it is bound to PCR 7 only
    subprocess.run(["tpm2", "pcrextend", f"4:sha256={'ab' * 32}"], check=True,
                   env={**os.environ, "TPM2TOOLS_TCTI": swtpm})
    out = tmp_path / "unsealed"
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 0 {out}").returncode == 0 and _opens(dev, 0, out)
    # the first boot it unlocks seals slot A's key to this boot's PCRs 4 and 7 and drops the installer's
    enroll = _tpm_sh(tmp_path, swtpm, f"luks_tpm_enroll {dev} A '' A")
    assert enroll.returncode == 0, enroll.stderr
    header = json.loads(subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(dev)],
                                       capture_output=True, text=True, check=True).stdout)
    assert [(t["boot"], t["pcrs"], t["keyslots"]) for t in header["tokens"].values()] == \
        [("A", encryption.pcr_list(encryption.TPM_PCRS), ["1"])]
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 1 {out}").returncode == 0 and _opens(dev, 1, out)
    subprocess.run(["tpm2", "pcrextend", f"4:sha256={'cd' * 32}"], check=True,
                   env={**os.environ, "TPM2TOOLS_TCTI": swtpm})
    assert _tpm_sh(tmp_path, swtpm, f"luks_tpm_unseal {dev} 1 {out}").returncode == 1  # now PCR 4 binds it


def test_a_tokens_pcr_selection_is_checked_before_it_reaches_the_tpm(tmp_path):
    for token, expected in [('{"pcrs":"sha256:7"}', "sha256:7\n"), ("{}", "sha256:4,7\n"),
                            ('{"pcrs":"sha256:4,7;reboot"}', "sha256:4,7\n"),  # cut at the pattern, then default
                            ('{"pcrs":"sha1:0,1"}', ""), ('{"pcrs":"sha256:4,,7"}', "")]:
        proc = subprocess.run(["sh", "-c", f"{encryption.shell_file()}. {LUKS_SH}; luks_tpm_pcrs '{token}'"],
                              capture_output=True, text=True)
        assert proc.stdout == expected, token


def test_the_callers_boot_slot_survives_an_unlock(tmp_path):
    """POSIX sh has no locals: luks_unlock reads `slot` from the header's tokens; the initrd's own `slot` (the boot
    slot, later the slot a factory reset seals its new tpm key for) must come back as it went in."""
    dev = _luks(tmp_path, {"type": "maculaos-tpm", "keyslots": ["0"], "boot": "B", "pub": "AAAA", "priv": "AAAA"})
    out = _luks_sh(tmp_path, f"slot=A; sources=keep; luks_unlock {dev} A; echo rc=$? slot=$slot sources=$sources")
    assert out.splitlines()[-1] == "rc=1 slot=A sources=keep"  # no key for A tried, nothing opened


@pytest.mark.parametrize("boot", ["", "3", "A;reboot"])
def test_a_tpm_key_without_a_boot_slot_is_refused_before_the_disk_is_touched(tmp_path, boot):
    dev = tmp_path / "data.img"
    subprocess.run(["truncate", "-s", "32M", str(dev)], check=True)
    proc = _tpm_sh(tmp_path, "", f"MACULAOS_LUKS_TPM_BOOT='{boot}'; "
                                 f"luks_create {dev} {encryption.Cipher.aes_xts.value} {encryption.USB_LABEL} tpm")
    assert proc.returncode == 1
    assert proc.stderr == "maculaos-luks: no boot slot to seal the tpm key for\n"
    assert dev.read_bytes() == bytes(32 << 20)


@pytest.fixture
def tang(tmp_path):
    """A real Tang server (Debian's tangd) on a local port; its signing key's thumbprint as tang-show-keys gives it."""
    server = TangServer(tmp_path / "tang").start()
    yield server
    server.stop()


def _net_sh(tmp_path: Path, call: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = f"MACULAOS_RUN={tmp_path}; {encryption.shell_file()}. {LUKS_SH}; {call}"
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_a_network_key_is_a_clevis_tang_jwe_both_ways(tmp_path, tang):
    """Our seal and unseal (POSIX sh, jose, wget: what the initrd has) speak clevis's tang pin format: clevis opens
    what we seal, and we open what clevis seals, against the same tangd."""
    url, thp = f"http://127.0.0.1:{tang.port}", tang.thumbprint()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(encryption.KEY_BYTES))
    assert _net_sh(tmp_path, f"luks_tang_seal {key} {url} {thp} {tmp_path / 'ours.jwe'}").returncode == 0
    assert subprocess.run(["clevis", "decrypt"], stdin=(tmp_path / "ours.jwe").open("rb"), capture_output=True,
                          check=True).stdout == key.read_bytes()
    theirs = subprocess.run(["clevis", "encrypt", "tang", json.dumps({"url": url, "thp": thp})],
                            input=key.read_bytes(), capture_output=True, check=True).stdout
    (tmp_path / "theirs.jwe").write_bytes(theirs)
    assert _net_sh(tmp_path, f"luks_tang_unseal {tmp_path / 'theirs.jwe'} {url} {tmp_path / 'out'}").returncode == 0
    assert (tmp_path / "out").read_bytes() == key.read_bytes()
    assert not (tmp_path / "luks-tang").exists()  # the work folder (the exchange's keys) is gone


def test_only_the_trusted_key_server_gets_a_key_and_only_it_releases_one(tmp_path, tang):
    url, thp = f"http://127.0.0.1:{tang.port}", tang.thumbprint()
    other = TangServer(tmp_path / "other").start()
    key, jwe = tmp_path / "key", tmp_path / "key.jwe"
    key.write_bytes(os.urandom(encryption.KEY_BYTES))
    try:
        # another server (one on the path, say) has no advertisement signed by the trusted key: nothing is sealed
        proc = _net_sh(tmp_path, f"luks_tang_seal {key} http://127.0.0.1:{other.port} {thp} {jwe}")
        assert proc.returncode == 1 and not jwe.exists()
        assert "sent no advertisement signed by the key" in proc.stderr
        # a URL or thumbprint from a hostile config or header never reaches wget
        for bad_url, bad_thp in [(f"{url}/$(reboot)", thp), ("https://tang.example", thp), (url, "short")]:
            proc = _net_sh(tmp_path, f"luks_tang_seal {key} '{bad_url}' '{bad_thp}' {jwe}")
            assert (proc.returncode, proc.stderr) == (1, "maculaos-luks: invalid key server URL or thumbprint\n")
        assert _net_sh(tmp_path, f"luks_tang_seal {key} {url} {thp} {jwe}").returncode == 0
        # the other server cannot release it: it holds none of the keys the exchange needs
        proc = _net_sh(tmp_path, f"luks_tang_unseal {jwe} http://127.0.0.1:{other.port} {tmp_path / 'out'}")
        assert proc.returncode == 1 and "did not answer (down, or not the one that holds this key)" in proc.stderr
        assert not (tmp_path / "out").exists() or (tmp_path / "out").read_bytes() == b""
    finally:
        other.stop()
    # the trusted one, down: a quick refusal (the next key source is tried), not a hang
    tang.stop()
    start = time.monotonic()
    proc = _net_sh(tmp_path, f"luks_tang_unseal {jwe} {url} {tmp_path / 'out'}")
    assert proc.returncode == 1 and f"the key server {url} did not answer" in proc.stderr
    assert time.monotonic() - start < encryption.HTTP_TIMEOUT_SECONDS


def test_a_running_system_waits_for_a_key_server_that_is_not_up_yet(tmp_path, tang):
    """The installer, run just after its boot, may ask before DHCP is done: it waits for the server to answer (the
    initrd brings its network up first and does not wait), then gives up with one line."""
    url, thp = f"http://127.0.0.1:{tang.port}", tang.thumbprint()
    key, jwe = tmp_path / "key", tmp_path / "key.jwe"
    key.write_bytes(os.urandom(encryption.KEY_BYTES))
    tang.stop()
    threading.Timer(3, tang.start).start()  # the same port and keys, 3 s into the seal
    proc = _net_sh(tmp_path, f"luks_tang_seal {key} {url} {thp} {jwe}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"maculaos-luks: waiting up to {encryption.NETWORK_WAIT_SECONDS}s for the key server "
                           f"{url} (the network may still be coming up)\n")
    assert subprocess.run(["clevis", "decrypt"], stdin=jwe.open("rb"), capture_output=True,
                          check=True).stdout == key.read_bytes()
    tang.stop()
    jwe.unlink()
    proc = _net_sh(tmp_path, f"MACULAOS_LUKS_NETWORK_WAIT=3; luks_tang_seal {key} {url} {thp} {jwe}")
    assert proc.returncode == 1 and not jwe.exists()
    assert proc.stderr.splitlines()[-1] == f"maculaos-luks: the key server {url} does not answer"
    # in the initrd (its /init defines luks_net_up) an unanswered server fails at once: no wait
    start = time.monotonic()
    proc = _net_sh(tmp_path, f"luks_net_up() {{ :; }}; luks_tang_seal {key} {url} {thp} {jwe}")
    assert proc.stderr == f"maculaos-luks: the key server {url} does not answer\n"
    assert time.monotonic() - start < encryption.HTTP_TIMEOUT_SECONDS


def _without_device_mapper(tmp_path: Path) -> dict[str, str]:
    """PATH with a cryptsetup whose `open` checks the key instead of mapping the volume (this host has no
    device-mapper): the key slot still has to accept the key the source gave."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "cryptsetup"
    shim.write_text("#!/usr/bin/env python3\nimport os, sys\na = sys.argv[1:]\n"
                    "if a[:1] == ['open']:\n    a = ['open', '--test-passphrase', *a[1:-1]]\n"
                    f"os.execv({shutil.which('cryptsetup')!r}, ['cryptsetup', *a])\n")
    shim.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def test_the_initrd_unlocks_with_the_key_server_and_falls_back_when_it_is_down(tmp_path, tang):
    url, thp = f"http://127.0.0.1:{tang.port}", tang.thumbprint()
    jwe = tmp_path / "key.jwe"
    dev = _luks(tmp_path)  # key slot 0: the key in tmp_path / "key"
    assert _net_sh(tmp_path, f"luks_tang_seal {tmp_path / 'key'} {url} {thp} {jwe}").returncode == 0
    for i, token in enumerate([
            {"type": "maculaos-network", "keyslots": ["0"], "rank": 0, "url": "http://x/$(reboot)", "jwe": "a.b"},
            {"type": "maculaos-network", "keyslots": ["0"], "rank": 1, "url": url, "thp": thp,
             "jwe": jwe.read_text()},
            {"type": "maculaos-usb", "keyslots": ["0"], "rank": 2, "label": "NO_SUCH_KEY"}]):
        subprocess.run(["cryptsetup", "token", "import", "--token-id", str(i), "--json-file", "-", str(dev)],
                       input=json.dumps(token).encode(), check=True)
    env = _without_device_mapper(tmp_path)
    unlock = f"MACULAOS_LUKS_USB_WAIT=0; luks_unlock {dev}"
    proc = _net_sh(tmp_path, unlock, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "maculaos-luks: a network key names no valid key server URL: trying the next key source",
        f"maculaos-luks: unlocked with the key server {url}"]
    tang.stop()
    proc = _net_sh(tmp_path, unlock, env)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2:] == [
        f"maculaos-luks: the key server {url} did not unlock the data partition: trying the next key source",
        "maculaos-luks: no disk labelled NO_SUCH_KEY: trying the next key source"]
    assert proc.stderr.count(f"the key server {url} did not answer") == encryption.NETWORK_TRIES
    assert not list(tmp_path.glob("luks-network*"))  # nothing of the key left behind


def test_a_network_key_source_needs_its_server_and_thumbprint(tmp_path):
    config = _config(tmp_path, "storage:\n  encryption:\n    enabled: true\n    key_sources: [network]\n")
    with pytest.raises(DeviceError, match="lists `network`: set storage.encryption.tang_url and tang_thp"):
        installer.data_policy(str(config))
    config.write_text("storage:\n  encryption:\n    enabled: true\n    key_sources: [network]\n"
                      f"    tang_url: http://tang.lan:7500\n    tang_thp: {'a' * 43}\n")
    policy, _ = installer.data_policy(str(config))
    assert policy.shell_env() == {"MACULAOS_LUKS_TANG_URL": "http://tang.lan:7500",
                                  "MACULAOS_LUKS_TANG_THP": "a" * 43}
