"""Keeping the engine's disk use bounded: the SDK removes its own stage images that no recent build used.

Every stage image is tagged `maculaos-sdk/<stage>:<id>`. Each build marks the images of its plan as used
(a marker file per image in the state folder, shared by every checkout on the machine). Afterwards, while the
SDK's images add up to more than the cache limit (`MACULAOS_SDK_CACHE_MAX`, default 20G), the least recently
used image that is not part of the current plan is removed. An image no build has marked counts as used when
it was created. Images of the plan just built are never removed, so a no-change rebuild stays all cached.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import BadInput
from .paths import state_dir

REPO_PREFIX = "maculaos-sdk/"
LABEL_STAGE = "io.maculaos.stage"
DEFAULT_CACHE_MAX = "20G"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class StageImage:
    """One tagged stage image as the engine lists it."""

    ref: str  # maculaos-sdk/<stage>:<id prefix>
    image_id: str
    size: int  # as listed: the engine's size, the layers of the images it builds on included; in a
    # collection's `removed`: the bytes its removal freed (its layers no kept image builds on)
    created: float  # seconds since 1970
    chain: tuple[str, ...] = ()  # the image and the images it was built on, nearest first


@dataclass(frozen=True)
class Listing:
    """The stage images and the bytes of each image's own top layer (its size less its parent's).

    A stage built on another (iso on tools, rootfs on base) lists the other's layers in its own size too:
    bytes are counted once per image in the union of the chains, as the engine stores them."""

    images: list[StageImage]
    own_bytes: dict[str, int]

    def held(self, images: list[StageImage]) -> int:
        """Bytes the engine holds for `images`, each shared layer counted once."""
        ids: set[str] = set().union(*(i.chain for i in images)) if images else set()
        return sum(self.own_bytes.get(x, 0) for x in ids)


@dataclass
class Collected:
    """What a collection removed (or, in a dry run, would remove)."""

    removed: list[StageImage]
    kept_bytes: int
    dangling_bytes: int = 0
    prune_refused: str = ""  # why the engine refused to prune dangling images, when it did

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.removed) + self.dangling_bytes


def parse_size(text: str, where: str = "MACULAOS_SDK_CACHE_MAX") -> int:
    """Bytes from '20G', '512M', '0' (binary units); a clear error otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise BadInput(f"{where}: {text!r} is not a size", "write it like 20G, 512M or 0")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cache_max() -> int:
    """The cache limit in bytes (MACULAOS_SDK_CACHE_MAX, default 20G)."""
    return parse_size(os.environ.get("MACULAOS_SDK_CACHE_MAX", DEFAULT_CACHE_MAX))


def _marker(ref: str) -> Path:
    return state_dir() / "used" / ref.removeprefix(REPO_PREFIX).replace("/", "_").replace(":", "@")


def mark_used(refs: list[str]) -> None:
    """Record that a build used these images now (touches one marker file each; best effort: an unwritable
    state folder only makes the images look as old as their creation)."""
    for ref in refs:
        path = _marker(ref)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError:
            return


def last_used(image: StageImage) -> float:
    """When a build last used the image, else when it was created."""
    try:
        return _marker(image.ref).stat().st_mtime
    except OSError:
        return image.created


def list_images(client: Any) -> Listing:
    """The stage images with their parent chains. One listing call (docker-py's `images.list` inspects each
    listed image afterwards, which failed when another build removed one in between); it includes the
    untagged images the classic builder keeps for each step, whose parent links give the chains."""
    rows = client.api.images(all=True)
    size = {r["Id"]: int(r.get("Size", 0)) for r in rows}
    parent = {r["Id"]: r.get("ParentId") or "" for r in rows}
    own = {i: size[i] - size[parent[i]] if parent[i] in size else size[i] for i in size}
    found = []
    for row in rows:
        if LABEL_STAGE not in (row.get("Labels") or {}):
            continue
        chain = [row["Id"]]
        while parent.get(chain[-1]) in size and len(chain) < 1000:
            chain.append(parent[chain[-1]])
        for tag in row.get("RepoTags") or ():
            if tag.startswith(REPO_PREFIX):  # the list endpoint gives Created in seconds
                found.append(StageImage(tag, row["Id"], size[row["Id"]], float(row.get("Created", 0)), tuple(chain)))
    return Listing(found, own)


def collect(client: Any, keep: set[str], limit: int, *, dry_run: bool = False,
            dangling_older_than: str | None = None) -> Collected:
    """Remove least recently used stage images not in `keep` until the rest fit in `limit` bytes.

    With `dangling_older_than` (a docker duration: "6h", "0s"), also remove the untagged images the SDK's
    builds left that are older than that: a build that was killed leaves its earlier stages behind. A build
    running at the same time could lose its intermediate images, so builds only prune old ones, or all of
    them when disk space runs out.
    """
    listing = list_images(client)
    left = list(listing.images)
    total = listing.held(left)
    removed: list[StageImage] = []
    for image in sorted((i for i in listing.images if i.ref not in keep), key=last_used):
        if total <= limit:
            break
        if not dry_run:
            try:
                client.images.remove(image.ref)
            except Exception:  # in use by a container, or removed meanwhile: leave it
                continue
            _marker(image.ref).unlink(missing_ok=True)
        left.remove(image)
        after = listing.held(left)  # the image's last tag gone: its layers no one else builds on go too
        removed.append(replace(image, size=total - after))
        total = after
    result = Collected(removed, total)
    if dangling_older_than is not None and not dry_run:
        result.dangling_bytes, result.prune_refused = _prune_dangling(client, dangling_older_than)
    return result


def _prune_dangling(client: Any, older_than: str) -> tuple[int, str]:
    """Bytes freed by removing the SDK's untagged images older than `older_than`, and why not if refused.

    The engine runs one prune at a time and answers 409 to a second one: another build sharing the engine
    is pruning the same images then, so that is no failure. Nor is any other refusal: trimming the cache
    must never fail the build that just succeeded.
    """
    try:
        pruned = client.images.prune(filters={"dangling": True, "label": LABEL_STAGE, "until": older_than})
    except Exception as err:  # docker.errors.APIError; the SDK's import stays lazy
        busy = getattr(getattr(err, "response", None), "status_code", None) == 409
        return 0, "" if busy else str(err).splitlines()[0]
    return int((pruned or {}).get("SpaceReclaimed") or 0), ""


def remove_untagged(client: Any, image_ids: list[str]) -> None:
    """Remove the images among `image_ids` that no tag names (a multi-stage build's earlier stages).

    The engine keeps each such image's untagged parents unless another image still builds on them, so the
    layers of tagged images (the package layer of rootfs, say) stay cached.
    """
    for image_id in reversed(image_ids):
        try:
            if not client.images.get(image_id).tags:
                client.images.remove(image_id)
        except Exception:  # a parent of a tagged image, or already gone with a child: keep going
            continue


def docker_free_bytes(client: Any) -> int | None:
    """Free bytes on the filesystem holding the engine's data, when it is on this machine."""
    try:
        root = client.info().get("DockerRootDir")
        return shutil.disk_usage(root).free if root and Path(root).exists() else None
    except Exception:
        return None


def human(n: float) -> str:
    """A byte count for people: 512 B, 340.0 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
