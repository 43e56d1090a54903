"""Holders across queries (``healthlab.holders``): no difference of pooled answers
over the same sites is one site's own, while ordinary margins are answered.

Attacks are mounted as the researcher would, through the statistics functions on
teaching sites; each asserts the refusal. A random search checks the rule against
the definition, in clear: after every answered histogram, no linear combination of
the released pooled counts depends on one site's rows alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
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


def test_a_memory_in_the_per_site_set_layout_is_refused_not_forgotten(
    tmp_path: Path,
) -> None:
    """A memory written one per set of sites (the layout before one memory over
    every query) cannot be merged soundly: read as empty it would forget what the
    site answered, so the site refuses and says what its operator should do."""
    import json

    a, b = between_sites()
    old = tmp_path / "a" / "holders-a.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"a@x,b@y": {"labels": "", "ids": [""]}}))
    sites = [
        Site("a", a, state_dir=tmp_path / "a"),
        Site("b", b, state_dir=tmp_path / "b"),
    ]
    with pytest.raises(DisclosureRefused, match="new state directory") as refused:
        encrypted.histogram(sites, "age", [20, 60, 100])
    assert not any(ch.isdigit() for ch in str(refused.value).split(":", 1)[-1])


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

    early = memory.prepare(["a", "b"], "0x01", first, [], lift, 12, 2)
    late = memory.prepare(["a", "b"], "0x02", second, [], lift, 12, 2)
    # every pattern held by both sites: the table summed with an equal one
    doubled = (2 * late.table) % (1 << 16)
    memory.check(late, doubled, [], 2, "a", lift, 1 << 16)
    memory.record(late)
    with pytest.raises(HeldByTooFewSites, match="ask it again"):
        memory.check(early, (2 * early.table) % (1 << 16), [], 2, "a", lift, 1 << 16)


# --------------------------------------------------------------- across site sets
def sexes(seed: int, holds: dict[str, list[str]], n: int = 40) -> dict[str, Site]:
    """Sites of ``n`` rows with an age and a sex drawn from each site's list."""
    rng = np.random.default_rng(seed)
    return {
        name: Site(
            name,
            pd.DataFrame(
                {"age": rng.normal(55, 10, n).round(1), "sex": rng.choice(kinds, n)}
            ),
        )
        for name, kinds in holds.items()
    }


def pick(sites: dict[str, Site], names: str) -> list[Site]:
    return [sites[n] for n in names]


@pytest.mark.parametrize(("empty", "kinds"), [("c", ["M"]), ("d", ["M"]), ("d", ["X"])])
def test_two_site_sets_do_not_release_one_sites_group(
    empty: str, kinds: list[str]
) -> None:
    """A group over {a, b, c} and over {a, b, d}, where c (or d) holds none of it:
    each pooled group is held by two sites and the sets single no site out, yet
    the difference of the two answers would be d's (or c's) n and sum in it. The
    second query is refused: d's rows in it are held by no other site, or (d
    holding only a group nobody else has, suppressed) an earlier pattern of a
    and b that c holds would no longer be a combination of patterns that enough
    sites hold."""
    holds = {n: ["F", "M"] for n in "abcd"}
    holds[empty] = kinds
    sites = sexes(5, holds)
    encrypted.describe(pick(sites, "abc"), ["age"], by="sex")
    with pytest.raises(HeldByTooFewSites, match=HOLDERS):
        encrypted.describe(pick(sites, "abd"), ["age"], by="sex")


def test_leaving_sites_out_of_an_asked_set_is_refused() -> None:
    """All four sites by sex, then two of them: where c holds no women, the two
    answers' difference would be d's women. The sites asked cannot count what
    the sites left out hold, so any such subset is refused, with or without
    groups."""
    holds = {n: ["F", "M"] for n in "abcd"}
    holds["c"] = ["M"]
    sites = sexes(6, holds)
    encrypted.describe(pick(sites, "abcd"), ["age"], by="sex")
    with pytest.raises(HeldByTooFewSites, match=HOLDERS):
        encrypted.describe(pick(sites, "ab"), ["age"], by="sex")
    with pytest.raises(HeldByTooFewSites, match=HOLDERS):
        encrypted.describe(pick(sites, "ab"), ["age"])


def test_disjoint_sets_then_their_union_and_the_same_sets_again_are_answered() -> None:
    """Two regions apart, then together, then each region again: every site moves
    with at least one other site, so no difference is one site's; each answer
    equals pandas on the pooled rows."""
    sites = sexes(7, {n: ["F", "M"] for n in "abcd"})
    for names in ("ab", "cd", "abcd", "ab", "cd", "abcd"):
        table = encrypted.describe(pick(sites, names), ["age"], by="sex")
        pooled = pd.concat([sites[n].rows(["age", "sex"])[0] for n in names])
        for sex in ("F", "M"):
            group = pooled.age[pooled.sex == sex]
            assert table[(sex, "age")]["count"] == len(group)
            assert table[(sex, "age")]["mean"] == pytest.approx(group.mean(), rel=1e-12)


@pytest.mark.parametrize("added", ["c", "cd"])
def test_sites_join_an_asked_set_two_at_a_time(added: str) -> None:
    """{a, b}, then with c alone (the difference would be c's: refused) or with
    c and d (answered, equal to pandas)."""
    sites = sexes(8, {n: ["F", "M"] for n in "abcd"})
    encrypted.describe(pick(sites, "ab"), ["age"])
    if len(added) == 1:
        with pytest.raises(DisclosureRefused):
            encrypted.describe(pick(sites, "ab" + added), ["age"])
        return
    table = encrypted.describe(pick(sites, "ab" + added), ["age"])
    pooled = pd.concat([sites[n].rows(["age"])[0] for n in "ab" + added])
    assert table.loc["count", "age"] == len(pooled)


SETS = ["ab", "cd", "abcd", "abc", "abd", "bcd", "abcde", "cde"]


@pytest.mark.parametrize("without", ["c", "cd"])
def test_no_two_site_sets_isolate_a_site(without: str) -> None:
    """Every ordered pair of eight site sets over five sites, by sex then by sex or
    an age histogram, where the sites in ``without`` hold no women: whenever both
    are answered, no combination of the released pooled cells (a site outside a
    query holds none of its cells) is one site's own — checked in clear on the
    rows. The sites answer pairs that add or leave out a pooled result's sites
    as a block."""
    from healthlab import sites as site_module

    holds = {n: ["F", "M"] for n in "abcde"}
    for n in without:
        holds[n] = ["M"]
    answered = 0
    for first, second, group in itertools.product(SETS, SETS, (True, False)):
        site_module._LOCAL_LOG.clear()  # each pair from a fresh study
        sites = sexes(9, holds)
        names = list(sites)
        frames = [sites[n].rows(["age", "sex"])[0] for n in names]
        released: list[list[np.ndarray]] = []

        def cells(
            chosen: str,
            select: Callable[[pd.DataFrame], np.ndarray],
            names: list[str] = names,
            frames: list[pd.DataFrame] = frames,
        ) -> list[np.ndarray]:
            return [
                select(f) if n in chosen else np.zeros(len(f), dtype=bool)
                for n, f in zip(names, frames, strict=True)
            ]

        try:
            table = encrypted.describe(pick(sites, first), ["age"], by="sex")
            for sex in ("F", "M"):
                if (sex, "age") in table.columns:  # a suppressed group is absent
                    released.append(cells(first, lambda f, s=sex: f.sex == s))
            if group:
                table = encrypted.describe(pick(sites, second), ["age"], by="sex")
                for sex in ("F", "M"):
                    if (sex, "age") in table.columns:
                        released.append(cells(second, lambda f, s=sex: f.sex == s))
            else:
                table = encrypted.histogram(pick(sites, second), "age", [0, 55, 200])
                released.append(cells(second, lambda f: f.age < 55))  # [0, 55)
                released.append(cells(second, lambda f: f.age >= 55))  # [55, 200]
        except DisclosureRefused:
            continue
        answered += 1
        released = [[np.asarray(m, dtype=bool) for m in r] for r in released]
        assert not _isolated(frames, released), f"{first} then {second} isolated"
    # the same set twice, a set and a disjoint one, a set and one with two more
    assert answered >= 12


def test_a_withheld_cell_with_a_released_cells_rows_is_withheld_alone() -> None:
    """Site a records no bmi at all: its missing-bmi cell (a alone holds one) is
    withheld, and at a it has the same rows as the released "of" count. Withheld
    by its rows, the released count went too, and a forgot it had released its
    row count: then the complete-case count of bmi gave a's n by difference (found
    by an attack review). Withheld by its label, the difference is refused."""
    rng = np.random.default_rng(2)

    def frame(n: int, bmi: bool = True) -> pd.DataFrame:
        values = rng.normal(27, 3, n).round(1) if bmi else np.full(n, np.nan)
        return pd.DataFrame({"age": rng.normal(55, 10, n).round(1), "bmi": values})

    a, b, c = frame(17, bmi=False), frame(25), frame(30)
    sites = [Site("a", a), Site("b", b), Site("c", c)]
    answers = []
    for ask in (
        lambda: int(encrypted.missing(sites, ["bmi"])["of"].iloc[0]),
        lambda: int(
            encrypted.describe(sites, ["bmi"], dropna=True).loc["count"].iloc[0]
        ),
    ):
        try:
            answers.append(ask())
        except DisclosureRefused:
            answers.append(None)
    assert None in answers, f"both answered: {answers} (of - count = a's n, 17)"
    # the same two over sites that all record bmi are answered
    d = frame(20)
    full = [Site("b", b), Site("c", c), Site("d", d)]
    assert int(encrypted.missing(full, ["bmi"])["of"].iloc[0]) == 75
    assert encrypted.describe(full, ["bmi"], dropna=True).loc["count", "bmi"] == 75


# ------------------------------------- a column's few values, a design's patterns
def _staged(name: str, stages: list[int], seed: int) -> Site:
    rng = np.random.default_rng(seed)
    n = len(stages)
    frame = pd.DataFrame(
        {
            "stage": np.asarray(stages, dtype=float),
            "age": rng.normal(60, 8, n).round(),
            "sex": np.arange(n) % 2,
        }
    )
    return Site(name, frame)


@pytest.mark.parametrize("ask", ["describe", "by sex", "corr"])
def test_a_value_only_one_site_holds_is_not_released_through_the_moments(
    ask: str,
) -> None:
    """stage takes 0, 1 and 2, and only site a has stage-2 patients (5 of them).
    n, Σ stage and Σ stage² give each value's pooled count — the count of stage 2
    was site a's own (n₂ = (Σx² − Σx) / 2 came out as a's count), as were Σ age over
    them through the cross moments. A column's value sets are holder cells keyed
    by the value, alike at every site: refused. Both sites holding stage 2:
    answered."""

    def query(sites: list[Site]) -> pd.DataFrame:
        if ask == "by sex":
            return encrypted.describe(sites, ["stage"], by="sex")
        if ask == "corr":
            return encrypted.corr(sites, ["stage", "age"])
        return encrypted.describe(sites, ["stage"])

    lone = [
        _staged("a", [0] * 40 + [1] * 30 + [2] * 12, 1),
        _staged("b", [0] * 50 + [1] * 25, 2),
    ]
    with pytest.raises(HeldByTooFewSites, match="site a"):
        query(lone)
    both = [
        _staged("a", [0] * 40 + [1] * 30 + [2] * 12, 1),
        _staged("b", [0] * 50 + [1] * 25 + [2] * 10, 2),
    ]
    answer = query(both)
    if ask == "describe":
        pooled = pd.concat([s._frame for s in both])
        assert answer.loc["mean", "stage"] == pytest.approx(pooled["stage"].mean())


def test_an_outcome_value_only_one_site_holds_is_refused_in_a_model() -> None:
    """A Poisson outcome of 0, 1 and 2 where only site a has a 2: the score's
    Σ x·y over the outcome's value sets gave a's sums over its y = 2 patients.
    Refused; with a 2 at both sites, answered."""
    rng = np.random.default_rng(3)

    def frame(twos: int) -> pd.DataFrame:
        age = rng.normal(60, 8, 80).round()
        y = (rng.random(80) < 0.3).astype(float)
        y[:twos] = 2.0
        return pd.DataFrame({"y": y, "age": age})

    with pytest.raises(HeldByTooFewSites):
        encrypted.glm([Site("a", frame(5)), Site("b", frame(0))], "y ~ age", "poisson")
    fit = encrypted.glm(
        [Site("a", frame(5)), Site("b", frame(4))], "y ~ age", "poisson"
    )
    assert fit.converged


def test_a_design_pattern_only_one_site_holds_is_refused() -> None:
    """y ~ g + x + z over three 0/1 covariates: 8 design patterns, each held by
    12 patients at site a; site b holds every pattern but (1, 1, 1), yet every
    pair of covariates' shared rows at both. A discrete design's iterates solve
    for each pattern's pooled count (healthlab.encrypted.models.design_patterns),
    and (1, 1, 1)'s was site a's own: the patterns are holder cells keyed by the
    design row's values. Refused; with every pattern at both sites, answered."""
    rng = np.random.default_rng(5)

    def frame(skip: bool) -> pd.DataFrame:
        rows = [
            pattern
            for pattern in itertools.product([0.0, 1.0], repeat=3)
            if not (skip and pattern == (1.0, 1.0, 1.0))
            for _ in range(12)
        ]
        out = pd.DataFrame(rows, columns=["g", "x", "z"])
        out["y"] = (rng.random(len(out)) < 0.4).astype(float)
        return out

    with pytest.raises(HeldByTooFewSites):
        encrypted.glm(
            [Site("a", frame(False)), Site("b", frame(True))],
            "y ~ g + x + z",
            "poisson",
        )
    fit = encrypted.glm(
        [Site("a", frame(False)), Site("b", frame(False))], "y ~ g + x + z", "poisson"
    )
    assert fit.converged
