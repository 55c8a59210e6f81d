"""Pinned artifacts: fetched over HTTP from a local server serving generated files (the real GitHub is out
of reach here), verified against the lock, resumed after a dropped connection, refused on a wrong checksum,
imported from a folder, and --offline failing before any stage with what to do."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from maculaos_sdk import artifacts
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB of generated data
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server(http.server.BaseHTTPRequestHandler):
    """/good serves PAYLOAD with Range support; /flaky drops the first connection half-way; /bad serves other
    bytes; /missing is a 404."""

    requests: list[str] = []
    dropped = False

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append(f"{self.path} {self.headers.get('Range', '-')}")
        if self.path == "/missing":
            self.send_error(404)
            return
        body = b"not the pinned file" * 1000 if self.path == "/bad" else PAYLOAD
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if self.path == "/flaky" and not type(self).dropped:
            type(self).dropped = True
            self.wfile.write(body[start:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-transfer
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    Server.requests, Server.dropped = [], False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def lock(tmp_path, monkeypatch, server):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "artifacts.lock.yaml"
    entries = []
    for name, url_path, sha, size in [("good", "good", SHA, ""), ("flaky", "flaky", SHA, ""), ("bad", "bad", SHA, ""),
                                      ("gone", "missing", SHA.replace("a", "b"), ""),
                                      ("small", "good", SHA, ", size: 1000")]:  # the lock says 1000 bytes
        entries.append(f"{name}:\n  version: '1'\n  install: /opt/{name}\n  mode: '0755'\n  arches:\n"
                       f"    amd64: {{url: '{server}/{url_path}', sha256: {sha}{size}}}\n")
    path.write_text("".join(entries))
    monkeypatch.setenv("MACULAOS_ARTIFACTS_LOCK", str(path))
    return artifacts.load_lock(path)


def test_fetch_verifies_and_caches_by_content(lock):
    path = artifacts.fetch(lock["good"]["amd64"], retries=1)
    assert path.read_bytes() == PAYLOAD and path.name == SHA
    assert oct(path.stat().st_mode & 0o777) == "0o755"
    n = len(Server.requests)
    assert artifacts.fetch(lock["good"]["amd64"]) == path
    assert len(Server.requests) == n  # served from the cache


def test_dropped_connection_is_resumed_where_it_stopped(lock):
    path = artifacts.fetch(lock["flaky"]["amd64"], retries=3)
    assert path.read_bytes() == PAYLOAD
    assert Server.requests[0] == "/flaky -"
    assert Server.requests[1].startswith("/flaky bytes=") and Server.requests[1] != "/flaky bytes=0-"


def test_wrong_checksum_is_refused_and_nothing_is_cached(lock):
    with pytest.raises(artifacts.ArtifactUnavailable, match="does not match the lock"):
        artifacts.fetch(lock["bad"]["amd64"], retries=1)
    assert not list(artifacts.store_dir().glob("*"))


def test_unreachable_artifact_names_the_url_and_how_to_provide_it(lock, server):
    with pytest.raises(artifacts.ArtifactUnavailable) as exc:
        artifacts.fetch(lock["gone"]["amd64"], retries=2)
    text = exc.value.render()
    assert f"{server}/missing" in text and "HTTP 404" in text and "artifacts import" in text


def test_offline_uses_only_the_cache(lock):
    with pytest.raises(artifacts.ArtifactUnavailable, match="--offline"):
        artifacts.files_for(["good"], "amd64", "p.yaml", offline=True)
    assert Server.requests == []
    artifacts.fetch(lock["good"]["amd64"])
    files = artifacts.files_for(["good"], "amd64", "p.yaml", offline=True)
    assert files == {"/opt/good": lock["good"]["amd64"].cache_path}


def test_import_takes_only_files_matching_the_lock(lock, tmp_path):
    usb = tmp_path / "usb"
    (usb / "sub").mkdir(parents=True)
    (usb / "sub" / "k3s-whatever").write_bytes(PAYLOAD)
    (usb / "notes.txt").write_text("unrelated")
    imported = artifacts.import_dir(usb, lock)
    assert {a.sha256 for a in imported} == {SHA}
    assert lock["good"]["amd64"].is_cached() and lock["flaky"]["amd64"].is_cached()


def test_unknown_artifact_and_missing_arch(lock):
    with pytest.raises(BadInput) as exc:
        artifacts.select(["god"], "amd64", lock, "p.yaml")
    assert "did you mean `good`" in exc.value.render()
    with pytest.raises(BadInput, match="no pinned arm64 build"):
        artifacts.select(["good"], "arm64", lock, "p.yaml")


def test_offline_build_of_the_maculaos_profile_fails_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    rc = main(["build-image", "--profile", "maculaos", "--offline", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "artifact k3s v1.36.4+k3s1 (amd64) is not in the cache and --offline is set" in err
    assert "https://github.com/k3s-io/k3s/releases/download/" in err and "artifacts import" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "logs").exists()


def test_the_repository_lock_file_is_valid():
    lock = artifacts.load_lock(Path(__file__).parents[1] / "artifacts.lock.yaml")
    assert {"k3s", "k3s-airgap-images"} <= set(lock)
    assert lock["k3s"]["amd64"].mode == 0o755


def test_a_download_larger_than_the_lock_says_is_cut_off_and_nothing_is_cached(lock):
    with pytest.raises(artifacts.ArtifactUnavailable, match="more than the 1000 bytes it may be"):
        artifacts.fetch(lock["small"]["amd64"], retries=1)
    assert not list(artifacts.store_dir().glob("*"))


def test_a_cached_file_altered_since_it_was_fetched_is_fetched_again(lock):
    path = artifacts.fetch(lock["good"]["amd64"], retries=1)
    n = len(Server.requests)
    path.chmod(0o644)
    with path.open("r+b") as f:  # same size, other bytes: a bad disk, or someone with write access to the cache
        f.write(b"tampered")
    assert artifacts.fetch(lock["good"]["amd64"], retries=1).read_bytes() == PAYLOAD
    assert len(Server.requests) == n + 1
