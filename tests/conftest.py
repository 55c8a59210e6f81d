"""Shared fixtures for the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write_profile(tmp_path: Path):
    """Write a YAML profile into tmp_path and return its path."""

    def write(text: str, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# The longest QEMU scenarios, longest first, as `--durations` measured them on a 2-core CI machine
# (seconds, stop 32's rehearsal: 1577 encryption, 949 arm64 rollback, 482 custom image, about 400 each update
# scenario, then the Pi boots). Each worker starts
# with its own share of them, so that the workers do not end with one of them alone on one worker while the
# other sits idle.
LONGEST_FIRST = (
    "test_encrypted_install_usb_key_passphrase_and_crypto_erase",  # an install and eight disk boots
    "test_arm64_update_failing_its_health_check_is_rolled_back_by_grub",
    "test_unconfirmed_or_hanging_update_rolls_back_after_three_tries",
    "test_custom_image_and_node_config_take_effect",
    "test_good_update_boots_b_and_is_confirmed_then_manual_rollback",
    "test_power_cut_while_writing_the_slot_or_the_env_boots_the_committed_slot",
    "test_install_from_iso_menu_to_blank_disk_then_boot_it",
    "test_rpi_slot_a_boots_to_a_shell_under_virt",  # rpi4 (with a second boot) and rpi5: one per worker
)


def pytest_collection_modifyitems(config, items):
    """xdist's work stealing gives worker i the i-th contiguous share of this order (shares of
    len(pending) // workers-left) and steals from the ends of the shares; so each share starts with its part
    of the longest scenarios (dealt in snake order: 0, 1, 1, 0, ...), then the other tests in their order. Without this,
    all of them sat at the head of the first worker's share and ran one after another there (seen in CI)."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    items[:] = interleave_longest(items, workers)


def interleave_longest(items: list, workers: int) -> list:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    longest = sorted((i for i in items if i.originalname in rank), key=lambda i: rank[i.originalname])
    rest = [i for i in items if i.originalname not in rank]
    order: list = []
    left = len(items)
    for w in range(workers):
        share = left // (workers - w)
        head = [t for j, t in enumerate(longest) if _snake(j, workers) == w]
        order += head + rest[:max(0, share - len(head))]
        del rest[:max(0, share - len(head))]
        left -= share
    return order + rest


def _snake(j: int, workers: int) -> int:
    """The worker that gets the j-th longest scenario: 0, 1, ..., n-1, n-1, ..., 0, 0, 1, ..."""
    turn, place = divmod(j, workers)
    return place if turn % 2 == 0 else workers - 1 - place
