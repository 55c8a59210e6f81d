"""Fixtures for the QEMU boot tests: build the `test` profile once (cached stages are reused), and
hand each test fresh Machines whose serial logs are kept in out/test-logs/."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.keys import signing_key
from maculaos_sdk.machine import cow_disk, guest_cpus
from maculaos_sdk.node_machine import MaculaMachine
from maculaos_sdk.paths import sdk_root
from maculaos_sdk.profile import Profile, load_profile
from maculaos_sdk.publish import publish, serve
from maculaos_sdk.vm import VmConfig

OUT = Path(os.environ.get("MACULAOS_TEST_OUT", sdk_root() / "out"))
LOGS = OUT / "test-logs"


def once_per_run(factory: pytest.TempPathFactory, name: str, make: Callable[[], dict[str, Path]]) -> dict[str, Path]:
    """`make()` once per test run: with parallel workers (pytest -n), the first to get here builds and the
    others wait for it and read what it built instead of exporting the same files again under running VMs."""
    root = factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # shared by the run's workers
    record = root / f"{name}.json"
    with (root / f"{name}.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            return {k: Path(v) for k, v in json.loads(record.read_text()).items()}
        made = make()
        record.write_text(json.dumps({k: str(v) for k, v in made.items()}))
        return made


def build_once(factory: pytest.TempPathFactory, name: str, profile: Profile, out: Path) -> dict[str, Path]:
    """A profile built through the real docker engine (never skipped), once per test run."""
    return once_per_run(factory, name, lambda: build_image(profile, BuildOptions(output=out)).artifacts)


@pytest.fixture(scope="session")
def test_build(tmp_path_factory) -> dict[str, Path]:
    """The test profile (ISO, A/B disk, bundle)."""
    return build_once(tmp_path_factory, "test-amd64", load_profile("test"), OUT)


@pytest.fixture(scope="session")
def test_iso(test_build) -> Path:
    return test_build["maculaos-test-0.1.0-amd64.iso"]


@pytest.fixture(scope="session")
def test_disk(test_build) -> Path:
    return test_build["maculaos-test-0.1.0-amd64.qcow2"]


@pytest.fixture(scope="session")
def update_bundle(tmp_path_factory) -> Path:
    """A signed 0.2.0 bundle of the test profile (same signing key as the 0.1.0 disk)."""
    profile = load_profile(str(Path(__file__).parent / "profiles" / "test-update.yaml"))
    return build_once(tmp_path_factory, "update-amd64", profile, OUT / "update")["maculaos-test-0.2.0-amd64.bundle"]


@pytest.fixture(scope="module")
def bundle_server(update_bundle: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Serve a folder of bundles over HTTP on the host (the guest reaches it as 10.0.2.2): the 0.2.0 bundle as
    `good/`, and an update server with a signed `stable` channel naming it."""
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(update_bundle, root / "good")
    publish([update_bundle], root, "stable", signing_key=signing_key(""))
    server = serve(root)
    yield f"http://10.0.2.2:{server.server_address[1]}", root
    server.shutdown()


@dataclass(frozen=True)
class SavedMachine:
    """A machine stopped at a known point: its disk (to put copy-on-write disks over) and its state."""

    disk: Path
    state: Path


@pytest.fixture(scope="session")
def booted_disk(test_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> SavedMachine:
    """The A/B disk booted once under UEFI to slot A with its network up, then saved: the scenarios that
    start there resume this state (seconds) instead of each booting a fresh copy (about a minute)."""
    work = tmp_path_factory.mktemp("booted-disk")
    disk = cow_disk(test_disk, work / "disk-amd64.qcow2")
    m = MaculaMachine("first-boot", VmConfig.for_image(disk, cpus=guest_cpus()), LOGS / "booted_disk")
    try:
        m.start()
        assert m.wait_for_boot() == "A"
        m.wait_for_network()
        m.wait_until_booted()
        m.succeed("sync")
        m.save_state(work / "state")
    finally:
        m.close()
    return SavedMachine(disk, work / "state")


@pytest.fixture
def make_machine(request: pytest.FixtureRequest) -> Iterator:
    """Factory for Machines; all are stopped at the end and their logs saved on failure."""
    machines: list[MaculaMachine] = []
    workdir = LOGS / request.node.name
    if workdir.exists():
        shutil.rmtree(workdir)

    def make(image: Path, name: str = "vm", **kw: object) -> MaculaMachine:
        test_channel = bool(kw.pop("test_channel", True))
        resume_from = kw.pop("resume_from", None)
        tpm_state = kw.pop("tpm_state", None)
        cfg = VmConfig.for_image(image, **{"cpus": guest_cpus(), **kw})  # type: ignore[arg-type]
        m = MaculaMachine(name, cfg, workdir, test_channel=test_channel, resume_from=resume_from,  # type: ignore[arg-type]
                          tpm_state=tpm_state)  # type: ignore[arg-type]
        machines.append(m)
        return m

    start = time.monotonic()
    yield make
    for m in machines:
        m.close()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        for m in machines:
            print(f"\n--- {m.name} serial console (last lines; full log {m.serial_log}) ---\n{m.console_tail(60)}")
    print(f"[{request.node.name}: {time.monotonic() - start:.1f}s]")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
