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


# The longest QEMU scenarios, longest first, as `--durations` measured them on a warm 2-core CI machine
# (seconds: 960 arm64 rollback, 590, 485, 370, 330, 280). Run first, so that the parallel workers do not end
# with one of them alone on one worker while the other sits idle (the tail cost ~5 min of a 48 min run).
LONGEST_FIRST = (
    "test_arm64_update_failing_its_health_check_is_rolled_back_by_grub",
    "test_unconfirmed_or_hanging_update_rolls_back_after_three_tries",
    "test_custom_image_and_node_config_take_effect",
    "test_good_update_boots_b_and_is_confirmed_then_manual_rollback",
    "test_power_cut_while_writing_the_slot_or_the_env_boots_the_committed_slot",
    "test_install_from_iso_menu_to_blank_disk_then_boot_it",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))  # stable: the rest keep their order
