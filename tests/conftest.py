"""Shared fixtures: one embedded chain per session, reset by snapshot for each test.

Components that live outside Python (the anvil node, cast) are required: when one is
missing the test is skipped locally with the command that installs it, and fails under
CI (``CI=true``), so CI never passes by skipping.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP384R1, derive_private_key
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from healthlab.ledger import Ledger
from healthlab.ledger.client import deploy_registry
from healthlab.ledger.node import AnvilNode, find_tool


def _share_jump_analysis() -> None:
    """Let py-evm analyse a contract's code for valid jump targets once per code, not
    once per call: its ``CodeStream`` caches which positions are opcodes (not PUSH
    data) in sets of its own, and a new one is made for every message, so every call
    of a view re-scans the registry's 22 KB of code behind each jump (a tenth of the
    property test's time). The validity of a position is a function of the code
    bytes alone, so streams of the same code share the sets py-evm itself fills.
    Checked against py-evm 0.12 (the version web3[tester] pins); on another layout
    this does nothing.
    """
    from importlib.metadata import version

    from eth.vm.code_stream import CodeStream

    slots = {"valid_positions", "invalid_positions"}
    if not version("py-evm").startswith("0.12.") or not slots <= set(
        CodeStream.__slots__
    ):
        return
    analysed: dict[bytes, tuple[set[int], set[int]]] = {}
    init = CodeStream.__init__

    def shared(self: CodeStream, code_bytes: bytes) -> None:
        init(self, code_bytes)
        known = analysed.setdefault(
            code_bytes, (self.valid_positions, self.invalid_positions)
        )
        self.valid_positions, self.invalid_positions = known

    CodeStream.__init__ = shared  # type: ignore[method-assign]


_share_jump_analysis()

ETHER = 10**18
#: Request timeout the test registry is deployed with (seconds).
TEST_TIMEOUT = 3600


def require(tool: str) -> str:
    """Path of an external tool; skip locally / fail under CI when it is missing."""
    path = find_tool(tool)
    if path is None:
        message = f"{tool} is not installed: run `make setup` (npm ci in contracts/)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Chain:
    """The session's embedded chain and its deployed registry."""

    w3: Any
    address: str
    block: int

    @property
    def tester(self) -> Any:
        return self.w3.provider.ethereum_tester

    def ledger(self) -> Ledger:
        """A fresh client on this chain (no caches carried across snapshots)."""
        return Ledger(self.w3, self.address, from_block=self.block)


@pytest.fixture(scope="session")
def chain() -> Chain:
    """An embedded chain with the registry deployed (request timeout: 1 hour)."""
    base = Ledger.local()
    address, block = deploy_registry(base.w3, base.w3.eth.accounts[0], TEST_TIMEOUT)
    return Chain(base.w3, address, block)


@pytest.fixture
def ledger(chain: Chain) -> Iterator[Ledger]:
    """A client on a clean registry: every change is rolled back after the test."""
    snapshot = chain.tester.take_snapshot()
    try:
        yield chain.ledger()
    finally:
        chain.tester.revert_to_snapshot(snapshot)


@pytest.fixture
def owner(ledger: Ledger) -> str:
    return ledger.accounts[1]


@pytest.fixture
def researcher(ledger: Ledger) -> str:
    return ledger.accounts[2]


@pytest.fixture
def stranger(ledger: Ledger) -> str:
    return ledger.accounts[3]


_hashes = iter(range(1, 1 << 30))


def content_hash() -> str:
    """A fresh, non-zero 32-byte content hash."""
    return "0x" + next(_hashes).to_bytes(32, "big").hex()


def mask_key(seed: int) -> bytes:
    """A site's X25519 public key (32 raw bytes); the same seed gives the same key."""
    private = X25519PrivateKey.from_private_bytes(bytes([seed % 256]) * 32)
    return private.public_key().public_bytes_raw()


def node_key(seed: int) -> bytes:
    """A SuperNode's P-384 public key, the 97-byte uncompressed point 0x04 || X || Y."""
    private = derive_private_key(seed + 1, SECP384R1())
    return private.public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint
    )


@pytest.fixture
def dataset(ledger: Ledger, owner: str) -> int:
    """A dataset (fee 0.01 ETH, 30-day grants, terms HMB|NCU) of ``owner``."""
    return ledger.register_dataset(
        "https://hospital.example/cohort.csv",
        content_hash(),
        fee_wei=ETHER // 100,
        grant_seconds=30 * 24 * 3600,
        terms="HMB|NCU",
        sender=owner,
    )


@pytest.fixture(scope="session")
def anvil() -> Iterator[AnvilNode]:
    """A real anvil node on its own loopback port and temp dir, stopped by PID."""
    require("anvil")
    home = tempfile.TemporaryDirectory(prefix="healthlab-home-")
    old = os.environ.get("HEALTHLAB_HOME")
    os.environ["HEALTHLAB_HOME"] = home.name
    node = AnvilNode().start()
    try:
        yield node
    finally:
        node.close()
        if old is None:
            os.environ.pop("HEALTHLAB_HOME", None)
        else:
            os.environ["HEALTHLAB_HOME"] = old
        home.cleanup()


#: Settings a test must not inherit from the developer's shell.
HEALTHLAB_SETTINGS = (
    "HEALTHLAB_RPC_URL",
    "HEALTHLAB_REGISTRY",
    "HEALTHLAB_PRIVATE_KEY",
    "HEALTHLAB_KEY_FILE",
    "HEALTHLAB_CHAIN_DIR",
    "HEALTHLAB_CHAIN_PORT",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HEALTHLAB_HOME and no HEALTHLAB_* settings from the environment."""
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path / "home"))
    for name in HEALTHLAB_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first, the rest in their order: on two workers
    (``make test``: ``-n 2 --dist loadfile``) one worker starts with the long
    property run while the other takes the files after it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _fresh_teaching_sites() -> Iterator[None]:
    """Each test starts with no ``{name: DataFrame}`` site remembered and an empty
    in-process query log: auditors and the log remember across calls within a
    test, not across tests."""
    from healthlab import sites

    sites._TEACHING.clear()
    sites._LOCAL_LOG.clear()
    yield
    sites._TEACHING.clear()
    sites._LOCAL_LOG.clear()
