"""The flat layout's module paths still import, as the same module, with a warning."""

# rewrite_imports: skip (this test imports the old paths on purpose)

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys

import pytest

import histolens.stats.metrics
from histolens.moved import MOVED


def test_an_old_path_is_the_new_module_and_says_so(monkeypatch):
    monkeypatch.delitem(sys.modules, "histolens.metrics", raising=False)
    with pytest.warns(DeprecationWarning, match="histolens.metrics is histolens.stats.metrics now"):
        old = importlib.import_module("histolens.metrics")
    assert old is histolens.stats.metrics


def test_every_old_path_points_at_a_module_that_exists():
    for old, new in MOVED.items():
        assert importlib.util.find_spec(f"histolens.{new}") is not None, (old, new)
        # An old path that still exists as a file would shadow the alias.
        parent, _, leaf = f"histolens.{old}".rpartition(".")
        where = importlib.import_module(parent).__path__
        assert importlib.machinery.PathFinder.find_spec(f"{parent}.{leaf}", where) is None, old


def test_unknown_paths_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("histolens.no_such_module")
