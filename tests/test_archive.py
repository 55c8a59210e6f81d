"""The manifest's record of the Debian archive a rootfs was installed from, and the note when it moved."""

from __future__ import annotations

from maculaos_sdk import archive

RELEASE = "deb.debian.org_debian_dists_trixie_InRelease"
RECORD = (f"{'a' * 64}  ./{RELEASE}\n{'b' * 64}  ./deb.debian.org_debian_dists_trixie-updates_InRelease\n"
          f"./{RELEASE}:Date: Sat, 08 Nov 2025 10:41:21 UTC\n"
          "./deb.debian.org_debian_dists_trixie-updates_InRelease:Date: Sun, 23 Nov 2025 20:15:39 UTC\n")


def test_the_record_gives_each_inrelease_its_digest_and_date():
    parsed = archive.parse_record(RECORD)
    assert parsed[RELEASE] == {"sha256": "a" * 64, "date": "Sat, 08 Nov 2025 10:41:21 UTC"}
    assert parsed["deb.debian.org_debian_dists_trixie-updates_InRelease"]["sha256"] == "b" * 64


def _manifest(rootfs_id: str, packages: dict[str, str]) -> dict:
    return {"stages": {"rootfs": {"id": rootfs_id}}, "packages": packages,
            "archive": archive.parse_record(RECORD)}


def test_same_inputs_with_other_versions_say_the_archive_moved():
    before = _manifest("r1", {"bash": "5.2.37-2", "openssl": "3.5.1-1", "zlib1g": "1:1.3"})
    after = _manifest("r1", {"bash": "5.2.37-2", "openssl": "3.5.4-1~deb13u1", "zlib1g": "1:1.3"})
    note = archive.moved(before, after)
    assert note is not None and "1 package version(s) differ: openssl 3.5.1-1 -> 3.5.4-1~deb13u1" in note
    assert "Sun, 23 Nov 2025 20:15:39 UTC" in note  # the newest InRelease the rebuild read


def test_nothing_is_said_when_the_versions_match_or_the_inputs_changed():
    packages = {"bash": "5.2.37-2"}
    assert archive.moved(_manifest("r1", packages), _manifest("r1", dict(packages))) is None
    assert archive.moved(_manifest("r1", packages), _manifest("r2", {"bash": "5.3-1"})) is None  # a new plan
    assert archive.moved({}, _manifest("r1", packages)) is None  # the first build


def test_a_long_list_of_changes_is_cut_short():
    before = _manifest("r1", {f"p{i}": "1" for i in range(9)})
    after = _manifest("r1", {f"p{i}": "2" for i in range(9)})
    note = archive.moved(before, after)
    assert note is not None and "9 package version(s) differ" in note and "and 4 more" in note
