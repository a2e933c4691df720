"""Names of models, datasets, benchmarks and value heads: a typo gets the closest known name."""

import pytest

from weighted_mtp.errors import UnknownComponentError, lookup


def test_a_known_name_gives_its_entry():
    assert lookup({"uniform": 1, "critic": 2}, "critic", "widget") == 2


def test_a_typo_names_the_closest_known_name_and_lists_them_all():
    with pytest.raises(UnknownComponentError, match=r"unknown widget 'unifrom'; did you mean 'uniform'\? \(known: critic, uniform\)"):
        lookup({"uniform": 1, "critic": 2}, "unifrom", "widget")


def test_a_name_far_from_every_known_one_only_lists_them():
    with pytest.raises(UnknownComponentError, match=r"unknown widget 'zzz' \(known: a\)"):
        lookup({"a": 1}, "zzz", "widget")
