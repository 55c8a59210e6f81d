"""The docker engine, through the docker SDK: build a stage, check the cache, export files."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from collections import deque
from pathlib import Path
from typing import IO, Any

from .errors import BuildFailed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

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

    def build(self, context: Path, tag: str, log: IO[str], *, platform: str | None, no_cache: bool,
              labels: dict[str, str]) -> None:
        """Build `context/Dockerfile` as `tag`, streaming the engine's output into `log`."""
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
                log.write(text)
                tail.extend(clean for line in text.splitlines() if (clean := _ANSI.sub("", line)).strip())
            elif "error" in chunk:
                log.write(f"ERROR: {chunk['error']}\n")
                log.flush()
                detail = "\n    ".join(list(tail)[-12:])
                raise BuildFailed(f"docker build failed: {chunk['error'].strip()}\n    {detail}")
            elif "status" in chunk:
                log.write(f"{chunk['status']}\n")
            log.flush()
        if not self.has_image(tag):
            raise BuildFailed(f"docker build finished but {tag} is missing", "see the stage log")

    def export_tree(self, ref: str, src: str, dest: Path) -> None:
        """Copy a folder out of an image to `dest` (replaced atomically: built aside, then renamed)."""
        container = self.client.containers.create(ref, command=["/nonexistent"])
        partial = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            bits, _ = container.get_archive(src.rstrip("/"))
            with tempfile.TemporaryFile(dir=dest.parent) as spool:
                for chunk in bits:
                    spool.write(chunk)
                spool.seek(0)
                with tarfile.open(fileobj=spool, mode="r:") as tar:
                    top = src.rstrip("/").rsplit("/", 1)[-1]
                    for member in tar.getmembers():
                        rel = Path(member.name).relative_to(top) if member.name != top else Path(".")
                        if member.isdir():
                            (partial / rel).mkdir(parents=True, exist_ok=True)
                        elif member.isfile():
                            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                            extracted = tar.extractfile(member)
                            assert extracted is not None
                            with (partial / rel).open("wb") as out:
                                shutil.copyfileobj(extracted, out, 1 << 20)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(partial, dest)
        finally:
            container.remove(force=True)

    def export(self, ref: str, src: str, dest: Path) -> None:
        """Copy one file out of an image (also FROM-scratch images) atomically to `dest`."""
        container = self.client.containers.create(ref, command=["/nonexistent"])
        try:
            bits, _ = container.get_archive(src)
            with tempfile.TemporaryFile(dir=dest.parent) as spool:
                for chunk in bits:
                    spool.write(chunk)
                spool.seek(0)
                with tarfile.open(fileobj=spool, mode="r:") as tar:
                    member = tar.next()
                    if member is None or not member.isfile():
                        raise BuildFailed(f"{ref}:{src} is not a regular file")
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    tmp = dest.with_name(f".{dest.name}.partial")
                    with tmp.open("wb") as out:
                        while block := extracted.read(1 << 20):
                            out.write(block)
                    os.replace(tmp, dest)
        finally:
            container.remove(force=True)


def read_text_from_image(engine: Engine, ref: str, src: str) -> str:
    """Small helper: a text file from an image, via a temporary export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        engine.export(ref, src, path)
        return path.read_text()

