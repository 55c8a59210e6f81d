"""The resolved profile as typed, frozen values: what the SDK's code reads (`profile.settings.kernel.args`),
instead of dotted strings into a dict. The settings table (settings.py) stays the one place that says which
keys exist, their defaults, patterns and docs; these classes give each key its type, and a unit test keeps
the two the same key for key."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .arch import Architecture
from .boards import BOARDS, Board


@dataclass(frozen=True)
class Debian:
    suite: str
    mirror: str
    components: tuple[str, ...]


@dataclass(frozen=True)
class Kernel:
    package: str
    args: tuple[str, ...]
    modules: tuple[str, ...]
    prune: tuple[str, ...]


@dataclass(frozen=True)
class Squashfs:
    compression: str
    level: int


@dataclass(frozen=True)
class Console:
    autologin: bool
    grub_password: str
    recovery_password: str


@dataclass(frozen=True)
class Iso:
    volume_id: str
    timeout: int


@dataclass(frozen=True)
class Disk:
    esp_mb: int
    slot_mb: int
    data_mb: int
    size_mb: int


@dataclass(frozen=True)
class Update:
    min_version: str
    signing_key: str


@dataclass(frozen=True)
class Install:
    config: str


@dataclass(frozen=True)
class Size:
    iso_max_mb: int


@dataclass(frozen=True)
class ProfileSettings:
    """Every setting of a merged, validated profile (`extends` and `base` are resolved away by then)."""

    name: str
    version: str
    description: str
    arch: Architecture
    board: Board
    outputs: tuple[str, ...]
    source_date_epoch: int
    base_image: str | None
    packages: tuple[str, ...]
    services: tuple[str, ...]
    overlay: Mapping[str, Any]
    images: tuple[str, ...]
    firstboot: tuple[str, ...]
    config: Mapping[str, Any]
    artifacts: tuple[str, ...]
    debian: Debian
    kernel: Kernel
    squashfs: Squashfs
    console: Console
    iso: Iso
    disk: Disk
    update: Update
    install: Install
    size: Size

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ProfileSettings:
        return _build(cls, data)


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    """An instance of dataclass `cls` from the mapping's values, each converted to its field's type."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)})


def _convert(kind: Any, value: Any) -> Any:
    if kind is Architecture:
        return Architecture(value)
    if kind is Board:  # a dataclass too: the table's entry, not built from the profile
        return BOARDS[value]
    if _is_section(kind):
        return _build(kind, value)
    if typing.get_origin(kind) is tuple:
        return tuple(value)
    if typing.get_origin(kind) is Mapping:
        return types.MappingProxyType(dict(value))
    return value


def _is_section(kind: Any) -> bool:
    return dataclasses.is_dataclass(kind) and isinstance(kind, type) and kind.__module__ == __name__


def leaf_keys(cls: type = ProfileSettings, prefix: str = "") -> list[str]:
    """The dotted keys these classes hold (`kernel.args`), to hold against the settings table."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys
