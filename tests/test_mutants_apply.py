"""`make mutants` stays runnable: every mutant still finds its code and names tests that exist.

A refactor that moves a line a mutant quotes would otherwise only show up when someone runs the
half-hour mutation check (it refuses to start); this keeps that in the fast suite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mutants import MUTANTS, mutant_id

ROOT = Path(__file__).resolve().parents[1]


def test_mutant_ids_are_unique_and_there_are_at_least_35():
    ids = [mutant_id(m) for m in MUTANTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 35


@pytest.mark.parametrize("mutant", MUTANTS, ids=mutant_id)
def test_each_mutant_applies_once_and_targets_existing_tests(mutant):
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.old) == 1, f"snippet found {text.count(mutant.old)} times in {mutant.file}"
    assert mutant.new != mutant.old and mutant.tests
    for target in mutant.tests:
        file, _, node = target.partition("::")
        assert (ROOT / file).is_file(), target
        if node:
            name = node.split("[")[0]
            assert re.search(rf"^(?:def|async def|class) {re.escape(name)}\b", (ROOT / file).read_text(), re.M), target
