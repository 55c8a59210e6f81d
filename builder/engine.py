"""The docker engine, through the docker SDK: build a stage, check the cache, export files."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import BuildFailed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$", re.MULTILINE)  # the image a build step left
_RUNNING = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})$", re.MULTILINE)  # the container of a RUN step

LABEL_STAGE_ID = "io.maculaos.stage-id"


def connect() -> Any:
    """A docker client for the local engine, or a clear error saying how to start one."""
    import docker  # imported lazily: `--help`, profile tools and dry runs work without it

    try:
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except Exception as exc:  # docker raises several unrelated types for "no engine"
        raise BuildFailed(f"no docker engine answers ({exc.__class__.__name__})",
                          "run `make setup` or start one with `dockerd &`; `maculaos-sdk doctor` checks") from None


@dataclass(frozen=True)
class Deadlines:
    """How long a stage build may run: in all, and without printing a line."""

    silent: float
    total: float

    @classmethod
    def for_stage(cls, emulated: bool) -> Deadlines:
        """MACULAOS_SDK_STAGE_SILENT / _TIMEOUT seconds (default 900 / 2700), x3 for an emulated stage."""
        factor = 3 if emulated else 1
        silent = _seconds("MACULAOS_SDK_STAGE_SILENT", 900)
        total = _seconds("MACULAOS_SDK_STAGE_TIMEOUT", 2700)
        return cls(silent * factor, total * factor)


def _seconds(var: str, default: float) -> float:
    value = os.environ.get(var, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise BuildFailed(f"{var}={value!r} is not a number of seconds",
                          f"unset it or give e.g. {default:.0f}") from None


class _Watchdog:
    """Stops the running step of a build that passes a deadline; the engine then reports the step failed."""

    def __init__(self, client: Any, deadlines: Deadlines) -> None:
        self.client, self.deadlines = client, deadlines
        self.start = self.last = time.monotonic()
        self.container: str | None = None
        self.why: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def output(self, text: str) -> None:
        self.last = time.monotonic()
        for cid in _RUNNING.findall(text):
            self.container = cid

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.deadlines.silent / 4)):
            now = time.monotonic()
            if now - self.start > self.deadlines.total:
                self.why = f"still running after {self.deadlines.total:.0f} s"
            elif now - self.last > self.deadlines.silent:
                self.why = f"no output for {self.deadlines.silent:.0f} s"
            else:
                continue
            if self.container:
                try:
                    self.client.api.kill(self.container)
                except Exception:  # gone already: the build ends on its own
                    pass
            return


class Engine:
    """Thin wrapper over a docker client, so tests can hand in a fake one."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def has_image(self, ref: str) -> bool:
        """True when the tag exists locally (a stage is only tagged after a complete build)."""
        try:
            self.client.images.get(ref)
            return True
        except Exception:
            return False

    def image_id(self, ref: str) -> str | None:
        """The id of the image `ref` names, or None when there is none."""
        try:
            return str(self.client.images.get(ref).id)
        except Exception:
            return None

    def build(self, context: Path, tag: str, log: IO[str], *, platform: str | None, emulated: bool, no_cache: bool,
              labels: dict[str, str], deadlines: Deadlines | None = None) -> list[str]:
        """Build `context/Dockerfile` as `tag`, streaming the engine's output into `log`.

        A step that passes a deadline is stopped and the build fails saying so; the cache keeps every
        stage built before it. Returns the ids of the images the build's steps left, in order (the last
        is the tagged one)."""
        with _Watchdog(self.client, deadlines or Deadlines.for_stage(emulated)) as watchdog:
            return self._build(context, tag, log, platform=platform, no_cache=no_cache, labels=labels,
                               watchdog=watchdog)

    def _build(self, context: Path, tag: str, log: IO[str], *, platform: str | None, no_cache: bool,
               labels: dict[str, str], watchdog: _Watchdog) -> list[str]:
        steps: list[str] = []
        tail: deque[str] = deque(maxlen=25)
        buildargs = {k: v for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy")
                     if (v := os.environ.get(k))}
        stream = self.client.api.build(
            path=str(context), dockerfile="Dockerfile", tag=tag, rm=True, forcerm=True, pull=False,
            nocache=no_cache, decode=True, platform=platform, labels=labels, buildargs=buildargs,
        )
        for chunk in stream:
            if "stream" in chunk:
                text = chunk["stream"]
                watchdog.output(text)
                log.write(text)
                steps.extend(_STEP_IMAGE.findall(text))
                tail.extend(clean for line in text.splitlines() if (clean := _ANSI.sub("", line)).strip())
            elif "error" in chunk:
                log.write(f"ERROR: {chunk['error']}\n")
                log.flush()
                detail = "\n    ".join(list(tail)[-12:])
                if watchdog.why:
                    log.write(f"STOPPED: {watchdog.why}\n")
                    raise BuildFailed(f"stopped: {watchdog.why}; last output:\n    {detail}",
                                      "a step that hangs under emulation: see the stage log; raise the limit with "
                                      "MACULAOS_SDK_STAGE_SILENT / MACULAOS_SDK_STAGE_TIMEOUT (seconds)")
                raise BuildFailed(f"docker build failed: {chunk['error'].strip()}\n    {detail}")
            elif "status" in chunk:
                log.write(f"{chunk['status']}\n")
            log.flush()
        if not self.has_image(tag):
            raise BuildFailed(f"docker build finished but {tag} is missing", "see the stage log")
        return steps

    @contextmanager
    def archive(self, ref: str, src: str) -> Iterator[tarfile.TarFile]:
        """A path inside an image as a tar stream, read once in order as the engine sends it (nothing is spooled
        to disk: an exported ISO is written once); works for FROM-scratch images too."""
        container = self.client.containers.create(ref, command=["/nonexistent"])
        try:
            bits, _ = container.get_archive(src.rstrip("/"))
            with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(bits), 1 << 20), mode="r|") as tar:
                yield tar
        finally:
            container.remove(force=True)

    def export(self, ref: str, src: str, dest: Path) -> None:
        """Copy one file out of an image to `dest`, atomically (tmp + rename)."""
        with self.archive(ref, src) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise BuildFailed(f"{ref}:{src} is not a regular file")
            _extract_to(tar, member, dest.with_name(f".{dest.name}.partial"))
            os.replace(dest.with_name(f".{dest.name}.partial"), dest)

    def export_tree(self, ref: str, src: str, dest: Path) -> None:
        """Copy a folder out of an image to `dest`, replaced as a whole (built aside, then renamed)."""
        partial = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        top = src.rstrip("/").rsplit("/", 1)[-1]
        with self.archive(ref, src) as tar:
            for member in tar:
                rel = Path(member.name).relative_to(top)
                if member.isdir():
                    (partial / rel).mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    _extract_to(tar, member, partial / rel)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)


class _ChunkReader(io.RawIOBase):
    """The byte chunks of docker's archive stream as a readable file."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _extract_to(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    extracted = tar.extractfile(member)
    assert extracted is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(extracted, out, 1 << 20)


def read_text_from_image(engine: Engine, ref: str, src: str) -> str:
    """Small helper: a text file from an image, via a temporary export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        engine.export(ref, src, path)
        return path.read_text()

