"""YAML input read as an attacker might write it: the SDK's profiles and the node config both come through here.

Before anything is built from the text: a size cap, then PyYAML's event stream is walked and stopped at the first
nesting deeper than MAX_DEPTH, alias beyond MAX_ALIASES or node beyond MAX_NODES (a "billion laughs" file never
expands); then a key given twice in one mapping is named with both lines (PyYAML keeps the last one silently).
Only then is the data constructed, with the safe loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 16  # each may name a whole subtree: a few, or a small file expands into millions of items
MAX_NODES = 100_000


@dataclass
class Refused(Exception):
    """Why the text was not read: line (1-based), key path ('' for the whole file), message, hint."""

    line: int
    key: str
    message: str
    hint: str


def _scan(text: str) -> None:
    depth = aliases = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else 1
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused(line, "", f"nested deeper than {MAX_DEPTH} levels", "flatten the file")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise Refused(line, "", f"more than {MAX_ALIASES} aliases (*name)", "write the values out")
        nodes += 1
        if nodes > MAX_NODES:
            raise Refused(line, "", f"more than {MAX_NODES} YAML nodes", "this is not a profile or a node config")


def _duplicates(node: Any, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            path = f"{prefix}.{name}" if prefix else name
            line = key.start_mark.line + 1
            if name in seen:
                raise Refused(line, path, f"given twice (lines {seen[name]} and {line})", "keep one of them")
            seen[name] = line
            _duplicates(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{prefix}[{i}]")


def read_text(path: Path) -> str:
    """The file's text, read no further than the size cap (a huge file is refused, not loaded into memory)."""
    with path.open("rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise Refused(1, "", f"larger than {MAX_BYTES // 1024} KiB", "a profile or node config is a few KiB")
    return raw.decode("utf-8")


def read(text: str) -> tuple[Any, Any]:
    """(data, composed node) of a YAML document, or Refused. yaml.YAMLError passes through (a syntax error)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise Refused(1, "", f"larger than {MAX_BYTES // 1024} KiB", "a profile or node config is a few KiB")
    _scan(text)
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    _duplicates(node)
    if node is None:
        return None, None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node), node
    finally:
        loader.dispose()
