"""The JSON Schema spellings of PruneConfig's rules take exactly what the validators take."""

from __future__ import annotations

import re

import pytest

from core.pruning.config import PruneConfig
from core.pruning.config_schema import NM, NM_MAX_DIGITS
from core.schema_rules import NON_BLANK


def _validator_takes(pattern: str) -> bool:
    try:
        PruneConfig(model="m", pattern=pattern)
    except ValueError:
        return False
    return True


def test_the_nm_regex_is_n_below_m():
    nm = re.compile(f"^(?:{NM})$")
    small = range(0, 120)
    for n in small:
        for m in small:
            assert bool(nm.match(f"{n}:{m}")) == (0 < n < m), (n, m)
    top = 10**NM_MAX_DIGITS
    for n, m in [(99, 100), (100, 101), (101, 100), (120, 999), (998, 999), (999, 999), (1, top - 1), (1, top)]:
        assert bool(nm.match(f"{n}:{m}")) == (0 < n < m < top), (n, m)


@pytest.mark.parametrize("pattern", ["2:4", "1:2", "63:64", "123:456", "4:2", "2:2", "0:4", "x:y", "2:4:8"])
def test_the_nm_regex_and_the_validator_agree(pattern: str):
    assert bool(re.fullmatch(NM, pattern)) == _validator_takes(pattern)


def test_non_blank_is_what_strip_keeps():
    """A text is blank for the validators when str.strip() leaves nothing: NON_BLANK matches every other character."""
    for code in range(0x10000):
        c = chr(code)
        assert bool(re.fullmatch(NON_BLANK, c)) == bool(c.strip()), hex(code)
