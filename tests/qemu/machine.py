"""A QEMU machine driven from Python, after the NixOS test driver.

The serial console is the log: a background thread drains it into `serial.log` and a buffer that
`wait_for_console_text` searches. Commands go over a separate virtio console (/dev/hvc0, served only by
the `test` profile), each framed with a token, its exit code and base64 output, so kernel messages
never tangle with results. Every wait has a deadline.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from maculaos_sdk.vm import VmConfig, qemu_command, wait_for_file


def cow_disk(base: Path, dest: Path) -> Path:
    """A copy-on-write qcow2 over `base`, so every VM starts from the pristine built image."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.resolve()), str(dest)],
                   check=True)
    return dest


def free_port() -> int:
    """A free TCP port on the host's loopback (for QEMU's ssh forward)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reap(process: pexpect.spawn) -> None:
    """Wait for QEMU to exit; two threads may race to reap it, which is fine."""
    try:
        process.wait()
    except (ChildProcessError, pexpect.ExceptionPexpect):
        pass


class MachineError(AssertionError):
    """A wait ran out or a command's exit code was not what the test expected."""


class Machine:
    """One VM: `start`, `wait_for_console_text`, `send_console`, `succeed`, `fail`, `shutdown`, `crash`."""

    def __init__(self, name: str, config: VmConfig, workdir: Path, *, test_channel: bool = True) -> None:
        self.name = name
        self.config = config
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = workdir / f"{name}.serial.log"
        self.test_channel = test_channel
        # AF_UNIX paths are limited to 108 bytes, and a checkout's test-log folder can be deeper than that.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="mq-"))
        self.channel_path = self._sock_dir / "test.sock"
        self.process: pexpect.spawn | None = None
        self._console = bytearray()
        self._console_pos = 0
        self._lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self._channel: pexpect.fdpexpect.fdspawn | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._stopping = False
        self.boots = 0
        self.started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start QEMU; the serial console starts logging at once.

        QEMU runs with -no-reboot: when the guest reboots, QEMU exits and a fresh QEMU is started on the
        same disk, like a power cycle. (Warm resets of OVMF under TCG were seen to hang.)"""
        self._stopping = False
        self.started_at = time.monotonic()
        self._spawn()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _spawn(self) -> None:
        extra: list[str] = ["-no-reboot"]
        if self.test_channel:
            self.channel_path.unlink(missing_ok=True)
            extra += ["-chardev", f"socket,id=testch,path={self.channel_path},server=on,wait=off",
                      "-device", "virtio-serial-pci", "-device", "virtconsole,chardev=testch,name=test"]
        cmd = qemu_command(self.config, extra=extra)
        (self.workdir / f"{self.name}.cmdline").write_text(" ".join(cmd) + "\n")
        process = pexpect.spawn(cmd[0], cmd[1:], timeout=None, echo=False)
        if self.test_channel:
            # Connect at once, so the guest never sees the host side of its test port closed.
            if not wait_for_file(self.channel_path, 10):
                raise MachineError(f"{self.name}: QEMU did not create {self.channel_path}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.channel_path))
            self._close_channel()
            self._sock = sock
            self._channel = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=60)
        self.process = process
        self.boots += 1

    def _drain(self) -> None:
        with self.serial_log.open("ab") as log:
            while True:
                process = self.process
                assert process is not None
                while True:
                    try:
                        data = process.read_nonblocking(65536, timeout=0.2)
                    except pexpect.TIMEOUT:
                        continue
                    except (pexpect.EOF, OSError, ValueError):
                        break
                    log.write(data)
                    log.flush()
                    with self._lock:
                        self._console.extend(data)
                        self._lock.notify_all()
                _reap(process)
                if self._stopping or process.exitstatus != 0 or self._powered_off():
                    break
                log.write(b"\n[machine.py: guest rebooted; starting QEMU again]\n")
                self._spawn()
        with self._lock:
            self._lock.notify_all()

    def is_running(self) -> bool:
        """True while the machine is up, including the moment between a guest reboot and the new QEMU."""
        return self._reader is not None and self._reader.is_alive()

    def _powered_off(self) -> bool:
        """The guest powered off (as opposed to rebooting): the kernel's last words say which."""
        with self._lock:
            tail = bytes(self._console[-4096:])
        return tail.rfind(b"reboot: Power down") > tail.rfind(b"reboot: Restarting system")

    def wait_for_poweroff(self, timeout: float = 120) -> None:
        """Wait until the guest powers itself off and QEMU exits."""
        if self._reader is not None:
            self._reader.join(timeout)
        if self.is_running():
            raise MachineError(f"{self.name}: still running after {timeout:.0f}s; last lines:\n{self.console_tail()}")
        self._close_channel()

    def crash(self) -> None:
        """Kill QEMU at once, like pulling the power cord (no restart follows)."""
        self._stopping = True
        if self.process is not None and self.process.isalive():
            self.process.kill(9)
            _reap(self.process)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self._close_channel()

    def shutdown(self, timeout: float = 60) -> None:
        """Power off from inside the guest and wait for QEMU to exit (kill it past the deadline)."""
        if not self.is_running():
            return
        self._stopping = True
        try:
            if self._channel is not None:
                self._send_channel("poweroff >/dev/null 2>&1 &\n")
            deadline = time.monotonic() + timeout
            while self.process is not None and self.process.isalive() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            self.crash()

    def close(self) -> None:
        self.crash()
        if self._reader is not None:
            self._reader.join(timeout=5)
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # -- serial console ---------------------------------------------------------------------
    def console_text(self) -> str:
        with self._lock:
            return self._console.decode(errors="replace")

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def wait_for_console_text(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears on the serial console after the last match."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                m = regex.search(self._console, self._console_pos)
                if m:
                    self._console_pos = m.end()
                    return re.match(r"(?s).*", m.group(0).decode(errors="replace"))  # type: ignore[return-value]
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_running():
                    why = "QEMU exited" if not self.is_running() else f"{timeout:.0f}s passed"
                    raise MachineError(f"{self.name}: {why} waiting for /{pattern}/ on the console; "
                                       f"last lines:\n{self.console_tail()}")
                self._lock.wait(min(left, 0.5))

    def send_console(self, text: str, delay: float = 0.02) -> None:
        """Type text on the serial console (a GRUB hotkey, a rescue-shell command), one key at a time:
        an emulated UART fed in one burst while the guest is busy can garble input."""
        assert self.process is not None
        for ch in text:
            self.process.send(ch.encode())
            time.sleep(delay)

    # -- test channel -----------------------------------------------------------------------
    def wait_for_channel(self, timeout: float = 120) -> float:
        """Wait until the guest's test shell answers; returns seconds since start."""
        if self._channel is None:
            raise MachineError(f"{self.name}: started without a test channel")
        self._ready = False
        deadline = time.monotonic() + timeout
        while True:
            token = uuid.uuid4().hex[:12]
            self._send_channel(f'echo "<<<{token} 0 >>>"\n')
            try:
                self._channel.expect(re.compile(rb"<<<(\w+) 0 >>>"), timeout=3)
                self._ready = True
                return time.monotonic() - self.started_at
            except pexpect.TIMEOUT:
                if time.monotonic() > deadline or not self.is_running():
                    raise MachineError(f"{self.name}: test channel silent after {timeout:.0f}s; last console "
                                       f"lines:\n{self.console_tail()}") from None

    def _send_channel(self, text: str) -> None:
        assert self._sock is not None
        self._sock.sendall(text.encode())

    def _close_channel(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._channel = None
        self._ready = False

    def execute(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit code, combined stdout+stderr)."""
        if not self._ready:
            self.wait_for_channel()
        assert self._channel is not None
        token = uuid.uuid4().hex[:12]
        script = base64.b64encode(command.encode()).decode()
        self._send_channel(
            f"echo {script} | base64 -d > /tmp/.tc; sh /tmp/.tc > /tmp/.to 2>&1 < /dev/null; rc=$?; "
            f'echo "<<<{token} $rc $(base64 -w0 < /tmp/.to)>>>"\n')
        try:
            self._channel.expect(re.compile(rf"<<<{token} (\d+) ([A-Za-z0-9+/=]*)>>>".encode()), timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            raise MachineError(f"{self.name}: `{command}` gave no result within {timeout:.0f}s; last console "
                               f"lines:\n{self.console_tail()}") from exc
        m = self._channel.match
        return int(m.group(1)), base64.b64decode(m.group(2)).decode(errors="replace")

    def succeed(self, command: str, timeout: float = 60) -> str:
        """Run a command that must exit 0; return its output."""
        rc, out = self.execute(command, timeout)
        if rc != 0:
            raise MachineError(f"{self.name}: `{command}` exited {rc}:\n{out}")
        return out

    def fail(self, command: str, timeout: float = 60) -> str:
        """Run a command that must exit non-zero; return its output."""
        rc, out = self.execute(command, timeout)
        if rc == 0:
            raise MachineError(f"{self.name}: `{command}` unexpectedly succeeded:\n{out}")
        return out

    def enter_recovery_from_menu(self, timeout: float = 120) -> None:
        """Pick Recovery in the GRUB menu by its hotkey and wait for the rescue shell's prompt."""
        self.wait_for_console_text(r"Recovery", timeout=timeout)
        self.send_console("r")
        self.wait_for_console_text(r"MaculaOS recovery shell", timeout=timeout)
        self.wait_for_console_text(r"\(recovery\) # ", timeout=30)

    def send_channel_nowait(self, command: str) -> None:
        """Fire a command whose shell will not live to answer (reboot, poweroff)."""
        self._send_channel(command + "\n")
        self._ready = False

    def wait_for_boot(self, timeout: float = 240) -> str:
        """Wait for the initrd of the next (re)boot to report its slot, then for the test channel."""
        m = self.wait_for_console_text(r"maculaos-init: slot [AB]", timeout=timeout)
        self._ready = False
        self.wait_for_channel(timeout=timeout)
        return m.group(0)[-1]

    def wait_for_network(self, timeout: float = 90) -> None:
        """Wait until eth0 has its DHCP address: the test channel comes up while networking still starts."""
        self.wait_until_succeeds("ip -4 -o addr show dev eth0 | grep -q inet", timeout=timeout)

    def reboot(self, timeout: float = 240) -> str:
        """Reboot the guest and wait until it is back; returns the slot it booted."""
        self.send_channel_nowait("reboot")
        return self.wait_for_boot(timeout)

    def upgrade_status(self) -> dict:
        """`maculaos upgrade --status`, parsed: the machine-readable A/B state every scenario asserts on."""
        return json.loads(self.succeed("maculaos upgrade --status"))

    def wait_until_succeeds(self, command: str, timeout: float = 60) -> str:
        """Retry a command until it exits 0 or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=max(5.0, deadline - time.monotonic()))
            if rc == 0:
                return out
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: `{command}` still failing after {timeout:.0f}s:\n{out}")
            time.sleep(1)
