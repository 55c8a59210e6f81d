"""Locks between builds sharing one cache folder (another terminal, parallel test workers, CI jobs).

`flock` on a file under `<cache>/locks/`: the kernel drops it when the holder dies, so a killed build
never leaves a stale lock. The file names what holds it, for the message of whoever waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from . import ui
from .paths import cache_dir


@contextlib.contextmanager
def cache_lock(name: str, what: str) -> Iterator[None]:
    """Hold the lock `name` (waiting, and saying for what, while another process holds it)."""
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fd.seek(0)
            holder = fd.read().strip() or what
            ui.info(f"  waiting for {holder} to finish ({path})")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            ui.info(f"  waited {time.monotonic() - t0:.1f}s")
        fd.seek(0)
        fd.truncate()
        fd.write(f"{what} (pid {os.getpid()})\n")
        fd.flush()
        try:
            yield
        finally:
            fd.seek(0)
            fd.truncate()
