"""Holders across queries (``healthlab.holders``): no difference of pooled answers
over the same sites is one site's own, while ordinary margins are answered.

Attacks are mounted as the researcher would, through the statistics functions on
teaching sites; each asserts the refusal. A random search checks the rule against
the definition, in clear: after every answered histogram, no linear combination of
the released pooled counts depends on one site's rows alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.errors import DisclosureRefused, HeldByTooFewSites

HOLDERS = "one site's own"


def ages(values: np.ndarray | list[float], **extra: object) -> pd.DataFrame:
    return pd.DataFrame({"age": np.asarray(values, dtype=float), **extra})


def between_sites() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sites hold ages in [20, 60) and [63, 100); only a holds [60, 63)."""
    rng = np.random.default_rng(3)
    a = ages(np.r_[rng.uniform(20, 59, 30).round(), [60, 61, 62, 61], [65, 70, 75]])
    b = ages(np.r_[rng.uniform(20, 59, 30).round(), [64, 66, 71, 78, 79]])
    return a, b


def first_refusal(asks: list) -> DisclosureRefused | None:  # type: ignore[type-arg]
    for ask in asks:
        try:
            ask()
        except DisclosureRefused as exc:
            return exc
    return None


@pytest.mark.parametrize(
    "edges",
    [
        [[20, 60, 100], [20, 63, 100]],
        [[20, 63, 100], [20, 60, 100]],
        [[20, 60, 100], [20, 62, 100], [20, 63, 100]],
        [[20, 40, 60, 100], [20, 50, 63, 100], [20, 63, 100]],
    ],
)
def test_edges_that_differ_by_one_sites_rows_are_refused(edges: list) -> None:  # type: ignore[type-arg]
    """Every bin of every histogram is held by both sites and each site's
    difference has at least 3 rows, yet the difference of two answers is site a's
    count in [60, 63): the sites refuse the query that would release it."""
    a, b = between_sites()
    sites = [Site("a", a), Site("b", b)]
    refused = first_refusal(
        [lambda e=e: encrypted.histogram(sites, "age", e) for e in edges]
    )
    assert isinstance(refused, HeldByTooFewSites), refused
    assert HOLDERS in str(refused)
    for value in ("60", "61", "62", "4 rows"):  # nothing of the rows in the message
        assert value not in str(refused).replace("fewer than 2", "")


def test_groups_that_differ_by_one_sites_rows_are_refused() -> None:
    """Two groupings that differ only on four of site a's rows (a recoded level):
    the difference of group x's answers is those rows' n and ages."""
    rng = np.random.default_rng(7)
    a = ages(rng.normal(55, 10, 40).round(1), g1=rng.choice(["x", "y"], 40))
    b = ages(rng.normal(55, 10, 40).round(1), g1=rng.choice(["x", "y"], 40))
    a["g2"], b["g2"] = a.g1, b.g1
    moved = a.index[a.g1 == "x"][:4]
    a.loc[moved, "g2"] = "y"
    sites = [Site("a", a), Site("b", b)]
    refused = first_refusal(
        [
            lambda: encrypted.describe(sites, ["age"], by="g1"),
            lambda: encrypted.describe(sites, ["age"], by="g2"),
        ]
    )
    assert isinstance(refused, HeldByTooFewSites), refused


def test_cells_that_differ_by_one_sites_rows_are_refused() -> None:
    """The same attack with crosstab cells: two tables whose cells differ by rows
    of site a alone."""
    rng = np.random.default_rng(8)

    def frame(n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"s": rng.choice(["F", "M"], n), "c1": rng.choice(["p", "q"], n)}
        )

    a, b = frame(60), frame(60)
    a["c2"], b["c2"] = a.c1, b.c1
    a.loc[a.index[(a.s == "F") & (a.c1 == "p")][:3], "c2"] = "q"
    sites = [Site("a", a), Site("b", b)]
    refused = first_refusal(
        [
            lambda: encrypted.crosstab(sites, "s", "c1"),
            lambda: encrypted.crosstab(sites, "s", "c2"),
        ]
    )
    assert isinstance(refused, HeldByTooFewSites), refused


def test_the_rule_is_kept_across_a_restart(tmp_path: Path) -> None:
    """The sites' patterns are in their state directories: the second histogram,
    asked of sites started again, is refused as before."""
    a, b = between_sites()

    def sites() -> list[Site]:
        return [
            Site("a", a, state_dir=tmp_path / "a"),
            Site("b", b, state_dir=tmp_path / "b"),
        ]

    encrypted.histogram(sites(), "age", [20, 60, 100])
    assert (tmp_path / "a" / "holders-a.json").exists()
    with pytest.raises(HeldByTooFewSites):
        encrypted.histogram(sites(), "age", [20, 63, 100])


def test_margins_are_answered_exactly() -> None:
    """A table by sex, then a histogram of age, where only site a has women over
    80: the (woman, over 80) rows are (woman, 60-80) - (man, 60-80) + (man, over
    80) at a, all held by both sites — margins isolate nothing, and are answered,
    equal to numpy on the pooled rows."""
    rng = np.random.default_rng(11)

    def frame(n: int, old_women: bool) -> pd.DataFrame:
        sex = rng.choice(["F", "M"], n)
        age = rng.uniform(20, 79.9, n).round(1)
        out = ages(age, sex=sex)
        extra = [("M", 85.0), ("M", 88.0), ("M", 91.0)]
        if old_women:
            extra += [("F", 84.0), ("F", 86.0), ("F", 90.0)]
        return pd.concat(
            [
                out,
                pd.DataFrame(
                    {"age": [a for _, a in extra], "sex": [s for s, _ in extra]}
                ),
            ],
            ignore_index=True,
        )

    a, b = frame(80, True), frame(80, False)
    sites = [Site("a", a), Site("b", b)]
    pooled = pd.concat([a, b], ignore_index=True)
    by_sex = encrypted.describe(sites, ["age"], by="sex")
    for sex in ("F", "M"):
        assert by_sex[(sex, "age")]["count"] == (pooled.sex == sex).sum()
    edges = [20, 40, 60, 80, 100]
    table = encrypted.histogram(sites, "age", edges)
    expected, _ = np.histogram(pooled.age, bins=edges)
    assert [int(c) for c in table["count"]] == expected.tolist()
    again = encrypted.describe(sites, ["age"], by="sex")  # the same groups again
    assert again[("F", "age")]["mean"] == pytest.approx(
        pooled.age[pooled.sex == "F"].mean(), rel=1e-12
    )


def _isolated(frames: list[pd.DataFrame], released: list[list[np.ndarray]]) -> bool:
    """In clear: whether a combination of the released pooled cells depends on one
    site's rows alone (some site's pattern outside the span of the others')."""
    patterns = []
    for s in range(len(frames)):
        cells = np.stack([c[s] for c in released], axis=1) if released else None
        rows = np.unique(cells, axis=0) if cells is not None else np.zeros((0, 0))
        patterns.append(rows[rows.any(axis=1)].astype(float))
    for s in range(len(frames)):
        others = [p for t, p in enumerate(patterns) if t != s and len(p)]
        mine = patterns[s]
        if not len(mine):
            continue
        if not others:
            return True
        rest = np.vstack(others)
        if np.linalg.matrix_rank(np.vstack([rest, mine])) > np.linalg.matrix_rank(rest):
            return True
    return False


@pytest.mark.parametrize("seed", range(6))
def test_no_answered_sequence_isolates_a_site(seed: int) -> None:
    """Random histograms with edges around ages only site 0 holds, over two or
    three sites: whatever the sites answer, no combination of what they released
    is one site's own (checked in clear on the rows, from the released bins).
    With the rule switched off, two of these six seeds isolate site 0."""
    rng = np.random.default_rng(100 + seed)
    n_sites = 2 + seed % 2
    # site 0 holds ages 60-69, the others none: edges there differ by its rows
    gap = np.r_[np.arange(20, 60), np.arange(70, 90)]
    frames = [ages(rng.integers(20, 90, 120))] + [
        ages(rng.choice(gap, 120)) for _ in range(n_sites - 1)
    ]
    sites = [Site(f"s{i}", f) for i, f in enumerate(frames)]
    released: list[list[np.ndarray]] = []
    answered = 0
    for _ in range(8):
        inner = sorted(rng.choice(np.arange(55, 76), size=2, replace=False))
        edges = [10, *inner, 100]
        try:
            table = encrypted.histogram(sites, "age", edges)
        except DisclosureRefused:
            continue
        answered += 1
        for i, count in enumerate(table["count"]):
            if pd.isna(count):
                continue
            lo, hi = edges[i], edges[i + 1]
            last = i == len(edges) - 2
            released.append(
                [
                    (
                        (f.age >= lo) & ((f.age <= hi) if last else (f.age < hi))
                    ).to_numpy()
                    for f in frames
                ]
            )
        assert not _isolated(frames, released), f"edges {edges} isolated a site"
    assert answered >= 1  # the search asked something the sites answered


def test_a_query_prepared_before_another_was_answered_is_asked_again() -> None:
    """Two queries prepared over the same sites, the later answered first: the
    earlier one's table counts patterns that no longer hold, so it is refused
    (answering it would forget the other's cells)."""
    from healthlab.holders import HolderPatterns

    memory = HolderPatterns()
    rows = np.arange(12)
    first = {"age": [rows < 6]}
    second = {"age": [rows < 8]}

    def lift(m: np.ndarray) -> np.ndarray:
        return m

    early = memory.prepare("a,b", "0x01", first, [], lift, 12, 2)
    late = memory.prepare("a,b", "0x02", second, [], lift, 12, 2)
    # every pattern held by both sites: the table summed with an equal one
    doubled = (2 * late.table) % (1 << 16)
    memory.check(late, doubled, [], 2, "a", lift, 1 << 16)
    memory.record(late)
    with pytest.raises(HeldByTooFewSites, match="ask it again"):
        memory.check(early, (2 * early.table) % (1 << 16), [], 2, "a", lift, 1 << 16)
