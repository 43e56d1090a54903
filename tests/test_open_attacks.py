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
    reason="open: a by= group's holders are a subset of the participants the "
    "site-set audit does not see; {A,B,C} and {A,B,D}, where C holds none of the "
    "group, differ by D's totals of it (README, Governance)",
)
def test_two_site_sets_do_not_release_one_sites_group() -> None:
    """Group F over {a, b, c} (c holds no F) and over {a, b, d}: each pooled F is
    held by at least two sites and the site sets single no site out, yet the
    difference of the two answers is site d's n and sum of ages in F."""
    rng = np.random.default_rng(5)

    def frame(n: int, sexes: list[str]) -> pd.DataFrame:
        return pd.DataFrame(
            {"age": rng.normal(55, 10, n).round(1), "sex": rng.choice(sexes, n)}
        )

    a, b, d = frame(40, ["F", "M"]), frame(40, ["F", "M"]), frame(40, ["F", "M"])
    c = frame(40, ["M"])
    site = {n: Site(n, f) for n, f in {"a": a, "b": b, "c": c, "d": d}.items()}
    first = encrypted.describe([site["a"], site["b"], site["c"]], ["age"], by="sex")
    second = answered(
        lambda: encrypted.describe([site["a"], site["b"], site["d"]], ["age"], by="sex")
    )
    if second is None:
        return
    (n1, s1), (n2, s2) = (
        (float(t[("F", "age")]["count"]), float(t[("F", "age")]["sum"]))
        for t in (first, second)
    )
    females = d[d.sex == "F"]
    assert n2 - n1 == len(females)
    assert s2 - s1 == pytest.approx(females.age.sum(), rel=1e-9)
    pytest.fail("released site d's n and sum of ages of its F rows")


@pytest.mark.xfail(
    strict=True,
    raises=pytest.fail.Exception,
    reason="open: an edit in a column the researcher does not ask about counts as a "
    "changed row (two places in the auditor's row space); one such edit plus one "
    "removal between two answers gives the removed patient's value (README, Data "
    "updates)",
)
def test_an_edit_elsewhere_plus_one_removal_does_not_release_a_patient(
    tmp_path: Path,
) -> None:
    """All rows' ages, then the site edits row 12's bmi (never asked about) and
    removes row 7, then all rows' ages again: the difference is row 7's age."""
    rng = np.random.default_rng(0)
    n = 60

    def cohort(seed: int) -> pd.DataFrame:
        r = np.random.default_rng(seed)
        return pd.DataFrame(
            {"age": r.normal(55, 10, n).round(1), "bmi": r.normal(27, 4, n).round(1)}
        )

    before = cohort(int(rng.integers(1 << 16)))
    partner = cohort(1)
    after = before.copy()
    after.loc[12, "bmi"] += 1.0
    after = after.drop(index=7).reset_index(drop=True)

    def sites(frame: pd.DataFrame) -> list[Site]:
        return [
            Site("a", frame, state_dir=tmp_path / "a"),
            Site("b", partner, state_dir=tmp_path / "b"),
        ]

    first = encrypted.describe(sites(before), ["age"])
    second = answered(lambda: encrypted.describe(sites(after), ["age"]))
    if second is None:
        return
    n1, n2 = float(first.loc["count", "age"]), float(second.loc["count", "age"])
    total = float(first.loc["sum", "age"]) - float(second.loc["sum", "age"])
    assert n1 - n2 == 1
    assert total == pytest.approx(before.loc[7, "age"], abs=1e-6)
    pytest.fail("released the removed patient's age")
