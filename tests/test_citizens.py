"""Citizens as sites (issue 16, point 4): sites of one person's few rows.

A citizen site (:meth:`DisclosurePolicy.citizen`) has no per-site row minimum: it
contributes only inside a secure sum pooled over at least ``min_contributors``
sites that all hold rows for the query, answers one record of its rows and no
groups, and the site-set audit runs with that pooled minimum. These tests check
the results against pandas on the pooled rows and attack the rules: too few
citizens, groups, a citizen the filter leaves out, differencing within one
citizen's rows and over sets of citizens. The oracle's pooled audit and a
1,000-citizen oracle run are in ``tests/test_oracle_citizens.py``.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from healthlab import errors
from healthlab.encrypted import KeyHolder, describe, histogram
from healthlab.sites import DisclosurePolicy, Site

K = 10


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


def citizens(n: int, *, seed: int = 0) -> dict[str, pd.DataFrame]:
    """``n`` one-row citizen frames, under names of their own (the ungated sites'
    query log is this process's: no other test's queries share these sites)."""
    rng = np.random.default_rng(seed)
    tag = uuid.uuid4().hex[:8]
    return {
        f"citizen-{tag}-{i:03d}": pd.DataFrame(
            {"x": [float(rng.normal(50, 10))], "y": [float(rng.normal(0, 1))]}
        )
        for i in range(n)
    }


def as_sites(frames: dict[str, pd.DataFrame], policy: DisclosurePolicy) -> list[Site]:
    return [Site(name, frame, policy=policy) for name, frame in frames.items()]


# -------------------------------------------------------------------- policy
def test_hospital_defaults_are_unchanged_and_a_one_row_hospital_site_refuses(
    keys: KeyHolder,
) -> None:
    policy = DisclosurePolicy()
    assert (policy.min_rows, policy.min_sites, policy.min_difference) == (3, 2, 3)
    assert policy.min_contributors is None and not policy.is_citizen
    frames = citizens(3)
    with pytest.raises(errors.TooFewRows, match="fewer than 3 rows"):
        describe(as_sites(frames, policy), ["x"], keys=keys)


def test_the_citizen_policy_is_explicit_and_never_below_the_per_site_k() -> None:
    policy = DisclosurePolicy.citizen()
    assert policy.is_citizen
    assert policy.min_contributors == K and policy.min_sites == K
    assert DisclosurePolicy.citizen(12, min_sites=20).min_sites == 20
    assert DisclosurePolicy.citizen(12, min_sites=3).min_sites == 12
    with pytest.raises(errors.InvalidInput, match="at least its min_rows"):
        DisclosurePolicy.citizen(2)
    with pytest.raises(errors.InvalidInput, match="min_sites must be at least"):
        DisclosurePolicy(min_contributors=10, min_sites=2)
    with pytest.raises(errors.InvalidInput, match="whole number"):
        DisclosurePolicy.citizen(True)


# ------------------------------------------------------------------- answers
def test_citizens_pool_to_what_pandas_computes_on_their_rows(keys: KeyHolder) -> None:
    frames = citizens(12)
    table = describe(
        as_sites(frames, DisclosurePolicy.citizen()), ["x", "y"], keys=keys
    )
    pooled = pd.concat(frames.values(), ignore_index=True)
    for column in ("x", "y"):
        assert table[column]["count"] == 12
        assert table[column]["mean"] == pytest.approx(pooled[column].mean(), abs=1e-9)
        assert table[column]["std"] == pytest.approx(pooled[column].std(), abs=1e-9)
    assert {q["min_sites"] for q in table.receipt["queries"]} == {K}


def test_a_study_cannot_ask_citizens_for_a_smaller_pool(keys: KeyHolder) -> None:
    """The query's min_sites is raised to the citizens' pooled minimum."""
    frames = citizens(9)
    with pytest.raises(errors.TooFewSites, match="fewer than the 10 required"):
        describe(
            as_sites(frames, DisclosurePolicy.citizen()), ["x"], keys=keys, min_sites=2
        )


# ------------------------------------------------------------------- attacks
def test_differencing_all_citizens_and_all_but_one_is_refused(
    keys: KeyHolder,
) -> None:
    frames = citizens(12)
    sites = as_sites(frames, DisclosurePolicy.citizen())
    assert describe(sites, ["x"], keys=keys)["x"]["count"] == 12
    # the same sites again: a study that asks every query of its sites is answered
    assert describe(sites, ["y"], keys=keys)["y"]["count"] == 12
    for leave_out in (0, 11):
        rest = [s for i, s in enumerate(sites) if i != leave_out]
        with pytest.raises(errors.DisclosureRefused, match="site-set differencing"):
            describe(rest, ["x"], keys=keys)
    # the logged attempts count as answered: the left-out citizens now refuse the
    # full set too (the log, not the answers, is what a researcher could hold)
    with pytest.raises(errors.DisclosureRefused, match="site-set differencing"):
        describe(sites, ["x"], keys=keys)


def test_a_citizen_the_query_leaves_out_makes_every_citizen_refuse(
    keys: KeyHolder,
) -> None:
    """Same participants, one citizen's row dropped by the query (a missing value):
    the difference with the full query would be that citizen's row. The holder
    count shows a site without rows; every citizen refuses alike, naming none."""
    frames = citizens(12)
    first = next(iter(frames))
    frames[first].loc[0, "y"] = np.nan
    sites = as_sites(frames, DisclosurePolicy.citizen())
    assert describe(sites, ["x"], keys=keys)["x"]["count"] == 12
    with pytest.raises(errors.TooFewSites, match="some hold none") as caught:
        describe(sites, ["x", "y"], dropna=True, keys=keys)
    assert "nan" not in str(caught.value).lower()


def test_citizens_answer_no_groups_bins_or_cells(keys: KeyHolder) -> None:
    frames = citizens(12)
    sites = as_sites(frames, DisclosurePolicy.citizen())
    with pytest.raises(errors.DisclosureRefused, match="answers no groups"):
        histogram(sites, "x", bins=[0, 50, 100], keys=keys)


def test_a_citizen_of_a_few_rows_answers_one_record(keys: KeyHolder) -> None:
    """A device of two rows answered both: a query of one of them (its other row's
    value missing) would let the two answers be differenced to one row."""
    frames = citizens(12)
    first = next(iter(frames))
    frames[first] = pd.DataFrame({"x": [40.0, 60.0], "y": [1.0, np.nan]})
    sites = as_sites(frames, DisclosurePolicy.citizen())
    assert describe(sites, ["x"], keys=keys)["x"]["count"] == 13
    assert describe(sites, ["x"], keys=keys)["x"]["count"] == 13
    with pytest.raises(errors.TooFewRows, match="its record"):
        describe(sites, ["x", "y"], dropna=True, keys=keys)


def test_the_record_rule_remembers_and_ignores_value_sets() -> None:
    """At the site: a column's value sets are functions of the record, not other
    rows; another set of rows is refused, and the refusal is remembered."""
    site = Site(
        "device",
        pd.DataFrame({"x": [1.0, 2.0, 2.0]}),
        policy=DisclosurePolicy.citizen(),
    )
    every = np.ones(3, dtype=bool)
    values = [np.array([True, False, False]), np.array([False, True, True])]
    subsets = {"x": [every], "values of x": values}
    site.check_subsets(subsets)
    site.remember(subsets, query_hash="0x1", kind="moments", researcher=None)
    site.check_subsets({"x": [every], "values of x": values})
    with pytest.raises(errors.TooFewRows, match="its record"):
        site.check_subsets({"x": [np.array([True, True, False])]})
    with pytest.raises(errors.DisclosureRefused, match="answers no groups"):
        site.check_subsets({"x": [every, np.zeros(3, dtype=bool)]})
    assert site.auditor.refused
