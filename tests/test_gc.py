"""The stage-image cache: limit parsing (`maculaos-sdk gc`, MACULAOS_SDK_CACHE_MAX) and how its bytes are counted."""

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


class _Layered:
    """An engine holding base (100 MiB), tools on base (+50), and iso on tools through one untagged step
    (+20, then +250), as the classic builder stores them."""

    MiB = 2**20

    def __init__(self) -> None:
        self.removed: list[str] = []
        rows = [("base", "", 100, ["maculaos-sdk/base:1"]), ("tools", "base", 150, ["maculaos-sdk/tools:1"]),
                ("step", "tools", 170, []), ("iso", "step", 420, ["maculaos-sdk/iso:1"])]
        self.rows = [{"Id": i, "ParentId": p, "Size": n * self.MiB, "RepoTags": tags, "Created": 1_700_000_000,
                      "Labels": {gc.LABEL_STAGE: i} if tags else {}} for i, p, n, tags in rows]
        self.api = type("Api", (), {"images": lambda _self, all: self.rows})()
        self.images = type("Images", (), {"remove": lambda _self, ref: self.removed.append(ref)})()


def test_layers_shared_by_stage_images_are_counted_once():
    listing = gc.list_images(_Layered())
    assert {i.ref: i.chain for i in listing.images}["maculaos-sdk/iso:1"] == ("iso", "step", "tools", "base")
    assert listing.held(listing.images) == 420 * _Layered.MiB  # not 100 + 150 + 420


def test_removing_an_image_built_on_another_frees_only_its_own_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_STATE", str(tmp_path))
    engine = _Layered()
    done = gc.collect(engine, {"maculaos-sdk/base:1", "maculaos-sdk/tools:1"}, 200 * _Layered.MiB)
    assert engine.removed == ["maculaos-sdk/iso:1"]
    assert done.freed == 270 * _Layered.MiB and done.kept_bytes == 150 * _Layered.MiB
