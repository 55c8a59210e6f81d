"""Profile loading: extends, merging, validation messages (file, line, key path, hint)."""

from __future__ import annotations

import pytest

from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput, BadInputs
from maculaos_sdk.profile import load_profile


def test_core_profile_resolves():
    p = load_profile("core")
    assert p.name == "core" and p.arch.value == "amd64"
    assert "htop" in p.get("packages")
    assert p.get("squashfs.compression") == "zstd"
    assert p.artifact_basename() == "maculaos-core-0.1.0-amd64"


def test_test_profile_extends_core_and_merges_lists():
    p = load_profile("test")
    core = load_profile("core")
    assert p.get("packages") == core.get("packages")
    assert p.get("services") == ["maculaos-log", "maculaos-watchdog", "maculaos-vmhost", "maculaos-config", "ssh",
                                 "chrony", "maculaos-confirm", "maculaos-install", "maculaos-testchannel"]
    assert p.get("outputs") == ["iso", "disk", "bundle"]
    assert "/etc/init.d/maculaos-testchannel" in p.get("overlay")
    assert p.origins["services"][0].endswith("test.yaml")
    assert p.origins["packages"][0].endswith("core.yaml")


def test_list_removal_and_map_merge(write_profile):
    path = write_profile("name: child\nextends: core\npackages: [-git, strace]\nkernel: {args: [quiet]}\n")
    p = load_profile(str(path))
    assert "git" not in p.get("packages") and "strace" in p.get("packages")
    assert p.get("kernel.args")[-1] == "quiet"
    assert p.get("kernel.prune")  # inherited from core, untouched


def test_unknown_key_names_file_line_and_suggests(write_profile):
    path = write_profile("name: x\nversion: '1'\npackges: [htop]\n")
    with pytest.raises(BadInputs) as exc:
        load_profile(str(path))
    text = exc.value.render()
    assert f"{path}:3: packges: unknown key" in text
    assert "did you mean `packages`?" in text


def test_all_errors_reported_at_once(write_profile):
    path = write_profile("name: x\narch: amd46\nkernel:\n  argz: []\nsquashfs:\n  level: high\n")
    with pytest.raises(BadInputs) as exc:
        load_profile(str(path))
    lines = exc.value.render().splitlines()
    assert len(lines) == 3, lines
    assert any(":2: arch: unknown value 'amd46'" in line and "amd64" in line for line in lines)
    assert any(":4: kernel.argz: unknown key" in line and "kernel.args" in line for line in lines)
    assert any(":6: squashfs.level: expected a integer" in line for line in lines)


def test_wrong_type_version_hint_says_quote(write_profile):
    path = write_profile("name: x\nversion: 1.2\n")
    with pytest.raises(BadInput) as exc:
        load_profile(str(path))
    assert "quote it" in exc.value.render()


def test_missing_overlay_source(write_profile):
    path = write_profile("name: x\noverlay:\n  /etc/a: {source: nothere.txt}\n")
    with pytest.raises(BadInputs) as exc:
        load_profile(str(path))
    assert "overlay./etc/a.source: missing file 'nothere.txt'" in exc.value.render()


def test_extends_cycle(write_profile):
    write_profile("name: a\nextends: b.yaml\n", "a.yaml")
    b = write_profile("name: b\nextends: a.yaml\n", "b.yaml")
    with pytest.raises(BadInput, match="cycle"):
        load_profile(str(b))


def test_invalid_yaml_reports_line(write_profile):
    path = write_profile("name: x\npackages: [htop\n")
    with pytest.raises(BadInput, match=r"p\.yaml:\d+: invalid YAML"):
        load_profile(str(path))


def test_cli_bad_profile_exit_2_one_line_no_traceback(write_profile, capsys):
    path = write_profile("name: x\nbord: rpi4\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:2: bord: unknown key" in err and "did you mean `board`?" in err


def test_cli_unknown_profile_exit_2(capsys):
    assert main(["build-image", "--profile", "coer", "--dry-run"]) == 2
    assert "did you mean `core`?" in capsys.readouterr().err


def test_cli_debug_shows_traceback(write_profile):
    path = write_profile("name: x\nbord: rpi4\n")
    with pytest.raises(BadInput):
        main(["--debug", "build-image", "--config", str(path), "--dry-run"])


def test_docs_profile_reference_is_generated_from_settings(capsys):
    from pathlib import Path

    assert main(["profile", "keys"]) == 0
    table = capsys.readouterr().out
    doc = (Path(__file__).parents[1] / "docs" / "profile-reference.md").read_text()
    assert doc.endswith(table), "regenerate: maculaos-sdk profile keys > docs/profile-reference.md (keep header)"


def test_readme_stage_graph_is_generated_from_the_stage_files(capsys):
    from pathlib import Path

    assert main(["profile", "stages"]) == 0
    graph = capsys.readouterr().out
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"by `make docs` -->\n{graph}<!-- /stages -->" in readme, "run `make docs`"
    assert "`45-layer`" in graph and "`75-sdimage`" in graph and "output `oci`" in graph


def test_profile_show_prints_origins(capsys):
    assert main(["profile", "show", "test"]) == 0
    out = capsys.readouterr().out
    assert "name: test" in out
    assert "#   services: " in out and "test.yaml" in out


def test_the_typed_settings_have_exactly_the_keys_of_the_settings_table():
    from maculaos_sdk.profile_settings import leaf_keys
    from maculaos_sdk.settings import SETTINGS_BY_KEY

    assert sorted(leaf_keys()) == sorted(set(SETTINGS_BY_KEY) - {"extends", "base"})


@pytest.mark.parametrize("name", ["core", "test", "maculaos"])
def test_the_typed_settings_hold_the_merged_values(name):
    from maculaos_sdk.profile_settings import leaf_keys

    profile = load_profile(name)
    for key in leaf_keys():
        typed: object = profile.settings
        for part in key.split("."):
            typed = getattr(typed, part)
        plain = {"arch": lambda v: v.value, "board": lambda v: v.name}.get(key, lambda v: v)(typed)
        if isinstance(plain, tuple):
            plain = list(plain)
        elif hasattr(plain, "keys"):
            plain = dict(plain)
        assert plain == profile.get(key), key
