"""The one schema engine (maculaos_device.schema) that both the profile and the node config are checked with."""

from __future__ import annotations

from maculaos_device.schema import BOOL, INT, LIST, STR, Field, Schema

SCHEMA = Schema((
    Field("name", STR, None, "", pattern=r"[a-z]+", nullable=False),
    Field("size", INT, 1, ""),
    Field("a.b.flag", BOOL, False, ""),
    Field("a.mode", STR, "x", "", choices=("x", "y")),
    Field("items", LIST, [], "", pattern=r"[a-z]+"),
), reference_hint="see the reference", list_removals=True)


def _problems(data, lines=None, prefix="", rule=None):
    return [(p.line, p.key, p.message, p.hint) for p in SCHEMA.check(data, "f.yaml", lines, prefix, rule)]


def test_sections_defaults_and_a_valid_mapping():
    assert SCHEMA.sections == {"a", "a.b"}
    assert SCHEMA.defaults() == {"name": None, "size": 1, "a": {"b": {"flag": False}, "mode": "x"}, "items": []}
    assert SCHEMA.defaults()["items"] is not SCHEMA.defaults()["items"]  # each caller gets its own copy
    assert _problems({"name": "ok", "a": {"b": {"flag": True}, "mode": "y"}, "items": ["p", "-q"]}) == []


def test_every_problem_names_its_line_key_and_a_hint():
    lines = {"name": 1, "size": 2, "a": 3, "a.b": 4, "a.b.flag": 5, "a.mode": 6, "items": 7, "nmae": 8}
    data = {"name": "Bad", "size": True, "a": {"b": {"flag": "yes"}, "mode": "z"}, "items": ["ok", "-No", 3],
            "nmae": "x"}
    assert _problems(data, lines) == [
        (1, "name", "invalid value 'Bad'", "must match [a-z]+"),
        (2, "size", "expected a integer, got bool True", "e.g. 1"),
        (5, "a.b.flag", "expected a boolean, got str 'yes'", "e.g. false"),
        (6, "a.mode", "unknown value 'z'", "one of x, y"),
        (7, "items", "expected a list of strings, got list ['ok', '-No', 3]", "e.g. []"),
        (8, "nmae", "unknown key", "did you mean `name`?"),
    ]
    assert _problems({"items": ["ok", "-No"]}, lines) == [(7, "items[1]", "invalid value 'No'", "must match [a-z]+")]
    assert _problems({"a": "flat"}, lines) == [(3, "a", "must be a mapping, got str", "put keys below `a:`")]
    assert _problems({"zzz": 1}) == [(1, "zzz", "unknown key", "see the reference")]


def test_null_resets_a_key_unless_the_field_forbids_it():
    assert _problems({"size": None, "a": {"mode": None}}) == []
    assert _problems({"name": None}) == [(1, "name", "expected a string, got null", "e.g. null")]


def test_a_prefix_places_a_nested_mapping_and_rules_see_only_well_typed_values():
    seen = []

    def rule(spec, value, add):
        seen.append((spec.key, value))
        if spec.key == "size" and value > 9:
            add("too big", "at most 9")

    lines = {"config.size": 12, "config": 11}
    assert _problems({"size": 10, "a": {"mode": 3}}, lines, "config.", rule) == [
        (12, "config.size", "too big", "at most 9"),
        (11, "config.a.mode", "expected a string, got int 3", 'quote it, e.g. "1.2"')]
    assert seen == [("size", 10)]
