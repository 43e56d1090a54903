"""What only a development chain can do — mine a block at a chosen time, and sign
for its published dev accounts — behind one interface with two backends: the
embedded chain (eth-tester and py-evm, in this process) and a node that speaks
anvil's/Hardhat's ``evm_*`` calls. :class:`~healthlab.ledger.Ledger` asks its
backend instead of branching on the provider."""

from __future__ import annotations

from functools import cache
from typing import Any, Protocol

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from healthlab import errors
from healthlab.ledger.keys import account_from_key

__all__ = [
    "ANVIL_CHAIN_ID",
    "ANVIL_MNEMONIC",
    "DevChain",
    "EmbeddedChain",
    "NodeChain",
    "dev_chain",
]

#: anvil's default chain id and the public test mnemonic its dev accounts come from.
ANVIL_CHAIN_ID = 31337
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"


class DevChain(Protocol):
    """A chain's development operations."""

    def next_block_time(self) -> int | None:
        """The earliest time the next block can have (None: any later one)."""

    def mine(self, timestamp: int | None) -> None:
        """Mine one block, at ``timestamp`` when given (checked by the caller)."""

    def dev_signer(self, address: str) -> LocalAccount | None:
        """The published key of a development account, or None."""


class EmbeddedChain:
    """eth-tester: blocks follow the wall clock at the least; its accounts' keys
    are the backend's."""

    def __init__(self, tester: Any) -> None:
        self.tester = tester

    def next_block_time(self) -> int:
        return int(self.tester.get_block_by_number("pending")["timestamp"])

    def mine(self, timestamp: int | None) -> None:
        if timestamp is not None:
            pending = self.next_block_time()
            if timestamp < pending:
                raise errors.InvalidInput(
                    f"the embedded chain's next block is at {pending} (it follows "
                    "the wall clock); pick that time or a later one"
                )
            if timestamp > pending:
                self.tester.time_travel(timestamp)  # mines a block at timestamp - 1 …
        self.tester.mine_blocks(1)  # … and this one at timestamp

    def dev_signer(self, address: str) -> LocalAccount | None:
        for key in self.tester.backend.account_keys:
            if key.public_key.to_checksum_address() == address:
                return account_from_key(
                    key.to_bytes(), source="the embedded chain's dev account"
                )
        return None


class NodeChain:
    """A node (anvil, Hardhat): ``evm_setNextBlockTimestamp`` and ``evm_mine``; on
    anvil's default chain id, its default accounts' published keys."""

    def __init__(self, w3: Web3, chain_id: int) -> None:
        self.w3 = w3
        self.chain_id = chain_id

    def next_block_time(self) -> None:
        return None

    def mine(self, timestamp: int | None) -> None:
        provider = self.w3.provider
        if timestamp is not None:
            provider.make_request(
                "evm_setNextBlockTimestamp",  # type: ignore[arg-type]
                [timestamp],
            )
        provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def dev_signer(self, address: str) -> LocalAccount | None:
        if self.chain_id != ANVIL_CHAIN_ID:
            return None
        return _anvil_dev_accounts().get(address)


def dev_chain(w3: Web3, chain_id: int) -> EmbeddedChain | NodeChain:
    """The development backend of ``w3``'s chain."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    return EmbeddedChain(tester) if tester is not None else NodeChain(w3, chain_id)


@cache
def _anvil_dev_accounts(count: int = 10) -> dict[str, LocalAccount]:
    Account.enable_unaudited_hdwallet_features()
    accounts = (
        Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        for i in range(count)
    )
    return {a.address: a for a in accounts}
