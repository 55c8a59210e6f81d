"""A stage cache shared across machines: an OCI registry holding built stage images under their ids.

A stage image `maculaos-sdk/<stage>:<id>` is pushed as `<registry>/maculaos-sdk/<stage>:<id>`; an engine whose
plan has that id and not the image pulls it instead of building it. The id is a hash of everything the stage is
made from (render.py), so a pulled image is the one this plan would build, as far as the registry is trusted: it
is trusted like the engine itself (serve it over TLS, with basic auth: `docker login <host:port>` once on each
machine; plain HTTP only on the loopback interface, or when asked for)."""

from __future__ import annotations

import ipaddress
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from . import ui
from .engine import LABEL_STAGE_ID
from .errors import BadInput, BuildFailed

ENV = "MACULAOS_SDK_CACHE_REGISTRY"
# scheme://host[:port][/path]: a DNS name or an IPv4 address (docker's reference grammar has no IPv6 hosts)
URL_PATTERN = re.compile(r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
                         r"(?::(?P<port>[0-9]{1,5}))?(?P<path>(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,4})/?")
PROBE_SECONDS = 10


@dataclass(frozen=True)
class StageRegistry:
    url: str
    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str, insecure: bool = False, where: str = "--cache-registry") -> StageRegistry:
        """The registry at `url`; plain http:// only for a loopback host unless `insecure`."""
        found = URL_PATTERN.fullmatch(url)
        if not found or (found["port"] and not 0 < int(found["port"]) < 65536):
            raise BadInput(f"{where}: {url[:200]!r} is not a registry URL",
                           "give https://HOST[:PORT][/PATH] (http:// for a registry on 127.0.0.1)")
        registry = cls(url.rstrip("/"), found["scheme"], found["host"], int(found["port"]) if found["port"] else None,
                       found["path"])
        if registry.scheme == "http" and not (insecure or registry.loopback):
            raise BadInput(f"{where}: {url} is plain HTTP to a host other than this one: stage images could be "
                           "read or replaced on the way", "serve the registry over https://, or pass "
                           "--insecure-registry (the engine must list it in its insecure-registries too)")
        return registry

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def prefix(self) -> str:
        """How docker names the registry in an image reference."""
        return f"{self.host}:{self.port}{self.path}" if self.port else f"{self.host}{self.path}"

    def remote(self, image: str) -> str:
        return f"{self.prefix}/{image}"

    def check(self) -> None:
        """The registry answers its API (401 counts: docker sends the credentials of `docker login`)."""
        api = f"{self.scheme}://{self.host}{f':{self.port}' if self.port else ''}/v2/"
        try:
            with urllib.request.urlopen(api, timeout=PROBE_SECONDS):  # noqa: S310 - the scheme is http(s), checked
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
            why = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            why = str(getattr(exc, "reason", exc))
        raise BuildFailed(f"the stage cache registry {self.url} does not answer ({why})",
                          f"start it, or build without --cache-registry (and without {ENV})")


def pull(client: Any, registry: StageRegistry, image: str, stage_id: str, platform: str | None) -> bool:
    """`image` from the registry, tagged locally as `image`: True once it is there and labelled with `stage_id`.
    A registry that lacks it (or fails) means False: the stage is built here."""
    import docker.errors

    remote = registry.remote(image)
    repository, tag = remote.rsplit(":", 1)
    try:
        pulled = client.images.pull(repository, tag=tag, platform=platform)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if "not found" in str(exc).lower() or "manifest unknown" in str(exc).lower():
            return False
        ui.info(f"[yellow]note:[/] pulling {remote} failed ({exc.explanation or exc}): building it here")
        return False
    try:
        if (pulled.labels or {}).get(LABEL_STAGE_ID) != stage_id:
            ui.info(f"[yellow]note:[/] {remote} is not labelled as stage {stage_id[:12]}: not used, building it here")
            return False
        pulled.tag(*image.rsplit(":", 1))
        return True
    finally:
        client.images.remove(remote, noprune=True)  # the local tag is the cache; the alias would escape gc


def push(client: Any, registry: StageRegistry, image: str) -> str | None:
    """Push `image` to the registry; None when done, else why not (the build goes on: the cache is a help)."""
    import docker.errors

    remote = registry.remote(image)
    repository, tag = remote.rsplit(":", 1)
    try:
        client.images.get(image).tag(repository, tag=tag)
        for line in client.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in line:
                return str(line.get("error"))[:300]
        return None
    except docker.errors.APIError as exc:
        return str(exc.explanation or exc)[:300]
    finally:
        try:
            client.images.remove(remote, noprune=True)
        except docker.errors.APIError:
            pass
