"""The city score oracle: contract, client and the data holder's worker, end to end.

Expected values are computed here independently of the worker: pandas on the pooled
city-day frame (all sites' rows), scored with ``health_score``, the mean scaled ×100
and rounded half up. Amounts are checked to the wei: the contract's balance must equal
open escrow plus outstanding credits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthlab import errors
from healthlab.data import city_days, load_city_tables
from healthlab.encrypted import KeyHolder
from healthlab.ledger import Ledger
from healthlab.ledger.artifacts import load_artifact
from healthlab.ledger.node import AnvilNode
from healthlab.oracle import (
    OracleClient,
    OracleWorker,
    Refusal,
    RequestStatus,
    ScoreResult,
)
from healthlab.score import health_score
from healthlab.sites import DisclosurePolicy
from tests.conftest import ETHER, require

FEE = ETHER // 100
TIMEOUT = 3600
ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / "contracts"
EPOCH = dt.date(1970, 1, 1)


# ------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's workers keep their memory in a HEALTHLAB_HOME of its own."""
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path / "home"))


def day(iso: str) -> int:
    return (dt.date.fromisoformat(iso) - EPOCH).days


def pandas_answer(
    frames: dict[str, pd.DataFrame], city: str, first: str, last: str
) -> tuple[int, int, int]:
    """(score ×100, user-days, sites) by pandas on the pooled city-day frame."""
    pooled = pd.concat(
        [f.assign(_site=name) for name, f in frames.items()], ignore_index=True
    )
    dates = pd.to_datetime(pooled["date"])
    rows = pooled[
        (pooled["city_id"] == city)
        & (dates >= pd.Timestamp(first))
        & (dates <= pd.Timestamp(last))
    ]
    scores = health_score(rows.drop(columns="_site")).dropna()
    mean = float(scores.mean())
    sites = rows.loc[scores.index, "_site"].nunique()
    return math.floor(mean * 100 + 0.5), len(scores), int(sites)


def gas_cost(receipt: Any) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def block_time(ledger: Ledger, receipt: Any) -> int:
    return int(ledger.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def raw_request(client: OracleClient, request_id: int) -> tuple[Any, ...]:
    """The contract's stored request, read without the client's decoding."""
    return tuple(client.contract.functions.getRequest(request_id).call())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def city_sites() -> dict[str, pd.DataFrame]:
    """The sample user-days split by the site that holds each citizen's record."""
    tables = load_city_tables()
    days = city_days(tables)
    site = days["user_id"].map(tables.patients.set_index("user_id")["site"])
    return {str(s): f.reset_index(drop=True) for s, f in days.groupby(site)}


@pytest.fixture(scope="module")
def with_clinic(city_sites: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """site_b's two first coastal users moved to a small third site, ``clinic``.

    Both wear their device on 2025-05-17 and 2025-05-18, so the clinic holds exactly
    2 user-days on the 17th and 4 user-days of 2 users over the two days.
    """
    b = city_sites["site_b"]
    dates = pd.to_datetime(b["date"])
    both = b[dates.isin(pd.to_datetime(["2025-05-17", "2025-05-18"]))]
    worn = both.groupby("user_id").size()
    users = sorted(worn[worn == 2].index)[:2]
    moved = b["user_id"].isin(users)
    return {
        "site_a": city_sites["site_a"],
        "site_b": b[~moved].reset_index(drop=True),
        "clinic": b[moved].reset_index(drop=True),
        "site_c": city_sites["site_c"],
    }


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


@pytest.fixture
def worker_account(ledger: Ledger) -> str:
    return ledger.accounts[4]


@pytest.fixture
def oracle(ledger: Ledger, owner: str, worker_account: str) -> OracleClient:
    """An oracle contract with ``worker_account`` registered and a 0.01 ETH fee."""
    return OracleClient.deploy(
        ledger,
        request_timeout=TIMEOUT,
        oracle=worker_account,
        fee_wei=FEE,
        sender=owner,
    )


@pytest.fixture
def worker(
    oracle: OracleClient,
    city_sites: dict[str, pd.DataFrame],
    worker_account: str,
    keys: KeyHolder,
) -> OracleWorker:
    return OracleWorker(oracle, city_sites, sender=worker_account, keys=keys)


# ------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    ("city", "first", "last"),
    [
        ("coastal", "2025-04-01", "2025-04-30"),
        ("coastal", "2025-04-01", "2025-06-29"),
        ("coastal", "2025-05-17", "2025-05-17"),
    ],
)
def test_worker_fulfils_with_the_score_pandas_computes_on_the_pooled_frame(
    ledger: Ledger,
    oracle: OracleClient,
    worker: OracleWorker,
    city_sites: dict[str, pd.DataFrame],
    researcher: str,
    worker_account: str,
    city: str,
    first: str,
    last: str,
) -> None:
    req = oracle.request_score(city, first, last, sender=researcher)
    actions = worker.run_once()

    score_x100, user_days, sites = pandas_answer(city_sites, city, first, last)
    assert sites == 2, "coastal citizens' records are held by site_a and site_b"
    assert [(a.request_id, a.action) for a in actions] == [(req, "fulfilled")]
    fulfilled = oracle.events(event="ScoreFulfilled")
    assert [e.args for e in fulfilled] == [
        {
            "requestId": req,
            "oracle": worker_account,
            "scoreX100": score_x100,
            "userDays": user_days,
            "sites": 2,
        }
    ]
    assert fulfilled[0].tx == actions[0].tx
    record = oracle.request(req)
    assert record.status is RequestStatus.FULFILLED
    assert record.result == ScoreResult(score_x100, user_days, 2)
    assert record.refusal is None
    assert (record.city, record.from_day, record.to_day) == (
        city,
        day(first),
        day(last),
    )
    assert record.period == (dt.date.fromisoformat(first), dt.date.fromisoformat(last))
    # the fee is now the oracle's; the contract holds exactly that credit
    assert oracle.credit(worker_account) == FEE
    assert oracle.credit(researcher) == 0
    assert ledger.balance(oracle.address) == FEE


def test_each_request_is_processed_once_and_later_requests_are_picked_up(
    oracle: OracleClient,
    worker: OracleWorker,
    city_sites: dict[str, pd.DataFrame],
    researcher: str,
    stranger: str,
) -> None:
    first = oracle.request_score(
        "coastal", "2025-04-01", "2025-04-07", sender=researcher
    )
    assert [a.request_id for a in worker.run_once()] == [first]
    assert worker.run_once() == [], "a request was processed twice"
    second = oracle.request_score(
        "coastal", "2025-04-08", "2025-04-14", sender=stranger
    )
    third = oracle.request_score("inland", "2025-04-08", "2025-04-14", sender=stranger)
    done = worker.run_once()
    assert [(a.request_id, a.action) for a in done] == [
        (second, "fulfilled"),
        (third, "refused"),
    ]
    assert worker.pending == []
    assert [e.request_id for e in oracle.events(event="ScoreFulfilled")] == [
        first,
        second,
    ]
    expected = pandas_answer(city_sites, "coastal", "2025-04-08", "2025-04-14")
    result = oracle.request(second).result
    assert result is not None
    assert (result.score_x100, result.user_days, result.sites) == expected


def test_a_worker_started_later_reads_requests_from_its_start_block(
    ledger: Ledger,
    oracle: OracleClient,
    city_sites: dict[str, pd.DataFrame],
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
) -> None:
    old = oracle.request_score("coastal", "2025-04-01", "2025-04-07", sender=researcher)
    start = ledger.w3.eth.block_number + 1
    late = OracleWorker(
        oracle, city_sites, sender=worker_account, keys=keys, from_block=start
    )
    new = oracle.request_score("coastal", "2025-04-08", "2025-04-14", sender=researcher)
    assert [(a.request_id, a.action) for a in late.run_once()] == [(new, "fulfilled")]
    assert oracle.request(old).status is RequestStatus.PENDING

    # a worker scanning from the deployment answers the old one and skips the new one
    full = OracleWorker(oracle, city_sites, sender=worker_account, keys=keys)
    assert [(a.request_id, a.action, a.note) for a in full.run_once()] == [
        (old, "fulfilled", ""),
        (new, "skipped", "fulfilled"),
    ]


def test_a_worker_that_is_not_the_registered_oracle_computes_nothing(
    oracle: OracleClient,
    city_sites: dict[str, pd.DataFrame],
    owner: str,
    researcher: str,
    stranger: str,
    worker_account: str,
    keys: KeyHolder,
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-07", sender=researcher)
    impostor = OracleWorker(oracle, city_sites, sender=stranger, keys=keys)
    with pytest.raises(errors.ConfigurationError, match="registered"):
        impostor.run_once()
    assert oracle.request(req).status is RequestStatus.PENDING
    # once the owner registers it, the same worker answers the waiting request
    oracle.set_oracle(stranger, sender=owner)
    assert [(a.request_id, a.action) for a in impostor.run_once()] == [
        (req, "fulfilled")
    ]
    assert oracle.credit(stranger) == FEE
    assert oracle.credit(worker_account) == 0


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("city", "first", "last", "code", "why", "has_rows"),
    [
        pytest.param(
            "coastal",
            "2025-05-17",
            "2025-05-17",
            Refusal.DISCLOSURE_REFUSED,
            "site clinic: a subset, group, cell or bin of this query would summarize "
            "fewer than 3 persons (user_id)",
            True,
            id="2-user-days-at-a-site",
        ),
        pytest.param(
            "coastal",
            "2025-05-17",
            "2025-05-18",
            Refusal.DISCLOSURE_REFUSED,
            # the auditor counts users, not user-days: refused as a small subset
            "site clinic: a subset, group, cell or bin of this query would summarize "
            "fewer than 3 persons (user_id)",
            True,
            id="4-user-days-of-2-users-at-a-site",
        ),
        pytest.param(
            "inland",
            "2025-04-01",
            "2025-04-30",
            Refusal.TOO_FEW_SITES,
            "1 site(s) hold the period; a result pools at least 2",
            True,
            id="one-site-holds-the-city",
        ),
        pytest.param(
            "coastal",
            "2024-01-01",
            "2024-12-31",
            Refusal.NO_DATA,
            "no scored user-day in the period",
            False,
            id="no-days-in-the-period",
        ),
        pytest.param(
            "atlantis",
            "2025-04-01",
            "2025-04-30",
            Refusal.UNKNOWN_CITY,
            "no site holds city 'atlantis'",
            False,
            id="unknown-city",
        ),
    ],
)
def test_a_request_the_rules_refuse_is_answered_with_a_code_and_no_number(
    ledger: Ledger,
    oracle: OracleClient,
    with_clinic: dict[str, pd.DataFrame],
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
    city: str,
    first: str,
    last: str,
    code: Refusal,
    why: str,
    has_rows: bool,
) -> None:
    if has_rows:  # a number exists: the refusal is the rules', not a lack of data
        assert pandas_answer(with_clinic, city, first, last)[1] > 0
    worker = OracleWorker(oracle, with_clinic, sender=worker_account, keys=keys)
    req = oracle.request_score(city, first, last, sender=researcher)
    (action,) = worker.run_once()

    assert (action.request_id, action.action) == (req, "refused")
    assert action.answer is not None
    assert action.answer.result is None
    assert action.answer.refusal is code
    assert action.answer.reason.startswith(why), action.answer.reason
    refused = oracle.events(event="ScoreRefused")
    assert [e.args for e in refused] == [
        {"requestId": req, "oracle": worker_account, "reason": code}
    ]
    assert oracle.events(event="ScoreFulfilled") == []
    record = oracle.request(req)
    assert (record.status, record.refusal, record.result) == (
        RequestStatus.REFUSED,
        code,
        None,
    )
    raw = raw_request(oracle, req)
    assert raw[8:] == (0, 0, 0), "a refused request stored a number"
    # the fee goes back to the requester, not to the oracle
    assert oracle.credit(researcher) == FEE
    assert oracle.credit(worker_account) == 0
    assert ledger.balance(oracle.address) == FEE


def test_without_the_users_rule_the_two_user_period_would_be_answered(
    oracle: OracleClient,
    with_clinic: dict[str, pd.DataFrame],
    worker_account: str,
    keys: KeyHolder,
) -> None:
    """Control for the case above: 4 user-days of 2 users fail only because users
    are counted (by min_users and by the auditor, which counts persons): with both
    thresholds at 2, the period is answered."""
    lax = OracleWorker(
        oracle,
        with_clinic,
        sender=worker_account,
        keys=keys,
        min_users=1,
        policy=DisclosurePolicy(min_rows=2, min_difference=2),
    )
    answer = lax.compute("coastal", "2025-05-17", "2025-05-18")
    expected = pandas_answer(with_clinic, "coastal", "2025-05-17", "2025-05-18")
    assert answer.refusal is None
    assert answer.result == ScoreResult(*expected)
    assert expected[2] == 3, "site_a, site_b and the clinic"


def _synthetic(users: list[str], days: list[str], city: str) -> pd.DataFrame:
    rows = []
    for i, user in enumerate(users):
        for d in days:
            rows.append(
                {
                    "user_id": user,
                    "date": d,
                    "city_id": city,
                    "bmi": 20.0 + 3 * i,
                    "calories_burned": 100.0 + 40 * i,
                    "steps": 3000.0 + 1500 * i,
                    "resting_hr": 58.0 + 4 * i,
                    "humidity": 50.0,
                    "temperature": 20.0,
                    "uv_index": 3.0,
                }
            )
    return pd.DataFrame(rows)


def test_a_period_differing_by_one_user_day_from_an_answered_one_is_refused(
    oracle: OracleClient,
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
    tmp_path: Path,
) -> None:
    """Publishing both means would give away that one user-day's score."""
    a = pd.concat(
        [
            _synthetic(["a1", "a2", "a3", "a4"], ["2025-04-01", "2025-04-02"], "t"),
            _synthetic(["a1"], ["2025-04-03"], "t"),
        ],
        ignore_index=True,
    )
    b = _synthetic(["b1", "b2", "b3", "b4"], ["2025-04-01", "2025-04-02"], "t")
    frames = {"a": a, "b": b}
    worker = OracleWorker(oracle, frames, sender=worker_account, keys=keys)
    two_days = oracle.request_score("t", "2025-04-01", "2025-04-02", sender=researcher)
    three_days = oracle.request_score(
        "t", "2025-04-01", "2025-04-03", sender=researcher
    )
    again = oracle.request_score("t", "2025-04-01", "2025-04-02", sender=researcher)
    actions = worker.run_once()
    assert [(x.request_id, x.action) for x in actions] == [
        (two_days, "fulfilled"),
        (three_days, "refused"),
        (again, "fulfilled"),
    ]
    refused = actions[1].answer
    assert refused is not None
    assert refused.refusal is Refusal.DISCLOSURE_REFUSED
    assert "would let a combination of answers summarize fewer than 3" in (
        refused.reason
    )
    expected = ScoreResult(*pandas_answer(frames, "t", "2025-04-01", "2025-04-02"))
    assert oracle.request(two_days).result == expected
    assert oracle.request(again).result == expected, "the same period, the same mean"
    # a worker without that memory would have answered: the refusal is the memory's
    fresh = OracleWorker(
        oracle, frames, sender=worker_account, keys=keys, state_dir=tmp_path / "new"
    )
    assert fresh.compute("t", "2025-04-01", "2025-04-03").result == ScoreResult(
        *pandas_answer(frames, "t", "2025-04-01", "2025-04-03")
    )
    # ... and a restarted worker keeps it (the sites' memory is in state_dir)
    restarted = OracleWorker(oracle, frames, sender=worker_account, keys=keys)
    assert restarted.state_dir == worker.state_dir
    again = restarted.compute("t", "2025-04-01", "2025-04-03", requester=researcher)
    assert again.refusal is Refusal.DISCLOSURE_REFUSED


@pytest.mark.parametrize("extra_days", [1, 3, 5])
def test_periods_differing_by_days_of_one_citizen_are_refused(
    oracle: OracleClient,
    worker_account: str,
    researcher: str,
    keys: KeyHolder,
    extra_days: int,
) -> None:
    """Two periods differing by several days of one citizen give that citizen's
    mean: the auditor counts distinct users, not user-days."""
    later = [f"2025-04-{d:02d}" for d in range(3, 3 + extra_days)]
    a = pd.concat(
        [
            _synthetic(["a1", "a2", "a3", "a4"], ["2025-04-01", "2025-04-02"], "t"),
            _synthetic(["a1"], later, "t"),
        ],
        ignore_index=True,
    )
    b = _synthetic(["b1", "b2", "b3", "b4"], ["2025-04-01", "2025-04-02"], "t")
    frames = {"a": a, "b": b}
    worker = OracleWorker(oracle, frames, sender=worker_account, keys=keys)
    first = worker.compute("t", "2025-04-01", "2025-04-02", requester=researcher)
    assert first.result is not None
    last = later[-1]
    second = worker.compute("t", "2025-04-01", last, requester=researcher)
    assert second.result is None
    assert second.refusal is Refusal.DISCLOSURE_REFUSED
    assert "fewer than 3 of its persons (user_id) (differencing)" in second.reason
    # another requester (a second account of the same person, say) finds the
    # same memory: the sites audit everything they answered, whoever asked
    other = worker.compute("t", "2025-04-01", last, requester=worker_account)
    assert other.refusal is Refusal.DISCLOSURE_REFUSED


def test_periods_differing_by_one_sites_days_are_refused(
    oracle: OracleClient, worker_account: str, researcher: str, keys: KeyHolder
) -> None:
    """Site c holds days only from the 3rd: the 1st–2nd over {a, b} and the 1st–3rd
    over {a, b, c} would give c's days by difference (site-set differencing)."""
    users = ["u1", "u2", "u3", "u4"]
    a = _synthetic([f"a{u}" for u in users], ["2025-04-01", "2025-04-02"], "t")
    b = _synthetic([f"b{u}" for u in users], ["2025-04-01", "2025-04-02"], "t")
    c = _synthetic([f"c{u}" for u in users], ["2025-04-03"], "t")
    worker = OracleWorker(
        oracle, {"a": a, "b": b, "c": c}, sender=worker_account, keys=keys
    )
    assert worker.compute("t", "2025-04-01", "2025-04-02", requester=researcher).result
    refused = worker.compute("t", "2025-04-01", "2025-04-03", requester=researcher)
    assert refused.refusal is Refusal.DISCLOSURE_REFUSED
    assert "site-set differencing" in refused.reason


# ------------------------------------------------------------- authorization
@pytest.mark.parametrize("caller", ["owner", "researcher", "stranger"])
@pytest.mark.parametrize("answer", ["fulfil", "refuse"])
def test_only_the_registered_oracle_may_answer(
    request: pytest.FixtureRequest,
    oracle: OracleClient,
    researcher: str,
    caller: str,
    answer: str,
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    who = request.getfixturevalue(caller)

    def respond() -> None:
        if answer == "fulfil":
            oracle.fulfil(req, ScoreResult(7000, 100, 2), sender=who)
        else:
            oracle.refuse(req, Refusal.NO_DATA, sender=who)

    with pytest.raises(errors.NotAuthorized) as caught:
        respond()
    assert caught.value.error_name == "NotOracle"
    assert caught.value.values == {"caller": who}
    assert oracle.request(req).status is RequestStatus.PENDING
    assert oracle.events(event="ScoreFulfilled") == []
    assert oracle.events(event="ScoreRefused") == []


def test_a_new_oracle_replaces_the_old_one_for_pending_requests(
    oracle: OracleClient,
    owner: str,
    researcher: str,
    stranger: str,
    worker_account: str,
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    oracle.set_oracle(stranger, sender=owner)
    assert oracle.oracle == stranger
    with pytest.raises(errors.NotAuthorized, match="NotOracle"):
        oracle.fulfil(req, ScoreResult(7000, 100, 2), sender=worker_account)
    assert oracle.fulfil(req, ScoreResult(7000, 100, 2), sender=stranger).result == (
        ScoreResult(7000, 100, 2)
    )
    assert oracle.credit(stranger) == FEE
    assert [e.args for e in oracle.events(event="OracleSet")][-1] == {
        "previousOracle": worker_account,
        "oracle": stranger,
    }


@pytest.mark.parametrize("first", ["fulfil", "refuse"])
@pytest.mark.parametrize("second", ["fulfil", "refuse"])
def test_a_request_is_answered_exactly_once(
    ledger: Ledger,
    oracle: OracleClient,
    researcher: str,
    worker_account: str,
    first: str,
    second: str,
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)

    def answer(how: str) -> None:
        if how == "fulfil":
            oracle.fulfil(req, ScoreResult(7123, 500, 2), sender=worker_account)
        else:
            oracle.refuse(req, Refusal.DISCLOSURE_REFUSED, sender=worker_account)

    answer(first)
    settled = RequestStatus.FULFILLED if first == "fulfil" else RequestStatus.REFUSED
    credits = (oracle.credit(worker_account), oracle.credit(researcher))
    assert credits == ((FEE, 0) if first == "fulfil" else (0, FEE))
    with pytest.raises(errors.NotPending) as caught:
        answer(second)
    assert caught.value.values == {"requestId": req, "status": settled}
    assert oracle.request(req).status is settled
    assert (oracle.credit(worker_account), oracle.credit(researcher)) == credits, (
        "a second answer moved the fee again"
    )
    assert ledger.balance(oracle.address) == FEE
    answers = oracle.events(event="ScoreFulfilled") + oracle.events(
        event="ScoreRefused"
    )
    assert len(answers) == 1


# ------------------------------------------------------------ cancel, refund
def test_an_unanswered_request_is_cancellable_after_the_timeout_with_a_refund(
    ledger: Ledger,
    oracle: OracleClient,
    worker: OracleWorker,
    researcher: str,
    worker_account: str,
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    created = oracle.request(req).created_at
    opens = created + TIMEOUT
    assert oracle.request(req).cancellable_at == opens

    # the next transaction is mined one second after the latest block
    ledger.mine(opens - 2)
    with pytest.raises(errors.TooEarlyToCancel) as caught:
        oracle.cancel(req, sender=researcher)
    assert caught.value.values == {"requestId": req, "cancellableAt": opens}
    assert oracle.credit(researcher) == 0

    ledger.mine(opens - 1)
    assert oracle.cancel(req, sender=researcher).status is RequestStatus.CANCELLED
    assert block_time(ledger, oracle.last_receipt) == opens
    assert oracle.credit(researcher) == FEE
    assert [e.args for e in oracle.events(event="RequestCancelled")] == [
        {"requestId": req, "requester": researcher}
    ]

    # the worker sees the request but does not answer it; nor can anyone else
    assert [(a.request_id, a.action, a.note) for a in worker.run_once()] == [
        (req, "skipped", "cancelled")
    ]
    with pytest.raises(errors.NotPending) as late:
        oracle.fulfil(req, ScoreResult(7000, 100, 2), sender=worker_account)
    assert late.value.values == {"requestId": req, "status": RequestStatus.CANCELLED}
    with pytest.raises(errors.NotPending):
        oracle.cancel(req, sender=researcher)
    assert oracle.credit(researcher) == FEE, "refund credited twice"

    before = ledger.balance(researcher)
    assert oracle.withdraw(sender=researcher) == FEE
    assert ledger.balance(researcher) == before + FEE - gas_cost(oracle.last_receipt)
    assert ledger.balance(oracle.address) == 0


def test_only_the_requester_may_cancel(
    ledger: Ledger, oracle: OracleClient, researcher: str, stranger: str
) -> None:
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    ledger.advance_time(TIMEOUT)
    with pytest.raises(errors.NotRequester) as caught:
        oracle.cancel(req, sender=stranger)
    assert caught.value.values == {"requestId": req, "caller": stranger}
    with pytest.raises(errors.UnknownRequest) as unknown:
        oracle.cancel(req + 1, sender=researcher)
    assert unknown.value.values == {"requestId": req + 1}
    assert oracle.request(req).status is RequestStatus.PENDING


# ------------------------------------------------------------------ payments
def test_payments_settle_exactly_once(
    ledger: Ledger,
    oracle: OracleClient,
    owner: str,
    researcher: str,
    stranger: str,
    worker_account: str,
) -> None:
    paid = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=stranger)
    refused = oracle.request_score(
        "inland", "2025-04-01", "2025-04-30", sender=stranger
    )
    dropped = oracle.request_score(
        "coastal", "2025-05-01", "2025-05-31", sender=researcher
    )
    oracle.set_fee(3 * FEE, sender=owner)  # pending requests keep what they paid
    dearer = oracle.request_score(
        "coastal", "2025-06-01", "2025-06-29", sender=researcher
    )
    assert ledger.balance(oracle.address) == 6 * FEE

    oracle.fulfil(paid, ScoreResult(7000, 100, 2), sender=worker_account)
    oracle.refuse(refused, Refusal.TOO_FEW_SITES, sender=worker_account)
    oracle.fulfil(dearer, ScoreResult(6900, 90, 2), sender=worker_account)
    ledger.advance_time(TIMEOUT)
    oracle.cancel(dropped, sender=researcher)
    expected = {worker_account: 4 * FEE, stranger: FEE, researcher: FEE}
    assert {who: oracle.credit(who) for who in expected} == expected
    assert ledger.balance(oracle.address) == sum(expected.values())

    for who, amount in expected.items():
        before = ledger.balance(who)
        assert oracle.withdraw(sender=who) == amount
        assert ledger.balance(who) == before + amount - gas_cost(oracle.last_receipt)
        with pytest.raises(errors.NothingToWithdraw) as again:
            oracle.withdraw(sender=who)
        assert again.value.values == {"payee": who}
    assert ledger.balance(oracle.address) == 0
    withdrawals = [e.args for e in oracle.events(event="Withdrawal")]
    assert withdrawals == [
        {"payee": who, "to": who, "amount": amount} for who, amount in expected.items()
    ]


def test_wrong_payment_pays_nothing_and_a_free_oracle_takes_no_fee(
    ledger: Ledger, oracle: OracleClient, owner: str, researcher: str
) -> None:
    before = ledger.balance(researcher)
    with pytest.raises(errors.WrongPayment) as caught:
        oracle.request_score(
            "coastal", "2025-04-01", "2025-04-30", fee_wei=FEE - 1, sender=researcher
        )
    assert caught.value.values == {"expected": FEE, "sent": FEE - 1}
    assert ledger.balance(researcher) == before, "a refused request cost something"
    assert oracle.request_count == 0

    oracle.set_fee(0, sender=owner)
    assert oracle.fee_wei == 0
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    assert oracle.request(req).amount_wei == 0
    assert ledger.balance(oracle.address) == 0


def test_a_payee_that_rejects_ether_keeps_its_credit_and_withdraws_elsewhere(
    ledger: Ledger,
    oracle: OracleClient,
    researcher: str,
    stranger: str,
    worker_account: str,
) -> None:
    artifact = load_artifact("test/RevertingPayee")
    factory = ledger.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    payee = ledger.transact(factory.constructor(oracle.address), stranger)[
        "contractAddress"
    ]
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    oracle.fulfil(req, ScoreResult(7000, 100, 2), sender=worker_account)
    with pytest.raises(errors.PaymentFailed) as caught:
        oracle.withdraw(sender=worker_account, to=payee)
    assert caught.value.values == {"to": payee, "amount": FEE}
    assert oracle.credit(worker_account) == FEE
    before = ledger.balance(stranger)
    assert oracle.withdraw(sender=worker_account, to=stranger) == FEE
    assert ledger.balance(stranger) == before + FEE
    with pytest.raises(errors.InvalidRequest) as zero:
        oracle.transact(
            oracle.contract.functions.withdrawTo("0x" + "00" * 20), worker_account
        )
    assert zero.value.error_name == "ZeroAddress"


# ---------------------------------------------------------------- validation
ZERO32 = b"\x00" * 32
CITY = b"coastal".ljust(32, b"\x00")


@pytest.mark.parametrize(
    ("call", "name", "family", "args"),
    [
        pytest.param(
            lambda c, s: (c.functions.requestScore(ZERO32, 1, 2), "researcher", FEE),
            "ZeroCity",
            errors.InvalidRequest,
            {},
            id="zero-city",
        ),
        pytest.param(
            lambda c, s: (
                c.functions.requestScore(CITY, 20200, 20199),
                "researcher",
                FEE,
            ),
            "InvalidPeriod",
            errors.InvalidRequest,
            {"fromDay": 20200, "toDay": 20199},
            id="period-ends-before-it-starts",
        ),
        pytest.param(
            lambda c, s: (c.functions.requestScore(CITY, 1, 2), "researcher", 2 * FEE),
            "WrongPayment",
            errors.StateConflict,
            {"expected": FEE, "sent": 2 * FEE},
            id="overpayment",
        ),
        pytest.param(
            lambda c, s: (c.functions.fulfil(s.req, 10_001, 5, 2), "worker", 0),
            "InvalidResult",
            errors.InvalidRequest,
            {"scoreX100": 10_001, "userDays": 5, "sites": 2},
            id="score-above-100",
        ),
        pytest.param(
            lambda c, s: (c.functions.fulfil(s.req, 5000, 0, 2), "worker", 0),
            "InvalidResult",
            errors.InvalidRequest,
            {"scoreX100": 5000, "userDays": 0, "sites": 2},
            id="no-user-days",
        ),
        pytest.param(
            lambda c, s: (c.functions.fulfil(s.req, 5000, 5, 0), "worker", 0),
            "InvalidResult",
            errors.InvalidRequest,
            {"scoreX100": 5000, "userDays": 5, "sites": 0},
            id="no-sites",
        ),
        pytest.param(
            lambda c, s: (c.functions.refuse(s.req, 0), "worker", 0),
            "InvalidRefusal",
            errors.InvalidRequest,
            {},
            id="refusal-none",
        ),
        pytest.param(
            lambda c, s: (c.functions.fulfil(s.req + 1, 5000, 5, 2), "worker", 0),
            "UnknownRequest",
            errors.NotFound,
            {"requestId": 2},
            id="unknown-request",
        ),
        pytest.param(
            lambda c, s: (c.functions.setOracle(s.stranger), "stranger", 0),
            "NotOwner",
            errors.NotAuthorized,
            {"caller": "stranger"},
            id="stranger-sets-oracle",
        ),
        pytest.param(
            lambda c, s: (c.functions.setFee(0), "worker", 0),
            "NotOwner",
            errors.NotAuthorized,
            {"caller": "worker"},
            id="oracle-sets-fee",
        ),
        pytest.param(
            lambda c, s: (c.functions.setOracle("0x" + "00" * 20), "owner", 0),
            "ZeroAddress",
            errors.InvalidRequest,
            {},
            id="zero-oracle",
        ),
        pytest.param(
            lambda c, s: (c.functions.withdraw(), "stranger", 0),
            "NothingToWithdraw",
            errors.StateConflict,
            {"payee": "stranger"},
            id="withdraw-nothing",
        ),
    ],
)
def test_the_contract_rejects_bad_calls_with_named_errors(
    ledger: Ledger,
    oracle: OracleClient,
    owner: str,
    researcher: str,
    stranger: str,
    worker_account: str,
    call: Callable[[Any, Any], tuple[Any, str, int]],
    name: str,
    family: type[errors.ContractError],
    args: dict[str, Any],
) -> None:
    accounts = {
        "owner": owner,
        "researcher": researcher,
        "stranger": stranger,
        "worker": worker_account,
    }
    req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    state = SimpleNamespace(req=req, stranger=stranger)
    fn, sender, value = call(oracle.contract, state)
    before = ledger.balance(oracle.address)
    with pytest.raises(family) as caught:
        oracle.transact(fn, accounts[sender], value=value)
    assert caught.value.error_name == name
    assert caught.value.values == {
        k: accounts.get(v, v) if isinstance(v, str) else v for k, v in args.items()
    }
    assert "city score oracle refused the call" in str(caught.value)
    assert ledger.balance(oracle.address) == before
    assert oracle.request(req).status is RequestStatus.PENDING


def test_requests_need_a_registered_oracle_and_a_timeout(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    bare = OracleClient.deploy(ledger, request_timeout=TIMEOUT, sender=owner)
    assert bare.oracle is None
    with pytest.raises(errors.StateConflict) as caught:
        bare.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    assert caught.value.error_name == "NoOracle"
    assert bare.request_count == 0

    artifact = load_artifact("CityScoreOracle")
    factory = ledger.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    for timeout in (0, 1 << 32):
        with pytest.raises(errors.InvalidRequest) as bad:
            bare.transact(factory.constructor(timeout), owner)
        assert (bad.value.error_name, bad.value.values) == (
            "InvalidTimeout",
            {"requestTimeout": timeout},
        )
    with pytest.raises(errors.InvalidInput):
        OracleClient.deploy(ledger, request_timeout=0, sender=owner)


@pytest.mark.parametrize(
    ("city", "first", "last"),
    [
        ("", "2025-04-01", "2025-04-02"),
        ("x" * 33, "2025-04-01", "2025-04-02"),
        ("coastal", "2025-04-02", "2025-04-01"),
        ("coastal", "April 1st", "2025-04-02"),
        ("coastal", "1969-12-31", "2025-04-02"),
    ],
)
def test_the_client_refuses_bad_requests_before_sending(
    oracle: OracleClient, researcher: str, city: str, first: str, last: str
) -> None:
    with pytest.raises(errors.InvalidInput):
        oracle.request_score(city, first, last, sender=researcher)
    assert oracle.request_count == 0


@pytest.mark.parametrize("request_id", [0x22, 0x27, 0x2722, 7])
def test_reverts_decode_whatever_bytes_their_data_holds(
    oracle: OracleClient, researcher: str, request_id: int
) -> None:
    """0x27 (') and 0x22 (") change how eth-tester quotes the revert bytes."""
    with pytest.raises(errors.UnknownRequest) as read:
        oracle.request(request_id)
    assert read.value.values == {"requestId": request_id}
    with pytest.raises(errors.UnknownRequest) as sent:
        oracle.cancel(request_id, sender=researcher)
    assert sent.value.values == {"requestId": request_id}


def test_every_contract_error_decodes_to_a_class_of_a_family() -> None:
    from healthlab import oracle as module

    abi = load_artifact("CityScoreOracle")["abi"]
    names = sorted(i["name"] for i in abi if i["type"] == "error")
    families = (
        errors.NotAuthorized,
        errors.NotFound,
        errors.InvalidRequest,
        errors.StateConflict,
    )
    for name in names:
        cls = getattr(module, name, None)
        assert cls is not None, f"healthlab.oracle lacks {name}"
        assert issubclass(cls, families), name
        assert cls.hint != errors.ContractError.hint, name
        assert name in module.__all__, name
        registry_twin = getattr(errors, name, None)
        if registry_twin is not None:  # same name: catching the registry's works too
            assert issubclass(cls, registry_twin), name


def test_every_state_change_emits_an_event(
    ledger: Ledger,
    owner: str,
    researcher: str,
    stranger: str,
    worker_account: str,
) -> None:
    client = OracleClient.deploy(ledger, request_timeout=TIMEOUT, sender=owner)
    client.set_oracle(worker_account, sender=owner)
    client.set_fee(FEE, sender=owner)
    one = client.request_score("coastal", "2025-04-01", "2025-04-30", sender=stranger)
    two = client.request_score("inland", "2025-04-01", "2025-04-30", sender=stranger)
    three = client.request_score(
        "coastal", "2025-05-01", "2025-05-30", sender=researcher
    )
    client.fulfil(one, ScoreResult(7000, 100, 2), sender=worker_account)
    client.refuse(two, Refusal.TOO_FEW_SITES, sender=worker_account)
    ledger.advance_time(TIMEOUT)
    client.cancel(three, sender=researcher)
    client.withdraw(sender=worker_account)
    seen = [(e.event, e.request_id) for e in client.events()]
    assert seen == [
        ("OracleSet", None),
        ("FeeSet", None),
        ("ScoreRequested", one),
        ("ScoreRequested", two),
        ("ScoreRequested", three),
        ("ScoreFulfilled", one),
        ("ScoreRefused", two),
        ("RequestCancelled", three),
        ("Withdrawal", None),
    ]
    requested = client.events(event="ScoreRequested")[0].args
    assert requested == {
        "requestId": one,
        "requester": stranger,
        "cityId": "0x" + b"coastal".ljust(32, b"\x00").hex(),
        "fromDay": day("2025-04-01"),
        "toDay": day("2025-04-30"),
        "amount": FEE,
    }
    statuses = [r.status for r in client.requests()]
    assert statuses == [
        RequestStatus.FULFILLED,
        RequestStatus.REFUSED,
        RequestStatus.CANCELLED,
    ]
    assert [r.id for r in client.requests(requester=researcher)] == [three]


# ----------------------------------------------------------------------- gas
#: Gas budgets (receipt gasUsed, 21,000 base included) measured on the embedded chain;
#: "first" = the payee's credit goes from zero to non-zero (a new storage slot).
GAS_BUDGET = {
    "request": 101_000,
    "fulfil, first credit": 57_500,
    "fulfil": 40_500,
    "refuse, first refund": 56_500,
    "cancel": 37_000,
    "withdraw": 32_000,
}


def test_gas_of_requests_and_answers_stays_within_budget(
    ledger: Ledger,
    oracle: OracleClient,
    researcher: str,
    stranger: str,
    worker_account: str,
) -> None:
    used: dict[str, int] = {}
    one = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=researcher)
    used["request"] = oracle.last_receipt["gasUsed"]
    two = oracle.request_score("coastal", "2025-05-01", "2025-05-31", sender=stranger)
    three = oracle.request_score("inland", "2025-05-01", "2025-05-31", sender=stranger)
    four = oracle.request_score("coastal", "2025-06-01", "2025-06-29", sender=stranger)
    oracle.fulfil(one, ScoreResult(7442, 2867, 2), sender=worker_account)
    used["fulfil, first credit"] = oracle.last_receipt["gasUsed"]
    oracle.fulfil(two, ScoreResult(7311, 2900, 2), sender=worker_account)
    used["fulfil"] = oracle.last_receipt["gasUsed"]
    oracle.refuse(three, Refusal.TOO_FEW_SITES, sender=worker_account)
    used["refuse, first refund"] = oracle.last_receipt["gasUsed"]
    ledger.advance_time(TIMEOUT)
    oracle.cancel(four, sender=stranger)
    used["cancel"] = oracle.last_receipt["gasUsed"]
    oracle.withdraw(sender=stranger)
    used["withdraw"] = oracle.last_receipt["gasUsed"]
    over = {k: (used[k], limit) for k, limit in GAS_BUDGET.items() if used[k] > limit}
    assert not over, f"gas over budget (used, budget): {over}; all: {used}"


# ----------------------------------------------------------- build and gate
def test_oracle_artifact_matches_its_source_and_fits_the_size_limit() -> None:
    artifact = load_artifact("CityScoreOracle")
    text = (CONTRACTS / "src" / "CityScoreOracle.sol").read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(text).hexdigest(), (
        "CityScoreOracle is stale: run `make contracts`"
    )
    assert artifact["compiler"]["version"].startswith("0.8.37+")
    runtime = bytes.fromhex(artifact["deployedBytecode"][2:])
    assert len(runtime) <= 24_576, f"{len(runtime)} bytes exceeds EIP-170"


def test_slither_gate_analyses_the_oracle_and_fails_on_a_seeded_reentrancy(
    tmp_path: Path,
) -> None:
    if not (ROOT / ".tools" / "slither" / "bin" / "slither").is_file():
        require("slither (.tools/slither)")
    require("node")
    source = (CONTRACTS / "src" / "CityScoreOracle.sol").read_text()
    safe = """        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);"""
    unsafe = """        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);
        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);"""
    assert safe in source, "the withdraw body changed: update this seeded bug"
    seeded = source.replace(safe, unsafe).replace(
        "internal nonReentrant returns", "internal returns"
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CityScoreOracle.sol").write_text(seeded)
    (tmp_path / "src" / "HealthLabRegistry.sol").write_text(
        (CONTRACTS / "src" / "HealthLabRegistry.sol").read_text()
    )
    done = subprocess.run(
        [str(ROOT / "scripts" / "slither.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, "Slither must fail on the oracle's reentrant withdraw"
    assert "reentrancy-eth" in output
    assert "CityScoreOracle" in output


# --------------------------------------------------------------------- anvil
@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEALTHLAB_REGISTRY", "HEALTHLAB_PRIVATE_KEY", "HEALTHLAB_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.anvil
@pytest.mark.usefixtures("_clean_env")
def test_worker_loop_on_anvil_fulfils_refuses_and_settles(
    anvil: AnvilNode, city_sites: dict[str, pd.DataFrame], keys: KeyHolder
) -> None:
    ledger = Ledger.connect(anvil.url)
    owner, worker_account, citizen = ledger.accounts[5:8]
    client = OracleClient.deploy(
        ledger,
        request_timeout=TIMEOUT,
        oracle=worker_account,
        fee_wei=FEE,
        sender=owner,
    )
    # the data holder's worker runs with its own connection, in its own thread
    own = OracleClient(
        Ledger.connect(anvil.url), client.address, from_block=client.from_block
    )
    worker = OracleWorker(own, city_sites, sender=worker_account, keys=keys)
    stop = threading.Event()
    done: list[Any] = []
    thread = threading.Thread(
        target=lambda: done.extend(worker.run(poll_seconds=0.05, stop_event=stop))
    )
    thread.start()
    try:
        citizen_before = ledger.balance(citizen)
        paid = client.request_score(
            "coastal", "2025-04-01", "2025-04-30", sender=citizen
        )
        paid_gas = gas_cost(client.last_receipt)
        refused = client.request_score(
            "inland", "2025-04-01", "2025-04-30", sender=citizen
        )
        refused_gas = gas_cost(client.last_receipt)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answered = client.events(event="ScoreFulfilled") + client.events(
                event="ScoreRefused"
            )
            if len(answered) == 2:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert sorted((a.request_id, a.action) for a in done) == [
        (paid, "fulfilled"),
        (refused, "refused"),
    ]
    score_x100, user_days, sites = pandas_answer(
        city_sites, "coastal", "2025-04-01", "2025-04-30"
    )
    assert [e.args for e in client.events(event="ScoreFulfilled")] == [
        {
            "requestId": paid,
            "oracle": worker_account,
            "scoreX100": score_x100,
            "userDays": user_days,
            "sites": sites,
        }
    ]
    assert [e.args for e in client.events(event="ScoreRefused")] == [
        {
            "requestId": refused,
            "oracle": worker_account,
            "reason": Refusal.TOO_FEW_SITES,
        }
    ]
    assert client.request(refused).result is None
    assert client.credit(worker_account) == FEE
    assert client.credit(citizen) == FEE
    assert ledger.balance(client.address) == 2 * FEE
    assert client.withdraw(sender=citizen) == FEE
    spent = paid_gas + refused_gas + gas_cost(client.last_receipt)
    assert ledger.balance(citizen) == citizen_before - FEE - spent
    assert ledger.balance(client.address) == FEE


@pytest.mark.anvil
@pytest.mark.usefixtures("_clean_env")
def test_cancel_after_the_timeout_on_anvil_refunds_exactly(anvil: AnvilNode) -> None:
    ledger = Ledger.connect(anvil.url)
    owner, worker_account, citizen = ledger.accounts[5:8]
    client = OracleClient.deploy(
        ledger,
        request_timeout=TIMEOUT,
        oracle=worker_account,
        fee_wei=FEE,
        sender=owner,
    )
    req = client.request_score("northern", "2025-04-01", "2025-04-30", sender=citizen)
    opens = client.request(req).cancellable_at
    with pytest.raises(errors.TooEarlyToCancel) as caught:
        client.cancel(req, sender=citizen)
    assert caught.value.values == {"requestId": req, "cancellableAt": opens}
    ledger.mine(opens)
    assert client.cancel(req, sender=citizen).status is RequestStatus.CANCELLED
    assert block_time(ledger, client.last_receipt) >= opens
    assert client.credit(citizen) == FEE
    with pytest.raises(errors.NotPending):
        client.fulfil(req, ScoreResult(7000, 100, 1), sender=worker_account)
    before = ledger.balance(citizen)
    assert client.withdraw(sender=citizen) == FEE
    assert ledger.balance(citizen) == before + FEE - gas_cost(client.last_receipt)
    assert ledger.balance(client.address) == 0


def test_site_scores_ignore_rows_without_enough_measured_weight(
    oracle: OracleClient, worker_account: str, keys: KeyHolder
) -> None:
    """Rows whose score is NaN (coverage below 0.5) are not counted as user-days."""
    a = _synthetic(["a1", "a2", "a3", "a4"], ["2025-04-01"], "t")
    b = _synthetic(["b1", "b2", "b3"], ["2025-04-01"], "t")
    a.loc[0, ["bmi", "calories_burned", "steps", "resting_hr"]] = np.nan
    frames = {"a": a, "b": b}
    worker = OracleWorker(oracle, frames, sender=worker_account, keys=keys)
    answer = worker.compute("t", "2025-04-01", "2025-04-01")
    assert answer.result == ScoreResult(
        *pandas_answer(frames, "t", "2025-04-01", "2025-04-01")
    )
    assert answer.result is not None and answer.result.user_days == 6
