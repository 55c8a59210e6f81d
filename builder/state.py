"""The state one build carries through its phases (inputs -> render -> schedule -> export -> record): what was
asked (`BuildOptions`), what was resolved before the first stage (`Inputs`), what was made (`BuildResult`), all in
one `Build` that every phase reads and adds to."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Engine
from .plan import BuildPlan
from .registry import StageRegistry
from .render import RenderedStage


@dataclass
class BuildOptions:
    """How to build: where to write, whether to trust the cache, whether to only render."""

    output: Path = Path("out")
    no_cache: bool = False
    dry_run: Path | None = None
    signing_key: Path | None = None
    offline: bool = False  # pinned artifacts and preloaded images from the local caches only
    check_packages: bool = True  # look the package names up in Debian's index before building
    release: bool = False  # a release: a real signing key, no console autologin
    explain: bool = False  # say why each stage that is not cached is built
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)  # stages built at the same time
    cache_registry: StageRegistry | None = None  # stage images pulled from there instead of built, pushed there


@dataclass
class Inputs:
    """What a build needs besides the stage folders, resolved before the first stage runs."""

    secret: Path | None  # the bundle signing key (None in a dry run that would have to generate one)
    public_key: str  # built into the image as /usr/share/maculaos/update.pub (read-only root)
    pinned: dict[str, Path]  # image path -> cached pinned artifact
    image_files: dict[str, Path]  # image path -> saved preloaded container image
    image_records: list[dict[str, Any]]


@dataclass
class StageResult:
    stage: RenderedStage
    cached: bool  # not built here: the engine had it, or it was pulled
    seconds: float
    pulled: bool = False  # from the stage cache registry


@dataclass
class BuildResult:
    """What a build produced."""

    plan: BuildPlan
    stages: list[StageResult] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    manifest: Path | None = None
    evidence: list[Path] = field(default_factory=list)  # SBOMs, provenance, SHA256SUMS (evidence.py)


@dataclass
class Build:
    """One build on an engine: the plan, the options, the resolved inputs and rendered stages, and what the
    phases made so far (`result`, the manifest entries of the exported artifacts)."""

    plan: BuildPlan
    options: BuildOptions
    inputs: Inputs
    rendered: list[RenderedStage]
    engine: Engine
    previous: dict[str, Any]  # this output's last manifest: exports still intact are not copied again
    result: BuildResult = field(init=False)
    exported: dict[str, Any] = field(default_factory=dict)  # artifact name -> manifest entry
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.result = BuildResult(plan=self.plan, manifest=self.manifest_path)

    @property
    def out(self) -> Path:
        return self.options.output

    @property
    def logs(self) -> Path:
        return self.options.output / "logs"

    @property
    def manifest_path(self) -> Path:
        return self.options.output / f"{self.plan.basename}.manifest.json"

    @property
    def secret(self) -> Path:
        assert self.inputs.secret is not None, "a build (not a dry run) always has its signing key"
        return self.inputs.secret

    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def images(self) -> set[str]:
        """The stage images this build uses: the cache trim and the space check keep them."""
        return {r.image for r in self.rendered}
