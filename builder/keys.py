"""Update-bundle signing keys (minisign, ed25519): generate, locate, sign."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from maculaos_device.manifest import key_id  # noqa: F401  (one parser of key ids, the device's)

from . import ui
from .errors import BadInput, BuildFailed
from .paths import cache_dir


def minisign_binary() -> str:
    path = shutil.which("minisign")
    if path is None:
        raise BuildFailed("minisign is not installed", "run `make setup` (apt-get install minisign)")
    return path


def public_key_path(secret: Path) -> Path:
    """`name.key` -> `name.pub`, the layout `keys generate` writes."""
    return secret.with_suffix(".pub")


def generate(secret: Path, force: bool = False) -> Path:
    """Create an unencrypted key pair `secret` + `secret.pub`; returns the public key path."""
    public = public_key_path(secret)
    if secret.exists() and not force:
        raise BadInput(f"{secret} already exists", "pass --force to replace it (old bundles stop verifying)")
    secret.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([minisign_binary(), "-G", "-W", "-f", "-p", str(public), "-s", str(secret)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildFailed(f"minisign -G failed: {proc.stderr.strip()}")
    secret.chmod(0o600)
    return public


def signing_key(configured: str, override: Path | None = None, create: bool = True) -> Path | None:
    """The secret key to sign bundles with: --signing-key, else the profile's, else a per-checkout dev key
    (generated on first use; without `create`, as in a dry run, None until then)."""
    if override is not None or configured:
        path = Path(override or configured).expanduser()
        if not path.is_file():
            raise BadInput(f"signing key {path} not found", "create one with `maculaos-sdk keys generate`")
        if not public_key_path(path).is_file():
            raise BadInput(f"public key {public_key_path(path)} not found next to {path}",
                           "keep name.key and name.pub together")
        return path
    dev = cache_dir() / "keys" / "dev.key"
    if not dev.is_file():
        if not create:
            return None
        from .locks import cache_lock

        with cache_lock("dev-key", "the generation of the development key"):  # one key, whoever is first
            if not dev.is_file():
                generate(dev, force=True)
                ui.info(f"[yellow]note:[/] generated development signing key {dev} (use --signing-key for releases)")
    return dev


def is_development_key(secret: Path) -> bool:
    return secret.resolve() == (cache_dir() / "keys" / "dev.key").resolve()


def sign(file: Path, secret: Path, comment: str) -> Path:
    """Write `file.minisig`, a detached ed25519 signature with a signed trusted comment."""
    proc = subprocess.run([minisign_binary(), "-S", "-s", str(secret), "-m", str(file), "-t", comment],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildFailed(f"signing {file} failed: {proc.stderr.strip()}")
    return file.with_name(file.name + ".minisig")
