"""The orchestrator against a fake docker client: what it asks the engine, caching, interruption."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from maculaos_sdk import keys
from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.engine import Engine
from maculaos_sdk.errors import BadInput, BuildFailed
from maculaos_sdk.profile import load_profile


class FakeImage:
    def __init__(self, ref: str, tags: list[str]) -> None:
        self.id = f"sha256:{ref}"
        self.tags = tags
        self.attrs = {"Size": 2**20, "Created": 1_700_000_000}


class FakeImages:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def get(self, ref: str) -> FakeImage:
        if ref in self.client.untagged:
            return FakeImage(ref, [])
        if ref not in self.client.tags:
            raise LookupError(ref)
        return FakeImage(ref, [ref])


    def remove(self, ref: str) -> None:
        self.client.removed.append(ref)
        self.client.untagged.discard(ref)
        self.client.tags.discard(ref)

    def prune(self, filters: dict) -> dict:
        assert filters["dangling"] is True and filters["label"] == "io.maculaos.stage" and "until" in filters
        if self.client.prune_error is not None:
            raise self.client.prune_error
        self.client.untagged.clear()
        return {"SpaceReclaimed": 0}


class FakeContainer:
    files = {"kernel-package.tsv": b"linux-image-6.1.0-1-amd64\t6.1.1-1\n", "kernel-version": b"6.1.0-1\n",
             "packages.tsv": b"bash\t5.2\nopenrc\t0.45\n"}  # by file name; anything else reads as an ISO

    copyright = {  # DEP-5 files: one in SPDX ids, one with a licence SPDX has no id for, one free-form
        "bash": "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\n"
                "License: GPL-3+\n\nFiles: lib/x\nLicense: GPL-2+ or BSD-3-clause\n",
        "openrc": "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\n"
                  "License: BSD-2-clause\n\nFiles: src/y\nLicense: Custom-Gentoo\n",
        "tzdata": "This is free-form text, not DEP-5.\nLicense: public domain\n",
    }

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def get_archive(self, path: str):
        if path == "/usr/share/doc":  # only the copyright files, as bootstrap.NODOC leaves the folder
            return iter([_tar({f"doc/{pkg}/copyright": text for pkg, text in self.copyright.items()})]), {}
        name = path.rsplit("/", 1)[-1]
        data = self.files.get(name, b"ISO9660 image bytes")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return iter([buf.getvalue()]), {}

    def remove(self, force: bool = False) -> None:
        pass


def _tar(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


class FakeContainers:
    def create(self, ref: str, command: list[str]) -> FakeContainer:
        return FakeContainer(ref)


class FakeApi:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.killed = threading.Event()
        self.kills: list[str] = []

    def kill(self, container: str) -> None:
        self.kills.append(container)
        self.killed.set()

    def images(self, all: bool) -> list[dict]:
        assert all is True  # the untagged step images too: their parent links give each image's chain
        if self.client.list_error is not None:
            raise self.client.list_error
        return [{"Id": f"sha256:{ref}", "ParentId": "", "RepoTags": [ref], "Size": 2**20, "Created": 1_700_000_000,
                 "Labels": {"io.maculaos.stage": ref.split("/")[-1].split(":")[0]}} for ref in sorted(self.client.tags)]

    def build(self, **kw):
        self.client.builds.append(kw)
        dockerfile = (Path(kw["path"]) / "Dockerfile").read_text()
        stage = kw["labels"]["io.maculaos.stage"]
        if stage == self.client.interrupt_at:
            self.client.interrupt_at = None
            yield {"stream": "Step 1/3\n"}
            raise KeyboardInterrupt
        if stage == self.client.hang_at and not self.kills:  # a RUN that never exits until its container is killed
            yield {"stream": "Step 2/4 : RUN apt-get install -y openrc\n"}
            yield {"stream": " ---> Running in 0123456789ab\n"}
            yield {"stream": "Setting up openrc ...\n"}
            if not self.killed.wait(30):
                raise AssertionError("the watchdog never stopped the hung step")
            yield {"error": "The command '/bin/sh -c apt-get install -y openrc' returned a non-zero code: 137"}
            return
        if stage == self.client.fail_at:
            yield {"stream": "Step 1/3 : RUN false\n"}
            yield {"error": "The command '/bin/sh -c false' returned a non-zero code: 1"}
            return
        assert "FROM" in dockerfile
        if stage in self.client.together:  # these stages must be building at the same time
            self.client.together_barrier.wait(timeout=10)
        yield {"stream": f"building {stage}\n"}
        step = hashlib.sha256(kw["tag"].encode()).hexdigest()[:12]  # an earlier stage's image, left untagged
        self.client.untagged.add(step)
        yield {"stream": f" ---> {step}\n"}
        self.client.tags.add(kw["tag"])


class FakeClient:
    def __init__(self) -> None:
        self.tags: set[str] = set()
        self.untagged: set[str] = set()
        self.removed: list[str] = []
        self.builds: list[dict] = []
        self.interrupt_at: str | None = None
        self.fail_at: str | None = None
        self.hang_at: str | None = None
        self.together: set[str] = set()
        self.together_barrier = threading.Barrier(2)
        self.prune_error: Exception | None = None
        self.list_error: Exception | None = None
        self.images = FakeImages(self)
        self.containers = FakeContainers()
        self.api = FakeApi(self)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MACULAOS_SDK_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    # the base stage bootstraps with mmdebstrap; the fake build does not need the tarball
    def fake_bootstrap(params, tarball: Path, log) -> None:
        tarball.parent.mkdir(parents=True, exist_ok=True)
        tarball.write_bytes(b"tar")

    monkeypatch.setattr("maculaos_sdk.schedule.bootstrap", fake_bootstrap)
    return tmp_path


def _build(client, out, profile="core", jobs=2):
    return build_image(load_profile(profile), BuildOptions(output=out, check_packages=False, jobs=jobs),
                       engine=Engine(client))


def test_cold_build_builds_every_stage_in_order_and_exports(env):
    client = FakeClient()
    result = _build(client, env / "out")
    stages = [b["labels"]["io.maculaos.stage"] for b in client.builds]
    assert sorted(stages) == sorted(["base", "tools", "kernel", "initrd", "rootfs", "layer", "squashfs", "bootloader",
                                    "iso"])
    for planned in result.plan.stages:  # each stage is built after every stage it reads
        assert all(stages.index(key) < stages.index(planned.key) for _, key in planned.inputs), (planned.key, stages)
    assert all(b["pull"] is False and b["platform"] is None for b in client.builds)
    assert all(b["tag"].startswith(f"maculaos-sdk/{s}:") for b, s in zip(client.builds, stages, strict=True))
    iso = env / "out" / "maculaos-core-0.1.0-amd64.iso"
    assert result.artifacts[iso.name] == iso and iso.read_bytes() == b"ISO9660 image bytes"
    sha = (env / "out" / f"{iso.name}.sha256").read_text()
    assert sha.endswith(f"  {iso.name}\n") and len(sha.split()[0]) == 64
    manifest = json.loads((env / "out" / "manifest.json").read_text())
    assert manifest["packages"] == {"bash": "5.2", "openrc": "0.45"}
    assert manifest["kernel"]["release"] == "6.1.0-1"
    assert manifest["source_date_epoch"] == 1735689600
    assert (manifest["arch"], manifest["board"], manifest["outputs"]) == ("amd64", "generic", ["iso"])
    assert set(manifest["stages"]) == set(stages)
    assert (env / "out" / "logs" / "30-rootfs.log").read_text().startswith("# stage rootfs")


def test_build_removes_the_untagged_images_its_stages_leave(env):
    client = FakeClient()
    _build(client, env / "out")
    assert client.untagged == set() and len(client.removed) == 9
    assert all(not ref.startswith("maculaos-sdk/") for ref in client.removed)


def _age_markers(state: Path, seconds: float) -> None:
    for marker in (state / "used").iterdir():
        st = marker.stat()
        os.utime(marker, (st.st_atime - seconds, st.st_mtime - seconds))


def test_old_stage_images_beyond_the_cache_limit_go_least_recently_used_first(env, monkeypatch):
    client = FakeClient()
    builds = {}
    for sde in ("1", "2", "1", "3"):  # plan 1 is used again after plan 2, so plan 2 is the oldest
        monkeypatch.setenv("SOURCE_DATE_EPOCH", sde)
        _age_markers(env / "state", 100) if (env / "state").exists() else None
        monkeypatch.setenv("MACULAOS_SDK_CACHE_MAX", "18M" if sde == "3" else "1G")
        builds[sde] = {s.stage.image for s in _build(client, env / "out").stages}
    assert len(set().union(*builds.values())) == 27  # three plans of 9 images of 1 MiB each
    assert client.tags == builds["1"] | builds["3"]  # 18 MiB kept: the plan just built and the most recent one
    client.builds.clear()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    _build(client, env / "out")
    assert client.builds == []


def test_the_plan_being_built_is_kept_even_over_the_limit(env, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE_MAX", "0")
    client = FakeClient()
    result = _build(client, env / "out")
    assert client.tags == {s.stage.image for s in result.stages}


class FakeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} Client Error: {message}")
        self.response = type("Response", (), {"status_code": status})()


def test_a_prune_refused_by_the_engine_does_not_fail_the_build_that_succeeded(env, capsys):
    client = FakeClient()
    client.prune_error = FakeApiError(409, 'Conflict ("a prune operation is already running")')
    result = _build(client, env / "out")  # another build sharing the engine is pruning: nothing to say
    assert result.artifacts and "refused to prune" not in capsys.readouterr().err
    client.prune_error = FakeApiError(500, "Server Error: disk I/O")
    _build(client, env / "out")
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "the engine refused to prune untagged images (500 Client Error: Server Error: disk I/O)" in err


def test_an_image_removed_by_another_build_while_the_cache_is_trimmed_does_not_fail_the_build(env, capsys):
    client = FakeClient()
    client.list_error = FakeApiError(404, "Not Found: no such image: sha256:b9a9")
    result = _build(client, env / "out")
    assert result.artifacts
    assert "cache: not trimmed this time (404 Client Error: Not Found: no such image" in \
        " ".join(capsys.readouterr().err.split())


def test_second_build_is_all_cached(env):
    client = FakeClient()
    _build(client, env / "out")
    client.builds.clear()
    result = _build(client, env / "out")
    assert client.builds == []
    assert all(s.cached for s in result.stages)


def test_a_second_build_of_an_output_waits_for_the_first_and_other_outputs_do_not(env):
    import fcntl
    import threading

    client = FakeClient()
    locks = env / "cache" / "locks"
    locks.mkdir(parents=True)
    with (locks / "out-maculaos-core-0.1.0-amd64.lock").open("a+") as held:  # a build of core, elsewhere
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("the build of maculaos-core-0.1.0-amd64 (pid 1)\n")
        held.flush()
        second = threading.Thread(target=_build, args=(client, env / "out"))
        second.start()
        second.join(1.0)
        assert second.is_alive() and client.builds == []  # waiting, nothing built meanwhile
        other = env / "other.yaml"  # another output: core 0.2.0, which builds meanwhile
        other.write_text(f"name: core\nextends: {Path(__file__).parents[1] / 'profiles' / 'core.yaml'}\n"
                         "version: 0.2.0\n")
        _build(client, env / "other", str(other))
        built_by_other = len(client.builds)
    second.join(30)
    assert not second.is_alive() and built_by_other == 9  # every stage: none was cached
    assert [b["labels"]["io.maculaos.stage"] for b in client.builds[built_by_other:]] == ["layer", "iso"]
    assert (locks / "out-maculaos-core-0.1.0-amd64.lock").read_text() == ""


def test_a_stage_another_build_is_building_is_waited_for_then_reused(env):
    import fcntl
    import threading

    client = FakeClient()
    _build(client, env / "out")
    rootfs = next(t for t in client.tags if t.startswith("maculaos-sdk/rootfs:"))
    client.tags.discard(rootfs)  # as if never built ...
    client.builds.clear()
    lock = env / "cache" / "locks" / f"stage-{rootfs.split(':')[1]}.lock"
    with lock.open("a+") as held:  # ... and another build is building it right now
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=_build, args=(client, env / "out2"))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive() and client.builds == []
        client.tags.add(rootfs)  # the other build finishes it
    waiting.join(30)
    assert not waiting.is_alive() and client.builds == []  # reused, not built twice


def test_explain_names_the_changed_file_and_the_parent_stage_for_each_rebuilt_stage(env, monkeypatch):
    from maculaos_sdk import ui
    from maculaos_sdk.paths import sdk_root

    profile = env / "p.yaml"
    write = lambda motd: profile.write_text(  # noqa: E731
        f"name: core\nextends: {sdk_root() / 'profiles' / 'core.yaml'}\noverlay:\n  /etc/motd: '{motd}'\n")
    said: list[str] = []
    monkeypatch.setattr(ui, "info", lambda msg: said.append(msg))
    client = FakeClient()
    options = BuildOptions(output=env / "out", check_packages=False, explain=True)
    write("one")
    build_image(load_profile(str(profile)), options, engine=Engine(client))
    assert any("base" in m and "never built for maculaos-core-0.1.0-amd64 on this cache" in m for m in said)
    said.clear()
    write("two")
    second = build_image(load_profile(str(profile)), options, engine=Engine(client))
    why = {m.split()[0]: m.split("rebuilds: ", 1)[1].removesuffix("[/]") for m in said if "rebuilds: " in m}
    assert why == {"layer": "overlay/etc/motd changed", "iso": "input stage layer changed"}
    said.clear()
    client.tags.discard(next(s.stage.image for s in second.stages if s.stage.key == "iso"))
    build_image(load_profile(str(profile)), options, engine=Engine(client))
    assert [m for m in said if "rebuilds: " in m] == \
        ["  iso        [dim]rebuilds: built before with these inputs, but its image is gone (gc, docker rmi or "
         "another engine)[/]"]


def test_interrupted_build_resumes_at_the_interrupted_stage(env):
    client = FakeClient()
    client.interrupt_at = "rootfs"
    with pytest.raises(KeyboardInterrupt):
        _build(client, env / "out")
    built_before = [b["labels"]["io.maculaos.stage"] for b in client.builds]
    client.builds.clear()
    _build(client, env / "out")
    rebuilt = [b["labels"]["io.maculaos.stage"] for b in client.builds]
    assert "rootfs" in built_before and not {"squashfs", "layer", "iso"} & set(built_before)
    # what finished before the interrupt (initrd and bootloader may have, beside rootfs) is not built again
    assert set(rebuilt) == {"rootfs", "squashfs", "layer", "iso"} | ({"initrd", "bootloader"} - set(built_before))


def test_failed_stage_reports_engine_error(env):
    client = FakeClient()
    client.fail_at = "kernel"
    with pytest.raises(BuildFailed, match="returned a non-zero code") as exc:
        _build(client, env / "out")
    assert "30-rootfs" not in str(exc.value)
    assert "Step 1/3 : RUN false" in exc.value.message


def test_a_silent_step_is_stopped_and_the_build_fails_naming_stage_and_last_output(env, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_STAGE_SILENT", "0.4")
    client = FakeClient()
    client.hang_at = "rootfs"
    with pytest.raises(BuildFailed) as exc:
        _build(client, env / "out")
    assert client.api.kills == ["0123456789ab"]  # the step's own container, nothing else
    assert exc.value.message.startswith("stage rootfs: stopped: no output for 0 s")
    assert "Setting up openrc ..." in exc.value.message and "MACULAOS_SDK_STAGE_SILENT" in exc.value.hint
    assert "STOPPED: no output" in (env / "out" / "logs" / "30-rootfs.log").read_text()
    # the cache keeps everything built before the stopped stage: the next build resumes there
    client.hang_at = None
    client.builds.clear()
    _build(client, env / "out")
    assert [b["labels"]["io.maculaos.stage"] for b in client.builds][0] == "rootfs"


def test_a_bad_deadline_setting_is_one_line(env, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_STAGE_TIMEOUT", "soon")
    client = FakeClient()
    with pytest.raises(BuildFailed, match="^MACULAOS_SDK_STAGE_TIMEOUT='soon' is not a number"):
        _build(client, env / "out")
    assert client.builds == []


def test_dry_run_writes_dockerfiles_without_engine(env):
    out = env / "dry"
    result = build_image(load_profile("core"), BuildOptions(output=env / "out", dry_run=out), engine=None)
    assert result.stages == []
    assert (out / "60-iso" / "Dockerfile").read_text().startswith("# iso")
    assert len((out / "30-rootfs" / "STAGE_ID").read_text().strip()) == 64
    assert not (env / "cache" / "keys").exists()  # no development key generated by a dry run
    assert not (env / "out").exists()  # and nothing written where a build would write


@pytest.mark.parametrize("extra, refusal", [
    ("", "console.grub_password: signed with .*release.key \\(not the development key\\), this build is a release"),
    ("services: [maculaos-testchannel]\n", "services\\[8\\]: .*maculaos-testchannel is a root shell for tests"),
    ("config:\n  upgrade:\n    allow_http: true\n", "config.upgrade.allow_http: .*plain-http updates"),
    ("config:\n  wifi:\n    ssid: lab\n    psk: s3cret-passphrase\n", "config.wifi.psk: .*readable by anyone"),
    ("config:\n  k3s:\n    args: [server, --token=s3cret]\n", "config.k3s.args: .*readable by anyone"),
    ("images: [registry.example/app:1.0]\n", "images\\[0\\]: .*registry.example/app:1.0 is not pinned by digest"),
])
def test_a_build_signed_with_a_real_key_is_held_to_the_release_checks_without_the_flag(env, extra, refusal):
    """The release gate was a flag: a build signed with a non-development key could carry a test channel,
    plain-http updates, secrets or unpinned images. The key decides now."""
    secret = env / "release.key"
    keys.generate(secret)
    pbkdf2 = "grub.pbkdf2.sha512.10000." + "AB12" * 16 + "." + "CD34" * 32
    locked = "" if not extra else f"console:\n  grub_password: {pbkdf2}\n"
    profile = env / "signed.yaml"
    profile.write_text(f"name: signed\nextends: core\n{locked}{extra}")
    with pytest.raises(BadInput, match=refusal):
        build_image(load_profile(str(profile)), BuildOptions(output=env / "out", dry_run=env / "dry",
                                                             signing_key=secret), engine=None)


def test_a_release_build_refuses_the_development_key_and_autologin(env):
    with pytest.raises(BadInput, match="--release: bundles would be signed with this checkout's development key"):
        build_image(load_profile("core"), BuildOptions(output=env / "out", dry_run=env / "dry", release=True),
                    engine=None)
    secret = env / "release.key"
    keys.generate(secret)
    with pytest.raises(BadInput, match="test.yaml: console.autologin: --release: a release image must not log root"):
        build_image(load_profile("test"), BuildOptions(output=env / "out", dry_run=env / "dry", release=True,
                                                       signing_key=secret), engine=None)
    with pytest.raises(BadInput, match="console.grub_password: --release: a release needs a GRUB password"):
        build_image(load_profile("core"), BuildOptions(output=env / "out", dry_run=env / "dry", release=True,
                                                       signing_key=secret), engine=None)
    pbkdf2 = "grub.pbkdf2.sha512.10000." + "AB12" * 16 + "." + "CD34" * 32
    profile = env / "release.yaml"
    profile.write_text(f"name: release\nextends: core\nconsole:\n  grub_password: {pbkdf2}\n")
    build_image(load_profile(str(profile)), BuildOptions(output=env / "out", dry_run=env / "dry", release=True,
                                                         signing_key=secret), engine=None)
    boot_cfg = (env / "dry" / "55-bootloader" / "grub.cfg").read_text()
    assert f'set superusers="root"\npassword_pbkdf2 root {pbkdf2}\n' in boot_cfg
    entries = [line for line in boot_cfg.splitlines() if line.startswith("menuentry")]
    assert [e.split("--id ")[1] for e in entries] == ["boot --unrestricted {", "committed --unrestricted {",
                                                     "recovery {"]  # recovery asks for the password
    iso_cfg = (env / "dry" / "60-iso" / "grub.cfg").read_text()
    assert "--id live --unrestricted {" in iso_cfg and "--id recovery {" in iso_cfg


def test_dry_run_of_a_cross_build_plans_the_host_base_and_the_board(env, monkeypatch):
    monkeypatch.setattr("maculaos_sdk.inputs.check_packages", lambda *a, **k: pytest.fail("dry runs look nothing up"))
    out = env / "dry"
    build_image(load_profile("core", {"arch": "arm64", "board": "rpi4"}),
                BuildOptions(output=env / "out", dry_run=out), engine=None)
    assert sorted(p.name for p in out.iterdir()) == ["00-base", "00-base@host", "10-tools", "20-kernel", "30-rootfs",
                                                      "40-initrd", "45-layer", "50-squashfs", "55-bootloader",
                                                      "75-sdimage"]
    assert "kernel=u-boot.bin" in (out / "75-sdimage" / "config.txt").read_text()


def test_low_disk_space_first_removes_every_image_the_plan_does_not_use(env, monkeypatch):
    client = FakeClient()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    old = {s.stage.image for s in _build(client, env / "out").stages}
    client.untagged.add("left-by-a-killed-build")
    client.info = lambda: {"DockerRootDir": str(env)}
    frees = iter([5 * 2**30, 9 * 2**30])  # before and after the collection
    monkeypatch.setattr("maculaos_sdk.gc.shutil.disk_usage", lambda path: type("U", (), {"free": next(frees)}))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2")
    new = {s.stage.image for s in _build(client, env / "out").stages}
    assert not old & client.tags and client.tags == new and not client.untagged


def test_too_little_disk_space_stops_before_the_first_stage_with_one_line(env, monkeypatch):
    client = FakeClient()
    client.info = lambda: {"DockerRootDir": str(env)}
    monkeypatch.setattr("maculaos_sdk.gc.shutil.disk_usage", lambda path: type("U", (), {"free": 3 * 2**30}))
    with pytest.raises(BuildFailed, match=r"only 3\.0 GiB free on the docker engine's disk") as exc:
        _build(client, env / "out")
    assert client.builds == [] and "docker system df" in exc.value.hint


def test_gc_dry_run_lists_but_removes_nothing(env, monkeypatch):
    from maculaos_sdk import gc

    client = FakeClient()
    _build(client, env / "out")
    tags, markers = set(client.tags), sorted((env / "state" / "used").iterdir())
    done = gc.collect(client, set(), 0, dry_run=True)
    assert {i.ref for i in done.removed} == tags and client.tags == tags
    assert sorted((env / "state" / "used").iterdir()) == markers


def test_independent_stages_build_at_the_same_time(env):
    client = FakeClient()
    client.together = {"tools", "kernel"}  # both read only base: with two jobs they meet at the barrier
    _build(client, env / "out", jobs=2)
    assert not client.together_barrier.broken


def test_one_job_builds_one_stage_at_a_time(env):
    client = FakeClient()
    client.together = {"tools", "kernel"}
    client.together_barrier = threading.Barrier(2, timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):
        _build(client, env / "out", jobs=1)


def test_after_a_failed_stage_nothing_that_reads_it_starts_and_running_stages_finish(env):
    client = FakeClient()
    client.fail_at = "kernel"
    with pytest.raises(BuildFailed) as exc:
        _build(client, env / "out", jobs=2)
    assert exc.value.message.startswith("stage kernel: ")
    built = [b["labels"]["io.maculaos.stage"] for b in client.builds]
    assert "tools" in built and not {"initrd", "rootfs", "squashfs", "iso"} & set(built), built
    assert any(tag.startswith("maculaos-sdk/tools:") for tag in client.tags)  # finished, so cached


def test_a_rebuild_with_the_same_ids_records_what_its_images_hold_not_the_last_manifest(env, monkeypatch):
    client = FakeClient()
    out = env / "out"
    _build(client, out)
    # the archive moved: a --no-cache rebuild of the same plan installs a newer kernel and bash
    monkeypatch.setitem(FakeContainer.files, "kernel-package.tsv", b"linux-image-6.1.0-2-amd64\t6.1.4-1\n")
    monkeypatch.setitem(FakeContainer.files, "packages.tsv", b"bash\t5.3\nopenrc\t0.45\n")
    build_image(load_profile("core"), BuildOptions(output=out, check_packages=False, no_cache=True),
                engine=Engine(client))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernel"]["version"] == "6.1.4-1" and manifest["packages"]["bash"] == "5.3"
    _build(client, out)  # all cached now: the record is carried over, still the new one
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernel"]["version"] == "6.1.4-1" and manifest["packages"]["bash"] == "5.3"


def test_a_locked_pi_card_has_u_boot_boot_without_a_key_and_the_build_says_what_stays_open(env, capsys):
    """U-Boot's autoboot could be interrupted on the UART or a USB keyboard, bypassing GRUB's and recovery's
    passwords: with console.grub_password the card carries an overlay that sets U-Boot's /config bootdelay -2
    and bootsecure, and config.txt loads it; an unlocked card does not, and the build says what stays open."""
    pbkdf2 = "grub.pbkdf2.sha512.10000." + "AB12" * 16 + "." + "CD34" * 32
    for locked in (True, False):
        profile = env / f"pi-{locked}.yaml"
        profile.write_text("name: pi\nextends: core\narch: arm64\nboard: rpi4\noutputs: [-iso, sdimage]\n"
                           + (f"console:\n  grub_password: {pbkdf2}\n" if locked else ""))
        dry = env / f"dry-{locked}"
        build_image(load_profile(str(profile)), BuildOptions(output=env / "out", dry_run=dry), engine=None)
        config = (dry / "75-sdimage" / "config.txt").read_text().splitlines()
        assert ("dtoverlay=maculaos-locked" in config) is locked
        assert ("dtc -q -@ -I dts -O dtb -o /work/boot/overlays/maculaos-locked.dtbo" in
                (dry / "75-sdimage" / "Dockerfile").read_text()) is locked
        err = " ".join(capsys.readouterr().err.split())  # as one line: the console wraps it
        said = "U-Boot boots without stopping for a key" if locked else "U-Boot's autoboot can be interrupted"
        assert said in err and "reads config.txt, the device trees and U-Boot from the card" in err, err
    overlay = subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dts", str(dry / "75-sdimage" / "maculaos-locked.dts")],
                             capture_output=True, text=True, check=True).stdout
    assert "bootdelay = <0xfffffffe>;" in overlay and "bootsecure = <0x01>;" in overlay
