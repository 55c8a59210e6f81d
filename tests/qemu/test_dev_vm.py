"""The dev VM as a developer runs it: `vm start --profile test --share DIR`, then `vm ssh`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from maculaos_sdk.node_machine import accepted_ports
from maculaos_sdk.paths import sdk_root

from .conftest import LOGS

pytestmark = pytest.mark.qemu
CLI = [sys.executable, "-m", "maculaos_sdk.cli"]
FORWARD = re.compile(r"^\s+(ssh|k3s-api|console)\s+guest :(\d+)\s+-> 127\.0\.0\.1:(\d+)$", re.M)


def vm_ssh(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`maculaos-sdk vm ssh -- command`; a guest that is not up yet gives exit 255 (or a timeout: 124)."""
    try:
        return subprocess.run([*CLI, "vm", "ssh", "--", *command], cwd=sdk_root(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", "timed out")


def until(what: str, check, timeout: float):
    """Call `check` until it returns something true; fail naming `what` past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(2)


def test_dev_vm_forwards_ssh_and_the_console_and_shares_a_folder(test_build, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    token = uuid.uuid4().hex
    (share / "hello.txt").write_text(token)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / "dev-vm.log"
    with log_path.open("w") as log:
        vm = subprocess.Popen([*CLI, "vm", "start", "--profile", "test", "--share", str(share)], cwd=sdk_root(),
                              stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        until("the forwards printed", lambda: "vm ssh logs in" in log_path.read_text(), 600)
        ports = {name: (int(guest), int(host)) for name, guest, host in FORWARD.findall(log_path.read_text())}
        assert {name: guest for name, (guest, _) in ports.items()} == {"ssh": 22, "k3s-api": 6443, "console": 443}

        # ssh through the forward with the checkout's dev key, which the VM got through fw_cfg
        seen = until("a login with the dev key", lambda: vm_ssh("cat", "/mnt/host/hello.txt", timeout=30).stdout, 300)
        assert seen == token
        assert vm_ssh("echo from-guest > /mnt/host/back.txt").returncode == 0  # one string: ssh joins its words
        assert (share / "back.txt").read_text() == "from-guest\n"

        # the forwarded ports are open in the guest's firewall, and the console port reaches the guest
        firewall = accepted_ports(json.loads(vm_ssh("nft", "-j", "list", "table", "inet", "maculaos").stdout))
        assert firewall["policy"] == "drop" and {22, 443, 6443} <= firewall["tcp"]
        serve = ("mkdir -p /tmp/www && echo console-ok > /tmp/www/index.html && cd /tmp/www && "
                 "(setsid python3 -m http.server 443 >/dev/null 2>&1 < /dev/null &)")
        assert vm_ssh(serve).returncode == 0

        def console() -> str:
            try:
                url = f"http://127.0.0.1:{ports['console'][1]}/index.html"
                return urllib.request.urlopen(url, timeout=10).read().decode()
            except OSError:
                return ""

        assert until("the console port", console, 60) == "console-ok\n"
    finally:
        os.killpg(vm.pid, signal.SIGKILL)
        vm.wait()
