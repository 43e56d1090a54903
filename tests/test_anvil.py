"""The client against a real anvil node: consent flow, deployment records, time, state.

``cast`` (Foundry) reads the contract independently of the Python client, so every
access check is made twice: once by ``Ledger.has_access``, once by ``cast call``.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import warnings
from pathlib import Path

import pytest
from web3 import Web3

from healthlab import errors
from healthlab.ledger import Ledger, Status, deployments
from healthlab.ledger.node import AnvilNode
from healthlab.services import free_port
from tests.conftest import ETHER, content_hash, require

FEE = ETHER // 100
POINTER = "https://hospital.example/cohort.csv"


@pytest.fixture(scope="module")
def cast() -> str:
    return require("cast")


@pytest.fixture(autouse=True)
def _no_registry_or_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEALTHLAB_REGISTRY", "HEALTHLAB_PRIVATE_KEY", "HEALTHLAB_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HEALTHLAB_HOME: no deployment is recorded for any chain."""
    home = tmp_path / "home"
    monkeypatch.setenv("HEALTHLAB_HOME", str(home))
    return home


def cast_has_access(
    cast: str, url: str, registry: str, dataset_id: int, researcher: str
) -> bool:
    """``hasAccess`` read by Foundry's cast, without the Python client."""
    out = subprocess.run(
        [
            cast,
            "call",
            "--rpc-url",
            url,
            registry,
            "hasAccess(uint256,address)(bool)",
            str(dataset_id),
            researcher,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    answer = out.stdout.strip()
    assert answer in ("true", "false"), f"unexpected cast output {out.stdout!r}"
    return answer == "true"


def register(ledger: Ledger, owner: str, *, grant_seconds: int = 30 * 86400) -> int:
    return ledger.register_dataset(
        POINTER,
        content_hash(),
        fee_wei=FEE,
        grant_seconds=grant_seconds,
        terms="HMB|NCU",
        sender=owner,
    )


@pytest.mark.anvil
def test_consent_flow_on_anvil_agrees_with_cast(anvil: AnvilNode, cast: str) -> None:
    ledger = Ledger.connect(anvil.url)
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    seen: list[tuple[str, bool, bool]] = []

    def check(state: str) -> None:
        on_chain = cast_has_access(cast, anvil.url, ledger.address, ds, researcher)
        seen.append((state, ledger.has_access(ds, researcher), on_chain))

    ds = register(ledger, owner)
    check("registered")
    req = ledger.request_access(ds, "CVD risk model", "HMB|NCU", sender=researcher)
    assert ledger.request(req).status is Status.PENDING
    check("requested")
    credit = ledger.credit(owner)
    before = ledger.balance(owner)
    assert ledger.approve(req, sender=owner).status is Status.APPROVED
    receipt = ledger.last_receipt
    assert ledger.credit(owner) == credit, "a compute fee is paid, not credited"
    assert (
        ledger.balance(owner)
        == before + FEE - receipt["gasUsed"] * receipt["effectiveGasPrice"]
    ), "approval must pay the owner exactly the fee, minus the gas paid"
    check("approved")
    ledger.advance_time(60)
    check("paid")
    ledger.revoke(ds, researcher, sender=owner)
    assert ledger.request(req).status is Status.REVOKED
    check("revoked")

    # (state, Ledger.has_access, cast call hasAccess)
    assert seen == [
        ("registered", False, False),
        ("requested", False, False),
        ("approved", True, True),
        ("paid", True, True),
        ("revoked", False, False),
    ]


@pytest.mark.anvil
def test_second_connection_finds_the_recorded_registry(
    anvil: AnvilNode, fresh_home: Path
) -> None:
    first = Ledger.connect(anvil.url)  # nothing recorded: deploys and records
    recorded = json.loads((fresh_home / "deployments.json").read_text())
    assert [r["address"] for r in recorded.values()] == [first.address]
    ds = register(first, first.accounts[1])
    block = first.w3.eth.block_number

    second = Ledger.connect(anvil.url)

    assert second.address == first.address
    assert second.from_block == first.from_block
    assert second.w3.eth.block_number == block, "the second connection deployed again"
    assert second.dataset(ds) == first.dataset(ds)


@pytest.mark.anvil
@pytest.mark.parametrize("record", ["none", "address without code"])
def test_connect_without_deploy_needs_a_recorded_registry(
    anvil: AnvilNode, fresh_home: Path, record: str
) -> None:
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    if record == "address without code":
        key = deployments.chain_key(w3.eth.chain_id, w3.eth.get_block(0)["hash"])
        deployments.record(key, "0x" + "de" * 20, 1, anvil.url)
    block = w3.eth.block_number

    with pytest.raises(errors.ConfigurationError, match=re.escape(anvil.url)):
        Ledger.connect(anvil.url, deploy=False)

    assert w3.eth.block_number == block, "deploy=False must not send a transaction"
    recorded = fresh_home / "deployments.json"
    assert recorded.is_file() == (record != "none")


@pytest.mark.parametrize("via", ["argument", "HEALTHLAB_RPC_URL"])
def test_closed_port_raises_chain_unreachable_naming_the_url(
    via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HEALTHLAB_RPC_URL", url)

    with pytest.raises(errors.ChainUnreachable, match=re.escape(url)):
        Ledger.connect(url if via == "argument" else None)


@pytest.mark.anvil
def test_advance_time_expires_a_grant_on_anvil(anvil: AnvilNode, cast: str) -> None:
    ledger = Ledger.connect(anvil.url)
    owner, researcher = ledger.accounts[3], ledger.accounts[4]
    ds = register(ledger, owner, grant_seconds=120)
    req = ledger.request_access(ds, "CVD risk model", "HMB|NCU", sender=researcher)
    ledger.approve(req, sender=owner)
    expires = ledger.access(ds, researcher).expires_at
    assert expires == ledger.now() + 120

    assert ledger.advance_time(expires - 1 - ledger.now()) == expires - 1
    assert ledger.has_access(ds, researcher), "the grant is live until expiresAt"
    assert cast_has_access(cast, anvil.url, ledger.address, ds, researcher)

    assert ledger.advance_time(1) == expires
    assert not ledger.has_access(ds, researcher), "the grant ends at expiresAt"
    assert not cast_has_access(cast, anvil.url, ledger.address, ds, researcher)
    assert ledger.access(ds, researcher).status is Status.EXPIRED
    assert ledger.request(req).status is Status.EXPIRED


@pytest.mark.anvil
def test_state_file_keeps_registry_and_grant_across_restart(
    fresh_home: Path, tmp_path: Path, cast: str
) -> None:
    require("anvil")
    state = tmp_path / "chain" / "anvil-state.json"
    first = AnvilNode(state_file=state).start()
    try:
        ledger = Ledger.connect(first.url)
        owner, researcher = ledger.accounts[1], ledger.accounts[2]
        ds = register(ledger, owner)
        req = ledger.request_access(ds, "CVD risk model", "HMB|NCU", sender=researcher)
        ledger.approve(req, sender=owner)
        dataset = ledger.dataset(ds)
        assert ledger.has_access(ds, researcher)
    finally:
        first.close()
    assert state.is_file(), "stopping anvil must write its state file"
    with pytest.raises(errors.ChainUnreachable, match=re.escape(first.url)):
        ledger.has_access(ds, researcher)

    second = AnvilNode(state_file=state).start()
    try:
        again = Ledger.connect(second.url)  # another port: found by the chain's key

        assert again.address == ledger.address
        assert again.dataset(ds) == dataset
        assert again.has_access(ds, researcher)
        assert cast_has_access(cast, second.url, again.address, ds, researcher)
        assert again.request(req).status is Status.APPROVED
    finally:
        second.close()


@pytest.mark.anvil
def test_starting_a_node_on_a_busy_port_raises(anvil: AnvilNode) -> None:
    node = AnvilNode(anvil.port)
    try:
        with pytest.raises(errors.ConfigurationError):
            node.start()  # must not take the running node's answer for its own
    finally:
        node.close()
    assert Web3(Web3.HTTPProvider(anvil.url)).eth.chain_id == 31337


@pytest.mark.anvil
def test_anvil_node_closes_its_log_file() -> None:
    require("anvil")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        node = AnvilNode().start()
        node.close()
        del node
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == [], f"AnvilNode.start() leaves its log file open: {leaks}"
