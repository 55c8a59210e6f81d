"""Where a bundle comes from: a folder (USB stick, local path) or an https URL. Every read is capped: a
server sending more than the signed size (or than a manifest may be) is refused, not buffered; a server
dripping bytes is cut off at an overall deadline (not only a per-read timeout); a redirect never leaves
https for http."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path
from typing import Any, Protocol

from .manifest import Pointer
from .system import DeviceError

HTTP_TIMEOUT = 30
RETRIES = 5
# A download's overall deadline: DEADLINE_BASE seconds plus its size at MIN_RATE bytes a second (a 120 MB root
# file system may take 33 minutes); a slower server holds the update lock no longer than that.
DEADLINE_BASE = 60
MIN_RATE = 64 << 10


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects stay on http(s), and one that starts on https stays on https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 (urllib's signature)
        if not newurl.startswith(("https://", "http://")) or \
                (req.full_url.startswith("https://") and not newurl.startswith("https://")):
            raise DeviceError(f"{req.full_url} redirects to {newurl}: a redirect away from https is refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoDowngrade)


class Stream(Protocol):
    """What an update is read from: a local file or a download (`_Deadline`)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview | bytearray, /) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Stream: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> object: ...


class _Deadline:
    """A response read one network read at a time, refused once its deadline has passed."""

    def __init__(self, resp: HTTPResponse, url: str, max_bytes: int) -> None:
        self._resp, self._url = resp, url
        self._start = time.monotonic()
        self._deadline = self._start + DEADLINE_BASE + max_bytes / MIN_RATE
        self._got = 0

    def readinto(self, buffer: memoryview | bytearray) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            self._resp.close()
            seconds = time.monotonic() - self._start
            raise DeviceError(f"{self._url}: {self._got} bytes in {seconds:.0f} s, slower than the "
                              f"{MIN_RATE >> 10} KiB/s allowed: cut off")
        data = self._resp.read1(size if size >= 0 else 1 << 20)  # one network read: blocks HTTP_TIMEOUT at most
        self._got += len(data)
        return data

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    def open(self, name: str, max_bytes: int) -> tuple[Stream, int | None]:
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
                resp = _OPENER.open(self.where(name), timeout=HTTP_TIMEOUT)  # noqa: S310 (scheme checked)
                length = resp.headers.get("Content-Length")
                announced = int(length) if length and length.isascii() and length.isdigit() else None
                if announced is not None and announced > max_bytes:
                    resp.close()
                    raise DeviceError(f"{self.where(name)} is {announced} bytes, more than the {max_bytes} allowed")
                return _Deadline(resp, self.where(name), max_bytes), announced
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
