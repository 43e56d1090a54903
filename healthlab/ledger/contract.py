"""What a client of any HealthLab contract does, written once.

:class:`ContractClient` holds one deployed contract: it sends a transaction signed
with a held key (or by the node, for its unlocked accounts) and turns a revert into
the contract's named error, calls views, reads events from a receipt and from the
node's logs, and pays out what the contract credits. It works on a
:class:`Connection`: a node, the keys this process holds for it and who sends by
default.

The registry's client (:class:`~healthlab.ledger.Ledger`) and the city score
oracle's (:class:`~healthlab.oracle.OracleClient`) *are* contract clients, so they
subclass :class:`ContractClient` and add their contract's operations; each names
its artifact (:attr:`ContractClient.artifact`), its error classes
(:meth:`ContractClient.revert_error`) and the enum of its ``status`` arguments
(:attr:`ContractClient.status_type`). The connection is *composed*, not inherited:
it belongs to no one contract, and an oracle client rides on a ledger's (the same
node, keys and default sender, shared by reference), so both hold one object.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import cache, cached_property
from typing import Any, ClassVar

from eth_abi.abi import decode as abi_decode
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    ContractPanicError,
    TimeExhausted,
)
from web3.logs import DISCARD

from healthlab import errors
from healthlab.ledger.artifacts import load_artifact
from healthlab.ledger.devchain import DevChain, dev_chain
from healthlab.ledger.reverts import ErrorTable, error_table, revert_data, rpc_errors

__all__ = [
    "Connection",
    "ContractClient",
    "address_topic",
    "checked_address",
    "uint_topic",
]

#: What web3 (and eth-tester, in ``estimate_gas``) raise for a revert.
_REVERTS: tuple[type[Exception], ...] = (
    ContractCustomError,
    ContractLogicError,
    ContractPanicError,
)
try:
    from eth_tester.exceptions import TransactionFailed as _TesterFailed

    _REVERTS += (_TesterFailed,)
except ImportError:  # pragma: no cover - eth-tester is an optional runtime
    pass

Decoder = Callable[[Exception], Exception]


def uint_topic(value: int) -> str:
    """The log topic of an indexed ``uint`` argument."""
    return "0x" + int(value).to_bytes(32, "big").hex()


def address_topic(address: str) -> str:
    """The log topic of an indexed ``address`` argument."""
    return "0x" + bytes(12).hex() + address[2:].lower()


class Connection:
    """A node, the keys this process holds for it, and who sends by default.

    Several contract clients may share one; keys are never shown, only used.
    """

    def __init__(
        self,
        w3: Web3,
        *,
        signers: Iterable[LocalAccount] = (),
        rpc_url: str | None = None,
        default_sender: str | None = None,
    ) -> None:
        self.w3 = w3
        self.rpc_url = rpc_url
        self.default_sender = default_sender
        self._signers: dict[str, LocalAccount] = {a.address: a for a in signers}

    @property
    def own_accounts(self) -> list[str]:
        """The addresses of the keys this connection holds."""
        return list(self._signers)

    @cached_property
    def dev(self) -> DevChain:
        """This chain's development operations (mining, dev keys)."""
        return dev_chain(self.w3, int(self.w3.eth.chain_id))

    def rpc(self) -> AbstractContextManager[None]:
        """A context in which a lost node becomes
        :class:`~healthlab.errors.ChainUnreachable`."""
        return rpc_errors(self.rpc_url)

    def signer(self, address: str) -> LocalAccount | None:
        """The key held for ``address``: an environment key, or a development
        chain's published one (the embedded chain's, anvil's default accounts)."""
        return self._signers.get(address) or self.dev.dev_signer(address)

    def sender(self, sender: str | None) -> str:
        """``sender``, else the default sender, as a checksum address."""
        chosen = sender or self.default_sender
        if chosen is None:
            raise errors.InvalidInput(
                "say who sends this transaction: pass sender=<address> "
                "(for example ledger.accounts[1])"
            )
        return checked_address(chosen, "sender")

    def send(
        self,
        fn: Any,
        sender: str | None,
        *,
        value: int = 0,
        decode: Decoder,
        mined: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send a prepared call or constructor from ``sender``; return its receipt.

        Signed here with a held key, else by the node (its unlocked accounts). A
        revert becomes ``decode(exc)``, whether gas estimation meets it or the mined
        transaction failed (replayed on the state it met). ``mined`` is given the
        receipt first, a failed transaction's too (it paid for gas).
        """
        sender = self.sender(sender)
        tx: dict[str, Any] = {"from": sender, "value": int(value)}
        with self.rpc():
            try:
                gas = fn.estimate_gas(tx)
            except _REVERTS as exc:
                raise decode(exc) from None
            tx["gas"] = int(gas * 1.25) + 10_000
            signer = self._signers.get(sender)
            if signer is not None:
                tx["nonce"] = self.w3.eth.get_transaction_count(
                    Web3.to_checksum_address(sender), "pending"
                )
                built = fn.build_transaction(tx)
                raw = signer.sign_transaction(built).raw_transaction
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            else:
                tx_hash = fn.transact(tx)
            try:
                receipt = self.w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=120, poll_latency=0.01
                )
            except TimeExhausted as exc:
                raise errors.TransactionFailed(
                    f"transaction {tx_hash.to_0x_hex()} was not mined within 120 s; "
                    "check the node and look the transaction up later"
                ) from exc
        if mined is not None:
            mined(receipt)
        if receipt["status"] != 1:
            # Replay on the state the transaction met: after its block (a revert
            # changes nothing, so earlier transactions of the block are included),
            # then before it.
            for block in (receipt["blockNumber"], receipt["blockNumber"] - 1):
                if not hasattr(fn, "call"):  # a constructor: nothing to replay
                    break
                try:
                    fn.call(tx, block_identifier=block)
                except _REVERTS as exc:
                    raise decode(exc) from None
            raise errors.TransactionFailed(
                f"transaction {tx_hash.to_0x_hex()} failed (out of gas or reverted by "
                "state that changed in the same block); try again"
            )
        return receipt


@cache
def _errors_of(artifact: str) -> ErrorTable:
    return error_table(load_artifact(artifact)["abi"])


class ContractClient:
    """The client of one deployed HealthLab contract on a :class:`Connection`.

    Subclasses set :attr:`artifact` and :attr:`status_type` and may override
    :meth:`revert_error`; everything else — transactions, calls, revert decoding,
    events, logs, credits and withdrawals — is here.

    Parameters
    ----------
    connection:
        The node and keys to use (shared with other clients on the same node).
    address:
        The deployed contract.
    from_block:
        Where log scans start (the deployment block).
    """

    #: The contract's build artifact (``contracts/build/<artifact>.json``).
    artifact: ClassVar[str]
    #: The enum of the contract's ``status`` values (reverts decode them to it).
    status_type: ClassVar[type[enum.IntEnum] | None] = None

    def __init__(
        self, connection: Connection, address: str, *, from_block: int = 0
    ) -> None:
        self.connection = connection
        self.address = Web3.to_checksum_address(address)
        self.contract = connection.w3.eth.contract(
            address=self.address, abi=load_artifact(self.artifact)["abi"]
        )
        self.from_block = int(from_block)
        self.last_receipt: Any = None
        self._timestamps: dict[int, int] = {}

    @classmethod
    def deploy_contract(
        cls, connection: Connection, *args: Any, sender: str | None = None
    ) -> Any:
        """Deploy a new instance of :attr:`artifact` with constructor ``args`` from
        ``sender``; return the receipt (its ``contractAddress``, ``blockNumber``)."""
        built = load_artifact(cls.artifact)
        factory = connection.w3.eth.contract(
            abi=built["abi"], bytecode=built["bytecode"]
        )
        receipt = connection.send(
            factory.constructor(*args), sender, decode=cls.decode_revert
        )
        if receipt["contractAddress"] is None:
            raise errors.TransactionFailed(f"deploying {cls.artifact} failed")
        return receipt

    # ------------------------------------------------------------- connection
    @property
    def w3(self) -> Web3:
        """The web3 connection to the node."""
        return self.connection.w3

    @property
    def rpc_url(self) -> str | None:
        """The node's URL (``None``: the embedded chain)."""
        return self.connection.rpc_url

    @rpc_url.setter
    def rpc_url(self, url: str | None) -> None:
        self.connection.rpc_url = url

    @property
    def default_sender(self) -> str | None:
        """Who sends when ``sender`` is not given (the first environment key)."""
        return self.connection.default_sender

    @default_sender.setter
    def default_sender(self, sender: str | None) -> None:
        # the connection's: every client on it sends from the new default
        self.connection.default_sender = sender

    @cached_property
    def accounts(self) -> list[str]:
        """Addresses to send from: this client's keys, then the node's unlocked ones."""
        own = self.connection.own_accounts
        return own + [str(a) for a in self.w3.eth.accounts if a not in own]

    @property
    def chain_id(self) -> int:
        """The chain's id (31337 on anvil)."""
        return int(self.w3.eth.chain_id)

    def balance(self, address: str) -> int:
        """Ether balance of ``address`` in wei."""
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))

    def transaction(self, tx_hash: Any) -> Any:
        """A mined transaction, as the node serves it."""
        with self.connection.rpc():
            return self.w3.eth.get_transaction(tx_hash)

    def private_key(self, address: str) -> bytes | None:
        """The key this client holds for ``address`` (environment or development
        key), to open what was sealed to it; ``None`` without one. Never shown."""
        signer = self.connection.signer(checked_address(address))
        return None if signer is None else bytes(signer.key)

    def sign_typed_data(self, address: str, typed: dict[str, Any]) -> str:
        """Sign EIP-712 ``typed`` data as ``address``: with the key held for it, else
        by the node (``eth_signTypedData_v4``, as anvil's unlocked accounts allow)."""
        signer = self.connection.signer(address)
        if signer is not None:
            signed = signer.sign_message(encode_typed_data(full_message=typed))
            return "0x" + bytes(signed.signature).hex()
        message = {
            k: "0x" + v.hex() if isinstance(v, bytes) else v
            for k, v in typed["message"].items()
        }
        with self.connection.rpc():
            reply = self.w3.provider.make_request(
                "eth_signTypedData_v4",  # type: ignore[arg-type]
                [address, json.dumps(dict(typed, message=message))],
            )
        if "result" not in reply:
            raise errors.ConfigurationError(
                f"cannot sign as {address}: no key for it here and the node refused "
                "(set HEALTHLAB_PRIVATE_KEY or HEALTHLAB_KEY_FILE)"
            )
        return str(reply["result"])

    # ------------------------------------------------------------------- time
    def now(self) -> int:
        """Timestamp of the latest block (what the contract's view calls see)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def block_time(self, number: int) -> int:
        """Timestamp of block ``number`` (remembered)."""
        if number not in self._timestamps:
            self._timestamps[number] = int(self.w3.eth.get_block(number)["timestamp"])
        return self._timestamps[number]

    def mine(self, timestamp: int | None = None) -> int:
        """Mine a block, at ``timestamp`` if given (dev chains only); return its time.

        The embedded chain stamps blocks with the wall clock at the least, so a
        ``timestamp`` before its next block's time is refused rather than missed.
        """
        if timestamp is not None and timestamp <= self.now():
            raise errors.InvalidInput(
                f"the chain is at {self.now()}; a new block needs a later timestamp"
            )
        self.connection.dev.mine(timestamp)
        mined = self.now()
        if timestamp is not None and mined != timestamp:
            raise errors.TransactionFailed(
                f"the node mined at {mined} instead of {timestamp}"
            )
        return mined

    def advance_time(self, seconds: int) -> int:
        """Move the chain's clock forward by at least ``seconds`` (dev chains only)."""
        if seconds < 1:
            raise errors.InvalidInput("advance the clock by at least one second")
        target = self.now() + int(seconds)
        earliest = self.connection.dev.next_block_time()  # embedded: the wall clock
        return self.mine(target if earliest is None else max(target, earliest))

    # ------------------------------------------------------ transactions, calls
    def transact(
        self,
        fn: Any,
        sender: str | None = None,
        *,
        value: int = 0,
        decode: Decoder | None = None,
    ) -> Any:
        """Send a prepared call (``client.contract.functions.X(...)``, or another
        contract's); return its receipt, also kept as :attr:`last_receipt` (a
        failed transaction's too).

        Low level, no client-side checks: ``decode`` turns a revert into an
        exception (default: this contract's named errors, :meth:`decode_revert`).
        """
        return self.connection.send(
            fn,
            sender,
            value=value,
            decode=decode or self.decode_revert,
            mined=self._keep,
        )

    def _keep(self, receipt: Any) -> None:
        self.last_receipt = receipt

    def call(self, fn: Any, decode: Decoder | None = None) -> Any:
        """Call a prepared view on this node; a revert becomes the error ``decode``
        makes of it (by default this contract's named error)."""
        with self.connection.rpc():
            try:
                return fn.call()
            except _REVERTS as exc:
                raise (decode or self.decode_revert)(exc) from None

    @classmethod
    def revert_error(cls, name: str, values: dict[str, Any]) -> errors.ContractError:
        """The exception of the contract's custom error ``name`` (``"revert"``: one
        without a known custom error). Default: :mod:`healthlab.errors`' classes."""
        return errors.contract_error(name, values)

    @classmethod
    def decode_revert(cls, exc: Exception) -> errors.ContractError:
        """The named error of a revert, with its decoded arguments."""
        data = revert_data(exc)
        if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
            found = _errors_of(cls.artifact).get(data[2:10])
            if found is not None:
                name, types, names = found
                values = abi_decode(types, bytes.fromhex(data[10:]))
                return cls.revert_error(
                    name,
                    {
                        k: cls._argument(k, t, v)
                        for k, t, v in zip(names, types, values, strict=True)
                    },
                )
        return cls.revert_error("revert", {"reason": str(exc)})

    @classmethod
    def _argument(cls, name: str, kind: str, value: Any) -> Any:
        if name == "status" and cls.status_type is not None:
            return cls.status_type(value)
        if kind == "address":
            return Web3.to_checksum_address(value)
        return value

    # ----------------------------------------------------------------- events
    def receipt_event(self, receipt: Any, name: str) -> Any:
        """The arguments of the first ``name`` event this contract logged in
        ``receipt``."""
        logs = getattr(self.contract.events, name)().process_receipt(
            receipt, errors=DISCARD
        )
        if not logs:
            raise errors.TransactionFailed(f"no {name} event in transaction receipt")
        return logs[0]["args"]

    @cached_property
    def event_abis(self) -> dict[str, dict[str, Any]]:
        """The contract's events by topic 0 (the hash of their signature)."""
        out = {}
        for item in self.contract.abi:
            if item["type"] == "event":
                types = ",".join(i["type"] for i in item["inputs"])
                topic = "0x" + keccak(text=f"{item['name']}({types})").hex()
                out[topic] = dict(item)
        return out

    def logs(
        self,
        *,
        events: Iterable[str] | None = None,
        topics: Sequence[Any] = (),
        from_block: int | None = None,
        to_block: int | str = "latest",
    ) -> list[Any]:
        """This contract's decoded logs, oldest first.

        ``events`` names the kinds (default every one); ``topics`` filters the
        indexed arguments in order (topic 1, 2, …: see :func:`uint_topic`,
        :func:`address_topic`; ``None`` for any); blocks from ``from_block``
        (default the deployment block) to ``to_block``.
        """
        abis = self.event_abis
        wanted = None if events is None else set(events)
        if wanted == set():
            return []  # an empty topic list would match every event
        unknown = sorted((wanted or set()) - {a["name"] for a in abis.values()})
        if unknown:
            raise errors.InvalidInput(
                f"{self.artifact} has no event {', '.join(unknown)}; it has "
                f"{', '.join(sorted({a['name'] for a in abis.values()}))}"
            )
        first = [t for t, a in abis.items() if wanted is None or a["name"] in wanted]
        params = {
            "address": self.address,
            "fromBlock": self.from_block if from_block is None else int(from_block),
            "toBlock": to_block,
            "topics": [first, *topics],
        }
        with self.connection.rpc():
            raw = self.w3.eth.get_logs(params)  # type: ignore[arg-type]
        decoded = []
        for entry in raw:
            abi = abis.get(entry["topics"][0].to_0x_hex())
            if abi is not None:
                event = getattr(self.contract.events, abi["name"])
                decoded.append(event().process_log(entry))
        return decoded

    # --------------------------------------------------------------- payments
    def credit(self, address: str) -> int:
        """Wei credited to ``address`` on this contract and withdrawable now
        (earnings or refunds)."""
        return int(self.call(self.contract.functions.credits(checked_address(address))))

    def withdraw(self, *, sender: str | None = None, to: str | None = None) -> int:
        """Pay out what is credited to ``sender`` (to ``to`` if given); return wei."""
        if to is None:
            fn = self.contract.functions.withdraw()
        else:
            fn = self.contract.functions.withdrawTo(checked_address(to, "to"))
        receipt = self.transact(fn, sender)
        return int(self.receipt_event(receipt, "Withdrawal")["amount"])


def checked_address(value: str, name: str = "address") -> str:
    """``value`` as a checksum address; :class:`~healthlab.errors.InvalidInput`
    naming ``name`` (never the value) when it is not an address."""
    if not isinstance(value, str) or not Web3.is_address(value):
        raise errors.InvalidInput(
            f"{name} must be an Ethereum address (0x + 40 hex digits)"
        )
    return str(Web3.to_checksum_address(value))
