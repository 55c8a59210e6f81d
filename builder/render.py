"""Render a stage: its Dockerfile template and build context, and the content hash that is its id."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from maculaos_device import bootenv, encryption, layout, manifest, paths

from .arch import Architecture
from .boards import BootFlow
from .bootstrap import DPKG_OPTIONS
from .contexts import CONTEXT_SOURCES, ContextInputs
from .errors import BadInput
from .plan import BOOT_PACKAGES, HOST, INITRD_MODULES, BuildPlan, PlannedStage
from .profile import Profile
from .stages import StageMeta

ID_SCHEMA = 1  # bump to invalidate every cached stage when the id recipe itself changes
IMAGE_REPO = "maculaos-sdk"
# The profile layer (overlay files, node files: stage layer) rides in the initrd, so in RAM: big files belong in
# the squashfs as pinned artifacts or packages.
LAYER_MAX_KIB = 16 * 1024


@dataclass(frozen=True)
class RenderedStage:
    """A stage ready to build: its context folder (holding the Dockerfile) and its content id."""

    planned: PlannedStage
    context: Path
    dockerfile: str
    stage_id: str
    id_inputs: dict[str, Any] = field(default_factory=dict, compare=False)  # what the id was hashed from

    @property
    def meta(self) -> StageMeta:
        return self.planned.meta

    @property
    def key(self) -> str:
        return self.planned.key

    @property
    def label(self) -> str:
        """Folder-style name for logs and dry-run output: `00-base`, `00-base@host`."""
        return self.meta.folder.name + (HOST if self.key.endswith(HOST) else "")

    @property
    def platform(self) -> str | None:
        """The docker platform the build asks for. Only the base needs one (its image starts from a tarball, or
        from a multi-arch base_image); every other stage starts FROM images that carry their arch, and asking
        would make docker refuse a COPY from a native step of the same Dockerfile (the rootfs's)."""
        arch = self.planned.arch
        return arch.docker_platform if self.meta.bootstrap and not arch.is_native else None

    @property
    def emulated(self) -> bool:
        """Whether its build runs the image's own programs under qemu-user (it reads the foreign base)."""
        arch = self.planned.arch
        return not arch.is_native and (self.meta.bootstrap or any(key == "base" for _, key in self.planned.inputs))

    @property
    def image(self) -> str:
        """The docker tag this stage's result lives under; present means cached."""
        return f"{IMAGE_REPO}/{self.meta.name}:{self.stage_id[:32]}"


def kernel_cmdline(profile: Profile) -> str:
    """Kernel arguments shared by every boot entry (mode excluded)."""
    consoles = f"console=tty1 console={profile.board.serial_console(profile.arch)},115200"
    # MBR cards (the Pi's): the initrd finds the slots by number on the disk with this signature.
    mbr = [f"macula.mbr={layout.MBR_DISK_ID}"] if profile.board.boot_flow(profile.arch) is BootFlow.rpi_firmware else []
    return " ".join([consoles, *mbr, *profile.settings.kernel.args])


def declared_view(profile: Profile, options: tuple[str, ...]) -> dict[str, Any]:
    """The profile as a stage's templates see it: only the keys its stage.yaml declares under `options`,
    nested as in the profile (`disk.slot_mb` -> profile.disk.slot_mb); reading any other is an error."""
    view: dict[str, Any] = {}
    for key in options:
        *parents, leaf = key.split(".")
        node = view
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = profile.get(key)
    return view


def template_vars(profile: Profile, arch: Architecture, input_images: dict[str, str], sde: int,
                  options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything a stage template may use; anything else is an error (StrictUndefined)."""
    package = profile.settings.kernel.package
    board = profile.board
    return {
        "profile": declared_view(profile, options),
        "arch": arch,
        "host_arch": Architecture.host(),
        "board": board,
        "serial_console": board.serial_console(arch) if arch in board.boot else arch.serial_console,
        "inputs": input_images,
        "sde": sde,
        "kernel_package": arch.kernel_package if package == "auto" else package,
        "initrd_modules": list(dict.fromkeys([*INITRD_MODULES[arch.value], *board.initrd_modules,
                                              *profile.settings.kernel.modules])),
        "boot_packages": [*BOOT_PACKAGES, *board.packages],
        "cmdline": kernel_cmdline(profile),
        "layout": layout,
        "paths": paths,  # on-device paths (maculaos_device.paths)
        "encryption": encryption,  # the data partition's LUKS2 facts (maculaos_device.encryption)
        "max_tries": bootenv.MAX_TRIES,  # GRUB's try ladder (55-bootloader/grub.cfg)
        "bundle_chunk_bytes": manifest.CHUNK_BYTES,
        "layer_max_kib": LAYER_MAX_KIB,
    }


def _env(folder: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(folder), str(folder.parent / "_shared")]),  # _shared: includes
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _render_file(env: jinja2.Environment, rel: str, variables: dict[str, Any], where: Path) -> str:
    try:
        return env.get_template(rel).render(**variables)
    except jinja2.UndefinedError as exc:
        raise BadInput(f"{where}: template uses an undefined value: {exc.message}",
                       "a profile key must be listed under `options:` in the stage's stage.yaml") from None
    except jinja2.TemplateError as exc:
        raise BadInput(f"{where}: template error: {exc}", "fix the template") from None


def tree_entries(root: Path) -> dict[str, str]:
    """Each entry of a folder as the stage id sees it: type, permission bits and content digest (not
    mtimes), in the order `tree_digest` hashes them. `build-image --explain` diffs two of these."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = f"L {os.readlink(path)}"
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = f"D {st.st_mode & 0o7777:o}"
            else:
                with path.open("rb") as f:
                    entries[rel] = f"F {st.st_mode & 0o7777:o} {hashlib.file_digest(f, 'sha256').hexdigest()}"
    return entries


def tree_digest(root: Path, entries: dict[str, str] | None = None) -> str:
    """Hash of a folder's names, types, permission bits and contents (not mtimes), sorted."""
    h = hashlib.sha256()
    for rel, entry in (tree_entries(root) if entries is None else entries).items():
        kind, rest = entry.split(" ", 1)
        if kind == "F":
            mode, digest = rest.split(" ")
            h.update(f"F {rel} {mode} ".encode() + bytes.fromhex(digest) + b"\n")
        else:
            h.update(f"{kind} {rel} {rest}\n".encode())
    return h.hexdigest()


def bootstrap_params(profile: Profile, arch: Architecture, sde: int) -> dict[str, Any]:
    """What the mmdebstrap base depends on; part of the base stage id."""
    deb = profile.settings.debian
    suite, mirror, components = deb.suite, deb.mirror, " ".join(deb.components)
    security = mirror.replace("/debian", "/debian-security")
    # The base already holds -updates and -security, as the apt sources of every later stage do: otherwise
    # the rootfs stage upgrades libc, ca-certificates and others again, which costs minutes under emulation.
    return {"suite": suite, "mirror": mirror, "components": list(deb.components),
            "sources": [f"deb {mirror} {suite} {components}", f"deb {mirror} {suite}-updates {components}",
                        f"deb {security} {suite}-security {components}"],
            "arch": arch.value, "variant": "minbase", "sde": sde, "dpkg_options": DPKG_OPTIONS,
            # apt reaches an https mirror only with the CA bundle; over http the rootfs stage installs it (and
            # makes the bundle natively: under emulation ca-certificates alone took 124 s of a 324 s bootstrap)
            "include": ["ca-certificates"] if mirror.startswith("https:") else []}


def render_stage(planned: PlannedStage, plan: BuildPlan, inputs: dict[str, RenderedStage], workdir: Path,
                 update_public_key: str = "", extra_files: dict[str, Path] | None = None) -> RenderedStage:
    """Render the stage into `workdir/<key>` (recreated) and compute its id."""
    meta, profile, sde, arch = planned.meta, plan.profile, plan.sde, planned.arch
    context = workdir / planned.key
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    variables = template_vars(profile, arch, {n: r.image for n, r in inputs.items()}, sde, meta.options)
    env = _env(meta.folder)
    for src in sorted(meta.folder.rglob("*")):
        rel = src.relative_to(meta.folder).as_posix()
        if src.is_dir() or rel == "stage.yaml":
            continue
        out = context / (rel[:-3] if rel.endswith(".j2") else rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".j2"):
            out.write_text(_render_file(env, rel, variables, src))
        else:
            shutil.copy2(src, out)
    sources = ContextInputs(profile, update_public_key, extra_files or {})
    for source in meta.context:  # names checked against the registry when the stage was loaded
        CONTEXT_SOURCES[source].write(sources, context)
    if meta.bootstrap and not profile.settings.base_image:
        (context / "bootstrap.json").write_text(json.dumps(bootstrap_params(profile, arch, sde), sort_keys=True))
    dockerfile = (context / "Dockerfile").read_text()
    files = tree_entries(context)
    key = {
        "schema": ID_SCHEMA,
        "stage": meta.name,
        "context": tree_digest(context, files),
        "inputs": {n: r.stage_id for n, r in sorted(inputs.items())},
        "arch": arch.value,
        "sde": sde,
    }
    stage_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    # for --explain: the Dockerfile apart from the parent image tags it names (those are "inputs")
    own = dockerfile
    for n, r in inputs.items():
        own = own.replace(r.image, f"<{n}>")
    files["Dockerfile"] = "F own " + hashlib.sha256(own.encode()).hexdigest()
    return RenderedStage(planned=planned, context=context, dockerfile=dockerfile, stage_id=stage_id,
                         id_inputs={**key, "files": files})


def render_plan(plan: BuildPlan, workdir: Path, update_public_key: str = "",
                extra_files: dict[str, Path] | None = None) -> list[RenderedStage]:
    """Render every stage in plan order; each id folds in its inputs' ids."""
    done: dict[str, RenderedStage] = {}
    for planned in plan.stages:
        inputs = {name: done[key] for name, key in planned.inputs}
        done[planned.key] = render_stage(planned, plan, inputs, workdir, update_public_key, extra_files)
    return list(done.values())
