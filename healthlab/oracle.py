"""The city health score oracle: its contract's client and the data holder's worker.

Anyone can ask the ``CityScoreOracle`` contract for a city's aggregate citizen health
score over a period of days (:meth:`OracleClient.request_score`), paying the fee into
escrow. The data holder runs an :class:`OracleWorker`: it watches for requests,
scores every user-day at each of its sites with :mod:`healthlab.score`, pools the
city's user-days of the period across sites with the encrypted statistics
(:func:`healthlab.encrypted.describe`) under the sites' disclosure rules, and answers
on chain - with the mean score ×100 and the number of user-days and sites behind it,
or with a :class:`Refusal` code and no number. No individual's score leaves a site.

Scaling: the published ``score_x100`` is ``floor(mean × 100 + 0.5)`` (half up) of the
pooled mean, so ``score_x100 / 100`` is the mean to two decimals.

Periods are day numbers: whole days since 1970-01-01 (UTC), both ends included
(:func:`day_number`); a city id is the city's short name, UTF-8, right-padded with
zeros to 32 bytes (:func:`city_id`).

Examples
--------
>>> from healthlab import Ledger
>>> from healthlab.data import city_days, load_city_tables
>>> tables = load_city_tables()
>>> days = city_days(tables)
>>> holder = days["user_id"].map(tables.patients.set_index("user_id")["site"])
>>> sites = {str(name): frame for name, frame in days.groupby(holder)}
>>> ledger = Ledger.local()
>>> owner, worker_account, citizen = ledger.accounts[1:4]
>>> oracle = OracleClient.deploy(ledger, oracle=worker_account, sender=owner)
>>> worker = OracleWorker(oracle, sites, sender=worker_account)
>>> req = oracle.request_score("coastal", "2025-04-01", "2025-04-30", sender=citizen)
>>> [action.action for action in worker.run_once()]
['fulfilled']
>>> oracle.request(req).result
ScoreResult(score_x100=7442, user_days=2867, sites=2)
>>> inland = oracle.request_score("inland", "2025-04-01", "2025-04-30", sender=citizen)
>>> worker.run_once()[0].answer.reason
'1 site(s) hold the period; a result pools at least 2'
>>> oracle.request(inland).refusal
<Refusal.TOO_FEW_SITES: 2>
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from healthlab import errors
from healthlab._paths import home
from healthlab.encrypted import KeyHolder, describe
from healthlab.ledger.client import Ledger
from healthlab.ledger.contract import ContractClient, checked_address
from healthlab.receipts import Receipt
from healthlab.score import health_score
from healthlab.sites import DisclosurePolicy, Site

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "MAX_SCORE_X100",
    "Answer",
    "InvalidPeriod",
    "InvalidRefusal",
    "InvalidResult",
    "InvalidTimeout",
    "NoOracle",
    "NotOracle",
    "NotOwner",
    "NotPending",
    "NotRequester",
    "NothingToWithdraw",
    "OracleClient",
    "OracleEvent",
    "OracleWorker",
    "PaymentFailed",
    "Reentrancy",
    "Refusal",
    "RequestStatus",
    "ScoreRequest",
    "ScoreResult",
    "TooEarlyToCancel",
    "UnknownRequest",
    "WorkerAction",
    "WrongPayment",
    "ZeroAddress",
    "ZeroCity",
    "city_id",
    "city_name",
    "day_date",
    "day_number",
    "scale_score",
]

log = logging.getLogger(__name__)

#: Seconds after which an unanswered request may be cancelled (default: one day).
DEFAULT_REQUEST_TIMEOUT = 24 * 3600
#: The highest ``score_x100`` (a score of 100.00).
MAX_SCORE_X100 = 10_000
_EPOCH = dt.date(1970, 1, 1)
_UINT32 = (1 << 32) - 1
_UINT96 = (1 << 96) - 1


# ------------------------------------------------------------------- records
class RequestStatus(enum.IntEnum):
    """A score request's state on chain (the contract's ``Status``)."""

    NONE = 0
    PENDING = 1
    FULFILLED = 2
    REFUSED = 3
    CANCELLED = 4


class Refusal(enum.IntEnum):
    """Why the oracle answered without a number (the contract's ``Refusal``)."""

    NONE = 0
    #: A site's disclosure policy refused (too few user-days or users, differencing).
    DISCLOSURE_REFUSED = 1
    #: Fewer sites hold the city's period than a pooled result needs.
    TOO_FEW_SITES = 2
    #: No site holds a scored user-day of the city in the period.
    NO_DATA = 3
    #: No site knows the city at all.
    UNKNOWN_CITY = 4
    #: A site's data could not be used.
    DATA_REFUSED = 5


@dataclass(frozen=True)
class ScoreResult:
    """A fulfilled request's answer: an aggregate, never an individual's score."""

    score_x100: int
    user_days: int
    sites: int

    @property
    def score(self) -> float:
        """The pooled mean score (0-100) to two decimals."""
        return self.score_x100 / 100


@dataclass(frozen=True)
class ScoreRequest:
    """A score request as the contract holds it now.

    ``result`` is set only when ``status`` is ``FULFILLED``, ``refusal`` only when it
    is ``REFUSED``: a refused request carries no number.
    """

    id: int
    requester: str
    city: str
    city_id: str
    from_day: int
    to_day: int
    amount_wei: int
    created_at: int
    cancellable_at: int
    status: RequestStatus
    result: ScoreResult | None
    refusal: Refusal | None

    @property
    def period(self) -> tuple[dt.date, dt.date]:
        """The first and last day of the period (inclusive) as dates."""
        return day_date(self.from_day), day_date(self.to_day)


@dataclass(frozen=True)
class OracleEvent:
    """One event of the oracle contract."""

    event: str
    block: int
    log_index: int
    tx: str
    request_id: int | None
    args: dict[str, Any]


# ------------------------------------------------------------------- errors
class _OracleError(errors.ContractError):
    """Mixin: the message names the oracle contract rather than the registry."""

    contract = "the city score oracle"


class NotOwner(_OracleError, errors.NotAuthorized):
    hint = "only the oracle contract's owner may register the oracle or set the fee"


class NotOracle(_OracleError, errors.NotAuthorized):
    hint = (
        "only the registered oracle (the data holder's worker) may answer requests; "
        "see OracleClient.oracle"
    )


class NotRequester(_OracleError, errors.NotRequester):
    hint = "only the account that requested this score may cancel it"


class UnknownRequest(_OracleError, errors.UnknownRequest):
    hint = "list score requests with OracleClient.requests()"


class NotPending(_OracleError, errors.NotPending):
    hint = "this request was answered or cancelled already: each is settled once"


class NoOracle(_OracleError, errors.StateConflict):
    hint = (
        "no oracle is registered yet, so nobody could answer; nothing was paid. "
        "The owner registers one with OracleClient.set_oracle"
    )


class ZeroAddress(_OracleError, errors.ZeroAddress):
    hint = "give a real address"


class ZeroCity(_OracleError, errors.InvalidRequest):
    hint = "name the city (its short id, e.g. 'coastal')"


class InvalidPeriod(_OracleError, errors.InvalidRequest):
    hint = "the period's last day must not come before its first day"


class InvalidTimeout(_OracleError, errors.InvalidRequest):
    hint = "the request timeout must be 1 to 2**32-1 seconds"


class WrongPayment(_OracleError, errors.WrongPayment):
    hint = "send exactly the oracle's current fee (OracleClient.fee_wei); nothing paid"


class InvalidResult(_OracleError, errors.InvalidRequest):
    hint = "a score is 0-10000 (x100) over at least one user-day and one site"


class InvalidRefusal(_OracleError, errors.InvalidRequest):
    hint = "give a refusal reason other than Refusal.NONE"


class TooEarlyToCancel(_OracleError, errors.TooEarlyToCancel):
    hint = "an unanswered request can be cancelled once its timeout has passed"


class NothingToWithdraw(_OracleError, errors.NothingToWithdraw):
    hint = "nothing is credited to this account on the oracle contract"


class PaymentFailed(_OracleError, errors.PaymentFailed):
    hint = "the receiving address rejected the ether; withdraw to another address"


class Reentrancy(_OracleError, errors.Reentrancy):
    hint = "withdraw cannot be re-entered"


_ERRORS: dict[str, type[errors.ContractError]] = {
    cls.__name__: cls
    for cls in (
        NotOwner,
        NotOracle,
        NotRequester,
        UnknownRequest,
        NotPending,
        NoOracle,
        ZeroAddress,
        ZeroCity,
        InvalidPeriod,
        InvalidTimeout,
        WrongPayment,
        InvalidResult,
        InvalidRefusal,
        TooEarlyToCancel,
        NothingToWithdraw,
        PaymentFailed,
        Reentrancy,
    )
}


# ------------------------------------------------------------------ helpers
def city_id(name: str) -> bytes:
    """The contract's ``bytes32`` id of a city: its name, UTF-8, zero-padded."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise errors.InvalidInput(
            "a city is named by a non-empty string, e.g. 'coastal'"
        )
    raw = name.encode()
    if len(raw) > 32:
        raise errors.InvalidInput(f"city names are at most 32 bytes of UTF-8: {name!r}")
    return raw.ljust(32, b"\0")


def city_name(raw: bytes) -> str:
    """The city name of a ``bytes32`` id (undecodable bytes become U+FFFD)."""
    return bytes(raw).rstrip(b"\0").decode("utf-8", errors="replace")


def day_number(day: dt.date | str | int) -> int:
    """Whole days since 1970-01-01 of a date, an ISO date string or a day number."""
    if isinstance(day, bool):
        raise errors.InvalidInput("a day is a date, an ISO date string or a number")
    if isinstance(day, int):
        number = day
    elif isinstance(day, dt.datetime):
        number = (day.date() - _EPOCH).days
    elif isinstance(day, dt.date):
        number = (day - _EPOCH).days
    elif isinstance(day, str):
        try:
            number = (dt.date.fromisoformat(day) - _EPOCH).days
        except ValueError:
            raise errors.InvalidInput(
                f"{day!r} is not an ISO date (YYYY-MM-DD)"
            ) from None
    else:
        raise errors.InvalidInput("a day is a date, an ISO date string or a number")
    if not 0 <= number <= _UINT32:
        raise errors.InvalidInput("days must fall on or after 1970-01-01")
    return number


def day_date(number: int) -> dt.date:
    """The date of a day number."""
    return _EPOCH + dt.timedelta(days=int(number))


def scale_score(mean: float) -> int:
    """The published form of a mean score: ``floor(mean × 100 + 0.5)``, 0-10000."""
    if not math.isfinite(mean) or not 0 <= mean <= 100:
        raise errors.InvalidInput(f"a mean score lies in [0, 100], not {mean!r}")
    return min(MAX_SCORE_X100, math.floor(mean * 100 + 0.5))


def _uint(value: int, name: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise errors.InvalidInput(f"{name} must be a whole number from 0 to {high}")
    return value


# ------------------------------------------------------------------- client
class OracleClient(ContractClient):
    """The Python client of a deployed ``CityScoreOracle``, on a :class:`Ledger`'s
    connection (its node, keys and default sender, shared).

    Sending, calls, revert decoding, events, logs, credits and withdrawals are the
    :class:`~healthlab.ledger.contract.ContractClient`'s; reverts become this
    module's error classes (:meth:`revert_error`).

    Parameters
    ----------
    ledger:
        Whose connection to use.
    address:
        The oracle contract.
    from_block:
        Where event scans start (the deployment block).
    """

    artifact = "CityScoreOracle"
    status_type = RequestStatus

    def __init__(self, ledger: Ledger, address: str, *, from_block: int = 0) -> None:
        super().__init__(
            ledger.connection, checked_address(address), from_block=from_block
        )
        self.ledger = ledger

    @classmethod
    def revert_error(cls, name: str, values: dict[str, Any]) -> errors.ContractError:
        """This module's class of the oracle contract's error ``name``."""
        return _ERRORS.get(name, _OracleError)(name, values)

    @classmethod
    def deploy(
        cls,
        ledger: Ledger,
        *,
        request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
        oracle: str | None = None,
        fee_wei: int = 0,
        sender: str | None = None,
    ) -> OracleClient:
        """Deploy a new oracle contract owned by ``sender``; optionally register the
        ``oracle`` account and a fee at once."""
        _uint(request_timeout, "request_timeout", _UINT32)
        if request_timeout == 0:
            raise errors.InvalidInput("request_timeout must be at least 1 second")
        receipt = cls.deploy_contract(
            ledger.connection, int(request_timeout), sender=sender
        )
        client = cls(
            ledger,
            receipt["contractAddress"],
            from_block=int(receipt["blockNumber"]),
        )
        client.last_receipt = receipt
        if oracle is not None:
            client.set_oracle(oracle, sender=sender)
        if fee_wei:
            client.set_fee(fee_wei, sender=sender)
        return client

    # ------------------------------------------------------------ settings
    @property
    def owner(self) -> str:
        """The account that registers the oracle and sets the fee."""
        return str(self.call(self.contract.functions.owner()))

    @property
    def oracle(self) -> str | None:
        """The registered oracle account (``None`` until one is registered)."""
        found = str(self.call(self.contract.functions.oracle()))
        return None if int(found, 16) == 0 else found

    @property
    def fee_wei(self) -> int:
        """What a new request pays into escrow."""
        return int(self.call(self.contract.functions.fee()))

    @cached_property
    def request_timeout(self) -> int:
        """Seconds after which an unanswered request may be cancelled."""
        return int(self.call(self.contract.functions.requestTimeout()))

    def set_oracle(self, oracle: str, *, sender: str | None = None) -> None:
        """Register the account that answers requests (owner only)."""
        who = checked_address(oracle, "oracle")
        self.transact(self.contract.functions.setOracle(who), sender)

    def set_fee(self, fee_wei: int, *, sender: str | None = None) -> None:
        """Set the fee of new requests (owner only); pending ones keep theirs."""
        fee = _uint(fee_wei, "fee_wei", _UINT96)
        self.transact(self.contract.functions.setFee(fee), sender)

    # ------------------------------------------------------------ requests
    def request_score(
        self,
        city: str,
        from_day: dt.date | str | int,
        to_day: dt.date | str | int,
        *,
        fee_wei: int | None = None,
        sender: str | None = None,
    ) -> int:
        """Ask for ``city``'s score over ``from_day``-``to_day`` (inclusive), paying
        the fee (default: the fee read now); return the request id.

        If the fee changed before the transaction is mined, the contract reverts with
        :class:`~healthlab.errors.WrongPayment` and nothing is paid.
        """
        start, end = day_number(from_day), day_number(to_day)
        if end < start:
            raise errors.InvalidInput(
                f"the period ends ({day_date(end)}) before it starts "
                f"({day_date(start)})"
            )
        pay = self.fee_wei if fee_wei is None else _uint(fee_wei, "fee_wei", _UINT96)
        fn = self.contract.functions.requestScore(city_id(city), start, end)
        receipt = self.transact(fn, sender, value=pay)
        return int(self.receipt_event(receipt, "ScoreRequested")["requestId"])

    def fulfil(
        self,
        request_id: int,
        result: ScoreResult,
        *,
        sender: str | None = None,
    ) -> ScoreRequest:
        """Answer a pending request with an aggregate (the registered oracle only)."""
        fn = self.contract.functions.fulfil(
            _uint(request_id, "request_id", (1 << 64) - 1),
            _uint(result.score_x100, "score_x100", MAX_SCORE_X100),
            _uint(result.user_days, "user_days", _UINT32),
            _uint(result.sites, "sites", (1 << 16) - 1),
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def refuse(
        self, request_id: int, reason: Refusal, *, sender: str | None = None
    ) -> ScoreRequest:
        """Answer a pending request with a refusal and no number (oracle only)."""
        code = Refusal(reason)
        if code is Refusal.NONE:
            raise errors.InvalidInput("give a refusal reason other than Refusal.NONE")
        fn = self.contract.functions.refuse(
            _uint(request_id, "request_id", (1 << 64) - 1), int(code)
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def cancel(self, request_id: int, *, sender: str | None = None) -> ScoreRequest:
        """Cancel your unanswered request after the timeout; the fee is refunded."""
        fn = self.contract.functions.cancel(
            _uint(request_id, "request_id", (1 << 64) - 1)
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def request(self, request_id: int) -> ScoreRequest:
        """A request's record as the contract holds it now."""
        raw = self.call(self.contract.functions.getRequest(int(request_id)))
        requester, amount, cid, start, end, created, status, refusal = raw[:8]
        score_x100, user_days, sites = raw[8:]
        state = RequestStatus(status)
        return ScoreRequest(
            id=int(request_id),
            requester=str(requester),
            city=city_name(cid),
            city_id="0x" + bytes(cid).hex(),
            from_day=int(start),
            to_day=int(end),
            amount_wei=int(amount),
            created_at=int(created),
            cancellable_at=int(created) + self.request_timeout,
            status=state,
            result=ScoreResult(int(score_x100), int(user_days), int(sites))
            if state is RequestStatus.FULFILLED
            else None,
            refusal=Refusal(refusal) if state is RequestStatus.REFUSED else None,
        )

    @property
    def request_count(self) -> int:
        """How many requests were ever made."""
        return int(self.call(self.contract.functions.requestCount()))

    def requests(
        self,
        *,
        requester: str | None = None,
        status: RequestStatus | None = None,
    ) -> list[ScoreRequest]:
        """Every request, oldest first, optionally of one requester and/or status."""
        who = None if requester is None else checked_address(requester, "requester")
        found = [self.request(i) for i in range(1, self.request_count + 1)]
        return [
            r
            for r in found
            if (who is None or r.requester == who)
            and (status is None or r.status is status)
        ]

    # -------------------------------------------------------------- events
    def events(
        self,
        *,
        event: str | None = None,
        from_block: int | None = None,
        to_block: int | str = "latest",
    ) -> list[OracleEvent]:
        """The contract's events (of one kind if ``event`` is given), oldest first."""
        found = self.logs(
            events=None if event is None else [event],
            from_block=from_block,
            to_block=to_block,
        )
        out = []
        for entry in found:
            args = {
                k: ("0x" + bytes(v).hex() if isinstance(v, bytes) else v)
                for k, v in entry["args"].items()
            }
            if entry["event"] == "ScoreRefused":
                args["reason"] = Refusal(int(args["reason"]))
            request_id = args.get("requestId")
            out.append(
                OracleEvent(
                    event=str(entry["event"]),
                    block=int(entry["blockNumber"]),
                    log_index=int(entry["logIndex"]),
                    tx=entry["transactionHash"].to_0x_hex(),
                    request_id=None if request_id is None else int(request_id),
                    args=args,
                )
            )
        return out


# ------------------------------------------------------------------- worker
@dataclass(frozen=True)
class Answer:
    """What the worker computed for a period: a result or a refusal, never both.

    ``reason`` explains a refusal with site names and thresholds, never values;
    ``receipt`` is the encrypted-statistics receipt of a result (kept by the data
    holder, not published).
    """

    result: ScoreResult | None
    refusal: Refusal | None
    reason: str = ""
    receipt: Receipt | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WorkerAction:
    """One thing :meth:`OracleWorker.run_once` did about a request."""

    request_id: int
    action: str  # "fulfilled", "refused" or "skipped"
    answer: Answer | None
    tx: str | None
    gas_used: int | None
    note: str = ""


_REFUSAL_OF: tuple[tuple[type[errors.HealthLabError], Refusal], ...] = (
    (errors.TooFewSites, Refusal.TOO_FEW_SITES),
    (errors.DisclosureRefused, Refusal.DISCLOSURE_REFUSED),
    (errors.DataRefused, Refusal.DATA_REFUSED),
)


class OracleWorker:
    """The data holder's oracle: computes city scores at its sites and answers.

    Parameters
    ----------
    client:
        The oracle contract's client.
    sites:
        ``{site name: frame}``: each site's user-days with ``user_id``, ``date``,
        ``city_id`` and the score's factor columns (as :func:`healthlab.data.city_days`
        gives them). Scores are computed once, at construction, per site.
    sender:
        The registered oracle account the worker answers from (default: the ledger's
        default sender).
    weights, min_coverage:
        Passed to :func:`healthlab.score.health_score`.
    policy:
        Every site's disclosure policy (default :class:`DisclosurePolicy`: at least 3
        user-days per site, 2 sites, differencing by at least 3 user-days). With
        :meth:`DisclosurePolicy.citizen` every site is one citizen's device (see
        *Citizens as sites* below).
    min_users:
        Fewest distinct users whose days a site pools (default 3), so a site's share
        of a mean is never one or two people's.
    min_sites:
        Fewest sites a result pools (never fewer than the policy's).
    from_block:
        The first block scanned for requests (default: the contract's deployment).
    state_dir:
        Where each site keeps what it answered each requester (the differencing
        check: user-days counted as distinct users, periods as subsets, and the
        sets of sites pooled), across restarts. Default:
        ``$HEALTHLAB_HOME/oracle/<chain id>-<oracle contract>``.

    Citizens as sites
    -----------------
    With ``policy=DisclosurePolicy.citizen(min_contributors=K)`` each site is one
    citizen's device of a few user-days, too few for a per-site minimum. The worker
    then audits the *pooled* subsets instead of each site's: one auditor over every
    citizen's user-days (``audit-citizens.json`` in ``state_dir``), counting
    distinct persons (``user_id``), with ``k = K``. A period is answered only when
    at least ``K`` sites hold days of it (else ``TOO_FEW_SITES``), its pooled days
    are of at least ``K`` persons, and no combination of it with the periods
    answered before isolates fewer than ``K`` persons (differencing, e.g. two
    periods that differ by one citizen's days) nor fewer than ``K`` sites (the
    site-set audit with ``need = K``). This is sound because the published mean and
    count are functions of the pooled subset's rows alone, exactly as one site's
    answer is of its rows: the pooled auditor is the per-site auditor of a site
    holding every citizen's rows. The sum itself is the secure sum over the citizen
    sites (each masks and encrypts its own totals; the key holder decrypts only the
    pooled sum), under the citizen rules of :meth:`DisclosurePolicy.citizen`. It
    needs the worker to see which citizen holds which days (as the data holder of
    the health-score programme does); devices answering on their own have the
    general citizen rules only.
    """

    def __init__(
        self,
        client: OracleClient,
        sites: Mapping[str, pd.DataFrame],
        *,
        sender: str | None = None,
        weights: Mapping[str, float] | None = None,
        min_coverage: float = 0.5,
        policy: DisclosurePolicy | None = None,
        min_users: int = 3,
        min_sites: int = 2,
        keys: KeyHolder | None = None,
        from_block: int | None = None,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(sites, Mapping) or not sites:
            raise errors.InvalidInput(
                "sites must be a non-empty mapping {site name: city-days frame}"
            )
        who = sender or client.default_sender
        if who is None:
            raise errors.InvalidInput("pass sender=<the registered oracle account>")
        if isinstance(min_users, bool) or not isinstance(min_users, int):
            raise errors.InvalidInput("min_users must be a whole number")
        self.client = client
        self.sender = checked_address(who, "sender")
        self.policy = policy or DisclosurePolicy()
        self.min_users = max(1, min_users)
        self.min_sites = max(int(min_sites), self.policy.min_sites)
        self.from_block = client.from_block if from_block is None else int(from_block)
        self._keys = keys or KeyHolder()
        self._tables = {
            str(name): _score_table(str(name), frame, weights, min_coverage)
            for name, frame in sites.items()
        }
        folder = (
            Path(state_dir)
            if state_dir is not None
            else home() / "oracle" / f"{client.chain_id}-{client.address.lower()}"
        )
        self.state_dir = folder
        # what each site answered before, over all its user-days (differencing),
        # counted in distinct users, kept in state_dir across restarts; citizens:
        # one auditor over the pooled user-days of every citizen site
        self._memory: dict[str, Site] = {}
        self._pooled: Site | None = None
        if self.policy.is_citizen:
            self._pooled = _pooled_memory(self._tables, self.policy, folder)
        else:
            self._memory = {
                name: Site(
                    name,
                    table[["score", "user_id"]],
                    policy=self.policy,
                    state_dir=folder,
                    units="user_id",
                )
                for name, table in self._tables.items()
            }
        self._queue: dict[int, OracleEvent] = {}

    # ------------------------------------------------------------ compute
    def compute(
        self,
        city: str,
        from_day: dt.date | str | int,
        to_day: dt.date | str | int,
        *,
        requester: str | None = None,
    ) -> Answer:
        """The city's pooled score over the period, or the refusal the rules give.

        Each site selects its scored user-days of the city in the period and refuses
        fewer than the policy's ``min_rows`` user-days or ``min_users`` users, and a
        selection that differs from one it answered before by fewer than
        ``min_difference`` user-days. The pooled mean and count come from
        :func:`healthlab.encrypted.describe` over the sites holding any such day.
        Citizen sites (:meth:`DisclosurePolicy.citizen`) are audited pooled
        instead: see the class's *Citizens as sites*.
        """
        start, end = day_number(from_day), day_number(to_day)
        masks: dict[str, np.ndarray] = {}
        known = False
        refused: list[str] = []
        for name, table in self._tables.items():
            in_city = (table["city_id"] == city).to_numpy()
            known = known or bool(in_city.any())
            day = table["day"].to_numpy()
            mask = (
                in_city
                & (day >= start)
                & (day <= end)
                & table["score"].notna().to_numpy()
            )
            if not mask.any():
                continue
            masks[name] = mask
            if self._pooled is not None:
                continue  # audited pooled, below
            try:
                self._memory[name].check_subsets(
                    {"score": [mask]}, researcher=requester
                )
                users = int(table.loc[mask, "user_id"].nunique())
                if users < self.min_users:
                    raise errors.DisclosureRefused(
                        f"site {name}: the period holds the days of fewer than "
                        f"{self.min_users} users"
                    )
            except errors.DisclosureRefused as exc:
                refused.append(str(exc))
        if refused:
            return Answer(None, Refusal.DISCLOSURE_REFUSED, "; ".join(refused))
        if not known:
            return Answer(None, Refusal.UNKNOWN_CITY, f"no site holds city {city!r}")
        if not masks:
            return Answer(None, Refusal.NO_DATA, "no scored user-day in the period")
        if len(masks) < self.min_sites:
            return Answer(
                None,
                Refusal.TOO_FEW_SITES,
                f"{len(masks)} site(s) hold the period; a result pools at least "
                f"{self.min_sites}",
            )
        pooled_sites = sorted(masks)
        if self._pooled is not None:
            refusal = self._check_pooled(masks, pooled_sites, requester)
            if refusal is not None:
                return refusal
        try:
            for name in pooled_sites if self._pooled is None else ():
                # the sets of sites pooled for this requester before: no two
                # periods may differ by one site's user-days
                others = [
                    members
                    for memory in self._memory.values()
                    for members in memory.auditor.site_sets.get(
                        (requester or "").lower(), []
                    )
                    if name not in members
                ]
                self._memory[name].auditor.check_sites(
                    name, requester, pooled_sites, others, self.min_sites
                )
        except errors.DisclosureRefused as exc:
            return Answer(None, Refusal.DISCLOSURE_REFUSED, str(exc))
        sites = [
            Site(
                name,
                self._tables[name].loc[mask, ["score"]].reset_index(drop=True),
                policy=self.policy,
            )
            for name, mask in masks.items()
        ]
        try:
            table = describe(
                sites, ["score"], keys=self._keys, min_sites=self.min_sites
            )
        except errors.HealthLabError as exc:
            for kind, code in _REFUSAL_OF:
                if isinstance(exc, kind):
                    return Answer(None, code, str(exc))
            raise
        receipt = table.receipt
        if self._pooled is not None:
            self._pooled.remember(
                {"score": [self._pooled_mask(masks)]},
                query_hash=str(receipt["result_hash"]),
                kind="city-score",
                researcher=requester,
                participants=pooled_sites,
            )
        for name, mask in masks.items() if self._pooled is None else ():
            self._memory[name].remember(
                {"score": [mask]},
                query_hash=str(receipt["result_hash"]),
                kind="city-score",
                researcher=requester,
                participants=pooled_sites,
            )
        pooled = table["score"].to_dict()
        result = ScoreResult(
            score_x100=scale_score(float(pooled["mean"])),
            user_days=round(float(pooled["count"])),
            sites=len(sites),
        )
        return Answer(result, None, "", receipt)

    def _pooled_mask(self, masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The period's user-days among every citizen's, in the pooled order."""
        return np.concatenate(
            [
                masks[name] if name in masks else np.zeros(len(table), dtype=bool)
                for name, table in self._tables.items()
            ]
        )

    def _check_pooled(
        self,
        masks: Mapping[str, np.ndarray],
        pooled_sites: list[str],
        requester: str | None,
    ) -> Answer | None:
        """Citizen sites: the pooled audit (persons and sets of sites), or the
        refusal it gives."""
        assert self._pooled is not None
        try:
            # fewer than K persons, or differencing with the periods answered
            # before (any requester) down to fewer than K persons
            self._pooled.check_subsets(
                {"score": [self._pooled_mask(masks)]}, researcher=requester
            )
            # no combination of the sets of citizens pooled singles out fewer
            # than K of them
            self._pooled.auditor.check_sites(
                "the citizens' sites", requester, pooled_sites, [], self.min_sites
            )
        except errors.DisclosureRefused as exc:
            return Answer(None, Refusal.DISCLOSURE_REFUSED, str(exc))
        return None

    # ---------------------------------------------------------------- loop
    def run_once(self) -> list[WorkerAction]:
        """Read new requests, answer every pending one; return what was done.

        A request that is no longer pending (cancelled meanwhile) is skipped. If the
        chain cannot be reached the error propagates and the unanswered requests stay
        queued for the next call. Raises
        :class:`~healthlab.errors.ConfigurationError` before computing anything when
        this worker's account is not the registered oracle.
        """
        registered = self.client.oracle
        if registered != self.sender:
            raise errors.ConfigurationError(
                f"this worker answers from {self.sender}, but the oracle registered "
                f"on {self.client.address} is {registered}: the owner must register "
                "this account (OracleClient.set_oracle)"
            )
        latest = int(self.client.w3.eth.block_number)
        if latest >= self.from_block:
            for found in self.client.events(
                event="ScoreRequested", from_block=self.from_block, to_block=latest
            ):
                assert found.request_id is not None
                self._queue[found.request_id] = found
            self.from_block = latest + 1
        actions = []
        for request_id in sorted(self._queue):
            actions.append(self._answer(request_id))
            del self._queue[request_id]
        return actions

    def run(
        self, poll_seconds: float = 2.0, stop_event: threading.Event | None = None
    ) -> list[WorkerAction]:
        """Call :meth:`run_once` every ``poll_seconds`` until ``stop_event`` is set;
        return every action taken. Lost connections are logged and retried."""
        stop = stop_event or threading.Event()
        done: list[WorkerAction] = []
        while not stop.is_set():
            try:
                actions = self.run_once()
            except (errors.ChainUnreachable, errors.TransactionFailed) as exc:
                log.warning("oracle worker: %s; retrying", exc)
            else:
                for action in actions:
                    log.info(
                        "oracle worker: request %d %s", action.request_id, action.action
                    )
                done += actions
            stop.wait(poll_seconds)
        return done

    @property
    def pending(self) -> list[int]:
        """Request ids seen but not yet answered (after a failed run_once)."""
        return sorted(self._queue)

    def _answer(self, request_id: int) -> WorkerAction:
        record = self.client.request(request_id)
        if record.status is not RequestStatus.PENDING:
            return WorkerAction(
                request_id, "skipped", None, None, None, record.status.name.lower()
            )
        answer = self.compute(
            record.city, record.from_day, record.to_day, requester=record.requester
        )
        try:
            if answer.result is not None:
                self.client.fulfil(request_id, answer.result, sender=self.sender)
                action = "fulfilled"
            else:
                assert answer.refusal is not None
                self.client.refuse(request_id, answer.refusal, sender=self.sender)
                action = "refused"
        except errors.NotPending as exc:  # cancelled between the check and the answer
            return WorkerAction(request_id, "skipped", answer, None, None, str(exc))
        receipt = self.client.last_receipt
        return WorkerAction(
            request_id,
            action,
            answer,
            receipt["transactionHash"].to_0x_hex(),
            int(receipt["gasUsed"]),
            answer.reason,
        )


def _pooled_memory(
    tables: Mapping[str, pd.DataFrame], policy: DisclosurePolicy, folder: Path
) -> Site:
    """The auditor of citizen sites' pooled user-days: every citizen's rows as one
    site's, persons counted by ``user_id``, ``k`` the pooled minimum."""
    assert policy.min_contributors is not None
    k = policy.min_contributors
    pooled = pd.concat(
        [
            table[["score", "user_id", "day"]].assign(site=name)
            for name, table in tables.items()
        ],
        ignore_index=True,
    )
    rules = DisclosurePolicy(min_rows=k, min_difference=k, min_sites=policy.min_sites)
    return Site("citizens", pooled, policy=rules, state_dir=folder, units="user_id")


def _score_table(
    name: str,
    frame: pd.DataFrame,
    weights: Mapping[str, float] | None,
    min_coverage: float,
) -> pd.DataFrame:
    """One site's user-days: user, city, day number and score (computed here)."""
    if not isinstance(frame, pd.DataFrame):
        raise errors.InvalidInput(f"site {name}: give its user-days as a DataFrame")
    absent = [c for c in ("user_id", "date", "city_id") if c not in frame.columns]
    if absent:
        raise errors.InvalidInput(
            f"site {name} lacks column(s) {', '.join(absent)} (see "
            "healthlab.data.city_days)"
        )
    frame = frame.reset_index(drop=True)
    dates = pd.to_datetime(frame["date"], errors="coerce")
    if dates.isna().any():
        raise errors.InvalidInput(
            f"site {name}: {int(dates.isna().sum())} row(s) have no valid date"
        )
    if dates.dt.tz is not None:
        dates = dates.dt.tz_convert("UTC").dt.tz_localize(None)
    days = dates.to_numpy().astype("datetime64[D]").astype(np.int64)
    scores = health_score(frame, weights, min_coverage=min_coverage)
    return pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(str).to_numpy(),
            "city_id": frame["city_id"].astype(str).to_numpy(),
            "day": days,
            "score": scores.to_numpy(dtype=float),
        }
    )
