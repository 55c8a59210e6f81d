"""Builds across machines (issue 23, part 6a): a stage cache in a real OCI registry (Debian's docker-registry on
127.0.0.1), shared by two real docker engines (the usual one and a second dockerd with its own data root and
socket, empty). What one engine built, the other pulls: zero stages built there, the same artifact bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.engine import Engine
from maculaos_sdk.errors import BuildFailed
from maculaos_sdk.profile import load_profile
from maculaos_sdk.registry import StageRegistry
from maculaos_sdk.vm import free_port


def _wait(what: str, ready, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up within {seconds:.0f} s")
        time.sleep(0.5)


class Registry:
    """docker-registry serving a folder on 127.0.0.1:<port>; stop() and start() keep its content."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.config = root / "config.yml"
        self.config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                               f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "registry.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Registry:
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT)
        _wait("docker-registry", self._answers)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def registry(tmp_path) -> Iterator[Registry]:
    (tmp_path / "registry").mkdir()
    server = Registry(tmp_path / "registry").start()
    yield server
    server.stop()


@pytest.fixture
def second_engine() -> Iterator[Engine]:
    """A second dockerd: its own data root, exec root, socket (a short path: AF_UNIX) and bridge, and no
    iptables rules (it only pulls and exports here). Not `--bridge=none`: a dockerd started so deletes the
    default bridge, docker0, which the first engine's builds need."""
    root = Path(tempfile.mkdtemp(prefix="d2-"))
    sock = root / "docker.sock"
    bridge = f"mq{root.name[-10:]}".replace("_", "")[:15]
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    proc = subprocess.Popen(["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                             "--pidfile", str(root / "pid"), "-H", f"unix://{sock}", "--bridge", bridge,
                             "--iptables=false", "--ip-masq=false"],
                            stdout=(root / "dockerd.log").open("wb"), stderr=subprocess.STDOUT)
    clients: list[docker.DockerClient] = []

    def answers() -> bool:
        try:
            clients.append(docker.DockerClient(base_url=f"unix://{sock}", timeout=600))
            return bool(clients[-1].ping())
        except docker.errors.DockerException:
            return False

    try:
        _wait("the second dockerd", answers)
        client = clients[-1]
        assert client.images.list() == []  # empty: everything it gets comes from the registry
        yield Engine(client)
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        subprocess.run(["ip", "link", "delete", bridge], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tags(registry: Registry, repository: str) -> list[str]:
    with urllib.request.urlopen(f"{registry.url}/v2/{repository}/tags/list", timeout=10) as answer:
        return json.load(answer)["tags"] or []


def test_a_stage_built_on_one_engine_is_pulled_not_built_on_another(registry, second_engine, tmp_path):
    profile = load_profile("test", {"outputs": ["tar"]})
    cache = StageRegistry.parse(registry.url)
    # engine 1 has every stage but the last (the registry, new, has none): the last one misses there too, and is
    # built; each one, built or reused, is pushed
    warm = build_image(profile, BuildOptions(output=tmp_path / "warm"))
    docker.from_env().images.remove(warm.stages[-1].stage.image)

    first = build_image(profile, BuildOptions(output=tmp_path / "one", cache_registry=cache))
    assert [(s.cached, s.pulled) for s in first.stages] == [(True, False)] * (len(first.stages) - 1) + [(False, False)]
    for s in first.stages:
        repository, tag = s.stage.image.rsplit(":", 1)
        assert tag in _tags(registry, repository), s.stage.image

    # engine 2, empty: every stage pulled, none built, the same artifact bytes; no registry-named tags left over
    second = build_image(profile, BuildOptions(output=tmp_path / "two", cache_registry=cache), engine=second_engine)
    assert [(s.stage.key, s.pulled) for s in second.stages] == [(s.stage.key, True) for s in first.stages]
    assert [s.stage.stage_id for s in second.stages] == [s.stage.stage_id for s in first.stages]
    assert {n: _sha256(p) for n, p in second.artifacts.items()} == {n: _sha256(p) for n, p in first.artifacts.items()}
    assert [t for i in second_engine.client.images.list() for t in i.tags if t.startswith(cache.prefix)] == []
    manifest = json.loads((tmp_path / "two" / f"{second.plan.basename}.manifest.json").read_text())
    assert all(stage["pulled"] for stage in manifest["stages"].values())

    # the registry down: one line naming it, before any stage
    registry.stop()
    with pytest.raises(BuildFailed, match=f"the stage cache registry {registry.url} does not answer"):
        build_image(profile, BuildOptions(output=tmp_path / "three", cache_registry=cache), engine=second_engine)
