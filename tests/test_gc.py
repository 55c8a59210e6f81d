"""Cache-limit parsing for `maculaos-sdk gc` and MACULAOS_SDK_CACHE_MAX."""

from __future__ import annotations

import pytest

from maculaos_sdk import gc
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput


@pytest.mark.parametrize(("text", "size"), [("20G", 20 * 2**30), ("512M", 512 * 2**20), ("0", 0),
                                            ("1.5GiB", 3 * 2**29), ("4k", 4096)])
def test_sizes_parse_in_binary_units(text, size):
    assert gc.parse_size(text) == size


def test_a_bad_cache_limit_names_the_variable_and_the_format(monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE_MAX", "lots")
    with pytest.raises(BadInput, match="MACULAOS_SDK_CACHE_MAX: 'lots' is not a size") as exc:
        gc.cache_max()
    assert "20G" in exc.value.hint


def test_gc_with_a_bad_max_exits_2_with_one_line(capsys):
    assert main(["gc", "--max", "ten"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max: 'ten' is not a size" in err[0]
