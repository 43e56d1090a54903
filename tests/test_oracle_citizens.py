"""The city oracle over citizen sites: every citizen's device a site of its own.

With ``DisclosurePolicy.citizen(min_contributors=10)`` the worker audits the pooled
user-days (persons counted by ``user_id``, ``k`` = 10) and the sets of citizens
pooled (``need`` = 10), and pools with the secure sum over the citizen sites.
One run over 1,000 citizens of one to three days each is checked against pandas
on the pooled rows; the attacks run on a few citizens (they are refused before
any sum is computed).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthlab.encrypted import KeyHolder
from healthlab.ledger import Ledger
from healthlab.oracle import OracleClient, OracleWorker, Refusal
from healthlab.score import health_score
from healthlab.sites import DisclosurePolicy

K = 10
CITY = "metro"


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


@pytest.fixture
def worker_account(ledger: Ledger) -> str:
    return ledger.accounts[4]


@pytest.fixture
def oracle(ledger: Ledger, owner: str, worker_account: str) -> OracleClient:
    return OracleClient.deploy(ledger, oracle=worker_account, sender=owner)


def citizen_days(user: str, days: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """One citizen's device: its user-days in the city, with the score's factors."""
    n = len(days)
    return pd.DataFrame(
        {
            "user_id": user,
            "date": days,
            "city_id": CITY,
            "bmi": rng.uniform(17, 35, n).round(1),
            "calories_burned": rng.uniform(50, 900, n).round(0),
            "steps": rng.uniform(500, 16_000, n).round(0),
            "resting_hr": rng.uniform(48, 95, n).round(0),
            "humidity": rng.uniform(20, 90, n).round(0),
            "temperature": rng.uniform(5, 35, n).round(1),
            "uv_index": rng.uniform(0, 10, n).round(1),
        }
    )


def april(day: int) -> str:
    return f"2025-04-{day:02d}"


def pandas_answer(
    frames: dict[str, pd.DataFrame], first: str, last: str
) -> tuple[int, int, int]:
    """(score x100, user-days, sites) by pandas on the pooled rows."""
    pooled = pd.concat(
        [f.assign(_site=name) for name, f in frames.items()], ignore_index=True
    )
    dates = pd.to_datetime(pooled["date"])
    rows = pooled[
        (pooled["city_id"] == CITY)
        & (dates >= pd.Timestamp(first))
        & (dates <= pd.Timestamp(last))
    ]
    scores = health_score(rows.drop(columns="_site")).dropna()
    sites = rows.loc[scores.index, "_site"].nunique()
    return math.floor(float(scores.mean()) * 100 + 0.5), len(scores), int(sites)


def test_the_oracle_over_1000_citizen_sites_equals_pandas_on_the_pooled_rows(
    oracle: OracleClient,
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,000 devices of 1-3 user-days each. Citizen 0's only day is the 30th; seven
    citizens also hold a day in May."""
    rng = np.random.default_rng(16)
    frames: dict[str, pd.DataFrame] = {
        "citizen-0000": citizen_days("u0000", [april(30)], rng)
    }
    for i in range(1, 1000):
        picked = sorted(rng.choice(29, size=int(rng.integers(1, 4)), replace=False))
        days = [april(int(d) + 1) for d in picked]
        if i <= 7:
            days.append("2025-05-02")
        frames[f"citizen-{i:04d}"] = citizen_days(f"u{i:04d}", days, rng)
    worker = OracleWorker(
        oracle,
        frames,
        sender=worker_account,
        keys=keys,
        policy=DisclosurePolicy.citizen(min_contributors=K),
    )
    start = time.perf_counter()
    answer = worker.compute(CITY, april(1), april(30), requester=researcher)
    took = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n  oracle over 1,000 citizen sites: {took:.1f} s")
    assert answer.result is not None, answer.reason
    expected = pandas_answer(frames, april(1), april(30))
    assert (
        answer.result.score_x100,
        answer.result.user_days,
        answer.result.sites,
    ) == expected
    assert answer.result.sites == 1000
    assert answer.receipt is not None and len(answer.receipt["sites"]) == 1000
    # all citizens, then all but citizen 0 (its only day left out): refused by
    # the pooled audit before any site computes
    start = time.perf_counter()
    differenced = worker.compute(CITY, april(1), april(29), requester=researcher)
    assert differenced.refusal is Refusal.DISCLOSURE_REFUSED
    assert "fewer than 10" in differenced.reason
    assert time.perf_counter() - start < 10
    # seven citizens hold May: fewer than the pooled minimum
    may = worker.compute(CITY, "2025-05-01", "2025-05-31", requester=researcher)
    assert may.refusal is Refusal.TOO_FEW_SITES
    assert "at least 10" in may.reason


@pytest.fixture
def few(
    oracle: OracleClient, worker_account: str, keys: KeyHolder
) -> tuple[OracleWorker, dict[str, pd.DataFrame]]:
    """Fifteen citizens: c00-c13 hold the 1st and the 2nd, c14 only the 3rd;
    c00 also holds the 4th to the 6th."""
    rng = np.random.default_rng(4)
    frames = {
        f"c{i:02d}": citizen_days(f"p{i:02d}", [april(1), april(2)], rng)
        for i in range(14)
    }
    frames["c14"] = citizen_days("p14", [april(3)], rng)
    frames["c00"] = pd.concat(
        [frames["c00"], citizen_days("p00", [april(4), april(5), april(6)], rng)],
        ignore_index=True,
    )
    policy = DisclosurePolicy.citizen(min_contributors=K)
    worker = OracleWorker(
        oracle, frames, sender=worker_account, keys=keys, policy=policy
    )
    return worker, frames


def test_citizen_sets_differing_by_one_citizen_are_refused(
    few: tuple[OracleWorker, dict[str, pd.DataFrame]], researcher: str
) -> None:
    worker, frames = few
    everyone = worker.compute(CITY, april(1), april(3), requester=researcher)
    assert everyone.result is not None, everyone.reason
    assert (
        everyone.result.score_x100,
        everyone.result.user_days,
        everyone.result.sites,
    ) == pandas_answer(frames, april(1), april(3))
    # all but c14: the difference is c14's day
    all_but_one = worker.compute(CITY, april(1), april(2), requester=researcher)
    assert all_but_one.refusal is Refusal.DISCLOSURE_REFUSED
    assert "differencing" in all_but_one.reason
    # another requester meets the same memory
    other = worker.compute(CITY, april(1), april(2), requester=worker.sender)
    assert other.refusal is Refusal.DISCLOSURE_REFUSED


def test_periods_differing_by_days_of_one_citizen_are_refused(
    few: tuple[OracleWorker, dict[str, pd.DataFrame]], researcher: str
) -> None:
    """Same fifteen sites, but the 1st-6th against the 1st-3rd differ by three
    days of c00: the pooled audit counts persons, not user-days or sites."""
    worker, _ = few
    assert worker.compute(CITY, april(1), april(3), requester=researcher).result
    more = worker.compute(CITY, april(1), april(6), requester=researcher)
    assert more.refusal is Refusal.DISCLOSURE_REFUSED
    assert "fewer than 10 of its persons (user_id)" in more.reason


def test_a_period_fewer_citizens_hold_than_the_pooled_minimum_is_refused(
    few: tuple[OracleWorker, dict[str, pd.DataFrame]], researcher: str
) -> None:
    worker, _ = few
    one = worker.compute(CITY, april(4), april(6), requester=researcher)
    assert one.refusal is Refusal.TOO_FEW_SITES
    assert one.result is None


def test_the_pooled_memory_survives_a_restart(
    few: tuple[OracleWorker, dict[str, pd.DataFrame]],
    oracle: OracleClient,
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
) -> None:
    worker, frames = few
    assert worker.compute(CITY, april(1), april(3), requester=researcher).result
    assert (worker.state_dir / "audit-citizens.json").exists()
    restarted = OracleWorker(
        oracle,
        frames,
        sender=worker_account,
        keys=keys,
        policy=DisclosurePolicy.citizen(min_contributors=K),
    )
    again = restarted.compute(CITY, april(1), april(2), requester=researcher)
    assert again.refusal is Refusal.DISCLOSURE_REFUSED


def test_one_citizen_alone_is_refused_by_the_ordinary_oracle_too(
    oracle: OracleClient, worker_account: str, keys: KeyHolder, researcher: str
) -> None:
    """Without the citizen policy nothing changes: a one-citizen site refuses."""
    rng = np.random.default_rng(5)
    frames = {f"h{i}": citizen_days(f"q{i}", [april(1)], rng) for i in range(12)}
    worker = OracleWorker(oracle, frames, sender=worker_account, keys=keys)
    answer = worker.compute(CITY, april(1), april(1), requester=researcher)
    assert answer.refusal is Refusal.DISCLOSURE_REFUSED
    assert answer.result is None
