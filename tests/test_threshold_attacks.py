"""Attacks through the thresholds a researcher chooses (issue 13): a clip bound, a
researcher's own ``min_rows``, and bins or cells only one site holds.

Each is mounted as the researcher would mount it, asserted refused or withheld,
next to the honest variant answered exactly (pandas on the pooled rows).

- **Clipping.** ``bounds=`` clip each value at a site; without a DP budget,
  Σ clip(x, hi) against Σ x gives Σ (x − hi) over the rows above ``hi``: with
  ``hi`` just below the oldest patient's age, that age exactly (it did, before the
  clipped rows were audited). Now the rows a bound clips are subsets like a group:
  fewer than ``k`` of them, at any site, is refused; so is a pair of bounds whose
  difference isolates them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.errors import DisclosureRefused


def cohort(seed: int, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "sex": rng.choice(["F", "M"], n),
        }
    )


def two_sites() -> list[Site]:
    return [Site("h1", cohort(1)), Site("h2", cohort(2))]


def pooled() -> pd.DataFrame:
    return pd.concat([cohort(1), cohort(2)], ignore_index=True)


# ---------------------------------------------------------------------- clipping
@pytest.mark.parametrize("rank", [1, 2])
def test_a_bound_just_below_the_oldest_patients_is_refused(rank: int) -> None:
    sites = two_sites()
    ages = np.sort(pooled()["age"].to_numpy())
    assert len(set(ages[-3:])) == 3
    hi = float(ages[-rank - 1])  # clips the `rank` oldest patients of the study
    encrypted.describe(sites, ["age"])  # the unclipped sums are answered
    with pytest.raises(DisclosureRefused, match=r"site h[12]"):
        encrypted.describe(sites, ["age"], bounds={"age": (0.0, hi)})


def test_a_low_bound_above_the_youngest_is_refused_too() -> None:
    sites = two_sites()
    lo = float(np.unique(pooled()["age"])[1])  # clips the youngest (two, tied)
    with pytest.raises(DisclosureRefused):
        encrypted.describe(
            sites, ["age", "sbp"], bounds={"age": (lo, 200.0), "sbp": (0.0, 900.0)}
        )


def test_two_bounds_whose_difference_isolates_patients_are_refused() -> None:
    """Each clip holds many rows; between them one site holds one or two."""
    sites = two_sites()
    h1 = np.sort(cohort(1)["age"].to_numpy())
    h2 = np.sort(cohort(2)["age"].to_numpy())
    # two bounds that each clip >= 3 rows at both sites, with exactly one h1 row
    # and no h2 row between them
    for i in range(20, len(h1) - 1):
        lo_b, hi_b = h1[-i - 1], h1[-i]
        between_h2 = ((h2 > lo_b) & (h2 <= hi_b)).sum()
        if h1[-i] > h1[-i - 1] and between_h2 == 0:
            break
    else:
        pytest.fail("no such pair of bounds in this cohort")
    first = {"age": (0.0, float(hi_b))}
    second = {"age": (0.0, float(lo_b))}
    table = encrypted.describe(sites, ["age"], bounds=first)
    expected = pooled()["age"].clip(0.0, float(hi_b))
    assert table.loc["mean", "age"] == pytest.approx(expected.mean(), abs=1e-9)
    with pytest.raises(DisclosureRefused, match="site h1: together with what"):
        encrypted.describe(sites, ["age"], bounds=second)


def test_bounds_that_clip_many_rows_or_none_are_answered_exactly() -> None:
    sites = two_sites()
    rows = pooled()
    wide = encrypted.describe(sites, ["age", "sbp"], bounds=(0.0, 1000.0))
    assert wide.loc["mean", "age"] == pytest.approx(rows["age"].mean(), abs=1e-9)
    bounds = {"age": (45.0, 65.0), "sbp": (110.0, 150.0)}
    table = encrypted.describe(two_sites(), ["age", "sbp"], bounds=bounds)
    for column, (lo, hi) in bounds.items():
        clipped = rows[column].clip(lo, hi)
        assert table.loc["mean", column] == pytest.approx(clipped.mean(), abs=1e-9)
        assert table.loc["std", column] == pytest.approx(clipped.std(), abs=1e-9)
