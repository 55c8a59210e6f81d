"""Where a bundle comes from: a folder (USB stick, local path) or an https URL. Every read is capped: a
server sending more than the signed size (or than a manifest may be) is refused, not buffered."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from .manifest import Pointer
from .system import DeviceError

HTTP_TIMEOUT = 30
RETRIES = 5


class Source:
    def __init__(self, location: str, allow_http: bool = False, pinned: Pointer | None = None) -> None:
        self.location = location.rstrip("/")
        self.pinned = pinned  # the channel pointer that named this bundle: its manifest must be the one it names
        self.is_url = location.startswith(("http://", "https://"))
        if location.startswith("http://") and not allow_http:
            raise DeviceError(f"{location}: plain http is refused (anyone on the path can hold updates back); use "
                              "https, or set upgrade.allow_http: true in the node config for a lab network")
        if "://" in location and not self.is_url:
            raise DeviceError(f"{location}: not a folder or an http(s) URL")

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def open(self, name: str, max_bytes: int) -> tuple[BinaryIO, int | None]:
        """A stream of `name` and its announced size (None if unknown); raises DeviceError."""
        if not self.is_url:
            path = Path(self.location) / name
            try:
                size = path.stat().st_size
                if size > max_bytes:
                    raise DeviceError(f"{path} is {size} bytes, more than the {max_bytes} allowed")
                return open(path, "rb"), size
            except OSError as exc:
                raise DeviceError(f"cannot read {path}: {exc.strerror}") from None
        last = ""
        for attempt in range(RETRIES):
            try:
                resp = urllib.request.urlopen(self.where(name), timeout=HTTP_TIMEOUT)  # noqa: S310 (scheme checked)
                length = resp.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                if size is not None and size > max_bytes:
                    resp.close()
                    raise DeviceError(f"{self.where(name)} is {size} bytes, more than the {max_bytes} allowed")
                return resp, size
            except urllib.error.HTTPError as exc:
                raise DeviceError(f"cannot fetch {self.where(name)}: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
                time.sleep(1 + attempt)
        raise DeviceError(f"cannot fetch {self.where(name)}: {last}")

    def read(self, name: str, max_bytes: int) -> bytes:
        stream, _ = self.open(name, max_bytes)
        chunks, total = [], 0
        with stream:
            while total <= max_bytes:
                chunk = stream.read(min(1 << 20, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise DeviceError(f"{self.where(name)} is larger than the {max_bytes} bytes allowed")
        return data
