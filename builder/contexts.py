"""What a stage's `context:` entries put into its build context, declared in one table.

A stage.yaml lists the names it needs (`context: [layout, image-parts]`); `stages.load_stage` refuses a name
that is not in CONTEXT_SOURCES, and `render.render_stage` calls each source's writer with what the build
resolved (`ContextInputs`). A new kind of input is one entry here, its writer beside it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maculaos_device
import yaml
from maculaos_device import encryption, manifest, paths

from . import confined
from .errors import BadInput
from .paths import sdk_root, stages_dir
from .profile import Profile


@dataclass(frozen=True)
class ContextInputs:
    """What the writers read besides the profile: resolved before rendering, part of every stage id through
    the files they write."""

    profile: Profile
    update_public_key: str = ""  # minisign public key, built into the image
    extra_files: dict[str, Path] = field(default_factory=dict)  # image path -> pinned artifact / saved image


Writer = Callable[[ContextInputs, Path], None]  # (inputs, the stage's context folder)


@dataclass(frozen=True)
class ContextSource:
    name: str
    description: str
    write: Writer


def _profile_overlay(inputs: ContextInputs, context: Path) -> None:
    profile, root = inputs.profile, context / "overlay"
    write_profile_overlay(profile, root)
    with confined_writes(profile, "overlay"):
        write_node_files(profile, root)
        if inputs.update_public_key:  # `maculaos upgrade` checks signatures against it: read-only root, not /etc
            confined.write_text(root, _rel(paths.UPDATE_KEY), inputs.update_public_key)


def _pinned_files(inputs: ContextInputs, context: Path) -> None:
    write_pinned_files(context / "pinned", inputs.extra_files)


def _signing_key_id(inputs: ContextInputs, context: Path) -> None:
    (context / "signing-key.id").write_text(manifest.key_id(inputs.update_public_key) + "\n")


# What the image stages run of the device's own code (`python3 -m maculaos_device.<module>`): the disk layout and
# the bundle manifest and slot record writers. Standard library only.
DEVICE_MODULES = ("__init__", "layout", "manifest", "versions")


def _device_modules(inputs: ContextInputs, context: Path) -> None:
    package = Path(str(maculaos_device.__file__)).parent
    (context / maculaos_device.__name__).mkdir()
    for name in DEVICE_MODULES:
        shutil.copyfile(package / f"{name}.py", context / maculaos_device.__name__ / f"{name}.py")


def _image_parts(inputs: ContextInputs, context: Path) -> None:
    shutil.copyfile(stages_dir() / "_shared" / "image-parts.sh", context / "image-parts.sh")


def _install_config(inputs: ContextInputs, context: Path) -> None:
    (context / "install-config").mkdir()
    profile = inputs.profile
    if profile.settings.install.config:  # validated to lie under the profile's folder (profile.validate_layer)
        origin = Path(profile.origins["install.config"][0]).parent
        shutil.copyfile(origin / profile.settings.install.config, context / "install-config" / "config.yaml")


def _sdk_overlay(inputs: ContextInputs, context: Path) -> None:
    shutil.copytree(sdk_root() / "overlay", context / "overlay", symlinks=True, dirs_exist_ok=True)


CONTEXT_SOURCES: dict[str, ContextSource] = {s.name: s for s in (
    ContextSource("overlay", "the SDK's overlay/ folder (mirrors / of the image)", _sdk_overlay),
    ContextSource("profile-overlay", "the profile's overlay entries, the on-device tool, the default node config, "
                  "first-boot commands and the update public key, under overlay/", _profile_overlay),
    ContextSource("pinned-files", "pinned artifacts and preloaded container images, under pinned/", _pinned_files),
    ContextSource("signing-key-id", "signing-key.id: the minisign id of the key that signs bundles",
                  _signing_key_id),
    ContextSource("device-modules", "maculaos_device/: the device's layout, manifest and versions modules (the disk "
                  "layout the installer uses, the one writer of bundle manifests and slot records)", _device_modules),
    ContextSource("image-parts", "image-parts.sh: shell helpers the disk and SD image stages share", _image_parts),
    ContextSource("install-config", "install-config/: the node config the ISO's unattended install uses",
                  _install_config),
)}


def _rel(path: object) -> str:
    """An on-device path (maculaos_device.paths) relative to the root of an image being built."""
    return str(path).lstrip("/")


def write_node_files(profile: Profile, dest_root: Path) -> None:
    """What the device needs besides the overlay: the on-device tool with the modules it shares with the SDK,
    the profile's default config.yaml and its first-boot commands. Written through `confined`: the profile's
    overlay folders came first and may have placed symlinks on these paths."""
    package = Path(str(maculaos_device.__file__)).parent  # `maculaos` and what it shares with the SDK
    lib = f"{_rel(paths.LIB)}/{maculaos_device.__name__}"
    for module in sorted(package.glob("*.py")):
        confined.copy_file(dest_root, f"{lib}/{module.name}", module).chmod(0o644)
    confined.write_text(dest_root, _rel(paths.SHELL_PATHS), paths.shell_file())  # for the OpenRC services
    confined.write_text(dest_root, _rel(paths.ENCRYPTION_SH), encryption.shell_file())  # for luks.sh
    config = profile.settings.config
    if config:
        confined.write_text(dest_root, _rel(paths.DEFAULT_CONFIG), yaml.safe_dump(dict(config), sort_keys=True))
    firstboot = profile.settings.firstboot
    if firstboot:
        confined.write_text(dest_root, _rel(paths.FIRSTBOOT_LIST), "".join(f"{c}\n" for c in firstboot))


def write_pinned_files(dest_root: Path, extra_files: dict[str, Path]) -> None:
    """Pinned artifacts and preloaded images at their paths in the root (hard-linked when possible), and their
    list (paths.PINNED_LIST). The list also keeps the folder from being empty: docker's classic
    builder can fail the step after a COPY that adds nothing ("failed to get layer ...: layer does not exist")."""
    listing = dest_root / _rel(paths.PINNED_LIST)
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{dest}\n" for dest in sorted(extra_files)))
    for dest, source in sorted(extra_files.items()):
        target = dest_root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def write_profile_overlay(profile: Profile, dest_root: Path) -> None:
    """The profile's overlay entries, in path order, confined to `dest_root` (see `confined_writes`)."""
    dest_root.mkdir(parents=True, exist_ok=True)
    for dest, spec in sorted(profile.settings.overlay.items()):
        if spec is None:
            continue
        with confined_writes(profile, f"overlay.{dest}"):
            _write_overlay_entry(profile, dest_root, dest, spec)


def _write_overlay_entry(profile: Profile, dest_root: Path, dest: str, spec: str | dict[str, Any]) -> None:
    if isinstance(spec, str):
        target = confined.write_text(dest_root, dest, spec)
    elif "content" in spec:
        target = confined.write_text(dest_root, dest, str(spec["content"]))
    elif profile.overlay_sources[dest].is_dir():
        target = confined.copy_tree(dest_root, dest, profile.overlay_sources[dest])
    else:
        target = confined.copy_file(dest_root, dest, profile.overlay_sources[dest])
    mode = int(str(spec["mode"]), 8) if isinstance(spec, dict) and "mode" in spec else None
    if mode is not None:  # confined: `target` is the real file or folder just written, never a symlink
        target.chmod(mode)
    elif target.is_file():
        target.chmod(0o644 if not os.access(target, os.X_OK) else 0o755)


@contextmanager
def confined_writes(profile: Profile, key: str) -> Iterator[None]:
    """Overlay folders are copied with their symlinks (they are the image's), so a later entry could name a
    path through one: it is refused, never written on the build host where the link points."""
    file, line = profile.origins.get(key, profile.origins.get("overlay", ("profile", 1)))
    try:
        yield
    except confined.ThroughLink as exc:
        raise BadInput(f"{file}:{line}: {key}: the path goes through {exc} that an earlier overlay entry placed",
                       "an overlay entry cannot be written through a symlink: name the path the link points to"
                       ) from None
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise BadInput(f"{file}:{line}: {key}: {exc}", "two overlay entries disagree on what this path is"
                       ) from None
