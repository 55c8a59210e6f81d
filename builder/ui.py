"""Console output: one line per stage with its state and duration, and timed steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.status import Status

console = Console(stderr=True, highlight=False)

_STYLE = {"cached": "cyan", "pulled": "cyan", "building": "yellow", "done": "green", "failed": "bold red",
          "planned": "dim"}


def stage_line(name: str, state: str, seconds: float | None = None, detail: str = "") -> None:
    """Print `  <name>  <state>  <duration>  <detail>`."""
    took = f"{seconds:6.1f}s" if seconds is not None else "       "
    console.print(f"  [bold]{name:<10}[/] [{_STYLE.get(state, 'white')}]{state:<9}[/] {took}  [dim]{detail}[/]")


class Activity:
    """The one status line (rich shows one live display at a time) naming every stage being built now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: dict[str, Path] = {}
        self._status: Status | None = None

    def __enter__(self) -> Activity:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._logs.clear()
            self._show()

    @contextmanager
    def building(self, name: str, log: Path) -> Iterator[None]:
        with self._lock:
            self._logs[name] = log
            self._show()
        try:
            yield
        finally:
            with self._lock:
                self._logs.pop(name, None)
                self._show()

    def _show(self) -> None:
        if not self._logs:
            if self._status is not None:
                self._status.stop()
                self._status = None
            return
        text = "  building " + ", ".join(f"{name} (log: {log})" for name, log in self._logs.items())
        if self._status is None:
            self._status = console.status(text)
            self._status.start()
        else:
            self._status.update(text)


@contextmanager
def step(title: str) -> Iterator[None]:
    """A named step that shows a spinner while it runs and logs its duration when done."""
    start = time.monotonic()
    with console.status(f"{title} ..."):
        yield
    console.print(f"[green]✓[/] {title} [dim]({time.monotonic() - start:.1f}s)[/]")


def info(msg: str) -> None:
    console.print(msg)


def error(msg: str) -> None:
    """One error line, printed as written: it quotes input (patterns, values), never read as rich markup."""
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)


def download_progress(artifact: object) -> Callable[[int, int | None], None]:
    """A progress callback for one download: a line at most every 2 s, and one at the end."""
    name = getattr(artifact, "name", str(artifact))
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < 2 and done != total:
            return
        last[0] = now
        of = f" of {total / 2**20:.1f}" if total else ""
        console.print(f"  [dim]fetching {name}: {done / 2**20:.1f}{of} MiB[/]")

    return report
