"""Writing a tree that a profile shapes, without ever leaving it.

A profile's overlay folders are copied with their symlinks (they are part of the image), so a later entry
whose path goes through such a link would otherwise be written, or chmod'ed, wherever the link points on the
build host. Every write here walks the path one component at a time with lstat: a symlink in the middle of
a path is refused (`ThroughLink`), a symlink at the end is replaced by what is written, never followed."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


class ThroughLink(Exception):
    """A write would go through a symlink inside the tree."""

    def __init__(self, link: str, target: str) -> None:
        super().__init__(f"/{link} is a symlink (-> {target})")
        self.link = link
        self.target = target


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.strip("/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{rel!r} leaves the tree")
    return parts


def directory(root: Path, rel: str) -> Path:
    """`root/rel` as a real folder (made where missing); no component of it may be a symlink."""
    here = root
    done: list[str] = []
    for part in _parts(rel):
        here = here / part
        done.append(part)
        try:
            st = here.lstat()
        except FileNotFoundError:
            here.mkdir()
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ThroughLink("/".join(done), os.readlink(here))
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"/{'/'.join(done)} is a file, not a folder")
    return here


def _slot(root: Path, rel: str) -> Path:
    """Where an entry `rel` goes: its folder made safely, and whatever symlink held its name removed."""
    parts = _parts(rel)
    if not parts:
        raise ValueError("the tree's root is not a file")
    path = directory(root, "/".join(parts[:-1])) / parts[-1]
    if path.is_symlink():
        path.unlink()
    return path


def write_text(root: Path, rel: str, text: str) -> Path:
    path = _slot(root, rel)
    if path.is_dir():
        raise IsADirectoryError(f"/{rel.strip('/')} is a folder")
    path.write_text(text)
    return path


def copy_file(root: Path, rel: str, source: Path) -> Path:
    path = _slot(root, rel)
    if path.is_dir():
        raise IsADirectoryError(f"/{rel.strip('/')} is a folder")
    shutil.copyfile(source, path)
    shutil.copymode(source, path)
    return path


def copy_tree(root: Path, rel: str, source: Path) -> Path:
    """`source`'s folders, files and symlinks (as links, never followed) into `root/rel`, merged with what is
    there; a file or link of `source` replaces a link of the same name, a folder never goes through one."""
    top = directory(root, rel)
    for dirpath, dirnames, filenames in os.walk(source):  # os.walk does not descend into linked folders
        here = Path(dirpath).relative_to(source).as_posix()
        base = f"{rel.strip('/')}/{here}".strip("/") if here != "." else rel.strip("/")
        for name in sorted(dirnames + filenames):
            src = Path(dirpath) / name
            dest = f"{base}/{name}"
            if src.is_symlink():
                slot = _slot(root, dest)
                if slot.exists():
                    raise IsADirectoryError(f"/{dest} is a folder in the image: a symlink cannot replace it")
                slot.symlink_to(os.readlink(src))
            elif src.is_dir():
                directory(root, dest).chmod(stat.S_IMODE(src.stat().st_mode))
            else:
                copy_file(root, dest, src)
    return top
