"""Attacks that still succeed: README's "Not proven, known open", as tests.

Each test mounts the attack as the researcher would and asserts that it fails; each
is a strict ``xfail`` today, so the suite says the gap is open, and a fix that
closes one turns its test into an unexpected pass (which fails the run until the
marker goes). The expected failure is only the attack's own ``pytest.fail``, after
its arithmetic was checked on the rows (``raises=``): any other error fails the
run, so a test cannot count as "still open" by breaking.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.errors import DisclosureRefused, TooFewSites

REFUSED = (DisclosureRefused, TooFewSites)


def answered(ask: Callable[[], pd.DataFrame]) -> pd.DataFrame | None:
    """The attack's last answer, or None when the sites refuse it (the defence)."""
    try:
        return ask()
    except REFUSED:
        return None


def ages(values: list[float] | np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"age": np.asarray(values, dtype=float)})


@pytest.mark.xfail(
    strict=True,
    raises=pytest.fail.Exception,
    reason="open: an edit in a column the researcher does not ask about counts as a "
    "changed row (two places in the auditor's row space); one such edit plus one "
    "removal at each of two sites between two answers gives the sum of the two "
    "removed patients' values (README, Data updates)",
)
def test_an_edit_elsewhere_plus_one_removal_does_not_release_a_patient(
    tmp_path: Path,
) -> None:
    """All rows' ages, then each site edits row 12's bmi (never asked about) and
    removes row 7, then all rows' ages again: the difference is the two row 7s'
    ages. (At one site alone it is refused: its changed rows are held by no other
    site, ``tests/test_holders.py``.)"""
    rng = np.random.default_rng(0)
    n = 60

    def cohort(seed: int) -> pd.DataFrame:
        r = np.random.default_rng(seed)
        return pd.DataFrame(
            {"age": r.normal(55, 10, n).round(1), "bmi": r.normal(27, 4, n).round(1)}
        )

    before = [cohort(int(rng.integers(1 << 16))), cohort(1)]
    after = []
    for frame in before:
        changed = frame.copy()
        changed.loc[12, "bmi"] += 1.0
        after.append(changed.drop(index=7).reset_index(drop=True))

    def sites(frames: list[pd.DataFrame]) -> list[Site]:
        return [
            Site(name, frame, state_dir=tmp_path / name)
            for name, frame in zip("ab", frames, strict=True)
        ]

    first = encrypted.describe(sites(before), ["age"])
    second = answered(lambda: encrypted.describe(sites(after), ["age"]))
    if second is None:
        return
    n1, n2 = float(first.loc["count", "age"]), float(second.loc["count", "age"])
    total = float(first.loc["sum", "age"]) - float(second.loc["sum", "age"])
    assert n1 - n2 == 2
    removed = sum(float(f.loc[7, "age"]) for f in before)
    assert total == pytest.approx(removed, abs=1e-6)
    pytest.fail("released the sum of the two removed patients' ages")
