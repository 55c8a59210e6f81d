"""The stage cache registry: its URL, refusals and probe (the real push and pull: tests/qemu/test_stage_cache.py)."""

from __future__ import annotations

import http.server
import threading

import pytest

from maculaos_sdk import doctor
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput, BuildFailed
from maculaos_sdk.registry import ENV, StageRegistry
from maculaos_sdk.vm import free_port


@pytest.mark.parametrize("url, prefix", [
    ("http://127.0.0.1:5000", "127.0.0.1:5000"),
    ("http://localhost:5000/", "localhost:5000"),
    ("https://registry.example.com/team/maculaos", "registry.example.com/team/maculaos"),
    ("https://10.1.2.3:443", "10.1.2.3:443"),
])
def test_a_registry_url_names_its_images(url, prefix):
    registry = StageRegistry.parse(url)
    assert registry.prefix == prefix
    assert registry.remote("maculaos-sdk/rootfs:ab12") == f"{prefix}/maculaos-sdk/rootfs:ab12"


@pytest.mark.parametrize("url", [
    "registry.example.com", "ftp://registry.example.com", "https://user:pw@registry.example.com",
    "https://registry.example.com:99999", "https://registry.example.com/Upper", "https://reg.example/x?y=1",
    "https://reg.example/$(reboot)", "https://-reg.example", "http://[::1]:5000", "https://reg.example\n",
])
def test_anything_else_is_refused(url):
    with pytest.raises(BadInput, match="is not a registry URL"):
        StageRegistry.parse(url)


def test_plain_http_is_for_this_host_only_unless_asked():
    with pytest.raises(BadInput, match="plain HTTP to a host other than this one"):
        StageRegistry.parse("http://builds.lan:5000")
    assert StageRegistry.parse("http://builds.lan:5000", insecure=True).prefix == "builds.lan:5000"


def test_a_registry_that_does_not_answer_is_one_line(capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BuildFailed, match=f"the stage cache registry {dead} does not answer"):
        StageRegistry.parse(dead).check()
    monkeypatch.setenv(ENV, dead)
    check = doctor._registry()  # the doctor's row for it
    assert len(check) == 1 and not check[0].ok and dead in check[0].detail


@pytest.mark.parametrize("status, ok", [(200, True), (401, True), (404, False), (500, False)])
def test_the_probe_takes_the_registry_api_answer(status, ok):
    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's API
            self.send_response(status if self.path == "/v2/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry = StageRegistry.parse(f"http://127.0.0.1:{server.server_address[1]}")
        if ok:
            registry.check()
        else:
            with pytest.raises(BuildFailed, match=f"HTTP {status}"):
                registry.check()
    finally:
        server.shutdown()


def test_the_cli_refuses_a_bad_registry_before_any_build(capsys, monkeypatch):
    assert main(["build-image", "--profile", "core", "--cache-registry", "http://builds.lan:5000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--cache-registry: http://builds.lan:5000 is plain HTTP" in err
    monkeypatch.setenv(ENV, "https://user@reg.example")
    assert main(["build-image", "--profile", "core"]) == 2
    assert f"{ENV}: 'https://user@reg.example' is not a registry URL" in capsys.readouterr().err
