"""Stage metadata: one folder per stage under stages/ with a Dockerfile template and stage.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from maculaos_device.schema import reference_row

from .contexts import CONTEXT_SOURCES
from .errors import BadInput
from .paths import stages_dir
from .settings import SETTINGS, SETTINGS_BY_KEY

_META_KEYS = {"name", "description", "inputs", "arches", "context", "exports", "provides", "bootstrap", "runs", "tag",
              "options"}


@dataclass(frozen=True)
class StageMeta:
    """What a stage is: its folder, inputs, arches, extra build-context sources and exported files."""

    name: str
    folder: Path
    description: str = ""
    inputs: tuple[str, ...] = ()
    arches: tuple[str, ...] = ("amd64", "arm64")
    context: tuple[str, ...] = ()
    exports: dict[str, str] = field(default_factory=dict)
    provides: str | None = None
    tag: str | None = None  # its image is an output: tagged so in the engine ({profile}, {version}, {arch})
    bootstrap: bool = False
    runs_on_host: bool = False  # `runs: host`: its build environment is native (tools), never emulated
    options: tuple[str, ...] = ()  # profile keys its templates may read (as `profile.<key>`); no others

    @property
    def order(self) -> int:
        """The numeric prefix of the folder (k3OS style), used to break ties in the plan."""
        m = re.match(r"^(\d+)-", self.folder.name)
        return int(m.group(1)) if m else 999


def load_stage(folder: Path) -> StageMeta:
    """Read and check one stage folder's stage.yaml."""
    meta_file = folder / "stage.yaml"
    try:
        raw = yaml.safe_load(meta_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"{meta_file}: cannot read stage metadata: {exc}", "fix the file") from None
    unknown = set(raw) - _META_KEYS
    if unknown:
        raise BadInput(f"{meta_file}: {sorted(unknown)[0]}: unknown key", f"one of {sorted(_META_KEYS)}")
    if raw.get("runs", "target") not in ("host", "target"):
        raise BadInput(f"{meta_file}: runs: must be host or target", "host: native tools; target: the image's arch")
    options = tuple(raw.get("options") or ())
    for key in options:
        if key not in SETTINGS_BY_KEY:
            raise BadInput(f"{meta_file}: options: {key!r} is not a profile key", "see `maculaos-sdk profile keys`")
    context = tuple(raw.get("context") or ())
    for name in context:
        if name not in CONTEXT_SOURCES:
            raise BadInput(f"{meta_file}: context: unknown source {name!r}", f"one of {', '.join(CONTEXT_SOURCES)}")
    if not (folder / "Dockerfile.j2").is_file():
        raise BadInput(f"{folder}: stage has no Dockerfile.j2", "every stage folder needs a template")
    return StageMeta(
        name=str(raw.get("name", folder.name)),
        folder=folder,
        description=str(raw.get("description", "")),
        inputs=tuple(raw.get("inputs") or ()),
        arches=tuple(raw.get("arches") or ("amd64", "arm64")),
        context=context,
        exports=dict(raw.get("exports") or {}),
        provides=raw.get("provides"),
        tag=raw.get("tag"),
        bootstrap=bool(raw.get("bootstrap", False)),
        runs_on_host=raw.get("runs", "target") == "host",
        options=options,
    )


def load_stages(root: Path | None = None) -> dict[str, StageMeta]:
    """All stages under stages/, keyed by name."""
    root = root or stages_dir()
    stages: dict[str, StageMeta] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "stage.yaml").is_file()):
        meta = load_stage(folder)
        if meta.name in stages:
            raise BadInput(f"{folder}: stage name {meta.name!r} already used by {stages[meta.name].folder}",
                           "stage names must be unique")
        stages[meta.name] = meta
    for meta in stages.values():
        for dep in meta.inputs:
            if dep.removesuffix("@host") not in stages:
                raise BadInput(f"{meta.folder}/stage.yaml: inputs: unknown stage {dep!r}",
                               f"known stages: {', '.join(stages)}")
    return stages


def reference_markdown() -> str:
    """A markdown table of all profile settings and the stages reading each, generated so the docs cannot drift
    from the code."""
    readers: dict[str, list[str]] = {}
    for meta in load_stages().values():
        for key in meta.options:
            readers.setdefault(key, []).append(meta.name)
    rows = ["| key | kind | default | meaning | stages reading it |", "| --- | --- | --- | --- | --- |"]
    rows += [reference_row(s, repr(s.default), ", ".join(readers.get(s.key, []))) for s in SETTINGS]
    return "\n".join(rows) + "\n"


def graph_markdown() -> str:
    """The stage graph as a markdown table, from the stage.yaml files (README's "Stage graph", `make docs`)."""
    stages = load_stages()
    rows = ["| stage | reads | gives | what |", "| --- | --- | --- | --- |"]
    for meta in sorted(stages.values(), key=lambda m: m.order):
        reads = ", ".join(dep.replace("@host", " (host arch)") for dep in meta.inputs) or "-"
        gives = meta.provides and f"output `{meta.provides}`" or "-"
        rows.append(f"| `{meta.folder.name}` | {reads} | {gives} | {meta.description} |")
    return "\n".join(rows) + "\n"
