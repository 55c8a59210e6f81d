"""The one schema engine for MaculaOS's YAML inputs: the SDK's profiles and the node config.

A schema is a table of `Field`s (dotted key, kind, default, help, choices, full-match pattern). The engine
gives, from that table alone: defaults, the sections that hold further keys, and `check`, which walks a
mapping and reports every unknown key, wrong kind, unknown choice and value not matching its pattern as a
`Problem` naming the file, line, key path and a hint. Rules that only one input has (profile package names,
SSH key lines) are a `rule` passed to `check`. Standard library only: the device imports it too.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STR, INT, BOOL, LIST, MAP, STR_MAP = ("string", "integer", "boolean", "list of strings", "mapping",
                                      "mapping of strings")


@dataclass(frozen=True)
class Field:
    """One key of a schema: dotted path, kind, default, meaning, allowed values."""

    key: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # every value (each item of a list) must match it whole
    nullable: bool = True  # null resets the key to its default (False: null is an error)
    secret: bool = False  # its value is never echoed in a problem (a passphrase, a token)

    def shown(self, value: Any) -> str:
        """The value as a problem message may show it."""
        return "(not shown: a secret)" if self.secret else repr(value)


@dataclass(frozen=True)
class Problem:
    """One mistake in an input: where, which key, what, and a hint."""

    where: str
    line: int
    key: str
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.key}: {self.message} (hint: {self.hint})"


Add = Callable[..., None]  # add(message, hint, key=...): record a problem at the key being checked
Rule = Callable[[Field, Any, Add], None]  # extra checks of one value whose kind is right


class Schema:
    """A table of fields and what follows from it: defaults, sections, validation."""

    def __init__(self, fields: tuple[Field, ...], reference_hint: str, list_removals: bool = False) -> None:
        self.fields = fields
        self.by_key = {f.key: f for f in fields}
        # mapping keys that hold further keys (as opposed to free-form mapping values)
        self.sections = frozenset(".".join(f.key.split(".")[:i]) for f in fields
                                  for i in range(1, f.key.count(".") + 1))
        self.reference_hint = reference_hint  # where an unknown key's hint sends the reader
        self.list_removals = list_removals  # list items may be `-x` (remove an inherited x)

    def defaults(self) -> dict[str, Any]:
        """The nested mapping of every field's default."""
        out: dict[str, Any] = {}
        for f in self.fields:
            set_key(out, f.key, copy.deepcopy(f.default))
        return out

    def check(self, data: Any, where: str, lines: dict[str, int] | None = None, prefix: str = "",
              rule: Rule | None = None) -> list[Problem]:
        """Every problem in one mapping (empty: valid). `prefix` names where the mapping sits inside a bigger
        file (a profile's `config:`), for key paths and line numbers; `rule` adds checks of its own."""
        lines = lines or {}
        if data is None:
            return []
        if not isinstance(data, dict):
            key = prefix.rstrip(".") or "(top level)"
            return [Problem(where, lines.get(key, 1), key, "must be a YAML mapping", "write `key: value` lines")]
        problems: list[Problem] = []
        self._walk(data, "", where, lines, prefix, rule, problems)
        return problems

    def _walk(self, node: dict[str, Any], parent: str, where: str, lines: dict[str, int], prefix: str,
              rule: Rule | None, problems: list[Problem]) -> None:
        for k, v in node.items():
            key = f"{parent}.{k}" if parent else str(k)
            line = _nearest_line(lines, prefix + key)

            def add(message: str, hint: str, key: str = key, line: int = line) -> None:
                problems.append(Problem(where, line, prefix + key, message, hint))

            spec = self.by_key.get(key)
            if spec is None:
                if key in self.sections and isinstance(v, dict):
                    self._walk(v, key, where, lines, prefix, rule, problems)
                elif key in self.sections:
                    add(f"must be a mapping, got {type(v).__name__}", f"put keys below `{k}:`")
                else:
                    add("unknown key", suggest(key, list(self.by_key) + sorted(self.sections)) or self.reference_hint)
            elif v is None:
                if not spec.nullable:
                    add(f"expected a {spec.kind}, got null", f"e.g. {json.dumps(spec.default)}")
            elif not kind_ok(spec.kind, v):
                hint = 'quote it, e.g. "1.2"' if spec.kind == STR and isinstance(v, int | float) else (
                    f"e.g. {json.dumps(spec.default)}")
                add(f"expected a {spec.kind}, got {type(v).__name__} {spec.shown(v)}", hint)
            else:
                self._check_values(spec, v, add)
                if rule:
                    rule(spec, v, add)

    def _check_values(self, spec: Field, value: Any, add: Add) -> None:
        """Choices and pattern, for a value or each item of a list."""
        items = value if spec.kind == LIST else [value]
        for i, item in enumerate(items):
            if self.list_removals and spec.kind == LIST and item.startswith("-"):
                item = item[1:]
            at = {"key": f"{spec.key}[{i}]"} if spec.kind == LIST else {}
            if spec.choices and item not in spec.choices:
                add(f"unknown value {spec.shown(item)}",
                    "" if spec.secret else suggest(item, list(spec.choices)) or f"one of {', '.join(spec.choices)}")
            elif spec.pattern and not re.fullmatch(spec.pattern, str(item)) and not _unset(spec, item):
                add(f"invalid value {spec.shown(item)}", f"must match {spec.pattern}", **at)


def _unset(spec: Field, value: Any) -> bool:
    """An empty string where the default is empty: "unset", as the references say (wifi.country: "")."""
    return spec.kind == STR and value == spec.default == ""


def _nearest_line(lines: dict[str, int], key: str) -> int:
    """The line of `key`, else of the nearest enclosing key that has one, else 1."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in lines:
            return lines[".".join(parts[:n])]
    return 1


def kind_ok(kind: str, value: Any) -> bool:
    if kind == STR:
        return isinstance(value, str)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == STR_MAP:
        return isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values())
    return kind == MAP and isinstance(value, dict)


def key_lines(node: Any, prefix: str = "", stop: frozenset[str] = frozenset()) -> dict[str, int]:
    """Every dotted key path of a composed YAML mapping (`yaml.compose`) -> its 1-based line; keys in `stop`
    get a line but their contents are not walked (free-form mappings whose keys hold dots)."""
    lines: dict[str, int] = {}
    if type(node).__name__ == "MappingNode":
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            lines[path] = k.start_mark.line + 1
            if path not in stop:
                lines.update(key_lines(v, path, stop))
    return lines


def suggest(word: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def get_key(data: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        data = data[p]
    return data


def reference_row(f: Field, default: str, *extra: str) -> str:
    """One markdown table row documenting a field (the references are generated, so they cannot drift)."""
    notes = f" One of: {', '.join(f.choices)}." if f.choices else ""
    if f.pattern:
        notes += f" Must match{' each' if f.kind == LIST else ''} `{f.pattern}`.".replace("|", "\\|")
    return " | ".join([f"| `{f.key}`", f.kind, f"`{default}`", f.help + notes, *extra]) + " |"
