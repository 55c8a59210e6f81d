"""Pinned artifacts: everything an image ships that is not from Debian's archive (k3s, airgap images, ...).

`artifacts.lock.yaml` declares each artifact once, with a URL and sha256 per arch and where it goes in the
image. Downloads (requests: resume, retries, progress) land in a content-addressed cache,
`.cache/artifacts/sha256/<digest>`, and only after their sha256 matched the lock. `--offline` uses the cache
alone; `artifacts import DIR` fills it from files brought over by hand. When an artifact cannot be had the
build stops before any stage runs, naming the artifact, its URL and how to provide it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from . import ui
from .errors import BadInput, BuildFailed
from .paths import cache_dir, sdk_root

LOCK_NAME = "artifacts.lock.yaml"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One pinned file for one arch."""

    name: str
    arch: str
    version: str
    url: str
    sha256: str
    install: str
    size: int | None = None
    mode: int = 0o644

    @property
    def cache_path(self) -> Path:
        return store_dir() / self.sha256

    @property
    def max_bytes(self) -> int:
        """What a download may be: the lock's size when it gives one, else MAX_BYTES."""
        return self.size if self.size else MAX_BYTES

    def is_cached(self) -> bool:
        return self.cache_path.is_file()


# A download with no size in the lock is cut off past this (the largest pinned file is 194 MB).
MAX_BYTES = 2 << 30
# Cached files whose sha256 this process has checked: (path, size, mtime_ns, inode) - a file changed since is
# hashed again before a build uses it.
_VERIFIED: set[tuple[str, int, int, int]] = set()


class ArtifactUnavailable(BuildFailed):
    """An artifact could not be fetched or verified; says which, from where, and how to provide it."""


def store_dir() -> Path:
    return cache_dir() / "artifacts" / "sha256"


def lock_path() -> Path:
    return Path(os.environ.get("MACULAOS_ARTIFACTS_LOCK", sdk_root() / LOCK_NAME))


def load_lock(path: Path | None = None) -> dict[str, dict[str, Artifact]]:
    """name -> arch -> Artifact, validated; every mistake is a BadInput naming the file and key."""
    path = path or lock_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the artifacts lock: {exc.strerror}",
                       "restore artifacts.lock.yaml") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: invalid YAML: {exc}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of artifact names", "see the comment at the top of the file")
    lock: dict[str, dict[str, Artifact]] = {}
    for name, spec in data.items():
        where = f"{path}: {name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("arches"), dict) or not spec.get("install"):
            raise BadInput(f"{where}: needs `version`, `install` and `arches`", "copy the k3s entry's shape")
        lock[name] = {}
        for arch, entry in spec["arches"].items():
            url, sha = (entry or {}).get("url"), str((entry or {}).get("sha256", ""))
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise BadInput(f"{where}.arches.{arch}.url: missing or not http(s)", "give the download URL")
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise BadInput(f"{where}.arches.{arch}.sha256: not a sha256 hex digest",
                               "pin the published checksum (lower-case hex, 64 characters)")
            install = str(spec["install"]).format(arch=arch)
            lock[name][arch] = Artifact(name, arch, str(spec.get("version", "")), url, sha, install,
                                        entry.get("size"), int(str(spec.get("mode", "0644")), 8))
    return lock


def select(names: list[str], arch: str, lock: dict[str, dict[str, Artifact]], where: str) -> list[Artifact]:
    """The lock entries a profile asks for, for its arch."""
    import difflib

    chosen = []
    for name in names:
        if name not in lock:
            close = difflib.get_close_matches(name, list(lock), n=1)
            raise BadInput(f"{where}: artifacts: {name!r} is not in {lock_path().name}",
                           f"did you mean `{close[0]}`?" if close else f"known: {', '.join(sorted(lock))}")
        if arch not in lock[name]:
            raise BadInput(f"{where}: artifacts: {name} has no pinned {arch} build in {lock_path().name}",
                           f"add arches.{arch} with its url and sha256")
        chosen.append(lock[name][arch])
    return chosen


def _how_to_provide(a: Artifact) -> str:
    return (f"on a connected machine run `maculaos-sdk artifacts fetch` (or download {a.url} and check its "
            f"sha256 {a.sha256[:12]}...), then `maculaos-sdk artifacts import DIR` here")


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stamp(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def verified_cache(a: Artifact) -> Path | None:
    """The cached file of `a`, once its sha256 checked out (again, if it changed since this process checked it);
    a cached file that no longer matches is removed, and None is returned, as for one never cached."""
    if not a.is_cached():
        return None
    if _stamp(a.cache_path) in _VERIFIED:
        return a.cache_path
    if file_sha256(a.cache_path) != a.sha256:
        a.cache_path.unlink(missing_ok=True)
        ui.info(f"[yellow]note:[/] cached artifact {a.name} ({a.arch}) no longer matched its sha256: removed, "
                "fetching it again")
        return None
    _VERIFIED.add(_stamp(a.cache_path))
    return a.cache_path


def _store(a: Artifact, part: Path) -> Path:
    got = file_sha256(part)
    if got != a.sha256:
        part.unlink(missing_ok=True)
        raise ArtifactUnavailable(f"artifact {a.name} ({a.arch}) from {a.url}: sha256 {got} does not match the "
                                  f"lock's {a.sha256}",
                                  "the download was corrupted or altered; if upstream re-published, re-pin the lock")
    part.chmod(a.mode)  # the image gets the file as cached (it is hard-linked into the build context)
    os.replace(part, a.cache_path)
    _VERIFIED.add(_stamp(a.cache_path))
    return a.cache_path


def fetch(a: Artifact, *, offline: bool = False, retries: int = 5, timeout: float = 30,
          session: requests.Session | None = None,
          progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The verified cached file of `a`, downloading it first (resuming a partial download) unless offline; a
    download is cut off at the lock's size (or MAX_BYTES)."""
    cached = verified_cache(a)
    if cached is not None:
        return cached
    if offline:
        raise ArtifactUnavailable(f"artifact {a.name} {a.version} ({a.arch}) is not in the cache and --offline "
                                  f"is set (URL {a.url})", _how_to_provide(a))
    store_dir().mkdir(parents=True, exist_ok=True)
    part = store_dir() / f"{a.sha256}.part"
    session = session or requests.Session()
    last_error = ""
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(a.url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # asked past the end: what we have is complete
                    return _store(a, part)
                r.raise_for_status()
                if have and r.status_code != 206:
                    have = 0  # the server ignored Range: start over
                length = r.headers.get("Content-Length", "")
                total = (int(length) if length.isascii() and length.isdigit() else 0) + have or None
                with part.open("ab" if have else "wb") as f:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                        have += len(chunk)
                        if have > a.max_bytes or (total or 0) > a.max_bytes:
                            part.unlink(missing_ok=True)
                            raise ArtifactUnavailable(f"artifact {a.name} ({a.arch}) from {a.url}: more than the "
                                                      f"{a.max_bytes} bytes it may be: refused, nothing cached",
                                                      "the server sends something else; check the URL and the lock")
                        if progress:
                            progress(have, total)
                if total is not None and have < total:
                    raise requests.ConnectionError(f"connection dropped after {have} of {total} bytes")
            return _store(a, part)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = str(exc).splitlines()[0][:200]
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            last_error = f"HTTP {status}"
            if status in (403, 404, 410):
                break
        time.sleep(min(2 ** attempt * 0.5, 8))
    raise ArtifactUnavailable(f"artifact {a.name} {a.version} ({a.arch}) cannot be fetched from {a.url}: "
                              f"{last_error}", _how_to_provide(a))


def import_dir(folder: Path, lock: dict[str, dict[str, Artifact]]) -> list[Artifact]:
    """Copy every file under `folder` whose sha256 matches a lock entry into the cache."""
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a folder", "point at the folder holding the downloaded files")
    wanted = {a.sha256: a for arches in lock.values() for a in arches.values()}
    imported = []
    store_dir().mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = file_sha256(path)
        if digest in wanted and not wanted[digest].is_cached():
            tmp = store_dir() / f"{digest}.part"
            shutil.copyfile(path, tmp)
            tmp.chmod(wanted[digest].mode)
            os.replace(tmp, store_dir() / digest)
            imported.append(wanted[digest])
    return imported


def files_for(names: list[str], arch: str, where: str, *, offline: bool,
              progress_factory: Callable[[Artifact], Any] | None = None, missing_ok: bool = False) -> dict[str, Path]:
    """install path -> cached file for a profile's artifacts; raises before any build step if one is missing
    (with `missing_ok`, as a dry run wants, the missing ones are left out instead)."""
    if not names:
        return {}
    chosen = select(names, arch, load_lock(), where)
    if missing_ok:
        chosen = [a for a in chosen if a.is_cached()]
    missing = [a for a in chosen if not a.is_cached()]
    if offline and missing:
        a = missing[0]
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ArtifactUnavailable(f"artifact {a.name} {a.version} ({a.arch}) is not in the cache and --offline is "
                                  f"set{others} (URL {a.url})", _how_to_provide(a))
    out = {}
    for a in chosen:
        progress = progress_factory(a) if progress_factory and not a.is_cached() else None
        out[a.install] = fetch(a, offline=offline, progress=progress)
    return out
