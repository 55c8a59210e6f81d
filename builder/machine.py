"""A QEMU machine driven from Python, after the NixOS test driver.

The serial console is the log: a background thread drains it into `serial.log` (and `timeline.log`: each line
with the seconds since the QEMU it came from started, to see where a boot spends its time) and a buffer that
`wait_for_console_text` searches. Commands go over a separate virtio console (/dev/hvc0, served only by
the `test` profile), each framed with a token, its exit code and base64 output, so kernel messages
never tangle with results. Every wait has a deadline.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

import pexpect
import pexpect.fdpexpect

from .vm import VmConfig, cow_disk, free_port, qemu_command, wait_for_file

__all__ = ["Machine", "MachineError", "cow_disk", "free_port"]


def _reap(process: pexpect.spawn) -> None:
    """Wait for QEMU to exit; two threads may race to reap it, which is fine."""
    try:
        process.wait()
    except (ChildProcessError, pexpect.ExceptionPexpect):
        pass


def _qmp(qmp, command: str, args: dict) -> dict:
    """Send one QMP command on a connected QMP stream; return its result (events are skipped)."""
    qmp.write(json.dumps({"execute": command, "arguments": args}) + "\n")
    qmp.flush()
    while True:
        reply = json.loads(qmp.readline())
        if "error" in reply:
            raise MachineError(f"QMP {command}: {reply['error'].get('desc')}")
        if "return" in reply:
            return reply["return"]


def stretch(timeout: float) -> float:
    """A deadline scaled for a shared CPU: MACULAOS_TEST_TIME_SCALE if set, else by how many vCPUs the
    parallel test workers' guests (pytest -n N, two vCPUs each) put on each host core. Only deadlines
    stretch: a wait that is met returns as soon as it is met."""
    scale = os.environ.get("MACULAOS_TEST_TIME_SCALE")
    if not scale:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        scale = str(2 * workers / (os.cpu_count() or 1))
    return timeout * max(1.0, float(scale))


def guest_cpus() -> int:
    """vCPUs per test guest: the host's cores shared out among the parallel test workers (pytest -n), at
    least 1 and at most 2. TCG runs each vCPU as a host thread; guests with more vCPUs than their share of
    cores spin on locks whose holder is not running, and every boot gets slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))



class Timeline:
    """Console lines stamped with the seconds since this QEMU started (escape sequences dropped)."""

    ESCAPES = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")

    def __init__(self, out: TextIO) -> None:
        self.out, self.start, self.partial = out, time.monotonic(), b""
        out.write("--- QEMU started\n")

    def add(self, data: bytes) -> None:
        *done, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > 4096:  # a screen redrawn without newlines (a boot menu): a line of its own
            done.append(self.partial)
            self.partial = b""
        for raw in done:
            line = self.ESCAPES.sub("", raw.decode(errors="replace")).strip()
            if line:
                self.out.write(f"[{time.monotonic() - self.start:7.1f}s] {line}\n")
        self.out.flush()


class MachineError(AssertionError):
    """A wait ran out or a command's exit code was not what the test expected."""


class Machine:
    """One VM: `start`, `wait_for_console_text`, `send_console`, `succeed`, `fail`, `wait_until_succeeds`,
    `wait_for_unit`, `wait_for_open_port`, `shutdown`, `crash`, `save_state`. Nothing MaculaOS-specific:
    that is in node_machine.py."""

    def __init__(self, name: str, config: VmConfig, workdir: Path, *, test_channel: bool = True,
                 resume_from: Path | None = None, tpm_state: Path | None = None) -> None:
        self.name = name
        self.config = config
        # A folder holding a TPM's state (swtpm's NVRAM): the machine's TPM across its boots. Another
        # folder is another machine's TPM.
        self.tpm_state = tpm_state
        self._swtpm: subprocess.Popen | None = None
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = workdir / f"{name}.serial.log"
        self.commands_log = workdir / f"{name}.commands.log"
        self.timeline_log = workdir / f"{name}.timeline.log"
        self.test_channel = test_channel
        # AF_UNIX paths are limited to 108 bytes, and a checkout's test-log folder can be deeper than that.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="mq-"))
        self.channel_path = self._sock_dir / "test.sock"
        self.qmp_path = self._sock_dir / "qmp.sock"
        # A state saved by `save_state`: the first start resumes it instead of booting (reboots boot).
        self._resume_from = resume_from
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
        self.qmp_path.unlink(missing_ok=True)
        extra: list[str] = ["-no-reboot", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self._resume_from is not None:
            extra += ["-incoming", f"exec:cat {shlex.quote(str(self._resume_from))}"]
            self._resume_from = None
        if self.test_channel:
            self.channel_path.unlink(missing_ok=True)
            extra += ["-chardev", f"socket,id=testch,path={self.channel_path},server=on,wait=off",
                      "-device", "virtio-serial-pci", "-device", "virtconsole,chardev=testch,name=test"]
        if self.tpm_state is not None:
            self.config = dataclasses.replace(self.config, tpm_socket=self._start_swtpm())
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

    def _start_swtpm(self) -> Path:
        """A swtpm for this boot on the machine's TPM state; it ends when QEMU does (--terminate)."""
        assert self.tpm_state is not None
        self.tpm_state.mkdir(parents=True, exist_ok=True)
        sock = self._sock_dir / "swtpm.sock"
        sock.unlink(missing_ok=True)
        if self._swtpm is not None and self._swtpm.poll() is None:
            self._swtpm.kill()
            self._swtpm.wait()
        self._swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}", "--terminate",
             "--ctrl", f"type=unixio,path={sock}", "--log", f"file={self.workdir / (self.name + '.swtpm.log')}"],
            stdin=subprocess.DEVNULL)
        if not wait_for_file(sock, 10):
            raise MachineError(f"{self.name}: swtpm did not create {sock} (is swtpm installed? `make setup`)")
        return sock

    def _drain(self) -> None:
        with self.serial_log.open("ab") as log, self.timeline_log.open("a") as timeline:
            while True:
                process = self.process
                assert process is not None
                lines = Timeline(timeline)
                while True:
                    try:
                        data = process.read_nonblocking(65536, timeout=0.2)
                    except pexpect.TIMEOUT:
                        continue
                    except (pexpect.EOF, OSError, ValueError):
                        break
                    log.write(data)
                    log.flush()
                    lines.add(data)
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
        timeout = stretch(timeout)
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
        if self._swtpm is not None and self._swtpm.poll() is None:
            self._swtpm.kill()
            self._swtpm.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self._close_channel()

    def save_state(self, dest: Path, timeout: float = 120) -> None:
        """Write the guest's whole state (RAM, devices) to `dest`, then end QEMU. A Machine
        created with `resume_from=dest` on a copy-on-write disk over this one's goes on from there."""
        timeout = stretch(timeout)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qmp_path))
            qmp = sock.makefile("rw")
            qmp.readline()  # the greeting
            # Migrated while running, so the resumed machine runs at once (a stopped one would stay paused).
            for command, args in (("qmp_capabilities", {}),
                                  ("migrate-set-parameters", {"max-bandwidth": 1 << 40}),
                                  ("migrate", {"uri": f"exec:cat > {shlex.quote(str(dest))}"})):
                _qmp(qmp, command, args)
            deadline = time.monotonic() + timeout
            while (status := _qmp(qmp, "query-migrate", {}).get("status")) != "completed":
                if status == "failed" or time.monotonic() > deadline:
                    raise MachineError(f"{self.name}: saving the machine state ended {status!r}")
                time.sleep(0.2)
        self.crash()

    def sync_clock(self) -> None:
        """Set the guest's clock to the host's (a resumed guest's clock goes on from when it was saved)."""
        self.succeed(f"date -s @{int(time.time())} >/dev/null")

    def shutdown(self, timeout: float = 90) -> None:
        """Power off from inside the guest and wait for QEMU to exit. A guest that does not power off
        within `timeout`, or whose kernel did not get to say so, fails the test (QEMU is killed)."""
        timeout = stretch(timeout)
        if not self.is_running():
            raise MachineError(f"{self.name}: shutdown of a machine that is not running")
        self._stopping = True
        try:
            self._send_channel("poweroff >/dev/null 2>&1 &\n") if self._channel else self.send_console("poweroff\n")
            deadline = time.monotonic() + timeout
            while self.process is not None and self.process.isalive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.process is not None and self.process.isalive():
                raise MachineError(f"{self.name}: still running {timeout:.0f}s after poweroff; last lines:\n"
                                   f"{self.console_tail()}")
            if self._reader is not None:
                self._reader.join(timeout=10)
            if not self._powered_off():
                raise MachineError(f"{self.name}: QEMU exited without the guest powering off; last lines:\n"
                                   f"{self.console_tail()}")
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
        """Wait until `pattern` (a regex) appears on the serial console after the last match; return the
        match, groups included. The console is read as latin-1 (one character per byte), so positions
        in the text are positions in the log."""
        timeout = stretch(timeout)
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                m = regex.search(self._console.decode("latin-1"), self._console_pos)
                if m:
                    self._console_pos = m.end()
                    return m
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
        timeout = stretch(timeout)
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
        """Run a shell command in the guest; return (exit code, combined stdout+stderr). Every command,
        its exit code, its duration and the start of its output go to `<name>.commands.log`."""
        timeout = stretch(timeout)
        if not self._ready:
            self.wait_for_channel()
        assert self._channel is not None
        started = time.monotonic()
        try:
            rc, out = self._run(command, timeout)
        except MachineError:
            self._transcript(command, None, "", started)
            raise
        self._transcript(command, rc, out, started)
        return rc, out

    def _transcript(self, command: str, rc: int | None, out: str, started: float) -> None:
        took = time.monotonic() - started
        result = "no result" if rc is None else f"exit {rc}"
        line = f"[{started - self.started_at:7.1f}s] {self.name}$ {command}  -> {result} in {took:.1f}s"
        print(line)
        with self.commands_log.open("a") as log:
            log.write(line + "\n" + "".join(f"    {row}\n" for row in out[:4000].splitlines()))

    def _run(self, command: str, timeout: float) -> tuple[int, str]:
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

    def write_file(self, path: str, data: bytes, mode: str = "0600") -> None:
        """Write `data` to the guest file `path` (created with `mode`), through the channel as base64."""
        encoded = base64.b64encode(data).decode()
        target = shlex.quote(path)
        self.succeed(f"umask 077 && echo {encoded} | base64 -d > {target} && chmod {mode} {target}")

    def send_channel_nowait(self, command: str) -> None:
        """Fire a command whose shell will not live to answer (reboot, poweroff)."""
        self._send_channel(command + "\n")
        self._ready = False

    def wait_for_unit(self, service: str, timeout: float = 60) -> None:
        """Wait until the OpenRC service `service` is started."""
        self.wait_until_succeeds(f"rc-service {shlex.quote(service)} status >/dev/null", timeout)

    def wait_for_open_port(self, port: int, timeout: float = 60) -> None:
        """Wait until something in the guest listens on TCP `port` (IPv4 or IPv6)."""
        state = f":{port:04X} 00000000000000000000000000000000:0000 0A|:{port:04X} 00000000:0000 0A"
        self.wait_until_succeeds(f"grep -qE '{state}' /proc/net/tcp /proc/net/tcp6", timeout)

    def wait_until_booted(self, timeout: float = 120) -> None:
        """Wait until the guest has reached its runlevel: no openrc is left starting services."""
        self.wait_until_succeeds("! pidof openrc >/dev/null", timeout)

    def wait_until_succeeds(self, command: str, timeout: float = 60) -> str:
        """Retry a command until it exits 0 or the deadline passes."""
        timeout = stretch(timeout)
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=max(5.0, deadline - time.monotonic()))
            if rc == 0:
                return out
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: `{command}` still failing after {timeout:.0f}s:\n{out}")
            time.sleep(1)
