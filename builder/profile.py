"""Load a YAML profile (following `extends:`), merge it over the defaults and validate it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from maculaos_device import encryption, layout, nodeconfig, yamlinput
from maculaos_device.schema import Add, Field, Problem, key_lines, set_key, suggest

from .arch import Architecture
from .boards import BOARDS, Board, board_problem
from .errors import BadInput, BadInputs
from .paths import profiles_dir
from .profile_settings import ProfileSettings
from .settings import SCHEMA, SETTINGS_BY_KEY

Origin = tuple[str, int]  # (file, line)


@dataclass(frozen=True)
class Profile:
    """A fully resolved profile: merged data plus where each value came from."""

    data: dict[str, Any]  # as merged (what `profile show` prints and stage templates see, key by key)
    origins: dict[str, Origin]
    files: tuple[Path, ...]
    settings: ProfileSettings  # the same values, typed: what the SDK's code reads
    overlay_sources: dict[str, Path] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        """Value of a dotted setting key, e.g. `kernel.args` (for code driven by key names, like a stage's
        declared options; everything else reads `settings`)."""
        node: Any = self.data
        for part in key.split("."):
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return self.settings.version

    @property
    def arch(self) -> Architecture:
        return self.settings.arch

    @property
    def board(self) -> Board:
        return self.settings.board

    def artifact_basename(self) -> str:
        """`maculaos-<profile>-<version>-<arch>[-<board>]`, the stem of every output file."""
        return f"maculaos-{self.name}-{self.version}-{self.arch}{self.board.suffix()}"


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        text = yamlinput.read_text(path)
        data, node = yamlinput.read(text)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read profile: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})",
                       "save the profile as UTF-8") from None
    except yamlinput.Refused as exc:
        raise BadInput(f"{path}:{exc.line}: {exc.key + ': ' if exc.key else ''}{exc.message}", exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{path}{where}: invalid YAML: {problem}", "fix the YAML syntax") from None
    if data is None:
        raise BadInput(f"{path}:1: the profile is empty", "start with `name: ...` and `extends: core`")
    if not isinstance(data, dict):
        raise BadInput(f"{path}:1: a profile must be a YAML mapping", "start with `name: ...`")
    return data, (key_lines(node, stop=frozenset({"overlay"})) if node is not None else {})


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Split a profile mapping into (dotted key, value) pairs at setting granularity."""
    items: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if not prefix and key in SCHEMA.sections and isinstance(v, dict):
            items.extend(_flatten(v, key))
        else:
            items.append((key, v))
    return items


# Kernel module folders the firewall is made of: no profile may prune them.
NETFILTER = ("net/netfilter", "net/ipv4/netfilter", "net/ipv6/netfilter")


def validate_layer(path: Path, data: dict[str, Any], lines: dict[str, int]) -> list[BadInput]:
    """Check one profile file's keys and value types; return every problem found."""
    nested: list[BadInput] = []

    def files_and_config(spec: Field, value: Any, add: Add) -> None:
        """What the schema cannot say: overlay sources, the install config and the default node config."""
        if spec.key == "overlay":
            nested.extend(_validate_overlay(path, value, lines))
        elif spec.key == "install.config" and value:
            source = (path.parent / value).resolve()
            if not source.is_relative_to(path.parent.resolve()):
                add(f"{value!r} is outside the profile's folder", f"keep the install config under {path.parent}")
            elif not source.is_file():
                add(f"missing file {value!r}", f"paths are relative to {path.parent}")
            else:
                problems = nodeconfig.validate_files([source])
                nested.extend(config_errors(problems))
                if not problems:  # valid YAML: read once more for what the schema cannot say
                    config, node = yamlinput.read(yamlinput.read_text(source))
                    nested.extend(_secrets_in(config, str(source), "", key_lines(node) if node else {}))
        elif spec.key == "config":
            nested.extend(config_errors(nodeconfig.check(value, str(path), lines, prefix="config.")))
            nested.extend(_secrets_in(value, str(path), "config.", lines))
        elif spec.key == "kernel.prune":
            for i, folder in enumerate(value):
                kept = [nf for nf in NETFILTER if f"{nf}/".startswith(f"{folder.lstrip('-').strip('/')}/")]
                if kept and not folder.startswith("-"):
                    add(f"{folder!r} holds {kept[0]}: the firewall needs it (without it the node fails closed and "
                        "never brings its network up)", "prune folders below it instead (e.g. net/netfilter/ipvs)",
                        key=f"kernel.prune[{i}]")

    return config_errors(SCHEMA.check(data, str(path), lines, rule=files_and_config)) + nested


def _secrets_in(config: Any, where: str, prefix: str, lines: dict[str, int]) -> list[BadInput]:
    """A node config built into an image (the profile's `config:`, the ISO's install config) may not hold what
    must never be stored (the data partition's passphrase): anyone with the image would have it."""
    if not isinstance(config, dict):
        return []
    return [BadInput(f"{where}:{lines.get(prefix + key, 1)}: {prefix}{key}: a secret in an image",
                     "leave it out: `maculaos install` asks for it on its terminal, or give it in the config of "
                     "`maculaos install --config`") for key in encryption.secrets_in(config)]


def config_errors(problems: list[Problem]) -> list[BadInput]:
    """Schema problems (profile or node config) as the one-line errors the CLI prints."""
    return [BadInput(f"{p.where}:{p.line}: {p.key}: {p.message}", p.hint) for p in problems]


def _validate_overlay(path: Path, overlay: dict[str, Any], lines: dict[str, int]) -> list[BadInput]:
    errors: list[BadInput] = []
    line = lines.get("overlay", 1)
    for dest, spec in overlay.items():
        where = f"{path}:{line}: overlay.{dest}"
        if not isinstance(dest, str) or not dest.startswith("/") or ".." in dest.split("/"):
            errors.append(BadInput(f"{where}: destination must be an absolute path", "e.g. /etc/motd"))
            continue
        if spec is None or isinstance(spec, str):
            continue
        if not isinstance(spec, dict) or not ({"source", "content"} & spec.keys()):
            errors.append(BadInput(f"{where}: expected text or a mapping with `source` or `content`",
                                   "e.g. {source: files/motd, mode: '0644'}"))
            continue
        unknown = set(spec) - {"source", "content", "mode"}
        if unknown:
            errors.append(BadInput(f"{where}.{sorted(unknown)[0]}: unknown key", "use source, content or mode"))
        if "mode" in spec and not re.match(r"^0?[0-7]{3,4}$", str(spec["mode"])):
            errors.append(BadInput(f"{where}.mode: invalid mode {spec['mode']!r}", "quote an octal mode: '0755'"))
        if "source" in spec:
            source = (path.parent / str(spec["source"])).resolve()
            if not source.is_relative_to(path.parent.resolve()):
                errors.append(BadInput(f"{where}.source: {spec['source']!r} is outside the profile's folder",
                                       f"keep overlay files under {path.parent}"))
            elif not source.exists():
                errors.append(BadInput(f"{where}.source: missing file {spec['source']!r}",
                                       f"paths are relative to {path.parent}"))
    return errors


def _merge(base: Any, over: Any) -> Any:
    """Deep-merge `over` onto `base`: maps merge, lists append ('-x' removes x), null removes."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v)
            else:
                out[k] = v
        return out
    if isinstance(base, list) and isinstance(over, list):
        removed = {v[1:] for v in over if isinstance(v, str) and v.startswith("-")}
        kept = [v for v in base if v not in removed]
        return kept + [v for v in over if not (isinstance(v, str) and v.startswith("-")) and v not in kept]
    return over


def resolve_profile_path(ref: str, relative_to: Path | None = None) -> Path:
    """Turn a profile name (`core`) or a path into a file path."""
    candidates = []
    as_path = Path(ref)
    if relative_to is not None and not as_path.is_absolute():
        candidates.append(relative_to / ref)
        candidates.append(relative_to / f"{ref}.yaml")
    candidates += [as_path, profiles_dir() / f"{ref}.yaml", profiles_dir() / ref]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
    raise BadInput(f"profile {ref!r} not found", suggest(ref, known) or f"known profiles: {', '.join(known)}")


Layer = tuple[Path, dict[str, Any], dict[str, int]]  # one profile file: path, its mapping, key -> line


def load_profile(ref: str, overrides: dict[str, Any] | None = None) -> Profile:
    """Load, merge and validate a profile; `overrides` (e.g. from CLI flags) win over every file."""
    chain = _read_chain(ref)
    errors = [_reached(e, chain[:i]) for i, (path, data, lines) in enumerate(chain)
              for e in validate_layer(path, data, lines)]
    if errors:
        raise BadInputs(errors)
    merged, origins, overlay_sources = _merge_chain(chain)
    _apply_overrides(merged, origins, overrides or {})
    merged.pop("extends", None)
    merged.pop("base", None)
    _name_from_file(chain[0], merged, origins)
    _check_board(merged, origins, chain[0][0])
    return Profile(data=merged, origins=origins, files=tuple(p for p, _, _ in chain),
                   settings=ProfileSettings.from_data(merged), overlay_sources=overlay_sources)


def _reached(problem: BadInput, children: list[Layer]) -> BadInput:
    """A problem in a file some other profile extends (or is based on), with the chain that led to it."""
    if not children:
        return problem
    steps = [f"{p}:{lines.get('base' if 'base' in data else 'extends', 1)} "
             f"({'base' if 'base' in data else 'extends'})" for p, data, lines in children]
    problem.message = f"{problem.message} (reached through {' -> '.join(steps)})"
    return problem


def _read_chain(ref: str) -> list[Layer]:
    """The profile file and every file it extends (or is based on), child first."""
    chain: list[Layer] = []
    path: Path | None = resolve_profile_path(ref)
    seen: set[Path] = set()
    while path is not None:
        if path in seen:
            raise BadInput(f"{path}: extends: cycle through {path.name}", "remove one of the `extends:` lines")
        seen.add(path)
        try:
            data, lines = _read_yaml(path)
        except BadInput as exc:
            raise _reached(exc, chain) from None
        chain.append((path, data, lines))
        parent = data.get("extends")
        if parent is not None and not isinstance(parent, str):
            raise BadInput(f"{path}:{lines.get('extends', 1)}: extends: expected a profile name", "e.g. core")
        base = data.get("base")
        if isinstance(base, str) and base:
            if parent:
                raise BadInput(f"{path}:{lines.get('base', 1)}: base: a file has either `base` or `extends`",
                               "keep one of them")
            parent, _, base_version = base.partition(":")
            if base_version and "version" not in data:
                data["version"] = base_version
                lines.setdefault("version", lines.get("base", 1))
        try:
            path = resolve_profile_path(parent, path.parent) if parent else None
        except BadInput as exc:
            key = "base" if "base" in data else "extends"
            raise BadInput(f"{chain[-1][0]}:{lines.get(key, 1)}: {key}: {exc.message}", exc.hint) from None
    return chain


def _merge_chain(chain: list[Layer]) -> tuple[dict[str, Any], dict[str, Origin], dict[str, Path]]:
    """The defaults with every file merged over them, parent first; where each key was set; overlay sources."""
    merged: dict[str, Any] = SCHEMA.defaults()
    origins: dict[str, Origin] = {}
    overlay_sources: dict[str, Path] = {}
    for p, data, lines in reversed(chain):
        merged = _merge(merged, data)
        for key, value in _flatten(data):
            origins[key] = (str(p), lines.get(key, 1))
            if key == "overlay" and isinstance(value, dict):
                for dest, spec in value.items():
                    if isinstance(spec, dict) and "source" in spec:
                        overlay_sources[dest] = (p.parent / str(spec["source"])).resolve()
    return merged, origins, overlay_sources


def _apply_overrides(merged: dict[str, Any], origins: dict[str, Origin], overrides: dict[str, Any]) -> None:
    """Command-line values (`--arch`, `--board`) over the files, checked against the setting's choices."""
    for key, value in overrides.items():
        if value is None:
            continue
        setting = SETTINGS_BY_KEY[key]
        for item in value if isinstance(value, list) else [value]:  # a list (--outputs): each of its items
            if setting.choices and item not in setting.choices:
                raise BadInput(f"command line: --{key.split('.')[-1]}: unknown value {item!r}",
                               f"one of: {', '.join(setting.choices)}")
        set_key(merged, key, value)
        origins[key] = ("command line", 0)


def _name_from_file(top: Layer, merged: dict[str, Any], origins: dict[str, Origin]) -> None:
    """A custom image file names its image: maculaos-custom.yaml -> maculaos-custom-<version>-<arch>.iso"""
    path, data, _ = top
    if "name" in data or (merged.get("name") and not data.get("base")):
        return
    derived = re.sub(r"^maculaos-", "", path.stem.lower())
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", derived):
        raise BadInput(f"{path}:1: name: missing, and the file name {path.name!r} is not a valid name",
                       "add `name: <image-name>`")
    merged["name"] = derived
    origins["name"] = (str(path), 0)


def _check_board(merged: dict[str, Any], origins: dict[str, Origin], top: Path) -> None:
    """The board can be built for this arch, suite and outputs (--board turns outputs into its own image)."""
    if origins.get("board", ("",))[0] == "command line":
        # --board picks the machine, not what to build: outputs it cannot boot become its own image.
        merged["outputs"] = BOARDS[merged["board"]].translate_outputs(Architecture(merged["arch"]),
                                                                     merged["outputs"])
    problem = board_problem(merged["board"], merged["arch"], merged["outputs"], merged["debian"]["suite"])
    disk = merged["disk"]
    if not problem and {"disk", "sdimage"} & set(merged["outputs"]):
        why = layout.never_fits(disk["esp_mb"], disk["slot_mb"], disk["data_mb"], disk["size_mb"])
        key = "disk.size_mb" if why and "a disk of" in why else "disk.data_mb"
        problem = (key, why, "raise it, or give the disk.* sizes 0 for the defaults") if why else None
    encrypted = ((merged.get("config") or {}).get("storage") or {}).get("encryption") or {}
    if not problem and encrypted.get("enabled") and {"disk", "sdimage"} & set(merged["outputs"]):
        # the first boot of a written image does not make the volume yet: its data partition would stay plain
        problem = ("config.storage.encryption.enabled", "a disk or SD image cannot encrypt its data partition "
                   "yet (its first boot keeps it plain)", "build the iso output: `maculaos install` makes the "
                   "encrypted data partition")
    if problem:
        key, message, hint = problem
        parts = key.split(".")  # a key inside a mapping (config.storage...) is where its mapping came from
        file, line = next((origins[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                           if k in origins), (str(top), 1))
        raise BadInput(f"{file}:{line}: {key}: {message}" if line else f"{file}: --{key}: {message}", hint)
