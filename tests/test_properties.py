"""Stateful property test: the registry against an exact Python model of it.

Six actors (accounts 1..6, each both owner and researcher) register datasets (fees
including 0, grants of 10..5000 s, random terms, auto-approval on or off), update
them, open and close them, request access (codes that fit the terms, random codes,
stale agreed fees and grant durations, wrong payments), approve, decline, cancel,
revoke, release keys, refund undelivered downloads, cap pending requests, record
results (fresh digests and copies of anyone's), bind site keys (any sender, valid and
invalid keys, rotations), start collaborations and keep them as owner directories
(admit and remove members, name them; curators and anyone else, the zero address,
names of 0, 1, 200 and 201 bytes), withdraw (to themselves, each other, an outside
payee or the zero address), and move the clock (random jumps and jumps onto grant
expiries, cancellation and refund times).

Every step's outcome is predicted by the model: a refused step must revert with the
error class *and arguments* the model names. After every step the whole chain state is
compared with the model: every dataset record, every (dataset, actor) access record,
``hasAccess`` for every pair, the site keys of every dataset (and of one that does not
exist), every credit, the dataset counter and each dataset's request counter, every
collaboration's curator (and that of one that does not exist), its members' flags and
name hashes (after every collaboration step, and every ``MEMBER_READS_EVERY``-th other
step), the clock and the contract's balance, and these invariants hold:

* the keys stored for a dataset are only ever those its owner last bound;
* a request's id is ``datasetId << 40 | number``, numbered per dataset from 1: unique
  across datasets, and an id never acts on another dataset's request;
* only a collaboration's curator changes its members and names; a member's stored
  name hash is keccak256 of the name the curator gave last, and the client's
  directory reads that name for a member and nothing for anyone else;

* contract balance == escrowed + credited (nothing else can send ether to it);
* total paid in == total paid out + balance held;
* every fee is in exactly one place: escrow (its request still pending, or its
  download grant waiting for the key), its owner's credit or payouts (withdrawals
  and fees paid on approval or key release), or its researcher's refund credit or
  withdrawals;
* a grant lasts the duration its request paid for; DL stays in the terms while any
  download is open; pending requests never exceed the owner's cap.

Each example runs on the session chain from a snapshot (taken in ``__init__``, restored
in ``teardown``). Profiles, chosen with ``HEALTHLAB_HYPOTHESIS_PROFILE``:

* ``ci`` (default): rounds of 25 examples × up to 60 steps until at least 5,000
  steps were checked (about 4 minutes alone on the 2-core dev box at the rate
  below; 395 s in ``make test``, beside the other worker);
* ``thorough``: 300 examples × up to 60 steps (~12,500 steps; ~10 minutes).

A step costs ~45 ms alone (it was ~73 ms): its transaction through the client (~18 ms,
half of it gas estimation), and the invariant check's ~60 view calls (~21 ms), read
in one ``eth_call`` through a test-only Multicall contract written in assembly (the
embedded chain interprets every opcode in Python), and read again only when the step
mined a block (:class:`Views`). Each step is checked as before; only repeated work
is gone.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import (
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
    keccak,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from healthlab import errors
from healthlab.ledger import Codes, Ledger, SiteKeys, Status, permits
from healthlab.ledger.artifacts import load_artifact
from tests.conftest import Chain, mask_key, node_key

T = TypeVar("T")

PROFILE_ENV = "HEALTHLAB_HYPOTHESIS_PROFILE"
_COMMON: dict[str, Any] = {"deadline": None}
#: The depth CI must reach (issue 15): steps checked against the model per run.
MIN_CI_STEPS = 5_000
#: CI runs rounds of this profile until the depth is reached (at most MAX_ROUNDS)
settings.register_profile(
    "healthlab-registry-ci", max_examples=25, stateful_step_count=60, **_COMMON
)
MAX_ROUNDS = 12
settings.register_profile(
    "healthlab-registry-thorough",
    max_examples=300,
    stateful_step_count=60,
    **_COMMON,
)

MAX_DATASETS = 3
ZERO_ADDRESS = "0x" + "00" * 20
#: Mined blocks are put this far ahead of the wall clock, so that every transaction
#: lands exactly one second after the latest block (eth-tester uses
#: max(wall clock, parent + 1)) and the model knows every timestamp.
CLOCK_LEAD = 10**7

PURPOSES = (Codes.GRU, Codes.HMB, Codes.DS, Codes.POA, Codes.MDS)
ATTESTABLE = (Codes.NCU, Codes.IRB, Codes.PUB)
ALL_CODES = (*PURPOSES, *ATTESTABLE, Codes.COL, Codes.DL)
PURPOSE_MASK = 0xFF

FEES = st.one_of(st.just(0), st.integers(1, 10**6), st.integers(10**6, 10**18))
GRANTS = st.integers(10, 5000)
TERMS = st.builds(
    lambda purposes, modifiers: sum(purposes) + sum(modifiers),
    st.sets(st.sampled_from(PURPOSES), min_size=1),
    st.sets(st.sampled_from((*ATTESTABLE, Codes.COL, Codes.DL))),
)
#: Configuration faults the contract must refuse (None: a valid configuration).
FAULTS = st.sampled_from([None] * 6 + ["fee", "grant", "purpose"])
#: Site keys the actors bind (a few, so that rotations repeat keys).
MASK_KEYS = [mask_key(i) for i in range(3)]
NODE_KEYS = [node_key(i) for i in range(3)]
ZERO32 = bytes(32)
#: A request's id is its dataset's id shifted by this, or'd with its number there.
REQUEST_NUMBER_BITS = 40
MAX_COLLABORATIONS = 2
#: The actors a curator admits and names (all six may call): fewer reads per step.
MEMBERS = 3
#: Members and name hashes are read after every collaboration step, and after every
#: this many other steps (which cannot change them: a later read still catches a
#: change that stays, e.g. a storage slot overwritten).
MEMBER_READS_EVERY = 8
#: Names a curator gives (collaborations and members): the contract takes 1 to 200
#: bytes of UTF-8; "" and the 201-byte name must be refused, the 200-byte one taken.
NAMES = [
    "CVD consortium",
    "St. Mary's University Hospital",
    "Hôpital Européen Georges-Pompidou",
    "é" * 100,  # 200 bytes
    " ",  # accepted by the contract (the client refuses it before sending)
    "",
    "x" * 201,
]


# ------------------------------------------------------------------------ model
class Held(enum.Enum):
    """Where a request's fee is."""

    ESCROW = "escrowed (pending, or a download grant waiting for its key)"
    OWNER = "earned by the owner"
    REFUND = "refunded to the researcher"


@dataclass
class DatasetModel:
    owner: str
    fee: int
    grant_seconds: int
    terms: int
    auto_approve: bool
    active: bool
    content_hash: bytes
    pointer: str
    old_fees: list[int] = field(default_factory=list)
    old_grants: list[int] = field(default_factory=list)
    pending: int = 0
    max_pending: int = 64
    downloads_open: int = 0
    #: requests made on the dataset (its last request's number)
    requests: int = 0

    def as_chain(self) -> tuple[Any, ...]:
        """The tuple ``getDataset`` returns (eth-abi decodes addresses lower-case)."""
        return (
            self.owner.lower(),
            self.fee,
            self.grant_seconds,
            self.terms,
            self.auto_approve,
            self.active,
            self.pending,
            self.max_pending,
            self.downloads_open,
            self.content_hash,
            self.pointer,
        )


@dataclass(frozen=True)
class AccessModel:
    request_id: int = 0
    amount: int = 0
    created_at: int = 0
    expires_at: int = 0
    grant_seconds: int = 0
    status: Status = Status.NONE
    download: bool = False
    key_released: bool = False

    @property
    def awaiting_key(self) -> bool:
        """A download grant whose fee waits in escrow for its key."""
        return (
            self.status is Status.APPROVED and self.download and not self.key_released
        )

    def as_chain(self) -> tuple[int, ...]:
        """The tuple ``getAccess`` returns."""
        return (
            self.request_id,
            self.amount,
            self.created_at,
            self.expires_at,
            self.grant_seconds,
            int(self.status),
            self.download,
            self.key_released,
        )


@dataclass
class CollaborationModel:
    """A collaboration (an owner directory when its members are named)."""

    curator: str
    members: set[str] = field(default_factory=set)
    #: the name its curator last gave each account (member or not)
    names: dict[str, str] = field(default_factory=dict)

    def name_hash(self, who: str) -> bytes:
        """What ``memberNameHash`` must return for ``who``."""
        name = self.names.get(who)
        return ZERO32 if name is None else keccak(name.encode())

    def directory_name(self, who: str) -> str | None:
        """What a client reads as ``who``'s name: a member's last given name."""
        return self.names.get(who) if who in self.members else None


@dataclass
class Payment:
    dataset: int
    researcher: str
    amount: int
    held: Held


@dataclass(frozen=True)
class Refusal:
    """The error the contract must revert with."""

    error: type[errors.ContractError]
    values: dict[str, Any]


def _refuse(error: type[errors.ContractError], **values: Any) -> Refusal:
    return Refusal(error, values)


def model_permits(codes: int, terms: int) -> bool:
    """The DUO rules of the contract's NatSpec, written independently of the client."""
    known = sum(ALL_CODES)
    if codes & ~known or codes & Codes.COL:
        return False
    purposes = codes & PURPOSE_MASK
    if not purposes:
        return False
    allowed = terms & PURPOSE_MASK
    if allowed & Codes.GRU:
        allowed = PURPOSE_MASK
    if allowed & Codes.HMB:
        allowed |= Codes.DS
    if codes & Codes.DL and not terms & Codes.DL:
        return False  # a download needs terms that allow downloads
    required = terms & sum(ATTESTABLE)
    return not purposes & ~allowed and codes & required == required


@dataclass
class Model:
    """The registry's expected state; ``now`` is the latest block's timestamp."""

    now: int
    timeout: int
    datasets: dict[int, DatasetModel] = field(default_factory=dict)
    access: dict[tuple[int, str], AccessModel] = field(default_factory=dict)
    credits: dict[str, int] = field(default_factory=dict)
    payments: dict[int, Payment] = field(default_factory=dict)
    #: paid out to each actor: withdrawals, and fees paid straight to owners
    withdrawn: dict[str, int] = field(default_factory=dict)
    #: anchors, per (request, result hash)
    results: set[tuple[int, bytes]] = field(default_factory=set)
    #: request -> when its asked-for download refund may complete
    refunds: dict[int, int] = field(default_factory=dict)
    grace: int = 0
    #: dataset -> (mask key, node key, bound at) of its owner's latest binding
    site_keys: dict[int, tuple[bytes, bytes, int]] = field(default_factory=dict)
    collaborations: dict[int, CollaborationModel] = field(default_factory=dict)
    paid_in: int = 0
    paid_out: int = 0

    @property
    def next_time(self) -> int:
        """Timestamp of the next transaction's block."""
        return self.now + 1

    def next_request_id(self, ds: int) -> int:
        """The id the dataset's next request gets: ``ds << 40 | number``."""
        return ds << REQUEST_NUMBER_BITS | self.datasets[ds].requests + 1

    def record(self, ds: int, who: str) -> AccessModel:
        return self.access.get((ds, who), AccessModel())

    def has_access(self, ds: int, who: str, at: int | None = None) -> bool:
        a = self.record(ds, who)
        when = self.now if at is None else at
        return (
            a.status is Status.APPROVED
            and when < a.expires_at
            and self.datasets[ds].active
        )

    def owner_check(self, ds: int, caller: str) -> Refusal | None:
        if ds not in self.datasets:
            return _refuse(errors.UnknownDataset, datasetId=ds)
        if self.datasets[ds].owner != caller:
            return _refuse(errors.NotDatasetOwner, datasetId=ds, caller=caller)
        return None

    def config_check(self, fee: int, grant: int, terms: int) -> Refusal | None:
        if fee >= 1 << 88:
            return _refuse(errors.FeeTooLarge, fee=fee)
        if grant == 0:
            return _refuse(errors.InvalidGrantDuration, grantSeconds=grant)
        if terms & ~sum(ALL_CODES):
            return _refuse(errors.UnknownCodes, codes=terms)
        if not terms & PURPOSE_MASK:
            return _refuse(errors.NoPurpose)
        return None

    def credit(self, payee: str, amount: int) -> None:
        self.credits[payee] = self.credits.get(payee, 0) + amount

    def pay(self, payee: str, amount: int) -> None:
        """A fee paid straight to ``payee`` (an owner deciding or releasing a key)."""
        self.withdrawn[payee] = self.withdrawn.get(payee, 0) + amount
        self.paid_out += amount

    # ------------------------------------------------------------ predictions
    def refuse_register(
        self, owner: str, digest: bytes, fee: int, grant: int, terms: int
    ) -> Refusal | None:
        for ds, record in self.datasets.items():  # one per owner: no squatting
            if record.content_hash == digest and record.owner == owner:
                return _refuse(
                    errors.DuplicateDataset, contentHash=digest, existingId=ds
                )
        return self.config_check(fee, grant, terms)

    def refuse_request(
        self, ds: int, who: str, agreed: int, value: int, codes: int, seconds: int
    ) -> Refusal | None:
        if ds not in self.datasets:
            return _refuse(errors.UnknownDataset, datasetId=ds)
        d = self.datasets[ds]
        if not d.active:
            return _refuse(errors.DatasetInactive, datasetId=ds)
        if agreed != d.fee:
            return _refuse(errors.FeeChanged, agreedFee=agreed, currentFee=d.fee)
        if value != d.fee:
            return _refuse(errors.WrongPayment, expected=d.fee, sent=value)
        if codes & Codes.DL and not d.terms & Codes.DL:
            return _refuse(errors.DownloadNotPermitted, datasetId=ds)
        if not model_permits(codes, d.terms):
            return _refuse(errors.PurposeNotPermitted, codes=codes, terms=d.terms)
        if seconds != d.grant_seconds:
            return _refuse(
                errors.GrantDurationChanged,
                agreedSeconds=seconds,
                currentSeconds=d.grant_seconds,
            )
        a = self.record(ds, who)
        if a.status is Status.PENDING:
            return _refuse(errors.RequestAlreadyOpen, requestId=a.request_id)
        if a.status is Status.APPROVED and self.next_time < a.expires_at:
            return _refuse(
                errors.AccessAlreadyGranted,
                requestId=a.request_id,
                expiresAt=a.expires_at,
            )
        if a.awaiting_key:  # its escrowed fee must be settled first
            return _refuse(errors.DownloadNotSettled, requestId=a.request_id)
        automatic = d.auto_approve and not d.terms & Codes.COL
        if not automatic and d.pending >= d.max_pending:
            return _refuse(
                errors.TooManyPending, datasetId=ds, maxPending=d.max_pending
            )
        return None

    def refuse_pending(self, ds: int, who: str, request_id: int) -> Refusal | None:
        a = self.record(ds, who)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.UnknownRequest, requestId=request_id)
        if a.status is not Status.PENDING:
            return _refuse(errors.NotPending, requestId=request_id, status=a.status)
        return None

    def refuse_approve(
        self, ds: int, who: str, request_id: int, caller: str
    ) -> Refusal | None:
        refusal = self.owner_check(ds, caller)
        if refusal is None and not self.datasets[ds].active:
            refusal = _refuse(errors.DatasetInactive, datasetId=ds)
        return refusal or self.refuse_pending(ds, who, request_id)

    def refuse_decline(
        self, ds: int, who: str, request_id: int, caller: str
    ) -> Refusal | None:
        return self.owner_check(ds, caller) or self.refuse_pending(ds, who, request_id)

    def refuse_cancel(self, ds: int, request_id: int, caller: str) -> Refusal | None:
        a = self.record(ds, caller)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.NotRequester, requestId=request_id, caller=caller)
        if a.status is not Status.PENDING:
            return _refuse(errors.NotPending, requestId=request_id, status=a.status)
        cancellable_at = a.created_at + self.timeout
        if self.next_time < cancellable_at and self.datasets[ds].active:
            return _refuse(
                errors.TooEarlyToCancel,
                requestId=request_id,
                cancellableAt=cancellable_at,
            )
        return None

    def refuse_revoke(self, ds: int, who: str, caller: str) -> Refusal | None:
        refusal = self.owner_check(ds, caller)
        if refusal is not None:
            return refusal
        a = self.record(ds, who)
        if a.status is not Status.APPROVED or self.next_time >= a.expires_at:
            return _refuse(errors.NoActiveGrant, datasetId=ds, researcher=who)
        return None

    def refuse_refund(
        self, ds: int, who: str, request_id: int, caller: str
    ) -> Refusal | None:
        a = self.record(ds, who)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.UnknownRequest, requestId=request_id)
        owner = self.datasets[ds].owner == caller
        if caller != who and not owner:
            return _refuse(errors.NotRequester, requestId=request_id, caller=caller)
        if not a.awaiting_key:
            return _refuse(errors.NotAwaitingKey, requestId=request_id)
        if not owner:
            at = self.refunds.get(request_id)
            if at is None:
                return _refuse(errors.RefundNotRequested, requestId=request_id)
            if self.next_time < at:
                return _refuse(
                    errors.TooEarlyToRefund, requestId=request_id, refundableAt=at
                )
        return None

    def refuse_ask_refund(
        self, ds: int, request_id: int, caller: str
    ) -> Refusal | None:
        a = self.record(ds, caller)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.NotRequester, requestId=request_id, caller=caller)
        if not a.awaiting_key:
            return _refuse(errors.NotAwaitingKey, requestId=request_id)
        if request_id in self.refunds:
            return _refuse(
                errors.RefundAlreadyRequested,
                requestId=request_id,
                refundableAt=self.refunds[request_id],
            )
        askable = a.expires_at - a.grant_seconds + self.timeout
        if self.next_time < askable and self.has_access(ds, caller, at=self.next_time):
            return _refuse(
                errors.TooEarlyToRefund, requestId=request_id, refundableAt=askable
            )
        return None

    def refuse_withdraw(self, payee: str, to: str | None) -> Refusal | None:
        if to == ZERO_ADDRESS:
            return _refuse(errors.ZeroAddress)
        if self.credits.get(payee, 0) == 0:
            return _refuse(errors.NothingToWithdraw, payee=payee)
        return None

    def refuse_release(
        self, ds: int, who: str, request_id: int, size: int, caller: str
    ) -> Refusal | None:
        refusal = self.owner_check(ds, caller)
        if refusal is not None:
            return refusal
        if size == 0 or size > 512:
            return _refuse(errors.InvalidEnvelope, length=size)
        a = self.record(ds, who)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.UnknownRequest, requestId=request_id)
        # the first release delivers what was paid for: live or not
        if not a.awaiting_key and not self.has_access(ds, who, at=self.next_time):
            return _refuse(errors.NoActiveGrant, datasetId=ds, researcher=who)
        if not a.download:
            return _refuse(errors.NotADownloadGrant, requestId=request_id)
        if not self.datasets[ds].terms & Codes.DL:
            return _refuse(errors.DownloadNotPermitted, datasetId=ds)
        return None

    def refuse_bind(
        self, ds: int, caller: str, mask: bytes, node: bytes
    ) -> Refusal | None:
        refusal = self.owner_check(ds, caller)
        if refusal is None and (
            mask == ZERO32 or len(node) != 97 or node[:1] != b"\x04"
        ):
            refusal = _refuse(errors.InvalidSiteKeys)
        return refusal

    def stored_keys(self, ds: int) -> tuple[bytes, bytes, int]:
        """The tuple ``siteKeys`` returns: the owner's latest binding, or zeros."""
        if ds not in self.site_keys:
            return (ZERO32, ZERO32, 0)
        mask, node, at = self.site_keys[ds]
        return (mask, keccak(node), at)

    def refuse_curate(self, cid: int, caller: str) -> Refusal | None:
        """Only an existing collaboration's curator keeps its list and names."""
        if cid not in self.collaborations:
            return _refuse(errors.UnknownCollaboration, collaborationId=cid)
        if self.collaborations[cid].curator != caller:
            return _refuse(errors.NotCurator, collaborationId=cid, caller=caller)
        return None

    def refuse_member(
        self, cid: int, caller: str, member: str, name: str | None = None
    ) -> Refusal | None:
        """``setMember`` (``name`` None) or ``nameMember``."""
        refusal = self.refuse_curate(cid, caller)
        if refusal is None and member == ZERO_ADDRESS:
            refusal = _refuse(errors.ZeroAddress)
        if refusal is None and name is not None:
            refusal = refuse_name(name)
        return refusal

    def refuse_result(
        self, ds: int, request_id: int, digest: bytes, caller: str
    ) -> Refusal | None:
        a = self.record(ds, caller)
        if a.request_id != request_id or request_id == 0:
            return _refuse(errors.NotRequester, requestId=request_id, caller=caller)
        if not self.has_access(ds, caller, at=self.next_time):
            return _refuse(errors.NoActiveGrant, datasetId=ds, researcher=caller)
        if (request_id, digest) in self.results:
            return _refuse(
                errors.ResultAlreadyRecorded, resultHash=digest, requestId=request_id
            )
        return None


def refuse_name(name: str) -> Refusal | None:
    """A collaboration's or a member's name: 1 to 200 bytes."""
    if not 0 < len(name.encode()) <= 200:
        return _refuse(errors.EmptyName)
    return None


# ------------------------------------------------------------------ chain reads
class Views:
    """The registry's view functions, called through eth-tester directly.

    The invariants read ~60 values after every step: :meth:`many` reads them in one
    ``eth_call`` through a test-only Multicall contract (one call's overhead instead
    of sixty), which is what lets CI run thousands of steps. A read is a function of
    the latest block (``eth_call`` runs on its state, at its timestamp) and of the
    calls: after a refused step, which mines no block (a third of the steps), the
    same read on the same block returns the values already read, not a re-run.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.tester = ledger.w3.provider.ethereum_tester  # type: ignore[union-attr]
        self.address = ledger.address
        #: (latest block hash, Multicall input) -> its output, of the latest read
        self._read: tuple[tuple[str, str], str] | None = None
        self.caller = ledger.accounts[0]
        artifact = load_artifact("test/Multicall")
        factory = ledger.w3.eth.contract(
            abi=artifact["abi"], bytecode=artifact["bytecode"]
        )
        tx = factory.constructor().transact({"from": self.caller})
        self.multicall = ledger.w3.eth.get_transaction_receipt(tx)["contractAddress"]
        (aggregate,) = (i for i in artifact["abi"] if i.get("name") == "aggregate")
        self._aggregate = function_abi_to_4byte_selector(aggregate)
        self.functions: dict[str, tuple[bytes, list[str], list[str]]] = {
            item["name"]: (
                function_abi_to_4byte_selector(item),
                get_abi_input_types(item),
                get_abi_output_types(item),
            )
            for item in ledger.contract.abi
            if item["type"] == "function"
        }

    def __call__(self, name: str, *args: Any) -> Any:
        selector, inputs, outputs = self.functions[name]
        data = "0x" + (selector + abi_encode(inputs, list(args))).hex()
        raw = self.tester.call({"from": self.caller, "to": self.address, "data": data})
        values = abi_decode(outputs, bytes.fromhex(raw[2:]))
        return values[0] if len(values) == 1 else values

    def many(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """Each ``(name, *args)`` view of ``calls``, read in one ``eth_call``."""
        encoded = []
        for name, *args in calls:
            selector, inputs, _ = self.functions[name]
            encoded.append(selector + abi_encode(inputs, list(args)))
        data = self._aggregate + abi_encode(
            ["address", "bytes[]"], [self.address, encoded]
        )
        key = (self.tester.get_block_by_number("latest")["hash"], "0x" + data.hex())
        if self._read is None or self._read[0] != key:
            raw = self.tester.call(
                {"from": self.caller, "to": self.multicall, "data": key[1]}
            )
            self._read = (key, raw)
        raw = self._read[1]
        (results,) = abi_decode(["bytes[]"], bytes.fromhex(raw[2:]))
        values = []
        for (name, *_), out in zip(calls, results, strict=True):
            decoded = abi_decode(self.functions[name][2], out)
            values.append(decoded[0] if len(decoded) == 1 else decoded)
        return values

    def balance(self, address: str) -> int:
        return int(self.tester.get_balance(address))

    def now(self) -> int:
        return int(self.tester.get_block_by_number("latest")["timestamp"])


# ----------------------------------------------------------------- the machine
class RegistryMachine(RuleBasedStateMachine):
    """Random operations by six actors, each checked against :class:`Model`."""

    def __init__(self, chain: Chain) -> None:
        super().__init__()
        self.chain = chain
        self.snapshot = chain.tester.take_snapshot()
        self.ledger = chain.ledger()
        self.views = Views(self.ledger)  # deploys the Multicall (rolled back after)
        accounts = self.ledger.accounts
        self.actors = list(accounts[1:7])
        self.outsider = accounts[7]  # only ever receives withdrawals
        assert self.views("datasetCount") == 0, "the session chain must be clean"
        assert self.views.balance(self.ledger.address) == 0, "the registry holds ether"
        now = self.ledger.mine(self.views.now() + CLOCK_LEAD)
        self.model = Model(
            now=now,
            timeout=int(self.views("requestTimeout")),
            grace=int(self.views("REFUND_GRACE")),
        )
        self.hashes = 0
        #: a collaboration rule ran since the last invariant check
        self.curated = False

    def teardown(self) -> None:
        self.chain.tester.revert_to_snapshot(self.snapshot)

    # -------------------------------------------------------------- helpers
    def fresh_hash(self) -> bytes:
        self.hashes += 1
        return self.hashes.to_bytes(32, "big")

    def attempt(self, refusal: Refusal | None, action: Callable[[], T]) -> T | None:
        """Run ``action``; when the model predicts a refusal, demand exactly it."""
        if refusal is None:
            result = action()
            self.model.now += 1  # one transaction, one block, one second
            return result
        with pytest.raises(errors.ContractError) as caught:
            action()
        assert type(caught.value) is refusal.error, (
            f"expected {refusal.error.__name__}{refusal.values}, got "
            f"{type(caught.value).__name__}: {caught.value}"
        )
        assert caught.value.values == refusal.values
        return None

    def gas_paid(self) -> int:
        receipt = self.ledger.last_receipt
        return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])

    def check_client_view(self, ds: int, who: str) -> None:
        assert self.ledger.has_access(ds, who) is self.model.has_access(ds, who), (
            f"Ledger.has_access({ds}, {who}) disagrees with the model"
        )

    def draw_dataset(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model.datasets)), label="dataset")

    def draw_request(
        self, data: st.DataObject, preferred: list[int]
    ) -> tuple[int, Payment]:
        every = sorted(self.model.payments)
        choices = st.sampled_from(every)
        if preferred:
            choices = st.one_of(st.sampled_from(preferred), choices)
        request_id = data.draw(choices, label="request")
        return request_id, self.model.payments[request_id]

    def draw_undelivered(self, data: st.DataObject) -> tuple[int, Payment, str]:
        """A request (preferably a download waiting for its key) and a caller: its
        researcher, its owner or anyone."""
        waiting = sorted(
            a.request_id for a in self.model.access.values() if a.awaiting_key
        )
        request_id, payment = self.draw_request(data, waiting)
        owner = self.model.datasets[payment.dataset].owner
        caller = data.draw(
            st.one_of(
                st.just(payment.researcher),
                st.just(owner),
                st.sampled_from(self.actors),
            )
        )
        return request_id, payment, caller

    def requests_in(self, status: Status) -> list[int]:
        return sorted(
            a.request_id for a in self.model.access.values() if a.status is status
        )

    def register(
        self,
        owner: str,
        fee: int,
        grant: int,
        terms: int,
        auto_approve: bool,
        digest: bytes,
    ) -> None:
        pointer = f"https://site{len(self.model.datasets)}.example/cohort.parquet"
        refusal = self.model.refuse_register(owner, digest, fee, grant, terms)
        ds = self.attempt(
            refusal,
            lambda: self.ledger.register_dataset(
                pointer,
                digest,
                fee_wei=fee,
                grant_seconds=grant,
                terms=Codes(terms),
                auto_approve=auto_approve,
                sender=owner,
            ),
        )
        if ds is not None:
            assert ds == len(self.model.datasets) + 1
            self.model.datasets[ds] = DatasetModel(
                owner, fee, grant, terms, auto_approve, True, digest, pointer
            )

    # ---------------------------------------------------------------- rules
    @initialize(
        data=st.data(),
        owners=st.lists(st.integers(0, 5), min_size=2, max_size=2),
        fees=st.lists(FEES, min_size=2, max_size=2),
        grants=st.lists(GRANTS, min_size=2, max_size=2),
        terms=st.lists(TERMS, min_size=2, max_size=2),
        auto_approve=st.lists(st.booleans(), min_size=2, max_size=2),
        researchers=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    )
    def two_datasets_and_requests(
        self,
        data: st.DataObject,
        owners: list[int],
        fees: list[int],
        grants: list[int],
        terms: list[int],
        auto_approve: list[bool],
        researchers: list[int],
    ) -> None:
        """Start every example with material for every rule (swarm testing may
        switch off the rules that register and request)."""
        for config in zip(owners, fees, grants, terms, auto_approve, strict=True):
            owner, fee, grant, codes, auto = config
            self.register(
                self.actors[owner], fee, grant, codes, auto, self.fresh_hash()
            )
        for researcher in researchers:
            self.permitted_request(data, researcher)
        self.create(self.actors[data.draw(st.integers(0, 5), label="curator")], "dir")

    @precondition(lambda self: len(self.model.datasets) < MAX_DATASETS)
    @rule(
        owner=st.integers(0, 5),
        fee=FEES,
        grant=GRANTS,
        terms=TERMS,
        auto_approve=st.booleans(),
        fault=st.sampled_from([None, None, "duplicate", "fee", "grant", "purpose"]),
    )
    def register_dataset(
        self,
        owner: int,
        fee: int,
        grant: int,
        terms: int,
        auto_approve: bool,
        fault: str | None,
    ) -> None:
        digest = self.fresh_hash()
        if fault == "duplicate":
            digest = next(iter(self.model.datasets.values())).content_hash
        fee, grant, terms = _faulty(fault, fee, grant, terms)
        self.register(self.actors[owner], fee, grant, terms, auto_approve, digest)

    @rule(data=st.data(), fee=FEES, fault=FAULTS)
    def update_dataset(self, data: st.DataObject, fee: int, fault: str | None) -> None:
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        grant = data.draw(st.one_of(st.none(), GRANTS), label="grant")
        terms = data.draw(st.one_of(st.none(), TERMS), label="terms")
        auto = data.draw(st.one_of(st.none(), st.booleans()), label="auto_approve")
        fee, grant, terms = _faulty(fault, fee, grant, terms)
        new_grant = d.grant_seconds if grant is None else grant
        new_terms = d.terms if terms is None else terms
        refusal = self.model.owner_check(ds, caller) or self.model.config_check(
            fee, new_grant, new_terms
        )
        if refusal is None and not new_terms & Codes.DL and d.downloads_open:
            refusal = _refuse(
                errors.DownloadsOutstanding,
                datasetId=ds,
                downloadsOpen=d.downloads_open,
            )
        record = self.attempt(
            refusal,
            lambda: self.ledger.update_dataset(
                ds,
                fee_wei=fee,
                grant_seconds=grant,
                terms=None if terms is None else Codes(terms),
                auto_approve=auto,
                sender=caller,
            ),
        )
        if record is not None:
            if fee != d.fee:
                d.old_fees.append(d.fee)
            if new_grant != d.grant_seconds:
                d.old_grants.append(d.grant_seconds)
            d.fee, d.grant_seconds, d.terms = fee, new_grant, new_terms
            d.auto_approve = d.auto_approve if auto is None else auto
            assert (record.fee_wei, record.grant_seconds, int(record.terms)) == (
                d.fee,
                d.grant_seconds,
                d.terms,
            )

    @rule(data=st.data(), close=st.sampled_from([False, False, True]))
    def set_active(self, data: st.DataObject, close: bool) -> None:
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        done = self.attempt(
            self.model.owner_check(ds, caller),
            lambda: self.ledger.set_active(ds, not close, sender=caller) or True,
        )
        if done:
            d.active = not close

    @rule(data=st.data(), researcher=st.integers(0, 5))
    def request_access(self, data: st.DataObject, researcher: int) -> None:
        self.permitted_request(data, researcher)

    def permitted_request(self, data: st.DataObject, researcher: int) -> None:
        """A request the terms permit, paying the fee as it stands."""
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        codes = data.draw(_fitting_codes(d.terms), label="codes")
        self.request(ds, self.actors[researcher], codes, d.fee, d.fee, d.grant_seconds)

    @rule(
        data=st.data(),
        researcher=st.integers(0, 5),
        fault=st.sampled_from(
            ["codes", "stale fee", "stale grant", "wrong value", "no dataset"]
        ),
    )
    def request_access_badly(
        self, data: st.DataObject, researcher: int, fault: str
    ) -> None:
        """A request with random codes, a stale fee, a wrong payment or no dataset."""
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        codes = data.draw(_fitting_codes(d.terms), label="codes")
        agreed = value = d.fee
        seconds = d.grant_seconds
        if fault == "stale grant":  # the owner changed the duration: bait refused
            stale_grant = st.sampled_from([*d.old_grants, 1]).filter(
                lambda g: g != d.grant_seconds
            )
            seconds = data.draw(stale_grant, label="stale grant")
        elif fault == "codes":
            codes = data.draw(_any_codes(), label="random codes")
        elif fault == "stale fee":
            stale = st.sampled_from([*d.old_fees, d.fee + 1]).filter(
                lambda f: f != d.fee
            )
            agreed = value = data.draw(stale, label="stale fee")
        elif fault == "wrong value":
            wrong = [d.fee + 1, d.fee - 1] if d.fee else [1]
            value = data.draw(st.sampled_from(wrong), label="value")
        elif fault == "no dataset":
            ds = len(self.model.datasets) + 1
        self.request(ds, self.actors[researcher], codes, agreed, value, seconds)

    def request(
        self, ds: int, who: str, codes: int, agreed: int, value: int, seconds: int
    ) -> None:
        terms = self.model.datasets[ds].terms if ds in self.model.datasets else None
        if terms is not None:
            assert permits(codes, terms) is model_permits(codes, terms), (
                f"healthlab.permits({codes:#x}, {terms:#x}) breaks the DUO rules"
            )
        refusal = self.model.refuse_request(ds, who, agreed, value, codes, seconds)
        paid = self.views.balance(who)
        held = self.views.balance(self.ledger.address)
        if value != agreed:  # the client always pays what it agreed: go around it

            def send() -> int:
                fn = self.ledger.contract.functions.requestAccess(
                    ds, agreed, seconds, codes, b"\x01" * 32, b""
                )
                self.ledger.transact(fn, who, value=value)
                return self.model.next_request_id(ds)

        else:

            def send() -> int:
                return self.ledger.request_access(
                    ds,
                    "a study",
                    Codes(codes),
                    fee_wei=agreed,
                    grant_seconds=seconds,
                    sender=who,
                )

        request_id = self.attempt(refusal, send)
        if request_id is None:
            return
        assert request_id == self.model.next_request_id(ds)
        d, at, fee = self.model.datasets[ds], self.model.now, value
        d.requests += 1
        download = bool(codes & Codes.DL)
        grant = d.grant_seconds
        d.downloads_open += download
        if d.auto_approve and not d.terms & Codes.COL:
            expires = at + grant
            record = AccessModel(
                request_id, fee, at, expires, grant, Status.APPROVED, download
            )
            if download:  # the fee waits in escrow for the key
                place = Held.ESCROW
            else:
                self.model.credit(d.owner, fee)
                place = Held.OWNER
        else:
            record = AccessModel(
                request_id, fee, at, 0, grant, Status.PENDING, download
            )
            d.pending += 1
            place = Held.ESCROW
        self.model.access[(ds, who)] = record
        self.model.payments[request_id] = Payment(ds, who, fee, place)
        self.model.paid_in += fee
        assert self.views.balance(who) == paid - fee - self.gas_paid(), (
            "the researcher paid something other than the fee plus gas"
        )
        assert self.views.balance(self.ledger.address) == held + fee
        self.check_client_view(ds, who)

    def decide(self, data: st.DataObject, approve: bool) -> None:
        request_id, payment = self.draw_request(data, self.requests_in(Status.PENDING))
        ds, who = payment.dataset, payment.researcher
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        if data.draw(st.sampled_from([False] * 5 + [True]), label="never made"):
            # ids the client cannot look up: the contract itself must refuse them;
            # among them the drawn request's number alone, and its number under
            # another dataset's id (an id that names a request of nobody here)
            number = request_id & (1 << REQUEST_NUMBER_BITS) - 1
            other = (ds % MAX_DATASETS + 1) << REQUEST_NUMBER_BITS | number
            request_id = data.draw(
                st.sampled_from([0, 10**6, number, other]), label="request"
            )
            name = "approve" if approve else "decline"
            fn = getattr(self.ledger.contract.functions, name)(ds, who, request_id)

            def send() -> Any:
                return self.ledger.transact(fn, caller)

        else:
            act = self.ledger.approve if approve else self.ledger.decline

            def send() -> Any:
                return act(request_id, sender=caller)

        if approve:
            refusal = self.model.refuse_approve(ds, who, request_id, caller)
        else:
            refusal = self.model.refuse_decline(ds, who, request_id, caller)
        owner_before = self.views.balance(d.owner)
        request = self.attempt(refusal, send)
        if request is None:
            return
        a = self.model.record(ds, who)
        d.pending -= 1
        if approve:
            # the grant lasts what the researcher paid for, whatever the owner set
            expires = self.model.now + a.grant_seconds
            a = replace(a, status=Status.APPROVED, expires_at=expires)
            if not a.download:  # paid to the owner in the call
                self.model.pay(d.owner, a.amount)
                payment.held = Held.OWNER
                gas = self.gas_paid() if caller == d.owner else 0
                assert self.views.balance(d.owner) == owner_before + a.amount - gas
        else:
            a = replace(a, status=Status.DECLINED)
            d.downloads_open -= a.download
            self.model.credit(who, a.amount)
            payment.held = Held.REFUND
        self.model.access[(ds, who)] = a
        assert (request.status, request.amount_wei) == (a.status, a.amount)
        assert request.expires_at == (a.expires_at if approve else None)
        self.check_client_view(ds, who)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def approve(self, data: st.DataObject) -> None:
        self.decide(data, approve=True)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def decline(self, data: st.DataObject) -> None:
        self.decide(data, approve=False)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id, payment = self.draw_request(data, self.requests_in(Status.PENDING))
        ds, who = payment.dataset, payment.researcher
        caller = data.draw(st.one_of(st.just(who), st.sampled_from(self.actors)))
        request = self.attempt(
            self.model.refuse_cancel(ds, request_id, caller),
            lambda: self.ledger.cancel(request_id, sender=caller),
        )
        if request is None:
            return
        a = replace(self.model.record(ds, who), status=Status.CANCELLED)
        self.model.access[(ds, who)] = a
        d = self.model.datasets[ds]
        d.pending -= 1
        d.downloads_open -= a.download
        self.model.credit(who, a.amount)
        payment.held = Held.REFUND
        assert request.status is Status.CANCELLED

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        request_id, payment = self.draw_request(data, self.requests_in(Status.APPROVED))
        ds, who = payment.dataset, payment.researcher
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        done = self.attempt(
            self.model.refuse_revoke(ds, who, caller),
            lambda: self.ledger.revoke(ds, who, sender=caller) or True,
        )
        if done:
            before = self.model.record(ds, who)
            a = replace(before, status=Status.REVOKED)
            self.model.access[(ds, who)] = a
            if before.awaiting_key:  # never delivered: the fee goes back
                d.downloads_open -= 1
                self.model.credit(who, a.amount)
                self.model.payments[request_id].held = Held.REFUND
            self.check_client_view(ds, who)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data(), size=st.sampled_from([0, 1, 129, 512, 513]))
    def release_key(self, data: st.DataObject, size: int) -> None:
        """Publish an envelope: only the owner, only for a live download grant of a
        dataset that allows downloads; it is logged, and the first release pays the
        owner the escrowed fee."""
        request_id, payment = self.draw_request(data, self.requests_in(Status.APPROVED))
        ds, who = payment.dataset, payment.researcher
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        envelope = bytes([size % 251]) * size
        fn = self.ledger.contract.functions.releaseKey(ds, who, request_id, envelope)
        owner_before = self.views.balance(d.owner)
        done = self.attempt(
            self.model.refuse_release(ds, who, request_id, size, caller),
            lambda: self.ledger.transact(fn, caller),
        )
        if done is not None:
            assert self.ledger.key_envelope(request_id) == envelope
            a = self.model.record(ds, who)
            paid = 0
            if not a.key_released:
                self.model.access[(ds, who)] = replace(a, key_released=True)
                d.downloads_open -= 1
                self.model.pay(d.owner, a.amount)
                payment.held = Held.OWNER
                paid = a.amount
            assert self.views.balance(d.owner) == owner_before + paid - self.gas_paid()

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def refund_download(self, data: st.DataObject) -> None:
        """Take back an undelivered download's fee: its researcher after the
        timeout (or once the grant is not live), its owner at any time."""
        request_id, payment, caller = self.draw_undelivered(data)
        ds, who = payment.dataset, payment.researcher
        d = self.model.datasets[ds]
        done = self.attempt(
            self.model.refuse_refund(ds, who, request_id, caller),
            lambda: self.ledger.refund_download(request_id, sender=caller),
        )
        if done is None:
            return
        a = self.model.record(ds, who)
        self.model.access[(ds, who)] = replace(a, status=Status.CANCELLED)
        d.downloads_open -= 1
        self.model.credit(who, a.amount)
        payment.held = Held.REFUND
        assert done.status is Status.CANCELLED

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def request_download_refund(self, data: st.DataObject) -> None:
        """Ask for an undelivered download's fee back: the researcher only, once
        the timeout has passed (or the grant is not live); the owner keeps a grace
        period to deliver."""
        request_id, payment, caller = self.draw_undelivered(data)
        ds = payment.dataset
        at = self.attempt(
            self.model.refuse_ask_refund(ds, request_id, caller),
            lambda: self.ledger.request_download_refund(request_id, sender=caller),
        )
        if at is not None:
            assert at == self.model.now + self.model.grace
            self.model.refunds[request_id] = at

    @rule(data=st.data(), cap=st.sampled_from([0, 1, 2, 3, 64]))
    def set_max_pending(self, data: st.DataObject, cap: int) -> None:
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        refusal = self.model.owner_check(ds, caller)
        if refusal is None and cap == 0:
            refusal = _refuse(errors.InvalidMaxPending)
        record = self.attempt(
            refusal, lambda: self.ledger.set_max_pending(ds, cap, sender=caller)
        )
        if record is not None:
            d.max_pending = cap
            assert record.max_pending == cap

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data(), reuse=st.booleans())
    def record_result(self, data: st.DataObject, reuse: bool) -> None:
        request_id, payment = self.draw_request(data, self.requests_in(Status.APPROVED))
        ds, who = payment.dataset, payment.researcher
        caller = data.draw(st.one_of(st.just(who), st.sampled_from(self.actors)))
        if reuse and self.model.results:  # anyone's digest: a copy cannot block
            digest = data.draw(
                st.sampled_from(sorted(d for _, d in self.model.results))
            )
        else:
            digest = self.fresh_hash()
        done = self.attempt(
            self.model.refuse_result(ds, request_id, digest, caller),
            lambda: self.ledger.record_result(request_id, digest, sender=caller),
        )
        if done is not None:
            self.model.results.add((request_id, digest))
        # anchored or not, the chain agrees with the model for this request
        assert self.ledger.result_recorded(request_id, digest) is (
            (request_id, digest) in self.model.results
        )

    @rule(
        data=st.data(),
        mask=st.integers(0, len(MASK_KEYS) - 1),
        node=st.integers(0, len(NODE_KEYS) - 1),
        fault=st.sampled_from(
            [None] * 4 + ["zero mask", "short node key", "compressed", "no dataset"]
        ),
    )
    def bind_site_keys(
        self, data: st.DataObject, mask: int, node: int, fault: str | None
    ) -> None:
        """Bind a site's keys from the owner or anyone else; only the owner's valid
        binding is stored, and it replaces the one before."""
        ds = self.draw_dataset(data)
        d = self.model.datasets[ds]
        caller = data.draw(st.one_of(st.just(d.owner), st.sampled_from(self.actors)))
        mask_key, node_key = MASK_KEYS[mask], NODE_KEYS[node]
        if fault == "zero mask":
            mask_key = ZERO32
        elif fault == "short node key":
            node_key = node_key[:96]
        elif fault == "compressed":
            node_key = b"\x02" + node_key[1:]
        elif fault == "no dataset":
            ds = len(self.model.datasets) + 1
        if fault is None:

            def send() -> Any:
                return self.ledger.bind_site_keys(ds, mask_key, node_key, sender=caller)

        else:  # the client refuses bad keys before sending: go around it
            fn = self.ledger.contract.functions.bindSiteKeys(ds, mask_key, node_key)

            def send() -> Any:
                return self.ledger.transact(fn, caller)

        done = self.attempt(
            self.model.refuse_bind(ds, caller, mask_key, node_key), send
        )
        if done is None:
            return
        self.model.site_keys[ds] = (mask_key, node_key, self.model.now)
        expected = SiteKeys(ds, mask_key, node_key, self.model.now)
        assert self.ledger.site_keys(ds) == expected

    # --------------------------------------------- collaborations, the directory
    def create(self, curator: str, name: str) -> None:
        self.curated = True
        cid = self.attempt(
            refuse_name(name),
            lambda: self.ledger.create_collaboration(name, sender=curator),
        )
        if cid is not None:
            assert cid == len(self.model.collaborations) + 1
            self.model.collaborations[cid] = CollaborationModel(curator)
            assert self.ledger.collaboration_curator(cid) == curator

    @precondition(lambda self: len(self.model.collaborations) < MAX_COLLABORATIONS)
    @rule(curator=st.integers(0, 5), name=st.sampled_from(NAMES))
    def create_collaboration(self, curator: int, name: str) -> None:
        """Anyone starts a collaboration and curates it; a name is 1 to 200 bytes."""
        self.create(self.actors[curator], name)

    def draw_curation(self, data: st.DataObject) -> tuple[int, str, str]:
        """A collaboration (or one that does not exist), a caller (its curator or
        anyone) and an account to act on (an actor, or the zero address)."""
        m = self.model
        cid = data.draw(
            st.sampled_from([*sorted(m.collaborations), len(m.collaborations) + 1]),
            label="collaboration",
        )
        callers = st.sampled_from(self.actors)
        if cid in m.collaborations:
            callers = st.one_of(st.just(m.collaborations[cid].curator), callers)
        caller = data.draw(callers, label="caller")
        member = data.draw(
            st.one_of(st.sampled_from(self.actors[:MEMBERS]), st.just(ZERO_ADDRESS)),
            label="member",
        )
        return cid, caller, member

    def check_directory(self, cid: int, who: str) -> None:
        """The client reads a name only for a member, and only the one the
        curator gave last (checked against the stored hash)."""
        expected = self.model.collaborations[cid].directory_name(who)
        assert self.ledger.owner_name(cid, who) == expected, (
            f"owner_name({cid}, {who}) is not the curator's latest name of a member"
        )
        assert self.ledger.is_member(cid, who) is (
            who in self.model.collaborations[cid].members
        )

    @rule(data=st.data(), admit=st.sampled_from([True, True, False]))
    def set_member(self, data: st.DataObject, admit: bool) -> None:
        """Admit or remove an owner: the curator only, never the zero address."""
        cid, caller, member = self.draw_curation(data)
        self.curated = True
        if member == ZERO_ADDRESS:  # the client refuses it: go around it
            fn = self.ledger.contract.functions.setMember(cid, member, admit)

            def send() -> Any:
                return self.ledger.transact(fn, caller)

        else:

            def send() -> Any:
                self.ledger.set_member(cid, member, admit, sender=caller)
                return True

        if not self.attempt(self.model.refuse_member(cid, caller, member), send):
            return
        members = self.model.collaborations[cid].members
        if admit:
            members.add(member)
        else:
            members.discard(member)
        self.check_directory(cid, member)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def name_member(self, data: st.DataObject, name: str) -> None:
        """Name an account in a directory: the curator only; the name is logged
        and its hash stored, replacing the one before."""
        cid, caller, member = self.draw_curation(data)
        self.curated = True
        if name.strip() and member != ZERO_ADDRESS:

            def send() -> Any:
                self.ledger.name_member(cid, member, name, sender=caller)
                return True

        else:  # the client refuses blank names and the zero address: go around it
            fn = self.ledger.contract.functions.nameMember(cid, member, name)

            def send() -> Any:
                return self.ledger.transact(fn, caller)

        if not self.attempt(self.model.refuse_member(cid, caller, member, name), send):
            return
        self.model.collaborations[cid].names[member] = name
        self.check_directory(cid, member)

    @rule(data=st.data(), payee=st.integers(0, 5))
    def withdraw(self, data: st.DataObject, payee: int) -> None:
        credited = sorted(a for a, c in self.model.credits.items() if c)
        who = self.actors[payee]
        if credited:
            who = data.draw(st.one_of(st.sampled_from(credited), st.just(who)))
        to = data.draw(
            st.one_of(
                st.none(),
                st.sampled_from([*self.actors, self.outsider]),
                st.just(ZERO_ADDRESS),
            ),
            label="to",
        )
        recipient = who if to is None else to
        before = self.views.balance(recipient)
        amount = self.attempt(
            self.model.refuse_withdraw(who, to),
            lambda: self.ledger.withdraw(sender=who, to=to),
        )
        if amount is None:
            return
        expected = self.model.credits[who]
        assert amount == expected, "withdraw paid out something other than the credit"
        self.model.credits[who] = 0
        self.model.withdrawn[who] = self.model.withdrawn.get(who, 0) + amount
        self.model.paid_out += amount
        gas = self.gas_paid() if recipient == who else 0
        assert self.views.balance(recipient) == before + amount - gas, (
            "the recipient did not receive exactly the credit"
        )

    @rule(seconds=st.one_of(st.integers(1, 120), st.integers(120, 6000)))
    def advance_time(self, seconds: int) -> None:
        self.model.now += seconds
        assert self.ledger.advance_time(seconds) == self.model.now

    @precondition(
        lambda self: any(
            a.status in (Status.APPROVED, Status.PENDING)
            for a in self.model.access.values()
        )
    )
    @rule(data=st.data(), offset=st.sampled_from([-2, -1, 0]))
    def jump_to_edge(self, data: st.DataObject, offset: int) -> None:
        """Put the latest block just before or at an expiry or a cancellation time."""
        edges = (
            sorted(
                a.expires_at
                if a.status is Status.APPROVED
                else a.created_at + self.model.timeout
                for a in self.model.access.values()
                if a.status in (Status.APPROVED, Status.PENDING)
            )
            + [  # when an undelivered download's fee may be asked, and taken, back
                a.expires_at - a.grant_seconds + self.model.timeout
                for a in self.model.access.values()
                if a.awaiting_key
            ]
            + [
                at
                for r, at in self.model.refunds.items()
                if any(
                    a.request_id == r and a.awaiting_key
                    for a in self.model.access.values()
                )
            ]
        )
        edge = data.draw(st.sampled_from(edges), label="edge")
        target = max(self.model.now + 1, edge + offset)
        assert self.ledger.advance_time(target - self.model.now) == target
        self.model.now = target

    # ----------------------------------------------------------- invariants
    @invariant()
    def chain_matches_model(self) -> None:
        m, view = self.model, self.views
        STEPS[0] += 1
        assert view.now() == m.now, "a refused call mined a block (or time drifted)"
        pairs = [(ds, who) for ds in m.datasets for who in self.actors]
        keyed = [*m.datasets, len(m.datasets) + 1]
        calls: list[tuple[Any, ...]] = [("datasetCount",)]
        calls += [("requestCount", ds) for ds in keyed]
        calls += [("getDataset", ds) for ds in m.datasets]
        calls += [("siteKeys", ds) for ds in keyed]
        calls += [("getAccess", ds, who) for ds, who in pairs]
        calls += [("hasAccess", ds, who) for ds, who in pairs]
        calls += [("credits", who) for who in self.actors]
        collaborations = [*m.collaborations, len(m.collaborations) + 1]
        calls += [("collaborationCount",)]
        calls += [("collaborationCurator", cid) for cid in collaborations]
        members = [
            (cid, who)
            for cid in m.collaborations
            for who in self.actors[:MEMBERS]
            if self.curated or STEPS[0] % MEMBER_READS_EVERY == 0
        ]
        self.curated = False
        calls += [("isMember", cid, who) for cid, who in members]
        calls += [("memberNameHash", cid, who) for cid, who in members]
        read = iter(view.many(calls))
        assert next(read) == len(m.datasets)
        for ds in keyed:
            made = m.datasets[ds].requests if ds in m.datasets else 0
            assert next(read) == made, f"dataset {ds}'s request counter"
        for ds, d in m.datasets.items():
            assert next(read) == d.as_chain(), f"dataset {ds} differs"
        for ds in keyed:
            assert next(read) == m.stored_keys(ds), (
                f"the keys stored for dataset {ds} are not those its owner last bound"
            )
        escrowed = 0
        for ds, who in pairs:
            record = m.record(ds, who)
            on_chain = next(read)
            assert on_chain == record.as_chain(), f"access of {who} on {ds}"
            if record.status is Status.PENDING or record.awaiting_key:
                escrowed += on_chain[1]
        for ds, who in pairs:
            assert next(read) is m.has_access(ds, who), (
                f"hasAccess({ds}, {who}) at t={m.now}: model says "
                f"{m.has_access(ds, who)} for {m.record(ds, who)}"
            )
        credits = {who: next(read) for who in self.actors}
        assert credits == {who: m.credits.get(who, 0) for who in self.actors}
        self.check_collaborations(read, collaborations, members)
        held = view.balance(self.ledger.address)
        assert held == escrowed + sum(credits.values()), "balance != escrow + credits"
        assert m.paid_in == m.paid_out + held, "paid in != paid out + held"
        self.check_settlement(escrowed, credits)

    def check_collaborations(
        self,
        read: Any,
        collaborations: list[int],
        members: list[tuple[int, str]],
    ) -> None:
        """Curators, member lists and name hashes are the model's: each changed
        only by its own curator's accepted calls."""
        m = self.model
        assert next(read) == len(m.collaborations), "collaboration counter"
        for cid in collaborations:
            known = m.collaborations.get(cid)
            expected = ZERO_ADDRESS if known is None else known.curator
            assert next(read) == expected.lower(), f"the curator of collaboration {cid}"
        for cid, who in members:
            assert next(read) is (who in m.collaborations[cid].members), (
                f"membership of {who} in collaboration {cid}"
            )
        for cid, who in members:
            assert next(read) == m.collaborations[cid].name_hash(who), (
                f"the name hash of {who} in collaboration {cid} is not the keccak256 "
                "of the name its curator gave last"
            )

    def check_settlement(self, escrowed: int, credits: dict[str, int]) -> None:
        """Each fee is in exactly one place: escrow, the owner's or the researcher's."""
        m = self.model
        in_escrow = earned = refunded = 0
        due = dict.fromkeys(self.actors, 0)
        for request_id, p in m.payments.items():
            if p.held is Held.ESCROW:
                a = m.record(p.dataset, p.researcher)
                assert a.request_id == request_id
                assert a.status is Status.PENDING or a.awaiting_key
                in_escrow += p.amount
            elif p.held is Held.OWNER:
                due[m.datasets[p.dataset].owner] += p.amount
                earned += p.amount
            else:
                due[p.researcher] += p.amount
                refunded += p.amount
        assert in_escrow == escrowed, (
            "escrow on chain != fees of pending requests and undelivered downloads"
        )
        assert in_escrow + earned + refunded == m.paid_in
        for who in self.actors:
            assert credits[who] + m.withdrawn.get(who, 0) == due[who], (
                f"{who}: credited {credits[who]} + withdrawn "
                f"{m.withdrawn.get(who, 0)} != fees owed to them {due[who]}"
            )


def _faulty(
    fault: str | None, fee: int, grant: T, terms: T
) -> tuple[int, T | int, T | int]:
    """Break one field of a dataset configuration (``None`` keeps all fields)."""
    if fault == "fee":
        return 1 << 88, grant, terms
    if fault == "grant":
        return fee, 0, terms
    if fault == "purpose":
        return fee, grant, int(Codes.NCU | Codes.COL)
    return fee, grant, terms


def _fitting_codes(terms: int) -> st.SearchStrategy[int]:
    """Codes that state permitted purposes and attest every requirement of ``terms``."""
    allowed = [p for p in PURPOSES if model_permits(p | terms & sum(ATTESTABLE), terms)]
    required = terms & sum(ATTESTABLE)
    return st.builds(
        lambda purposes, extra: sum(purposes) | required | sum(extra),
        st.sets(st.sampled_from(allowed), min_size=1),
        st.sets(st.sampled_from(ATTESTABLE)),
    )


def _any_codes() -> st.SearchStrategy[int]:
    return st.builds(sum, st.sets(st.sampled_from(ALL_CODES)))


def _profile() -> settings:
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in ("ci", "thorough"):
        raise ValueError(f"{PROFILE_ENV} must be 'ci' or 'thorough', not {name!r}")
    return settings.get_profile(f"healthlab-registry-{name}")


#: Steps run (invariant checks) in this process, counted for the depth figure.
STEPS = [0]


@pytest.mark.slow  # scheduled first (tests/conftest.py): it runs beside the others
def test_registry_matches_its_model_under_random_operations(chain: Chain) -> None:
    before = STEPS[0]
    profile = _profile()
    ci = os.environ.get(PROFILE_ENV, "ci") == "ci"
    rounds = 0
    # CI: rounds of fresh random examples until the depth is reached, so the
    # depth holds whatever lengths hypothesis draws (no flaky count)
    while rounds == 0 or (ci and STEPS[0] - before < MIN_CI_STEPS):
        rounds += 1
        assert rounds <= MAX_ROUNDS, "the depth was not reached in MAX_ROUNDS rounds"
        run_state_machine_as_test(lambda: RegistryMachine(chain), settings=profile)
    steps = STEPS[0] - before
    print(f"\nstateful registry test: {steps} steps checked in {rounds} round(s)")
    if ci:
        assert steps >= MIN_CI_STEPS, f"only {steps} steps ran (target {MIN_CI_STEPS})"
