"""critical_weights.config.rules: each rule's verdict, and the one generic section reader."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from critical_weights.config.params import Params
from critical_weights.config.rules import Boolean, Choice, ChoiceOrIndex, Choices, Integer, Integers, Number, Problems, Refused, String, param, read_section


@pytest.mark.parametrize("rule, value, held", [
    (Integer(minimum=1), 3, 3),
    (Integer(minimum=0, maximum=9), 9, 9),
    (Number(0.0, 1.0), 1, 1.0),
    (Boolean(), False, False),
    (String(), "x", "x"),
    (Choice(("a", "b")), "b", "b"),
    (Choices(("a", "b")), ["b", "a"], ("b", "a")),
    (Choices(), [], ()),
    (Integers(minimum=1), [10, 1, 10], (1, 10)),
    (ChoiceOrIndex(("sign",), 32, "a bit index"), 31, 31),
    (ChoiceOrIndex(("sign",), 32, "a bit index"), "sign", "sign"),
])
def test_rule_accepts_and_converts(rule, value, held):
    out = rule.check(value)
    assert out == held and type(out) is type(held)


@pytest.mark.parametrize("rule, value, message", [
    (Integer(minimum=1), True, "True is not an integer"),
    (Integer(minimum=1), 0, "0 must be an integer >= 1"),
    (Integer(minimum=30, maximum=600), 601, "601 must be an integer between 30 and 600"),
    (Number(0.0, 1.0), 1.5, "1.5 must be a number between 0.0 and 1.0"),
    (Boolean(), "yes", "'yes' must be true or false"),
    (String(), "  ", "'  ' must be a non-empty string"),
    (Choice(("a", "b")), "c", "'c' is not one of a, b"),
    (Choices(("a", "b")), "a", "'a' must be a list of strings"),
    (Choices(("a", "b")), ["a", "c", "d"], "'c', 'd' not one of a, b"),
    (Choices(("a", "b")), [], "[] must name at least one of a, b"),
    (Choices(("a", "b")), ["a", "a"], "['a', 'a'] repeats an entry"),
    (Integers(minimum=1), [], "[] must be a non-empty list of integers >= 1"),
    (ChoiceOrIndex(("sign", "exponent_msb"), 32, "a bit index"), 32,
     "32 is not one of sign, exponent_msb, or a bit index 0..31"),
])
def test_rule_refuses_with_what_is_allowed(rule, value, message):
    with pytest.raises(Refused) as info:
        rule.check(value)
    assert str(info.value) == message


@dataclass(frozen=True)
class Inner:
    a: int = param(1, Integer(minimum=0))
    b: str = param("x", Choice(("x", "y")))


@dataclass(frozen=True)
class Outer:
    n: int = param(5, Integer(minimum=1))
    inner: Inner = Inner()


def test_reader_recurses_keeps_defaults_and_collects_every_problem():
    problems = Problems()
    got = read_section(Outer, {"n": 0, "inner": {"a": 7, "b": "z", "bb": 1}, "inner2": None}, "", problems)
    assert got == Outer(n=5, inner=Inner(a=7, b="x"))  # refused values stand in as their defaults
    assert problems == [
        "n: 0 must be an integer >= 1",
        "inner.b: 'z' is not one of x, y",
        "inner.bb: unknown key (did you mean inner.b?); known keys here are a, b",
        "inner2: unknown key (did you mean inner?); known keys here are inner, n",
    ]
    assert problems.bad == {"n", "inner.b"}
    assert problems.fine("inner.a") and not problems.fine("inner.b")


def test_reader_refuses_a_section_that_is_not_a_mapping():
    problems = Problems()
    assert read_section(Outer, {"inner": [1]}, "", problems) == Outer()
    assert problems == ["inner: [1] is not a mapping"]
    assert not problems.fine("inner.a")
    problems = Problems()
    read_section(Outer, 3, "", problems)
    assert problems == ["top level: 3 is not a mapping; expected the sections n, inner"]


def test_every_params_field_states_its_rule_once():
    """Each value of params.yaml has exactly one home: a field with a default and a rule."""
    def walk(cls):
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(field.default):
                yield from walk(type(field.default))
            else:
                yield cls.__name__, field

    for owner, field in walk(Params):
        rule = field.metadata.get("rule")
        assert rule is not None, f"{owner}.{field.name} has no rule"
        assert rule.check(_as_yaml(field.default)) == field.default, f"{owner}.{field.name}: its default breaks its rule"


def _as_yaml(value):
    return list(value) if isinstance(value, tuple) else value


def test_choice_maps_an_alias_to_its_name_and_suggests_a_close_one():
    rule = Choice(("per_tensor", "global"), (("per_layer", "per_tensor"),))
    assert rule.check("per_layer") == "per_tensor" and rule.check("global") == "global"
    with pytest.raises(Refused, match=r"^'per_tensr' is not one of per_tensor, global \(did you mean per_tensor\?\)$"):
        rule.check("per_tensr")
    with pytest.raises(Refused, match=r"^'zzz' is not one of per_tensor, global$"):  # nothing close: no guess
        rule.check("zzz")


def test_choices_suggest_a_close_name_for_each_misspelt_entry():
    with pytest.raises(Refused, match=r"^'fishr' not one of fisher, magnitude \(did you mean fisher\?\)$"):
        Choices(("fisher", "magnitude")).check(["magnitude", "fishr"])


def test_rank_mode_per_layer_is_read_as_per_tensor():
    from critical_weights.config.params import parse_params

    assert parse_params({"rank": {"mode": "per_layer"}}).rank.mode == "per_tensor"


def test_fractions_are_strictly_between_0_and_1_sorted_and_unique():
    from critical_weights.config.rules import Fractions

    assert Fractions("sparsity").check([0.5, 0.1, 0.5]) == (0.1, 0.5)
    for bad in ([], [0], [1.0], [0.5, 1.2], [True], "0.5", [-0.1]):
        with pytest.raises(Refused, match="strictly between 0 and 1 \\(each a sparsity\\)"):
            Fractions("sparsity").check(bad)


def test_structures_are_unstructured_or_n_of_m_with_n_below_m():
    from critical_weights.config.rules import Structures

    assert Structures().check(["unstructured", "2:4", "4:8"]) == ("unstructured", "2:4", "4:8")
    with pytest.raises(Refused, match="needs 0 < N < M <= 64"):
        Structures().check(["4:4"])
    with pytest.raises(Refused, match="needs 0 < N < M <= 64"):
        Structures().check(["0:4"])
    with pytest.raises(Refused, match=r"is not a structure; use unstructured, or N:M.*did you mean unstructured\?\)"):
        Structures().check(["unstructred"])
    with pytest.raises(Refused, match="repeats an entry"):
        Structures().check(["2:4", "2:4"])
    with pytest.raises(Refused, match="non-empty list of structures"):
        Structures().check([])
