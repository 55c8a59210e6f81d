"""MaculaOS on top of the generic Machine: slots, the A/B status, the GRUB menu, the network it waits for."""

from __future__ import annotations

import json

from .machine import Machine


class MaculaMachine(Machine):
    """A Machine running MaculaOS: `wait_for_boot` and `reboot` return the slot booted."""

    def wait_for_boot(self, timeout: float = 240) -> str:
        """Wait for the initrd of the next (re)boot to report its slot, then for the test channel."""
        slot = self.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=timeout).group(1)
        self._ready = False
        self.wait_for_channel(timeout=timeout)
        return slot

    def reboot(self, timeout: float = 240) -> str:
        """Reboot the guest and wait until it is back; returns the slot it booted."""
        self.send_channel_nowait("reboot")
        return self.wait_for_boot(timeout)

    def wait_for_network(self, timeout: float = 90) -> None:
        """Wait until eth0 has its DHCP address and the default route: the test channel comes up while networking
        still starts (a fetch before the route exists fails with "Network is unreachable")."""
        self.wait_until_succeeds("ip -4 -o addr show dev eth0 | grep -q inet && ip -4 route show default | grep -q .",
                                 timeout=timeout)

    def upgrade_status(self) -> dict:
        """`maculaos upgrade --status`, parsed: the machine-readable A/B state every scenario asserts on."""
        return json.loads(self.succeed("maculaos upgrade --status"))

    def enter_recovery_from_menu(self, timeout: float = 120) -> None:
        """Pick Recovery in the GRUB menu by its hotkey and wait for the rescue shell's prompt."""
        self.wait_for_console_text(r"Recovery", timeout=timeout)
        self.send_console("r")
        self.wait_for_console_text(r"MaculaOS recovery shell", timeout=timeout)
        self.wait_for_console_text(r"\(recovery\) # ", timeout=30)


def accepted_ports(ruleset: dict, chain: str = "input") -> dict[str, object]:
    """From `nft -j list ...` output: the chain's policy and the TCP/UDP destination ports it accepts."""
    found: dict[str, object] = {"policy": None, "tcp": set(), "udp": set()}
    for item in ruleset["nftables"]:
        if item.get("chain", {}).get("name") == chain:
            found["policy"] = item["chain"].get("policy")
        rule = item.get("rule")
        if not rule or rule["chain"] != chain or not any("accept" in e for e in rule["expr"]):
            continue
        for expr in rule["expr"]:
            payload = expr.get("match", {}).get("left", {}).get("payload", {})
            if payload.get("field") == "dport" and payload.get("protocol") in ("tcp", "udp"):
                right = expr["match"]["right"]
                ports = right["set"] if isinstance(right, dict) else [right]
                found[payload["protocol"]] |= set(ports)  # type: ignore[operator]
    return found


def check_native_step_outputs(m: Machine) -> None:
    """What the rootfs stage's native step made in place of the packages' (emulated) postinst work is there
    and used: Python imports the standard library from the squashfs's bytecode (nothing new is compiled into
    the writable layer), udev finds devices in hwdb.bin, and TLS trusts the CA bundle."""
    m.succeed("python3 -c 'import json, ssl, yaml, email.parser, asyncio'")
    m.succeed("python3 -I -c 'import sys; sys.path.insert(0, \"/usr/lib/maculaos\"); import maculaos_device."
              "cli, maculaos_device.installer, maculaos_device.nodeconfig'")  # the on-device tool's modules
    assert m.succeed("find /run/maculaos/rw/upper -name '*.pyc'") == ""
    assert "ID_VENDOR_FROM_DATABASE=Linux Foundation" in m.succeed("systemd-hwdb query usb:v1D6Bp0002")
    trusted = m.succeed("python3 -c 'import ssl; print(ssl.create_default_context().cert_store_stats()[\"x509_ca\"])'")
    assert int(trusted) > 100, trusted
