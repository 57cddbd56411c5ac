"""Run the docstring examples of the public modules."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["grmpiqa.losses", "grmpiqa.model", "grmpiqa.backbone"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
