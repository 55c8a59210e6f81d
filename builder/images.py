"""Preloaded container images (`images:`): taken from a `docker save` tarball, the local engine, or pulled,
then saved into the image for k3s to import at start (/var/lib/rancher/k3s/agent/images/)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from maculaos_device import paths as device_paths

from .errors import BadInput, BuildFailed
from .paths import cache_dir

IMAGES_DIR = str(device_paths.K3S_IMAGES)


def _file_name(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ref).strip("_") + ".tar"


def _tarball_ids(path: Path) -> list[str]:
    """Config digests listed in a `docker save` tarball's manifest.json (its image ids)."""
    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.load(member) if member else []
    except (tarfile.TarError, KeyError, ValueError) as exc:
        raise BadInput(f"{path}: not a `docker save` tarball ({exc})",
                       "create it with `docker save IMAGE -o FILE`") from None
    return ["sha256:" + Path(m["Config"]).name.removesuffix(".json") for m in manifest]


def preload(refs: list[str], base_dir: Path, client: Any, *, offline: bool, where: str) -> tuple[dict[str, Path],
                                                                                              list[dict[str, Any]]]:
    """install path -> cached tarball, and the manifest records (ref, image id, digests) of each image."""
    files: dict[str, Path] = {}
    records: list[dict[str, Any]] = []
    store = cache_dir() / "images"
    store.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        local = (base_dir / ref) if not os.path.isabs(ref) else Path(ref)
        if ref.endswith((".tar", ".tar.gz", ".tgz")) and local.is_file():
            ids = _tarball_ids(local)
            with local.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            cached = store / f"file-{digest}.tar"
            if not cached.exists():
                shutil.copyfile(local, cached)
            files[f"{IMAGES_DIR}/{local.name}"] = cached
            records.append({"ref": ref, "source": "tarball", "ids": ids, "sha256": digest, "file": local.name})
            continue
        if ref.endswith((".tar", ".tar.gz", ".tgz")):
            raise BadInput(f"{where}: images: {ref}: no such file", f"paths are relative to {base_dir}")
        image = _local_or_pulled(ref, client, offline, where)
        cached = store / f"{image.id.replace(':', '-')}.tar"
        if not cached.exists():
            tmp = cached.with_suffix(".part")
            with tmp.open("wb") as f:
                for chunk in image.save(named=ref):
                    f.write(chunk)
            os.replace(tmp, cached)
        name = _file_name(ref)
        files[f"{IMAGES_DIR}/{name}"] = cached
        records.append({"ref": ref, "source": "engine", "ids": [image.id],
                        "repo_digests": sorted(image.attrs.get("RepoDigests") or []), "file": name})
    return files, records


def _local_or_pulled(ref: str, client: Any, offline: bool, where: str) -> Any:
    import docker.errors

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        pass
    hint = (f"on a connected machine run `docker pull {ref} && docker save {ref} -o image.tar` and list the tarball "
            "(path relative to the profile) under images: instead")
    if offline:
        raise BuildFailed(f"{where}: images: {ref} is not in the local engine and --offline is set", hint)
    try:
        return client.images.pull(ref)
    except docker.errors.APIError as exc:
        raise BuildFailed(f"{where}: images: cannot pull {ref}: {exc.explanation or exc}", hint) from None
