"""The one argument walker every part of asyncflow uses."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from asyncflow.walk import contains, find, replace

pytestmark = pytest.mark.timeout(10)


class Marker:
    def __init__(self, n: int) -> None:
        self.n = n


class Other:
    pass


def test_every_builtin_container_is_entered() -> None:
    a, b, c, d, e = (Marker(i) for i in range(5))
    obj = (a, [b, {"k": c}], {d}, frozenset([e]))
    assert {m.n for m in find(obj, Marker)} == {0, 1, 2, 3, 4}
    assert contains(frozenset([e]), Marker)
    out = replace(obj, Marker, lambda m: m.n * 10)
    assert out == (0, [10, {"k": 20}], {30}, frozenset([40]))
    assert type(out[3]) is frozenset


def test_repeats_kept_and_other_objects_left_whole() -> None:
    m = Marker(1)
    inside = OrderedDict(k=m)  # not a builtin dict: left whole, as pickling would
    assert find([m, m, inside], Marker) == [m, m]
    assert replace(inside, Marker, lambda _: 0) is inside
    assert not contains({"k": Other()}, (Marker,))


def test_several_kinds_and_dict_keys() -> None:
    m, o = Marker(1), Other()
    assert len(find({m: [m, o]}, (Marker, Other))) == 2  # values only, not keys
    assert replace({"a": (m, o)}, frozenset({Marker, Other}), type) == {
        "a": (Marker, Other)
    }
