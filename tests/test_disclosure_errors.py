"""No site value in any error, and levels() that releases only common categories.

Attacked as the researcher would (issue 13, points 6 and 7): every public statistic
is asked about columns a site cannot summarize — text holding patient identifiers,
text mixed with numbers, dates, a column with no value, infinities, a column one
site lacks — through gated ``Site`` objects on the embedded chain and through the
ungated ``{name: DataFrame}`` form. Each must raise a named HealthLab error, and the
whole exception chain (``str``, ``repr``, every ``__cause__``/``__context__`` and the
formatted traceback) must hold no cell value of any site and no count of rows other
than the threshold itself.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.encrypted import KeyHolder, Levels
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
)
from healthlab.site_data import numeric
from tests.conftest import Chain
from tests.test_sites import Grants, Study, grant_study

ROWS = 30  # per site
K = 3  # the default policy's minimum rows
INFINITE = 2  # infinities per site: a count below the threshold


def site_frame(i: int) -> pd.DataFrame:
    """Site ``i``'s rows: two honest columns and one of each kind a site refuses."""
    r = np.arange(ROWS)
    base = 449 + 1000 * i
    inf = 63.125 + r + 100 * i
    inf[:INFINITE] = np.inf
    return pd.DataFrame(
        {
            "age": np.round(20.0 + 1.37 * r + 0.11 * i, 2),
            "sex": np.where(r % 2 == 1, "F", "M"),
            "patient_id": [f"C{base + j:05d}" for j in r],  # 'C00449', …
            "mixed": [
                f"X{base + j:05d}" if j % 3 == 0 else 36.25 + j + 50 * i for j in r
            ],
            "visit": pd.date_range("2021-03-04", periods=ROWS)
            + pd.Timedelta(days=40 * i),
            "empty": np.full(ROWS, np.nan),
            "infinite": inf,
            "partial": 88.5 + 0.75 * r + 40 * i,  # dropped at the last site below
        }
    )


def site_frames() -> dict[str, pd.DataFrame]:
    frames = {f"site_{c}": site_frame(i) for i, c in enumerate("abc")}
    frames["site_c"] = frames["site_c"].drop(columns=["partial"])
    return frames


BAD = ["patient_id", "mixed", "visit", "empty", "infinite", "partial"]
TEXTUAL = ["patient_id", "mixed", "visit", "partial"]  # refused with dropna too


def distinctive_values(frames: Mapping[str, pd.DataFrame]) -> set[str]:
    """Every cell rendered as text that could not appear in a message by chance."""
    found: set[str] = set()
    for frame in frames.values():
        for column in frame.columns:
            for value in frame[column].dropna().tolist():
                text = str(value)
                if isinstance(value, pd.Timestamp):
                    found.add(value.date().isoformat())
                if len(text) >= 4 and any(ch.isdigit() for ch in text):
                    found.add(text)
    return found


VALUES = distinctive_values(site_frames())


def chain_of(error: BaseException) -> list[BaseException]:
    """``error`` and every exception chained to it, each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


def assert_discloses_nothing(error: BaseException) -> None:
    """No cell value anywhere in the chain, no row count but the threshold."""
    chained = chain_of(error)
    assert all(isinstance(e, HealthLabError) for e in chained), [
        type(e).__name__ for e in chained
    ]
    texts = [f"{e}\n{e!r}" for e in chained]
    formatted = "".join(traceback.format_exception(error))
    for value in VALUES:
        for text in texts:
            assert value not in text, f"{value!r} in {text!r}"
        assert value not in formatted, f"{value!r} in the traceback"
    for text in texts:
        counts = re.findall(r"(\d+) (?:complete )?rows?\b", text)
        assert all(int(c) == K for c in counts), f"a row count in {text!r}"
        # the site's rows, or its rows without infinities (2 is also min_sites)
        assert not re.search(rf"\b({ROWS}|{ROWS - INFINITE})\b", text), text


Statistic = Callable[[Any, str, dict[str, Any]], object]


def _values(sites: Any, column: str, options: dict[str, Any]) -> object:
    return encrypted.describe_values(sites, [column], bound=1e6, workers=1, **options)


STATISTICS: dict[str, Statistic] = {
    "describe": lambda s, c, o: encrypted.describe(s, [c], **o),
    "describe-by": lambda s, c, o: encrypted.describe(s, ["age"], by=c, **o),
    "histogram": lambda s, c, o: encrypted.histogram(s, c, [0, 50, 100, 200], **o),
    "crosstab-row": lambda s, c, o: encrypted.crosstab(s, c, "sex", **o),
    "crosstab-col": lambda s, c, o: encrypted.crosstab(s, "sex", c, **o),
    "corr": lambda s, c, o: encrypted.corr(s, ["age", c], **o),
    "cov": lambda s, c, o: encrypted.cov(s, [c, "age"], **o),
    "ols-covariate": lambda s, c, o: encrypted.ols(s, "age", [c], **o),
    "ols-response": lambda s, c, o: encrypted.ols(s, c, ["age"], **o),
    "levels": lambda s, c, o: encrypted.levels(s, c, researcher=o.get("researcher")),
    "describe_values": _values,
}


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


@pytest.fixture(scope="module")
def granted(chain: Chain) -> Iterator[tuple[Any, Grants]]:
    """The three sites' datasets granted once to one researcher."""
    clean = chain.tester.take_snapshot()
    try:
        grants = grant_study(chain.ledger(), site_frames())
        yield chain.tester.take_snapshot(), grants
    finally:
        chain.tester.revert_to_snapshot(clean)


@pytest.fixture
def study(chain: Chain, granted: tuple[Any, Grants]) -> Iterator[Study]:
    snapshot, grants = granted
    try:
        yield Study.open(chain.ledger(), site_frames(), grants)
    finally:
        chain.tester.revert_to_snapshot(snapshot)


def attack(
    sites: Any, statistic: str, column: str, options: dict[str, Any]
) -> HealthLabError:
    with pytest.raises(HealthLabError) as caught:
        STATISTICS[statistic](sites, column, options)
    assert_discloses_nothing(caught.value)
    assert caught.value.__cause__ is None
    return caught.value


# --------------------------------------------------------------- the attacks
@pytest.mark.parametrize("column", BAD)
@pytest.mark.parametrize("statistic", list(STATISTICS))
def test_ungated_refusals_quote_no_value(
    keys: KeyHolder, statistic: str, column: str
) -> None:
    options = {} if statistic == "levels" else {"keys": keys}
    error = attack(site_frames(), statistic, column, options)
    if statistic != "levels" or column != "empty":
        assert "site_" in str(error) or column in str(error)


@pytest.mark.parametrize("column", BAD)
@pytest.mark.parametrize(
    "statistic",
    ["describe", "describe-by", "histogram", "crosstab-row", "ols-response"],
)
def test_gated_refusals_quote_no_value(
    study: Study, keys: KeyHolder, statistic: str, column: str
) -> None:
    options: dict[str, Any] = {"researcher": study.researcher}
    if statistic != "levels":
        options["keys"] = keys
    attack(study.sites, statistic, column, options)


@pytest.mark.parametrize("statistic", ["corr", "cov", "ols-covariate", "levels"])
def test_gated_refusals_quote_no_value_for_every_statistic(
    study: Study, keys: KeyHolder, statistic: str
) -> None:
    for column in BAD:
        options: dict[str, Any] = {"researcher": study.researcher}
        if statistic != "levels":
            options["keys"] = keys
        attack(study.sites, statistic, column, options)


def test_gated_every_value_mode_refusals_quote_no_value(
    study: Study, keys: KeyHolder
) -> None:
    for column in BAD:
        attack(
            study.sites,
            "describe_values",
            column,
            {"researcher": study.researcher, "keys": keys},
        )


@pytest.mark.parametrize("column", TEXTUAL)
@pytest.mark.parametrize(
    "statistic",
    ["describe", "describe-by", "histogram", "crosstab-row", "corr", "ols-response"],
)
def test_refusals_with_dropna_quote_no_value(
    keys: KeyHolder, statistic: str, column: str
) -> None:
    attack(site_frames(), statistic, column, {"keys": keys, "dropna": True})


def test_a_text_identifier_is_named_as_text_not_quoted(keys: KeyHolder) -> None:
    error = attack(site_frames(), "describe", "patient_id", {"keys": keys})
    assert isinstance(error, DataRefused)
    assert "site site_a: column 'patient_id' holds text" in str(error)
    assert "C00449" not in str(error)


def test_dates_are_refused_as_dates(keys: KeyHolder) -> None:
    error = attack(site_frames(), "histogram", "visit", {"keys": keys})
    assert "column 'visit' holds dates or times" in str(error)


def test_missing_values_are_named_by_column_never_counted(keys: KeyHolder) -> None:
    error = attack(site_frames(), "describe", "infinite", {"keys": keys})
    assert "has missing or infinite values in 'infinite'" in str(error)


def test_an_unexpected_failure_at_the_site_quotes_no_value(
    keys: KeyHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pandas/numpy error no check foresaw is still turned into a clean one."""

    def explode(site: Site, query: Any) -> Any:
        raise ValueError("could not convert string to float: 'C00449'")

    from healthlab.encrypted import protocol

    # the sites compute what the registry names for the query's kind
    monkeypatch.setitem(protocol.COMPUTATIONS, "moments", explode)
    error = attack(site_frames(), "describe", "age", {"keys": keys})
    assert isinstance(error, DataRefused)
    assert "(ValueError)" in str(error)
    assert error.__context__ is None and error.__suppress_context__


def test_numbers_written_as_text_are_still_summarized(keys: KeyHolder) -> None:
    frames = {
        name: frame.assign(age=frame["age"].astype(str))
        for name, frame in site_frames().items()
    }
    table = encrypted.describe(frames, ["age"], keys=keys)
    pooled = pd.concat(site_frames().values())["age"]
    assert table.loc["count", "age"] == len(pooled)
    assert table.loc["mean", "age"] == pytest.approx(pooled.mean(), rel=1e-12)


def test_numeric_conversion_keeps_numbers_and_booleans() -> None:
    frame = pd.DataFrame(
        {"i": [1, 2], "b": [True, False], "t": ["1.5", "2"], "n": pd.array([3, 4])}
    )
    assert numeric("a", frame, ["i", "b", "t", "n"]).tolist() == [
        [1.0, 1.0, 1.5, 3.0],
        [2.0, 0.0, 2.0, 4.0],
    ]


# ------------------------------------------------------------------ levels()
def levels_frames() -> dict[str, pd.DataFrame]:
    """Common levels A and B everywhere; Z held by 1 patient at a, Y by 2 at b;
    W by 5 at b but 2 at c (so W is withheld too); V by exactly 3 at a."""
    a = ["A"] * 6 + ["B"] * 5 + ["Z"] + ["V"] * 3
    b = ["A"] * 4 + ["B"] * 7 + ["Y"] * 2 + ["W"] * 5
    c = ["A"] * 8 + ["B"] * 3 + ["W"] * 2
    return {
        name: pd.DataFrame({"g": g, "x": np.arange(len(g), dtype=float)})
        for name, g in (("a", a), ("b", b), ("c", c))
    }


def test_levels_releases_common_levels_exactly_as_pandas_gives_them() -> None:
    frames = site_frames()
    found = encrypted.levels(frames, "sex")
    pooled = pd.concat(frames.values())["sex"]
    assert found == sorted(pooled.astype(str).unique())
    assert isinstance(found, Levels) and not found.withheld


def test_levels_of_numbers_are_their_text() -> None:
    frames = {
        name: pd.DataFrame({"k": [0, 1, 2] * 4, "f": [1.5, 2.5] * 6})
        for name in ("a", "b")
    }
    assert encrypted.levels(frames, "k") == ["0", "1", "2"]
    assert encrypted.levels(frames, "f") == ["1.5", "2.5"]


def test_levels_held_by_one_or_two_patients_are_withheld() -> None:
    found = encrypted.levels(levels_frames(), "g")
    assert found == ["A", "B", "V"]  # V: exactly 3 rows at the one site holding it
    assert found.withheld
    assert not {"Z", "Y", "W"} & set(found)
    assert "Z" not in repr(found) and "W" not in repr(found)


def test_a_withheld_level_refuses_grouping_without_naming_the_site(
    keys: KeyHolder,
) -> None:
    for call in (
        lambda: encrypted.describe(levels_frames(), ["x"], by="g", keys=keys),
        lambda: encrypted.crosstab(levels_frames(), "g", "g", keys=keys),
    ):
        with pytest.raises(DisclosureRefused, match="'g' has a level held by") as e:
            call()
        message = str(e.value)
        assert not any(f"site {name}" in message for name in "abc"), message
        assert not any(f"'{level}'" in message for level in "YZW"), message
        assert_discloses_nothing(e.value)


def test_common_levels_group_rows_as_pandas_does(keys: KeyHolder) -> None:
    frames = {
        name: frame[frame["g"].isin(["A", "B"])]
        for name, frame in levels_frames().items()
    }
    table = encrypted.describe(frames, ["x"], by="g", keys=keys)
    pooled = pd.concat(frames.values())
    expected = pooled.groupby("g")["x"].count()
    assert table.loc["count"].tolist() == expected.astype(float).tolist()


def test_identifier_columns_are_refused() -> None:
    with pytest.raises(DataRefused, match="'patient_id' looks like an identifier") as e:
        encrypted.levels(site_frames(), "patient_id")
    assert_discloses_nothing(e.value)


def test_identifier_rule_is_more_than_half_distinct() -> None:
    # 10 rows with a value (and 5 without): 5 distinct values pass, 6 do not
    def frames(distinct: int) -> dict[str, pd.DataFrame]:
        common = 11 - distinct
        values = ["A"] * common + [f"L{i}" for i in range(distinct - 1)]
        # levels are released across at least 2 sites; b's are all "A"
        return {
            "a": pd.DataFrame({"g": values + [None] * 5}),
            "b": pd.DataFrame({"g": ["A"] * 10}),
        }

    found = encrypted.levels(frames(5), "g")
    assert found == ["A"] and found.withheld  # L0…L3: one row each, withheld
    with pytest.raises(DataRefused, match="looks like an identifier") as e:
        encrypted.levels(frames(6), "g")
    assert_discloses_nothing(e.value)


def test_levels_follow_the_site_policy_and_a_stricter_query() -> None:
    frames = levels_frames()
    strict = [
        Site("a", frames["a"], policy=DisclosurePolicy(min_rows=4)),
        Site("b", frames["b"]),
        Site("c", frames["c"]),
    ]
    assert encrypted.levels(strict, "g") == ["A", "B"]  # V has 3 rows at a
    # a threshold of the researcher's own would be a count oracle: refused
    with pytest.raises(InvalidInput, match="sites' own minimum of rows"):
        encrypted.levels(levels_frames(), "g", min_rows=4)


def test_a_column_with_no_level_to_release_is_refused() -> None:
    for column in ("empty", "g"):
        frames = {
            "a": pd.DataFrame({"empty": [np.nan] * 4, "g": ["u", "v", "u", "v"]}),
            "b": pd.DataFrame({"empty": [np.nan] * 4, "g": ["u", "v", "u", "v"]}),
        }
        with pytest.raises(DisclosureRefused, match=f"no level of '{column}'"):
            encrypted.levels(frames, column)


def test_gated_levels_withhold_rare_levels(chain: Chain) -> None:
    snapshot = chain.tester.take_snapshot()
    try:
        ledger = chain.ledger()
        frames = levels_frames()
        grants = grant_study(ledger, frames)
        sites = Study.open(ledger, frames, grants).sites
        found = encrypted.levels(sites, "g", researcher=grants.researcher)
        assert found == ["A", "B", "V"] and found.withheld
    finally:
        chain.tester.revert_to_snapshot(snapshot)
