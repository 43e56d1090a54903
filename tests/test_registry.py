"""Behaviour of the HealthLabRegistry contract on the embedded chain.

Every test runs on the session chain (request timeout ``TEST_TIMEOUT``) and is rolled
back by the ``ledger`` fixture's snapshot. Amounts are checked to the wei: escrow and
credits are held by the registry, so its balance must always equal open escrow plus
outstanding credits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from web3 import Web3
from web3.logs import DISCARD

from healthlab import errors
from healthlab.ledger import Ledger
from healthlab.ledger.artifacts import load_artifact
from healthlab.ledger.codes import KNOWN, Codes, as_codes, permits
from healthlab.ledger.records import Status
from tests.conftest import ETHER, TEST_TIMEOUT, Chain, content_hash

FEE = ETHER // 100  # the `dataset` fixture's fee
GRANT = 30 * 24 * 3600  # the `dataset` fixture's grant duration
HMB_NCU = int(Codes.HMB | Codes.NCU)  # codes that satisfy the `dataset` fixture's terms
PURPOSE = b"\x01" * 32  # any non-zero purpose commitment
ZERO32 = b"\x00" * 32
GAS = 300_000  # explicit gas for transactions sent without estimation
URI = "https://hospital.example/other.csv"


# ------------------------------------------------------------------- helpers
def deploy_payee(ledger: Ledger, name: str, sender: str) -> Any:
    """Deploy test contract ``name`` (ReentrantPayee/RevertingPayee) on the registry."""
    artifact = load_artifact(f"test/{name}")
    factory = ledger.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx_hash = factory.constructor(ledger.address).transact({"from": sender})
    receipt = ledger.w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1, f"deploying {name} failed"
    return ledger.w3.eth.contract(
        address=receipt["contractAddress"], abi=artifact["abi"]
    )


def logs(ledger: Ledger, receipt: Any, event: str) -> list[dict[str, Any]]:
    """The decoded arguments of every ``event`` the registry emitted in ``receipt``."""
    found = getattr(ledger.contract.events, event)().process_receipt(
        receipt, errors=DISCARD
    )
    return [dict(entry["args"]) for entry in found]


def gas_cost(receipt: Any) -> int:
    """Wei the sender paid for gas."""
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def block_time(ledger: Ledger, receipt: Any) -> int:
    """Timestamp of the block that mined ``receipt``."""
    return int(ledger.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def values(exc: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    """A decoded error's arguments, addresses checksummed like everywhere else."""
    return {
        k: Web3.to_checksum_address(v)
        if isinstance(v, str) and Web3.is_address(v)
        else v
        for k, v in exc.value.values.items()
    }


def counters(ledger: Ledger) -> tuple[int, int]:
    """``(datasetCount, requests made on all datasets)``."""
    functions = ledger.contract.functions
    datasets = functions.datasetCount().call()
    made = sum(functions.requestCount(d).call() for d in range(1, datasets + 1))
    return datasets, made


def payee_request(ledger: Ledger, payee: Any, dataset: int, funder: str) -> int:
    """Have a payee contract request ``dataset`` (paying FEE); return the request id."""
    receipt = ledger.transact(
        payee.functions.request(dataset, GRANT, HMB_NCU, PURPOSE), funder, value=FEE
    )
    (requested,) = logs(ledger, receipt, "AccessRequested")
    assert requested["researcher"] == payee.address
    return int(requested["requestId"])


def register(ledger: Ledger, owner: str, *, fee: int = FEE, **kwargs: Any) -> int:
    """Register another dataset (30-day grants, terms HMB|NCU unless given)."""
    kwargs.setdefault("grant_seconds", GRANT)
    kwargs.setdefault("terms", "HMB|NCU")
    return ledger.register_dataset(
        URI, content_hash(), fee_wei=fee, sender=owner, **kwargs
    )


@contextmanager
def auto_mining_off(ledger: Ledger) -> Iterator[Any]:
    """Queue transactions into one block; auto-mining is back on whatever happens."""
    tester = ledger.w3.provider.ethereum_tester
    tester.disable_auto_mine_transactions()
    try:
        yield tester
    finally:
        tester.enable_auto_mine_transactions()


# ---------------------------------------------------------------- reentrancy
def test_reentrant_payee_is_refunded_exactly_once(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    funder = ledger.accounts[4]
    attacker = deploy_payee(ledger, "ReentrantPayee", funder)
    req = payee_request(ledger, attacker, dataset, funder)
    ledger.decline(req, sender=owner)
    assert ledger.credit(attacker.address) == FEE
    assert ledger.balance(ledger.address) == FEE

    receipt = ledger.transact(attacker.functions.withdraw(), funder)

    assert attacker.functions.received().call() == FEE, "refund paid more than once"
    assert attacker.functions.reentryAttempts().call() == 1
    assert attacker.functions.reentrySuccesses().call() == 0
    assert ledger.balance(attacker.address) == FEE
    assert ledger.credit(attacker.address) == 0
    assert ledger.balance(ledger.address) == 0
    assert logs(ledger, receipt, "Withdrawal") == [
        {"payee": attacker.address, "to": attacker.address, "amount": FEE}
    ]


def test_reentrant_payee_cannot_drain_other_credits_or_escrow(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    funder = ledger.accounts[4]
    attacker = deploy_payee(ledger, "ReentrantPayee", funder)
    # a dearer dataset, so the other researcher's credit exceeds the attacker's refund
    dear = register(ledger, owner, fee=3 * FEE)
    other_req = ledger.request_access(dear, "cohort study", HMB_NCU, sender=researcher)
    ledger.decline(other_req, sender=owner)
    ledger.request_access(dataset, "still pending", HMB_NCU, sender=stranger)
    req = payee_request(ledger, attacker, dataset, funder)
    ledger.decline(req, sender=owner)
    assert ledger.balance(ledger.address) == FEE + 3 * FEE + FEE

    ledger.transact(attacker.functions.withdraw(), funder)

    assert attacker.functions.received().call() == FEE
    assert attacker.functions.reentryAttempts().call() == 1
    assert attacker.functions.reentrySuccesses().call() == 0
    assert ledger.credit(attacker.address) == 0
    assert ledger.credit(researcher) == 3 * FEE, "the other researcher's credit moved"
    # what is left is exactly the other refund plus the stranger's open escrow
    assert ledger.balance(ledger.address) == 3 * FEE + FEE
    assert ledger.withdraw(sender=researcher) == 3 * FEE
    assert ledger.balance(ledger.address) == FEE


# ---------------------------------------------------------- reverting payee
def test_reverting_payee_keeps_its_credit_and_can_withdraw_elsewhere(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    funder, destination = ledger.accounts[4], ledger.accounts[6]
    payee = deploy_payee(ledger, "RevertingPayee", funder)
    req = payee_request(ledger, payee, dataset, funder)
    ledger.decline(req, sender=owner)
    other_req = ledger.request_access(
        dataset, "cohort study", HMB_NCU, sender=researcher
    )
    ledger.decline(other_req, sender=owner)
    assert ledger.balance(ledger.address) == 2 * FEE

    with pytest.raises(errors.PaymentFailed) as caught:
        ledger.transact(payee.functions.withdraw(), funder)
    assert values(caught) == {"to": payee.address, "amount": FEE}
    # the same call mined without estimation reverts on chain and changes nothing
    tx_hash = payee.functions.withdraw().transact({"from": funder, "gas": GAS})
    assert ledger.w3.eth.get_transaction_receipt(tx_hash)["status"] == 0
    assert ledger.credit(payee.address) == FEE
    assert ledger.balance(ledger.address) == 2 * FEE

    before = ledger.balance(researcher)
    assert ledger.withdraw(sender=researcher) == FEE
    assert ledger.balance(researcher) == before + FEE - gas_cost(ledger.last_receipt)

    before = ledger.balance(destination)
    receipt = ledger.transact(payee.functions.withdrawTo(destination), funder)
    assert ledger.balance(destination) == before + FEE
    assert ledger.credit(payee.address) == 0
    assert ledger.balance(ledger.address) == 0
    assert logs(ledger, receipt, "Withdrawal") == [
        {"payee": payee.address, "to": destination, "amount": FEE}
    ]


# -------------------------------------------------------------------- expiry
def test_grant_is_live_until_one_second_before_expiry(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    ledger.approve(req, sender=owner)
    approved_at = block_time(ledger, ledger.last_receipt)
    expires_at = ledger.request(req).expires_at
    assert expires_at == approved_at + GRANT

    assert ledger.mine(expires_at - 1) == expires_at - 1
    assert ledger.has_access(dataset, researcher) is True
    assert ledger.request(req).status is Status.APPROVED

    assert ledger.mine(expires_at) == expires_at
    assert ledger.has_access(dataset, researcher) is False
    assert ledger.request(req).status is Status.EXPIRED
    assert ledger.access(dataset, researcher).status is Status.EXPIRED
    with pytest.raises(errors.NoActiveGrant):
        ledger.revoke(dataset, researcher, sender=owner)

    again = ledger.request_access(dataset, "follow-up", HMB_NCU, sender=researcher)
    assert again == req + 1
    assert ledger.request(again).status is Status.PENDING
    assert ledger.request(req).status is Status.EXPIRED


# ------------------------------------------------- fee change in one block
def test_request_after_a_fee_change_in_the_same_block_reverts_with_fee_changed(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    functions = ledger.contract.functions
    researcher_before = ledger.balance(researcher)
    registry_before = ledger.balance(ledger.address)
    with auto_mining_off(ledger) as tester:
        update = functions.updateDataset(dataset, 2 * FEE, GRANT, HMB_NCU, False)
        update_hash = update.transact({"from": owner, "gas": GAS})
        request = functions.requestAccess(dataset, FEE, GRANT, HMB_NCU, PURPOSE, b"")
        request_hash = request.transact({"from": researcher, "gas": GAS, "value": FEE})
        tester.mine_blocks(1)
    update_receipt = ledger.w3.eth.get_transaction_receipt(update_hash)
    receipt = ledger.w3.eth.get_transaction_receipt(request_hash)

    assert update_receipt["blockNumber"] == receipt["blockNumber"], "not one block"
    assert update_receipt["status"] == 1
    assert receipt["status"] == 0
    assert logs(ledger, receipt, "AccessRequested") == []
    assert ledger.balance(researcher) == researcher_before - gas_cost(receipt)
    assert ledger.balance(ledger.address) == registry_before
    assert counters(ledger) == (1, 0), "a request was recorded"
    assert ledger.requests() == []
    assert ledger.access(dataset, researcher).status is Status.NONE
    # Replaying on the state the request met (the block's, which its revert left
    # untouched) names the cause; the block before still had the old fee.
    with pytest.raises(errors.FeeChanged) as caught:
        ledger.transact(request, researcher, value=FEE)
    assert values(caught) == {"agreedFee": FEE, "currentFee": 2 * FEE}
    assert ledger.balance(researcher) == researcher_before - gas_cost(receipt)


def test_request_before_a_fee_change_in_the_same_block_keeps_the_old_fee(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    functions = ledger.contract.functions
    researcher_before = ledger.balance(researcher)
    with auto_mining_off(ledger) as tester:
        request = functions.requestAccess(dataset, FEE, GRANT, HMB_NCU, PURPOSE, b"")
        request_hash = request.transact({"from": researcher, "gas": GAS, "value": FEE})
        update = functions.updateDataset(dataset, 2 * FEE, GRANT, HMB_NCU, False)
        update_hash = update.transact({"from": owner, "gas": GAS})
        tester.mine_blocks(1)
    receipt = ledger.w3.eth.get_transaction_receipt(request_hash)
    update_receipt = ledger.w3.eth.get_transaction_receipt(update_hash)

    assert update_receipt["blockNumber"] == receipt["blockNumber"], "not one block"
    assert (receipt["status"], update_receipt["status"]) == (1, 1)
    (requested,) = logs(ledger, receipt, "AccessRequested")
    assert requested["amount"] == FEE
    assert ledger.balance(researcher) == researcher_before - FEE - gas_cost(receipt)
    assert ledger.balance(ledger.address) == FEE
    assert ledger.dataset(dataset).fee_wei == 2 * FEE
    assert ledger.access(dataset, researcher).amount_wei == FEE
    owner_before = ledger.balance(owner)
    ledger.approve(requested["requestId"], sender=owner)
    (paid,) = logs(ledger, ledger.last_receipt, "FeePaid")
    assert paid["amount"] == FEE, "the owner must earn the fee agreed, not the new"
    assert ledger.balance(owner) == owner_before + FEE - gas_cost(ledger.last_receipt)
    assert ledger.credit(owner) == 0 and ledger.balance(ledger.address) == 0


def test_client_raises_fee_changed_for_a_fee_change_earlier_in_the_same_block(
    ledger: Ledger,
    owner: str,
    researcher: str,
    dataset: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # request_access promises FeeChanged "if the owner changes it before your
    # transaction is mined"; here the owner's change lands just ahead of it.
    w3 = ledger.w3
    wait = w3.eth.wait_for_transaction_receipt
    before = ledger.balance(researcher)
    with auto_mining_off(ledger) as tester, monkeypatch.context() as patch:
        ledger.contract.functions.updateDataset(
            dataset, 2 * FEE, GRANT, HMB_NCU, False
        ).transact({"from": owner, "gas": GAS})

        def mine_then_wait(tx_hash: Any, *args: Any, **kwargs: Any) -> Any:
            tester.mine_blocks(1)  # the block holds the fee change, then the request
            return wait(tx_hash, *args, **kwargs)

        patch.setattr(w3.eth, "wait_for_transaction_receipt", mine_then_wait)
        with pytest.raises(errors.HealthLabError) as caught:
            ledger.request_access(
                dataset, "cohort study", HMB_NCU, fee_wei=FEE, sender=researcher
            )
    assert ledger.last_receipt["status"] == 0
    assert ledger.balance(researcher) == before - gas_cost(ledger.last_receipt)
    assert isinstance(caught.value, errors.FeeChanged), (
        f"client raised {type(caught.value).__name__}: {caught.value} — it replays the "
        "failed request on the block before (old fee), so it cannot name FeeChanged"
    )
    assert values(caught) == {"agreedFee": FEE, "currentFee": 2 * FEE}


# ---------------------------------------------------------------- bad inputs
@dataclass(frozen=True)
class Scene:
    """What a bad call is built from."""

    ledger: Ledger
    owner: str
    researcher: str
    dataset: int

    @property
    def functions(self) -> Any:
        return self.ledger.contract.functions

    def register(
        self,
        pointer: str = URI,
        digest: bytes | None = None,
        *,
        fee: int = 0,
        grant: int = GRANT,
        terms: int = int(Codes.GRU),
    ) -> Any:
        digest = bytes.fromhex(content_hash()[2:]) if digest is None else digest
        return self.functions.registerDataset(pointer, digest, fee, grant, terms, False)

    def update(
        self, *, fee: int = FEE, grant: int = GRANT, terms: int = HMB_NCU
    ) -> Any:
        return self.functions.updateDataset(self.dataset, fee, grant, terms, False)

    def request(
        self,
        dataset: int | None = None,
        *,
        agreed: int = FEE,
        codes: int = HMB_NCU,
        purpose: bytes = PURPOSE,
    ) -> Any:
        dataset = self.dataset if dataset is None else dataset
        return self.functions.requestAccess(dataset, agreed, GRANT, codes, purpose, b"")


#: (build(scene) -> (call, sender role, value, expected values), expected error)
Case = Callable[[Scene], tuple[Any, str, int, dict[str, Any]]]
BAD_CALLS: list[Any] = [
    pytest.param(
        lambda s: (s.register(digest=ZERO32), "owner", 0, {}),
        errors.ZeroContentHash,
        id="zero-content-hash",
    ),
    pytest.param(
        lambda s: (s.register(""), "owner", 0, {}),
        errors.EmptyPointer,
        id="empty-pointer",
    ),
    *[
        pytest.param(
            lambda s, p=pointer: (s.register(p), "owner", 0, {}),
            errors.InvalidPointer,
            id=f"pointer-{name}",
        )
        for name, pointer in [
            ("ftp", "ftp://hospital.example/a.csv"),
            ("http", "http://hospital.example/a.csv"),
            ("upper-case-scheme", "HTTPS://hospital.example/a.csv"),
            ("https-scheme-only", "https://"),
            ("ipfs-scheme-only", "ipfs://"),
            ("513-bytes", "https://" + "a" * 505),
        ]
    ],
    pytest.param(
        lambda s: (
            s.register(
                digest=bytes.fromhex(s.ledger.dataset(s.dataset).content_hash[2:])
            ),
            "owner",  # the owner's own second registration (another owner's is fine)
            0,
            {
                "contentHash": bytes.fromhex(
                    s.ledger.dataset(s.dataset).content_hash[2:]
                ),
                "existingId": s.dataset,
            },
        ),
        errors.DuplicateDataset,
        id="duplicate-content-hash",
    ),
    pytest.param(
        lambda s: (s.register(grant=0), "owner", 0, {"grantSeconds": 0}),
        errors.InvalidGrantDuration,
        id="grant-0",
    ),
    pytest.param(
        lambda s: (s.register(fee=2**96), "owner", 0, {"fee": 2**96}),
        errors.FeeTooLarge,
        id="fee-2**96",
    ),
    pytest.param(
        lambda s: (s.update(fee=2**200), "owner", 0, {"fee": 2**200}),
        errors.FeeTooLarge,
        id="update-fee-2**200",
    ),
    *[
        pytest.param(
            lambda s, t=terms: (s.register(terms=t), "owner", 0, {"codes": t}),
            errors.UnknownCodes,
            id=f"unknown-code-bit-{bit}",
        )
        for bit, terms in [(5, 1 << 5 | 1), (13, 1 << 13 | 1), (31, 1 << 31 | 1)]
    ],
    pytest.param(
        lambda s: (s.update(terms=(1 << 7) | HMB_NCU), "owner", 0, {"codes": 0x182}),
        errors.UnknownCodes,
        id="update-unknown-code-bit-7",
    ),
    *[
        pytest.param(
            lambda s, t=terms: (s.register(terms=t), "owner", 0, {}),
            errors.NoPurpose,
            id=f"no-purpose-{terms:#x}",
        )
        for terms in [0, int(Codes.NCU | Codes.IRB | Codes.PUB), int(Codes.COL)]
    ],
    pytest.param(
        lambda s: (
            s.request(),
            "researcher",
            FEE - 1,
            {"expected": FEE, "sent": FEE - 1},
        ),
        errors.WrongPayment,
        id="payment-short-by-1-wei",
    ),
    pytest.param(
        lambda s: (
            s.request(),
            "researcher",
            FEE + 1,
            {"expected": FEE, "sent": FEE + 1},
        ),
        errors.WrongPayment,
        id="payment-over-by-1-wei",
    ),
    pytest.param(
        lambda s: (s.request(), "researcher", 0, {"expected": FEE, "sent": 0}),
        errors.WrongPayment,
        id="payment-none",
    ),
    pytest.param(
        lambda s: (
            s.request(agreed=FEE + 1),
            "researcher",
            FEE + 1,
            {"agreedFee": FEE + 1, "currentFee": FEE},
        ),
        errors.FeeChanged,
        id="agreed-fee-differs",
    ),
    pytest.param(
        lambda s: (s.request(purpose=ZERO32), "researcher", FEE, {}),
        errors.ZeroPurposeHash,
        id="zero-purpose-hash",
    ),
    pytest.param(
        lambda s: (
            s.request(codes=int(Codes.POA | Codes.NCU)),
            "researcher",
            FEE,
            {"codes": int(Codes.POA | Codes.NCU), "terms": HMB_NCU},
        ),
        errors.PurposeNotPermitted,
        id="purpose-not-permitted",
    ),
    pytest.param(
        lambda s: (s.request(99), "researcher", FEE, {"datasetId": 99}),
        errors.UnknownDataset,
        id="request-unknown-dataset",
    ),
    pytest.param(
        lambda s: (
            s.functions.approve(99, s.researcher, 1),
            "owner",
            0,
            {"datasetId": 99},
        ),
        errors.UnknownDataset,
        id="approve-unknown-dataset",
    ),
    pytest.param(
        lambda s: (s.functions.getDataset(99), "owner", 0, {"datasetId": 99}),
        errors.UnknownDataset,
        id="get-unknown-dataset",
    ),
    pytest.param(
        lambda s: (s.functions.getDataset(0), "owner", 0, {"datasetId": 0}),
        errors.UnknownDataset,
        id="get-dataset-0",
    ),
    *[
        pytest.param(
            lambda s, f=function, r=request: (
                getattr(s.functions, f)(s.dataset, s.researcher, r),
                "owner",
                0,
                {"requestId": r},
            ),
            errors.UnknownRequest,
            id=f"{function}-unknown-request-{request}",
        )
        for function in ("approve", "decline")
        for request in (0, 99)
    ],
    pytest.param(
        lambda s: (
            s.functions.approve(s.dataset, s.researcher, 1),
            "researcher",
            0,
            {"datasetId": s.dataset, "caller": s.researcher},
        ),
        errors.NotDatasetOwner,
        id="approve-by-non-owner",
    ),
    pytest.param(
        lambda s: (
            s.functions.recordResult(s.dataset, 1, ZERO32),
            "researcher",
            0,
            {},
        ),
        errors.ZeroResultHash,
        id="zero-result-hash",
    ),
    pytest.param(
        lambda s: (
            s.functions.recordResult(s.dataset, 1, PURPOSE),
            "researcher",
            0,
            {"requestId": 1, "caller": s.researcher},
        ),
        errors.NotRequester,
        id="record-result-without-request",
    ),
    pytest.param(
        lambda s: (s.functions.withdraw(), "researcher", 0, {"payee": s.researcher}),
        errors.NothingToWithdraw,
        id="withdraw-nothing",
    ),
    pytest.param(
        lambda s: (
            s.functions.withdrawTo("0x" + "00" * 20),
            "researcher",
            0,
            {},
        ),
        errors.ZeroAddress,
        id="withdraw-to-zero-address",
    ),
]


@pytest.mark.parametrize(("build", "error"), BAD_CALLS)
def test_bad_call_reverts_with_its_named_error_and_changes_nothing(
    ledger: Ledger,
    owner: str,
    researcher: str,
    dataset: int,
    build: Case,
    error: type[errors.ContractError],
) -> None:
    scene = Scene(ledger, owner, researcher, dataset)
    call, role, value, expected = build(scene)
    sender = {"owner": owner, "researcher": researcher}[role]
    watched = (owner, researcher, ledger.address)
    before = (
        counters(ledger),
        [ledger.balance(a) for a in watched],
        [ledger.credit(a) for a in watched],
    )

    with pytest.raises(error) as caught:
        ledger.transact(call, sender, value=value)

    assert type(caught.value) is error, f"got {type(caught.value).__name__}"
    assert values(caught) == expected
    after = (
        counters(ledger),
        [ledger.balance(a) for a in watched],
        [ledger.credit(a) for a in watched],
    )
    assert after == before, "a refused call changed counters, balances or credits"


def test_pointer_of_exactly_512_bytes_is_accepted(ledger: Ledger, owner: str) -> None:
    pointer = "ipfs://" + "b" * 505
    assert len(pointer.encode()) == 512
    ds = ledger.register_dataset(pointer, content_hash(), sender=owner)
    assert ledger.dataset(ds).pointer == pointer


def test_fee_of_2_to_the_88_minus_1_is_accepted(ledger: Ledger, owner: str) -> None:
    ds = ledger.register_dataset(URI, content_hash(), fee_wei=2**88 - 1, sender=owner)
    assert ledger.dataset(ds).fee_wei == 2**88 - 1
    with pytest.raises(errors.FeeTooLarge) as caught:
        ledger.register_dataset(URI, content_hash(), fee_wei=2**88, sender=owner)
    assert values(caught) == {"fee": 2**88}


def test_client_decodes_a_view_revert_into_its_named_error(ledger: Ledger) -> None:
    with pytest.raises(errors.ContractError) as caught:
        ledger.dataset(99)
    assert type(caught.value) is errors.UnknownDataset, (
        f"ledger.dataset(99) raised {type(caught.value).__name__}: {caught.value} — "
        "eth-tester's eth_call gives the revert data as the text \"b'...'\", which "
        "_revert_data does not read"
    )
    assert values(caught) == {"datasetId": 99}


# ------------------------------------------------------------------ matching
def test_auto_approval_grants_in_the_request_transaction(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    ds = register(ledger, owner, auto_approve=True)
    req = ledger.request_access(
        ds, "cohort study", Codes.DS | Codes.NCU, sender=researcher
    )
    receipt = ledger.last_receipt

    (requested,) = logs(ledger, receipt, "AccessRequested")
    (granted,) = logs(ledger, receipt, "AccessGranted")
    assert requested["requestId"] == granted["requestId"] == req
    assert granted["automatic"] is True
    assert granted["expiresAt"] == block_time(ledger, receipt) + GRANT
    assert ledger.has_access(ds, researcher) is True
    assert ledger.request(req).status is Status.APPROVED
    assert ledger.credit(owner) == FEE, "an automatic grant earns the owner the fee"
    assert ledger.balance(ledger.address) == FEE


def test_conflicting_codes_are_refused_and_take_no_fee(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    ds = register(ledger, owner, auto_approve=True)
    before = (ledger.balance(researcher), ledger.balance(ledger.address))
    with pytest.raises(errors.PurposeNotPermitted) as caught:
        ledger.request_access(ds, "ancestry", "POA|NCU", sender=researcher)
    assert values(caught) == {
        "codes": int(Codes.POA | Codes.NCU),
        "terms": HMB_NCU,
    }
    assert (ledger.balance(researcher), ledger.balance(ledger.address)) == before
    assert counters(ledger) == (1, 0)
    assert ledger.has_access(ds, researcher) is False


def test_collaboration_terms_are_never_auto_approved(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    ds = register(ledger, owner, terms="HMB|NCU|COL", auto_approve=True)
    req = ledger.request_access(ds, "cohort study", HMB_NCU, sender=researcher)
    assert logs(ledger, ledger.last_receipt, "AccessGranted") == []
    assert ledger.request(req).status is Status.PENDING
    assert ledger.has_access(ds, researcher) is False
    assert ledger.credit(owner) == 0
    assert ledger.balance(ledger.address) == FEE, "the fee stays in escrow"
    ledger.approve(req, sender=owner)
    assert ledger.has_access(ds, researcher) is True


@pytest.mark.parametrize(
    ("codes", "terms", "allowed"),
    [
        ("GRU", "GRU", True),
        *[(purpose, "GRU", True) for purpose in ("HMB", "DS", "POA", "MDS")],
        ("DS", "HMB", True),
        ("HMB|DS", "HMB", True),
        ("HMB", "DS", False),
        ("GRU", "HMB", False),
        ("POA", "HMB", False),
        ("MDS", "HMB", False),
        ("MDS", "DS|POA", False),
        ("POA", "DS|POA", True),
        ("HMB|POA", "HMB", False),
        ("NCU", "GRU", False),
        ("HMB|COL", "HMB|COL", False),
        ("HMB", "HMB|NCU", False),
        ("HMB|NCU", "HMB|NCU", True),
        ("HMB|IRB", "HMB|IRB|PUB", False),
        ("HMB|PUB", "HMB|IRB|PUB", False),
        ("HMB|IRB|PUB", "HMB|IRB|PUB", True),
        ("DS|NCU|IRB|PUB", "GRU|NCU|IRB|PUB|COL", True),
        ("HMB|NCU|IRB|PUB", "HMB", True),
        ("HMB|DL", "HMB", False),
        ("HMB|DL", "HMB|DL", True),
        ("HMB", "HMB|DL", True),
        ("DL", "GRU|DL", False),
    ],
)
def test_duo_hierarchy_and_attestations(
    ledger: Ledger, codes: str, terms: str, allowed: bool
) -> None:
    c, t = int(as_codes(codes)), int(as_codes(terms))
    assert ledger.contract.functions.permits(c, t).call() is allowed
    assert permits(c, t) is allowed, "the Python mirror disagrees"


def test_missing_attestation_is_refused_on_request(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    ds = register(ledger, owner, terms="HMB|NCU|IRB|PUB", auto_approve=True)
    for codes in ("HMB|IRB|PUB", "HMB|NCU|PUB", "HMB|NCU|IRB"):
        with pytest.raises(errors.PurposeNotPermitted):
            ledger.request_access(ds, "cohort study", codes, sender=researcher)
    assert counters(ledger) == (1, 0)
    req = ledger.request_access(ds, "cohort study", "DS|NCU|IRB|PUB", sender=researcher)
    assert ledger.request(req).status is Status.APPROVED


_KNOWN_BITS = [int(c) for c in Codes]
_codes = st.one_of(
    st.lists(st.sampled_from(_KNOWN_BITS), max_size=6).map(lambda bits: sum(set(bits))),
    st.builds(
        lambda bits, extra: sum(set(bits)) | (1 << extra),
        st.lists(st.sampled_from(_KNOWN_BITS), max_size=6),
        st.integers(0, 31),
    ),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=200, deadline=None)
@given(codes=_codes, terms=_codes)
def test_python_permits_mirrors_the_contract(
    chain: Chain, codes: int, terms: int
) -> None:
    contract = chain.w3.eth.contract(
        address=chain.address, abi=load_artifact("HealthLabRegistry")["abi"]
    )
    assert permits(codes, terms) is contract.functions.permits(codes, terms).call(), (
        f"codes={codes:#x} terms={terms:#x} (known bits {int(KNOWN):#x})"
    )


# -------------------------------------------------------------------- cancel
def test_cancel_opens_exactly_at_the_request_timeout(
    ledger: Ledger, researcher: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    created_at = ledger.request(req).created_at
    opens = created_at + TEST_TIMEOUT

    # the next transaction is mined one second after the latest block
    ledger.mine(opens - 2)
    with pytest.raises(errors.TooEarlyToCancel) as caught:
        ledger.cancel(req, sender=researcher)
    assert values(caught) == {"requestId": req, "cancellableAt": opens}
    assert ledger.credit(researcher) == 0

    ledger.mine(opens - 1)
    assert ledger.cancel(req, sender=researcher).status is Status.CANCELLED
    assert block_time(ledger, ledger.last_receipt) == opens
    assert ledger.credit(researcher) == FEE
    assert ledger.balance(ledger.address) == FEE

    with pytest.raises(errors.NotPending) as again:
        ledger.cancel(req, sender=researcher)
    assert values(again) == {"requestId": req, "status": Status.CANCELLED}
    assert ledger.credit(researcher) == FEE, "refund credited twice"
    assert ledger.withdraw(sender=researcher) == FEE
    assert ledger.balance(ledger.address) == 0


def test_cancel_is_allowed_at_once_on_a_deactivated_dataset(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    with pytest.raises(errors.TooEarlyToCancel):
        ledger.cancel(req, sender=researcher)
    ledger.set_active(dataset, False, sender=owner)
    assert ledger.cancel(req, sender=researcher).status is Status.CANCELLED
    assert block_time(ledger, ledger.last_receipt) < ledger.request(req).created_at + (
        TEST_TIMEOUT
    )
    assert ledger.credit(researcher) == FEE


def test_only_the_requester_can_cancel(
    ledger: Ledger, researcher: str, stranger: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    ledger.advance_time(TEST_TIMEOUT)
    with pytest.raises(errors.NotRequester) as caught:
        ledger.cancel(req, sender=stranger)
    assert values(caught) == {"requestId": req, "caller": stranger}
    assert ledger.request(req).status is Status.PENDING


# --------------------------------------------------------------- deactivation
def test_deactivation_suspends_access_and_new_decisions(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    granted = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    ledger.approve(granted, sender=owner)
    pending = ledger.request_access(dataset, "other study", HMB_NCU, sender=stranger)

    ledger.set_active(dataset, False, sender=owner)
    assert ledger.dataset(dataset).active is False
    assert ledger.has_access(dataset, researcher) is False
    with pytest.raises(errors.DatasetInactive) as caught:
        ledger.approve(pending, sender=owner)
    assert values(caught) == {"datasetId": dataset}
    newcomer = ledger.accounts[5]
    with pytest.raises(errors.DatasetInactive):
        ledger.request_access(dataset, "late study", HMB_NCU, sender=newcomer)
    assert ledger.decline(pending, sender=owner).status is Status.DECLINED
    assert ledger.credit(stranger) == FEE

    ledger.set_active(dataset, True, sender=owner)
    assert ledger.has_access(dataset, researcher) is True, "the grant did not come back"
    assert ledger.request(granted).status is Status.APPROVED


# ----------------------------------------------------------- request states
def test_request_state_machine_for_one_researcher(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    first = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    with pytest.raises(errors.RequestAlreadyOpen) as pending:
        ledger.request_access(dataset, "again", HMB_NCU, sender=researcher)
    assert values(pending) == {"requestId": first}

    ledger.decline(first, sender=owner)
    second = ledger.request_access(dataset, "revised", HMB_NCU, sender=researcher)
    assert second == first + 1
    ledger.approve(second, sender=owner)
    expires_at = ledger.request(second).expires_at
    with pytest.raises(errors.AccessAlreadyGranted) as granted:
        ledger.request_access(dataset, "again", HMB_NCU, sender=researcher)
    assert values(granted) == {"requestId": second, "expiresAt": expires_at}

    ledger.revoke(dataset, researcher, sender=owner)
    assert ledger.has_access(dataset, researcher) is False
    third = ledger.request_access(dataset, "after revoke", HMB_NCU, sender=researcher)
    assert [r.status for r in ledger.requests(researcher=researcher)] == [
        Status.DECLINED,
        Status.REVOKED,
        Status.PENDING,
    ]
    assert third == second + 1
    # one refund (declined) and one fee paid to the owner on approval; the third
    # is in escrow
    assert (ledger.credit(researcher), ledger.credit(owner)) == (FEE, 0)
    assert ledger.balance(ledger.address) == 2 * FEE


def test_a_superseded_request_id_cannot_be_approved(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    first = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    ledger.decline(first, sender=owner)
    second = ledger.request_access(dataset, "revised", HMB_NCU, sender=researcher)

    with pytest.raises(errors.UnknownRequest) as caught:
        ledger.transact(
            ledger.contract.functions.approve(dataset, researcher, first), owner
        )
    assert values(caught) == {"requestId": first}
    with pytest.raises(errors.UnknownRequest):
        ledger.approve(first, sender=owner)  # the client names request #1 the same way
    assert ledger.request(second).status is Status.PENDING
    assert ledger.approve(second, sender=owner).status is Status.APPROVED
    assert ledger.request(first).status is Status.DECLINED


def test_request_ids_are_unique_across_datasets_and_name_their_dataset(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    """Each dataset numbers its own requests (no shared counter to write), and a
    request's id is ``datasetId << 40 | number``: the first requests of two datasets
    get different ids, and an id used with the other dataset names no request there,
    so an owner cannot act on (or a researcher anchor under) another dataset's."""
    other = register(ledger, stranger)
    mine = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    theirs = ledger.request_access(other, "cohort study", HMB_NCU, sender=researcher)
    assert (mine, theirs) == ((dataset << 40) | 1, (other << 40) | 1)
    functions = ledger.contract.functions
    assert [functions.requestCount(d).call() for d in (dataset, other)] == [1, 1]
    assert ledger.access(other, researcher).request_id == theirs

    # the stranger owns `other`: it names `mine` (dataset's request) with its dataset
    with pytest.raises(errors.UnknownRequest) as caught:
        ledger.transact(functions.approve(other, researcher, mine), stranger)
    assert values(caught) == {"requestId": mine}
    with pytest.raises(errors.UnknownRequest):  # nor the bare number
        ledger.transact(functions.approve(other, researcher, 1), stranger)
    assert ledger.request(theirs).status is Status.PENDING

    ledger.approve(mine, sender=owner)
    ledger.approve(theirs, sender=stranger)
    result = "0x" + "ab" * 32
    ledger.record_result(mine, result, sender=researcher)
    # the same digest under the other grant is its own anchor, not a duplicate
    ledger.record_result(theirs, result, sender=researcher)
    assert ledger.result_recorded(mine, result)
    assert ledger.result_recorded(theirs, result)
    with pytest.raises(errors.NotRequester):  # an id of one dataset under another
        ledger.transact(
            functions.recordResult(other, mine, bytes.fromhex("cd" * 32)), researcher
        )


# ------------------------------------------------------------------- results
def test_result_is_anchored_once_and_only_under_a_live_grant(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "cohort study", HMB_NCU, sender=researcher)
    ledger.approve(req, sender=owner)
    result = "0x" + "ab" * 32

    ledger.record_result(req, result, sender=researcher)
    assert logs(ledger, ledger.last_receipt, "ResultRecorded") == [
        {
            "requestId": req,
            "datasetId": dataset,
            "researcher": researcher,
            "resultHash": bytes.fromhex("ab" * 32),
        }
    ]
    assert ledger.result_recorded(req, result)
    assert not ledger.result_recorded(req, "0x" + "cd" * 32)

    with pytest.raises(errors.ResultAlreadyRecorded) as again:
        ledger.record_result(req, result, sender=researcher)
    assert values(again) == {
        "resultHash": bytes.fromhex("ab" * 32),
        "requestId": req,
    }

    ledger.revoke(dataset, researcher, sender=owner)
    with pytest.raises(errors.NoActiveGrant) as revoked:
        ledger.record_result(req, "0x" + "cd" * 32, sender=researcher)
    assert values(revoked) == {"datasetId": dataset, "researcher": researcher}
    assert not ledger.result_recorded(req, "0x" + "cd" * 32)


# ------------------------------------------------------------------ zero fee
def test_zero_fee_dataset_flows_without_credits(
    ledger: Ledger, owner: str, researcher: str, stranger: str
) -> None:
    ds = register(ledger, owner, fee=0)
    declined = ledger.request_access(ds, "first try", HMB_NCU, sender=stranger)
    ledger.decline(declined, sender=owner)
    req = ledger.request_access(ds, "cohort study", HMB_NCU, sender=researcher)
    assert logs(ledger, ledger.last_receipt, "AccessRequested")[0]["amount"] == 0
    ledger.approve(req, sender=owner)
    assert ledger.has_access(ds, researcher) is True
    ledger.record_result(req, "0x" + "ef" * 32, sender=researcher)
    assert ledger.result_recorded(req, "0x" + "ef" * 32)

    assert [ledger.credit(a) for a in (owner, researcher, stranger)] == [0, 0, 0]
    assert ledger.balance(ledger.address) == 0
    for payee in (owner, stranger):
        with pytest.raises(errors.NothingToWithdraw) as caught:
            ledger.withdraw(sender=payee)
        assert values(caught) == {"payee": payee}
