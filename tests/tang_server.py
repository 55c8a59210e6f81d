"""A real Tang server for the network key source's tests: Debian's tangd (the `tang` package), started for each
connection as its systemd socket unit would, on a local port (a guest under QEMU user networking reaches it as
10.0.2.2). Its keys are made by tangd-keygen; the signing key's thumbprint is what `tang-show-keys` prints, as an
operator reads it off the server."""

from __future__ import annotations

import socketserver
import subprocess
import threading
from pathlib import Path

TANGD = Path("/usr/libexec/tangd")
KEYGEN = Path("/usr/libexec/tangd-keygen")


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        subprocess.run([str(TANGD), str(self.server.db)], stdin=sock.fileno(), stdout=sock.fileno(),  # type: ignore[attr-defined]
                       stderr=subprocess.DEVNULL, timeout=30, check=False)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class TangServer:
    """tangd on 127.0.0.1:<port>, its keys in `db` (made when the folder is empty). `stop()` then `start()` again
    serves the same keys on the same port: a key server that was down and came back."""

    def __init__(self, db: Path, port: int = 0) -> None:
        self.db = db
        db.mkdir(parents=True, exist_ok=True)
        if not any(db.glob("*.jwk")):
            subprocess.run([str(KEYGEN), str(db)], check=True, capture_output=True)
        self.port = port
        self._server: _Server | None = None

    def start(self) -> TangServer:
        server = _Server(("127.0.0.1", self.port), _Connection)
        server.db = self.db  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def thumbprint(self) -> str:
        """The signing key's SHA-256 thumbprint, as `tang-show-keys <port>` prints it (the server must be up)."""
        out = subprocess.run(["tang-show-keys", str(self.port)], capture_output=True, text=True, check=True).stdout
        return out.split()[0]
