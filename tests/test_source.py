"""Where `maculaos upgrade` downloads from, against real HTTP(S) servers on 127.0.0.1: a redirect never leaves
https, a malformed Content-Length is one line, and a server dripping bytes is cut off at an overall deadline."""

from __future__ import annotations

import functools
import http.server
import ssl
import subprocess
import threading
import time

import pytest
from maculaos_device import source
from maculaos_device.source import Source
from maculaos_device.system import DeviceError


class Handler(http.server.BaseHTTPRequestHandler):
    """/redirect -> the `to` URL; /odd-length: a Content-Length of non-ASCII digits; /drip: a byte at a time."""

    def __init__(self, *args, to: str = "", **kw) -> None:
        self.to = to
        super().__init__(*args, **kw)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.to)
            self.end_headers()
        elif self.path.startswith("/odd-length"):
            self.send_response(200)
            self.send_header("Content-Length", "\u00b2")  # '²'.isdigit() is True, int('²') raises
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = True
        elif self.path.startswith("/drip"):
            self.send_response(200)
            self.send_header("Content-Length", "400")
            self.end_headers()
            for _ in range(400):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            body = b"payload"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def serve(handler, context: ssl.SSLContext | None = None) -> tuple[str, http.server.HTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if context:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"{'https' if context else 'http'}://127.0.0.1:{httpd.server_address[1]}", httpd


@pytest.fixture
def tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1 that the client trusts (SSL_CERT_FILE)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_a_redirect_from_https_to_http_is_refused(tls):
    plain, plain_server = serve(Handler)
    secure, secure_server = serve(functools.partial(Handler, to=f"{plain}/manifest.json"), tls)
    try:
        assert Source(secure).read("manifest.json", 100) == b"payload"  # the https server itself is trusted
        with pytest.raises(DeviceError, match="a redirect away from https is refused"):
            Source(secure, allow_http=True).read("redirect", 100)
    finally:
        plain_server.shutdown()
        secure_server.shutdown()


def test_a_content_length_of_non_ascii_digits_is_no_traceback():
    url, server = serve(Handler)
    try:
        assert Source(url, allow_http=True).read("odd-length", 100) == b"ok"  # read to the end, still capped
    finally:
        server.shutdown()


def test_a_server_dripping_bytes_is_cut_off_at_the_overall_deadline(monkeypatch):
    monkeypatch.setattr(source, "DEADLINE_BASE", 1)
    url, server = serve(Handler)
    start = time.monotonic()
    try:
        with pytest.raises(DeviceError, match="slower than the 64 KiB/s allowed: cut off"):
            Source(url, allow_http=True).read("drip", 400)  # 20 s at this pace; each byte well within the timeout
    finally:
        server.shutdown()
    assert time.monotonic() - start < 5
