"""``healthlab.Ledger``: the Python client of the HealthLab registry contract."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3

from healthlab import errors
from healthlab.dp import PrivacyBudget
from healthlab.ledger import deployments
from healthlab.ledger.codes import Codes, as_codes, code_names
from healthlab.ledger.contract import (
    Connection,
    ContractClient,
    address_topic,
    checked_address,
    uint_topic,
)
from healthlab.ledger.keys import account_from_key
from healthlab.ledger.records import (
    Access,
    Dataset,
    LoggedQuery,
    PrivacySpend,
    Request,
    SiteKeys,
    Status,
)
from healthlab.ledger.reverts import CONNECTION_ERRORS
from healthlab.ledger.signing import (
    SignedQuery,
    query_typed_data,
    transaction_public_key,
)

__all__ = ["DEFAULT_GRANT_SECONDS", "DEFAULT_REQUEST_TIMEOUT", "Ledger", "sha256_of"]

DEFAULT_GRANT_SECONDS = 30 * 24 * 3600
DEFAULT_REQUEST_TIMEOUT = 7 * 24 * 3600
_DECISIONS = (
    "AccessGranted",
    "AccessDeclined",
    "RequestCancelled",
    "AccessRevoked",
    "DownloadRefunded",
)
#: The events indexed by a request id first.
_OF_REQUEST = (
    "AccessRequested",
    *_DECISIONS,
    "ResultRecorded",
    "KeyReleased",
    "FeePaid",
)
_FINAL = {
    "AccessGranted": Status.APPROVED,
    "AccessDeclined": Status.DECLINED,
    "RequestCancelled": Status.CANCELLED,
    "AccessRevoked": Status.REVOKED,
    "DownloadRefunded": Status.CANCELLED,
}


def sha256_of(data: bytes | str | os.PathLike[str]) -> str:
    """The ``0x``-prefixed sha256 of bytes or of a file's content (the content hash)."""
    digest = hashlib.sha256()
    if isinstance(data, bytes):
        digest.update(data)
    else:
        with open(data, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "0x" + digest.hexdigest()


@dataclass(frozen=True)
class Purpose:
    """A free-text purpose and the salt of its on-chain commitment (kept off chain)."""

    text: str
    salt: str

    @property
    def commitment(self) -> str:
        """``keccak256(salt ‖ utf-8 text)``: what goes on chain."""
        return "0x" + keccak(bytes.fromhex(self.salt[2:]) + self.text.encode()).hex()

    @classmethod
    def new(cls, text: str) -> Purpose:
        """Commit to ``text`` with a fresh 128-bit salt: the hash cannot be guessed."""
        if not text or not text.strip():
            raise errors.InvalidInput("state the purpose of your study in a few words")
        return cls(text=text, salt="0x" + secrets.token_hex(16))


class Ledger(ContractClient):
    """A connection to the HealthLab registry on an EVM chain.

    Use :meth:`local` for the embedded chain (tests, teaching, a single notebook) and
    :meth:`connect` for a node (anvil, a testnet, a consortium chain). Sending,
    calls, revert decoding (into :mod:`healthlab.errors`), events, logs, credits,
    withdrawals and the dev-chain clock are the
    :class:`~healthlab.ledger.contract.ContractClient`'s; this class adds the
    registry's operations. Other contracts' clients share its :attr:`connection`
    (e.g. :class:`~healthlab.oracle.OracleClient`).

    Examples
    --------
    >>> ledger = Ledger.local()
    >>> owner, researcher = ledger.accounts[1], ledger.accounts[2]
    >>> ds = ledger.register_dataset(
    ...     "ipfs://bafy…",
    ...     "0x" + "11" * 32,
    ...     fee_wei=10**15,
    ...     terms="HMB|NCU",
    ...     sender=owner,
    ... )
    >>> req = ledger.request_access(
    ...     ds, purpose="CVD risk", codes="HMB|NCU", sender=researcher
    ... )
    >>> ledger.approve(req, sender=owner)
    ... ledger.has_access(ds, researcher)
    True
    """

    artifact = "HealthLabRegistry"
    status_type = Status

    def __init__(
        self,
        w3: Web3,
        registry_address: str,
        *,
        signers: Sequence[LocalAccount] = (),
        rpc_url: str | None = None,
        from_block: int = 0,
        default_sender: str | None = None,
    ) -> None:
        connection = Connection(
            w3, signers=signers, rpc_url=rpc_url, default_sender=default_sender
        )
        super().__init__(connection, registry_address, from_block=from_block)
        self._purposes: dict[int, Purpose] = {}

    # ----------------------------------------------------------- construction
    @classmethod
    def local(
        cls, *, request_timeout: int = DEFAULT_REQUEST_TIMEOUT, accounts: int = 10
    ) -> Ledger:
        """Start the embedded chain (eth-tester, py-evm) and deploy the registry.

        Its ``accounts`` are funded with 1,000,000 ether each and unlocked; nothing
        outside this Python process can see this chain.
        """
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider

        backend = PyEVMBackend(
            genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts)
        )
        w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
        address, block = deploy_registry(w3, w3.eth.accounts[0], request_timeout)
        return cls(w3, address, from_block=block)

    @classmethod
    def connect(
        cls,
        rpc_url: str | None = None,
        registry_address: str | None = None,
        *,
        request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
        deploy: bool = True,
        new: bool = False,
        timeout: float = 10.0,
    ) -> Ledger:
        """Use an EVM JSON-RPC node.

        Parameters
        ----------
        rpc_url:
            The node, e.g. ``http://127.0.0.1:8545``; default ``$HEALTHLAB_RPC_URL``.
        registry_address:
            The deployed registry; defaults to ``$HEALTHLAB_REGISTRY``, then to the
            address recorded for this chain in ``$HEALTHLAB_HOME/deployments.json``.
            When none is known the registry is deployed (unless ``deploy=False``) and
            recorded there; ``new=True`` always deploys a new one (``healthlab
            deploy``).

        Keys come from ``$HEALTHLAB_PRIVATE_KEY`` or ``$HEALTHLAB_KEY_FILE`` (one hex
        key per line), never from arguments; accounts the node has unlocked (anvil's
        dev accounts) are usable as senders too.
        """
        url = rpc_url or os.environ.get("HEALTHLAB_RPC_URL")
        if not url:
            raise errors.ConfigurationError(
                "no node given: pass rpc_url or set HEALTHLAB_RPC_URL "
                "(for example http://127.0.0.1:8545 after `make node`), "
                "or use Ledger.local() for the embedded chain"
            )
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
        try:
            chain_id = w3.eth.chain_id
            genesis = w3.eth.get_block(0)["hash"]
        except (*CONNECTION_ERRORS, requests.exceptions.Timeout, OSError) as exc:
            raise errors.ChainUnreachable(
                f"cannot reach an Ethereum node at {url} ({type(exc).__name__}); "
                "start one with `make node` or check HEALTHLAB_RPC_URL"
            ) from exc
        signers = _signers_from_env()
        default = signers[0].address if signers else None
        key = deployments.chain_key(chain_id, genesis)
        address = (
            None if new else (registry_address or os.environ.get("HEALTHLAB_REGISTRY"))
        )
        from_block = 0
        if address is None and not new:
            record = deployments.lookup(key)
            if record and w3.eth.get_code(Web3.to_checksum_address(record["address"])):
                address, from_block = record["address"], int(record["block"])
        elif address is not None and not w3.eth.get_code(
            Web3.to_checksum_address(address)
        ):
            raise errors.ConfigurationError(
                f"no contract at {address} on {url}; deploy one with "
                "`healthlab deploy --rpc-url …` or unset HEALTHLAB_REGISTRY"
            )
        if address is None:
            if not deploy:
                raise errors.ConfigurationError(
                    f"no registry is recorded for the chain at {url}; pass "
                    "registry_address or deploy one with `healthlab deploy`"
                )
            deployer = default or _first_node_account(w3, url)
            address, from_block = deploy_registry(
                w3, deployer, request_timeout, signer=signers[0] if signers else None
            )
            deployments.record(key, address, from_block, url)
        return cls(
            w3,
            address,
            signers=signers,
            rpc_url=url,
            from_block=from_block,
            default_sender=default,
        )

    # ---------------------------------------------------------------- datasets
    def register_dataset(
        self,
        uri: str,
        content_hash: str | bytes,
        *,
        fee_wei: int = 0,
        grant_seconds: int = DEFAULT_GRANT_SECONDS,
        terms: Codes | int | str | Iterable[str] = Codes.GRU,
        auto_approve: bool = False,
        sender: str | None = None,
    ) -> int:
        """Register a dataset and return its id.

        Parameters
        ----------
        uri:
            Where the content lives: ``https://…`` or ``ipfs://CID``.
        content_hash:
            sha256 of the content (see :func:`sha256_of`), 32 bytes or 64 hex digits.
        fee_wei:
            What each request pays into escrow.
        grant_seconds:
            How long an approved grant lasts.
        terms:
            Permitted purposes and requirements, e.g. ``"HMB|NCU|IRB"``.
        auto_approve:
            Grant requests whose codes satisfy the terms in the same transaction.
        """
        fn = self.contract.functions.registerDataset(
            uri,
            _bytes32(content_hash, "content_hash"),
            _uint(fee_wei, "fee_wei"),
            _uint(grant_seconds, "grant_seconds", bits=32),
            int(as_codes(terms)),
            bool(auto_approve),
        )
        receipt = self.transact(fn, sender)
        return int(self.receipt_event(receipt, "DatasetRegistered")["datasetId"])

    def update_dataset(
        self,
        dataset_id: int,
        *,
        fee_wei: int | None = None,
        grant_seconds: int | None = None,
        terms: Codes | int | str | Iterable[str] | None = None,
        auto_approve: bool | None = None,
        sender: str | None = None,
    ) -> Dataset:
        """Change fee, grant duration, terms or auto-approval; return the new record."""
        d = self.dataset(dataset_id)
        fn = self.contract.functions.updateDataset(
            dataset_id,
            _uint(d.fee_wei if fee_wei is None else fee_wei, "fee_wei"),
            _uint(
                d.grant_seconds if grant_seconds is None else grant_seconds,
                "grant_seconds",
                32,
            ),
            int(d.terms if terms is None else as_codes(terms)),
            d.auto_approve if auto_approve is None else bool(auto_approve),
        )
        self.transact(fn, sender)
        return self.dataset(dataset_id)

    def set_active(
        self, dataset_id: int, active: bool, *, sender: str | None = None
    ) -> None:
        """Open or close (``active=False``) a dataset; closed ones grant no access."""
        self.transact(
            self.contract.functions.setActive(dataset_id, bool(active)), sender
        )

    def deactivate(self, dataset_id: int, *, sender: str | None = None) -> None:
        """Close a dataset: no access, no new requests, pending ones cancellable now."""
        self.set_active(dataset_id, False, sender=sender)

    def dataset(self, dataset_id: int) -> Dataset:
        """The dataset's record."""
        raw = self.call(self.contract.functions.getDataset(dataset_id))
        owner, fee, grant, terms, auto, active, pending, cap, downloads = raw[:9]
        content_hash, pointer = raw[9:]
        return Dataset(
            id=int(dataset_id),
            owner=owner,
            pointer=pointer,
            content_hash="0x" + bytes(content_hash).hex(),
            fee_wei=int(fee),
            grant_seconds=int(grant),
            terms=Codes(terms),
            auto_approve=bool(auto),
            active=bool(active),
            pending=int(pending),
            max_pending=int(cap),
            downloads_open=int(downloads),
        )

    def set_max_pending(
        self, dataset_id: int, max_pending: int, *, sender: str | None = None
    ) -> Dataset:
        """Cap the requests that may wait for the owner's decision (owner only; at
        least 1). A request over the cap is refused with
        :class:`~healthlab.errors.TooManyPending` and pays nothing."""
        fn = self.contract.functions.setMaxPending(
            dataset_id, _uint(max_pending, "max_pending", bits=16)
        )
        self.transact(fn, sender)
        return self.dataset(dataset_id)

    def datasets(self) -> pd.DataFrame:
        """All datasets as a table, one row per dataset (the catalogue)."""
        count = int(self.call(self.contract.functions.datasetCount()))
        rows = [self.dataset(i).__dict__ for i in range(1, count + 1)]
        frame = pd.DataFrame(rows, columns=list(Dataset.__dataclass_fields__))
        frame["terms"] = frame["terms"].map(code_names)
        return frame.set_index("id")

    # --------------------------------------------------------------- site keys
    def bind_site_keys(
        self,
        dataset_id: int,
        mask_key: bytes,
        node_key: bytes,
        *,
        sender: str | None = None,
    ) -> SiteKeys:
        """Bind the public keys of the site that holds a dataset (owner only).

        Peers can then check a site's keys against the chain, so a server that
        substitutes one (to unmask that site's totals in a secure sum) is caught.
        Binding again replaces both keys (rotation): :meth:`site_keys` reads the latest
        binding. Only public keys go on chain.

        Parameters
        ----------
        dataset_id:
            The dataset; anyone but its owner is refused with
            :class:`~healthlab.errors.NotDatasetOwner`.
        mask_key:
            The site's X25519 public key, 32 raw bytes (``Site.mask_public_key``).
        node_key:
            Its Flower SuperNode's ECDSA P-384 public key as the 97-byte uncompressed
            point ``0x04 || X || Y``, i.e.
            ``key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)``.

        Returns
        -------
        SiteKeys
            What this transaction bound, with its block time.

        Examples
        --------
        >>> keys = ledger.bind_site_keys(ds, site.mask_public_key, node, sender=owner)
        >>> ledger.site_keys(ds) == keys
        True
        """
        fn = self.contract.functions.bindSiteKeys(
            dataset_id, _mask_key(mask_key), _node_key(node_key)
        )
        receipt = self.transact(fn, sender)
        bound = self.receipt_event(receipt, "SiteKeysBound")
        return SiteKeys(
            dataset_id=int(dataset_id),
            mask_key=bytes(bound["maskKey"]),
            node_key=bytes(bound["nodeKey"]),
            bound_at=self.block_time(receipt["blockNumber"]),
        )

    def site_keys(self, dataset_id: int) -> SiteKeys | None:
        """The site keys the owner of ``dataset_id`` bound last, verified.

        The mask key and the node key's keccak256 are read from the registry's storage;
        the node key itself from the latest ``SiteKeysBound`` log whose key hashes to
        the stored hash. ``None`` when no keys were bound (or there is no such dataset).
        When no log matches, :class:`~healthlab.errors.SiteKeysUnverified` is raised:
        an unverified key is never returned.
        """
        fn = self.contract.functions.siteKeys(dataset_id)
        mask_key, node_key_hash, bound_at = self.call(fn)
        if bytes(mask_key) == bytes(32):  # the contract never binds a zero mask key
            return None
        stored = bytes(node_key_hash)
        # Only the hash is trusted: the node that serves the logs could alter them.
        for entry in reversed(self._logs(event="SiteKeysBound", dataset_id=dataset_id)):
            node_key = bytes(entry["args"]["nodeKey"])
            if keccak(node_key) == stored:
                return SiteKeys(
                    int(dataset_id), bytes(mask_key), node_key, int(bound_at)
                )
        raise errors.SiteKeysUnverified(
            f"no SiteKeysBound log from block {self.from_block} on holds the node key "
            f"bound to dataset {dataset_id} (keccak256 0x{stored.hex()}): the node's "
            "logs are incomplete or altered, or this client reads logs from after the "
            "binding. No keys were returned: use a node you trust, from the registry's "
            "deployment block"
        )

    # ---------------------------------------------------------------- requests
    def request_access(
        self,
        dataset_id: int,
        purpose: str,
        codes: Codes | int | str | Iterable[str],
        *,
        fee_wei: int | None = None,
        grant_seconds: int | None = None,
        download: bool = False,
        sender: str | None = None,
    ) -> int:
        """Request access and pay the fee into escrow; return the request id.

        ``download=True`` (or ``Codes.DL`` among the codes) asks for a download grant:
        once approved, the owner releases the dataset's key to you
        (:func:`healthlab.storage.download`). A compute-only dataset refuses it with
        :class:`~healthlab.errors.DownloadNotPermitted` and nothing is paid.

        ``purpose`` never goes on chain in clear: a salted hash is recorded, and the
        text and salt are sealed to the owner's public key (recovered from the
        dataset's registration) and sent as call data, so the owner's inbox reads them
        (:meth:`sealed_purpose`) and checks them against the hash; this client keeps
        them too (:meth:`purpose_of`). An owner without a key (a contract) gets the
        hash only. ``fee_wei``
        is the fee you agree to pay; by default the fee read from the chain now. If the
        owner changes it before your transaction is mined,
        :class:`~healthlab.errors.FeeChanged` is raised and nothing is paid.
        ``grant_seconds`` is the grant duration you agree to, likewise (by default
        the dataset's now; :class:`~healthlab.errors.GrantDurationChanged` if the
        owner changes it first): an approved grant lasts exactly that long, whatever
        the owner sets later.
        """
        commitment = Purpose.new(purpose)
        record = self.dataset(dataset_id)
        agreed = record.fee_wei if fee_wei is None else fee_wei
        seconds = record.grant_seconds if grant_seconds is None else grant_seconds
        sealed = self._seal_purpose(
            commitment, dataset_id, self.connection.sender(sender)
        )
        fn = self.contract.functions.requestAccess(
            dataset_id,
            _uint(agreed, "fee_wei"),
            _uint(seconds, "grant_seconds", bits=32),
            int(as_codes(codes) | (Codes.DL if download else Codes(0))),
            bytes.fromhex(commitment.commitment[2:]),
            sealed,
        )
        receipt = self.transact(fn, sender, value=agreed)
        request_id = int(self.receipt_event(receipt, "AccessRequested")["requestId"])
        self._purposes[request_id] = commitment
        return request_id

    def owner_public_key(self, dataset_id: int) -> bytes | None:
        """The owner's 64-byte public key, recovered from the signature of the
        transaction that registered ``dataset_id`` — or ``None`` when the owner did
        not send it (a contract owner has no key)."""
        from healthlab.storage.envelope import address_of

        owner = self.dataset(dataset_id).owner  # storage, not the log a node serves
        found = self._logs(event="DatasetRegistered", dataset_id=dataset_id)
        for entry in found:
            tx = self.transaction(entry["transactionHash"])
            if str(tx.get("to") or "").lower() != self.address.lower():
                continue  # not a call to this registry
            key = transaction_public_key(tx)  # the signature's, checked against from
            if address_of(key).lower() == owner.lower():
                return key
        return None

    def _purpose_context(self, dataset_id: int, researcher: str) -> bytes:
        """What a sealed purpose is bound to: chain, registry, dataset, researcher."""
        return (
            b"healthlab purpose v1|"
            + self.chain_id.to_bytes(8, "big")
            + bytes.fromhex(self.address[2:])
            + int(dataset_id).to_bytes(32, "big")
            + bytes.fromhex(checked_address(researcher, "researcher")[2:])
        )

    def _seal_purpose(
        self, purpose: Purpose, dataset_id: int, researcher: str
    ) -> bytes:
        from healthlab.storage.envelope import MAX_MESSAGE, seal_message

        key = self.owner_public_key(dataset_id)
        if key is None:
            return b""
        message = json.dumps({"text": purpose.text, "salt": purpose.salt}).encode()
        if len(message) > MAX_MESSAGE:
            raise errors.InvalidInput(
                f"the purpose is too long to seal for the owner ({len(message)} bytes "
                f"with its salt, at most {MAX_MESSAGE}): say it in fewer words"
            )
        return seal_message(
            message, key, context=self._purpose_context(dataset_id, researcher)
        )

    def sealed_purpose(self, request_id: int, *, owner: str) -> Purpose | None:
        """The purpose text and salt a request sealed to its dataset's owner, opened
        with ``owner``'s key (held by this client) and checked against the hash on
        chain; ``None`` when the request carries none.

        Raises :class:`~healthlab.errors.PurposeUnverified` when the sealed text is
        not what the request committed to on chain (or does not open), and
        :class:`~healthlab.errors.ConfigurationError` without ``owner``'s key.
        """
        from healthlab.storage.envelope import open_message
        from healthlab.storage.errors import StorageError

        created = self._logs(event="AccessRequested", request_id=request_id)
        if not created:
            raise errors.UnknownRequest("UnknownRequest", {"requestId": request_id})
        # read the request from the researcher's signed transaction, not from logs a
        # node could rewrite: its signature must be the researcher's, sent to this
        # registry, for this dataset
        args = created[0]["args"]
        tx = self.transaction(created[0]["transactionHash"])
        signed = self._signed_request(tx, args["researcher"], args["datasetId"])
        if signed is None:
            raise errors.PurposeUnverified(
                f"request {request_id}'s transaction is not the researcher's signed "
                "request to this registry (the node serving it altered it?): ask the "
                "researcher for the purpose, and use a node you trust"
            )
        purpose_hash, envelope = signed
        if not envelope:
            return None
        req = {**args, "purposeHash": purpose_hash}
        found = [{"args": {"envelope": envelope}}]
        key = self.private_key(owner)
        if key is None:
            raise errors.ConfigurationError(
                f"this client holds no key for {owner}: read sealed purposes as the "
                "dataset's owner (HEALTHLAB_PRIVATE_KEY or HEALTHLAB_KEY_FILE)"
            )
        context = self._purpose_context(req["datasetId"], req["researcher"])
        try:
            opened = json.loads(
                open_message(bytes(found[0]["args"]["envelope"]), key, context=context)
            )
            purpose = Purpose(text=str(opened["text"]), salt=str(opened["salt"]))
            committed = "0x" + bytes(req["purposeHash"]).hex()
            matches = purpose.commitment == committed
        except (StorageError, ValueError, KeyError, TypeError):
            matches = False
        if not matches:
            raise errors.PurposeUnverified(
                f"the purpose sealed with request {request_id} does not open for "
                f"{owner}, or is not the text its hash on chain commits to: ask the "
                "researcher for the purpose, and check it with verify_purpose()"
            )
        return purpose

    def _signed_request(
        self, tx: Any, researcher: str, dataset_id: int
    ) -> tuple[bytes, bytes] | None:
        """The purpose hash and sealed purpose of ``tx`` when it is ``researcher``'s
        signed ``requestAccess`` of ``dataset_id`` on this registry, else None."""
        from healthlab.storage.envelope import address_of

        if str(tx.get("to") or "").lower() != self.address.lower():
            return None
        try:
            signer = address_of(transaction_public_key(tx))
            fn, values = self.contract.decode_function_input(tx["input"])
        except (errors.HealthLabError, ValueError):
            return None
        if signer.lower() != str(researcher).lower() or fn.fn_name != "requestAccess":
            return None
        if int(values["datasetId"]) != int(dataset_id):
            return None
        return bytes(values["purposeHash"]), bytes(values["sealedPurpose"])

    def purpose_of(self, request_id: int) -> Purpose:
        """The purpose text and salt of a request made from this client."""
        try:
            return self._purposes[request_id]
        except KeyError:
            raise errors.InvalidInput(
                f"request {request_id} was not made from this client; ask its "
                "researcher for the purpose text and salt; check them with "
                "verify_purpose()"
            ) from None

    def verify_purpose(self, request_id: int, text: str, salt: str) -> bool:
        """Whether ``text`` and ``salt`` are what ``request_id`` committed to."""
        return Purpose(text, salt).commitment == self.request(request_id).purpose_hash

    def approve(self, request_id: int, *, sender: str | None = None) -> Request:
        """Approve a pending request (owner only), for the grant duration the
        researcher paid for. A compute grant's fee is paid to the owner in the same
        transaction; a download grant's fee waits in escrow for :meth:`release_key`."""
        req = self._request_event(request_id)
        fn = self.contract.functions.approve(
            req["datasetId"], req["researcher"], request_id
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def decline(self, request_id: int, *, sender: str | None = None) -> Request:
        """Decline a pending request (owner only); the researcher gets a refund."""
        req = self._request_event(request_id)
        fn = self.contract.functions.decline(
            req["datasetId"], req["researcher"], request_id
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def cancel(self, request_id: int, *, sender: str | None = None) -> Request:
        """Cancel your unanswered request after the timeout; you get a refund."""
        req = self._request_event(request_id)
        self.transact(
            self.contract.functions.cancel(req["datasetId"], request_id), sender
        )
        return self.request(request_id)

    def revoke(
        self, dataset_id: int, researcher: str, *, sender: str | None = None
    ) -> None:
        """Revoke a researcher's live grant at once (owner only)."""
        who = checked_address(researcher, "researcher")
        self.transact(self.contract.functions.revoke(dataset_id, who), sender)

    # ------------------------------------------------------------- key release
    def release_key(
        self, request_id: int, envelope: bytes, *, sender: str | None = None
    ) -> str:
        """Publish a wrapped data key for a live download grant (owner only).

        ``envelope`` is the data key encrypted to the researcher's public key (see
        :func:`healthlab.storage.release_key`, which builds it); it is only logged,
        as ``KeyReleased``. Returns the transaction hash. A revoked or expired grant
        (:class:`~healthlab.errors.NoActiveGrant`), a compute grant
        (:class:`~healthlab.errors.NotADownloadGrant`) or a dataset that no longer
        allows downloads (:class:`~healthlab.errors.DownloadNotPermitted`) is refused.
        The first release pays the owner the grant's escrowed fee.
        """
        req = self._request_event(request_id)
        # a release mined after the researcher's refund completes reverts, but its
        # envelope is public all the same: do not send one that could land that late
        deadline = int(self.call(self.contract.functions.refundableAt(request_id)))
        if deadline and self.now() + RELEASE_MARGIN >= deadline:
            raise errors.ReleaseTooLate(
                f"the researcher's refund of request {request_id} completes at "
                f"{deadline} (chain time), within {RELEASE_MARGIN} s: a key released "
                "now could be mined after it and reach the researcher unpaid. Nothing "
                "was sent; refund the grant instead (refund_download)"
            )
        fn = self.contract.functions.releaseKey(
            req["datasetId"], req["researcher"], request_id, bytes(envelope)
        )
        receipt = self.transact(fn, sender)
        return str(receipt["transactionHash"].to_0x_hex())

    def request_download_refund(
        self, request_id: int, *, sender: str | None = None
    ) -> int:
        """Ask for your download grant's fee back (its key did not come within the
        request timeout of the approval, or the grant is no longer live); return
        when the refund may complete (:meth:`refund_download`). Until then the owner
        may still release the key, and is paid: a refund never races a release."""
        req = self._request_event(request_id)
        fn = self.contract.functions.requestDownloadRefund(req["datasetId"], request_id)
        receipt = self.transact(fn, sender)
        return int(
            self.receipt_event(receipt, "DownloadRefundRequested")["refundableAt"]
        )

    def refund_download(self, request_id: int, *, sender: str | None = None) -> Request:
        """End a download grant whose key was not released; its fee is credited back
        to the researcher (:meth:`withdraw`). The researcher may once the grace after
        :meth:`request_download_refund` has passed; the owner may at any time. Too
        early: :class:`~healthlab.errors.TooEarlyToRefund`; not asked:
        :class:`~healthlab.errors.RefundNotRequested`."""
        req = self._request_event(request_id)
        fn = self.contract.functions.refundDownload(
            req["datasetId"], req["researcher"], request_id
        )
        self.transact(fn, sender)
        return self.request(request_id)

    def key_envelope(self, request_id: int) -> bytes | None:
        """The latest key envelope released for ``request_id``, or ``None``."""
        found = self._logs(event="KeyReleased", request_id=request_id)
        return bytes(found[-1]["args"]["envelope"]) if found else None

    def requester_public_key(self, request_id: int) -> bytes:
        """The 64-byte public key of whoever sent ``request_id``'s transaction.

        Recovered from the request transaction's signature and checked against its
        sender, so an owner can encrypt to the researcher without asking for a key.
        """
        req = self.request(request_id)
        return transaction_public_key(self.transaction(req.request_tx))

    def has_access(self, dataset_id: int, researcher: str) -> bool:
        """Whether ``researcher`` holds an approved, unexpired, unrevoked grant now."""
        who = checked_address(researcher, "researcher")
        return bool(self.call(self.contract.functions.hasAccess(dataset_id, who)))

    def access(self, dataset_id: int, researcher: str) -> Access:
        """The current request or grant of ``researcher`` on ``dataset_id``."""
        who = checked_address(researcher, "researcher")
        raw = self.call(self.contract.functions.getAccess(dataset_id, who))
        request_id, amount, created, expires, grant, status, download, released = raw
        state = Status(status)
        if state is Status.APPROVED and self.now() >= expires:
            state = Status.EXPIRED
        return Access(
            int(dataset_id),
            who,
            int(request_id),
            int(amount),
            int(created),
            int(expires),
            state,
            bool(download),
            int(grant),
            bool(released),
        )

    def request(self, request_id: int) -> Request:
        """A request's record and current status, with the transactions behind it."""
        logs = self._logs(request_id=request_id)
        created = next((e for e in logs if e["event"] == "AccessRequested"), None)
        if created is None:
            raise errors.UnknownRequest("UnknownRequest", {"requestId": request_id})
        args = created["args"]
        decisions = [e for e in logs if e["event"] in _DECISIONS]
        grant = next((e for e in decisions if e["event"] == "AccessGranted"), None)
        current = self.access(args["datasetId"], args["researcher"])
        if current.request_id == request_id:
            status = current.status
        else:
            status = _FINAL[decisions[-1]["event"]] if decisions else Status.NONE
            if status is Status.APPROVED:
                status = Status.EXPIRED
        return Request(
            id=int(request_id),
            dataset_id=int(args["datasetId"]),
            researcher=args["researcher"],
            codes=Codes(args["codes"]),
            purpose_hash="0x" + bytes(args["purposeHash"]).hex(),
            amount_wei=int(args["amount"]),
            status=status,
            created_at=self.block_time(created["blockNumber"]),
            expires_at=int(grant["args"]["expiresAt"]) if grant else None,
            request_tx=created["transactionHash"].to_0x_hex(),
            decision_tx=decisions[0]["transactionHash"].to_0x_hex()
            if decisions
            else None,
        )

    def requests(
        self, *, dataset_id: int | None = None, researcher: str | None = None
    ) -> list[Request]:
        """Every request, optionally of one dataset and/or researcher, oldest first."""
        ids = []
        for entry in self._logs(event="AccessRequested"):
            args = entry["args"]
            if dataset_id is not None and args["datasetId"] != dataset_id:
                continue
            if researcher is not None and args["researcher"] != checked_address(
                researcher, "researcher"
            ):
                continue
            ids.append(int(args["requestId"]))
        return [self.request(i) for i in ids]

    # ----------------------------------------------------------------- results
    def record_result(
        self, request_id: int, result_hash: str | bytes, *, sender: str | None = None
    ) -> str:
        """Anchor a result hash against the live grant of ``request_id``; return tx."""
        req = self._request_event(request_id)
        fn = self.contract.functions.recordResult(
            req["datasetId"], request_id, _bytes32(result_hash, "result_hash")
        )
        receipt = self.transact(fn, sender)
        return str(receipt["transactionHash"].to_0x_hex())

    def result_recorded(self, request_id: int, result_hash: str | bytes) -> bool:
        """Whether ``result_hash`` was anchored under ``request_id`` by its researcher.

        Anchors are per request: another researcher recording the same hash under
        their own grant neither blocks nor replaces this one."""
        fn = self.contract.functions.resultRecorded(
            int(request_id), _bytes32(result_hash, "result_hash")
        )
        return bool(self.call(fn))

    # ------------------------------------------------------- the shared query log
    def log_query(
        self, query_hash: str | bytes, dataset_ids: Sequence[int], *, sender: str
    ) -> str:
        """Log a statistics query before the sites answer it; return the tx hash.

        One ``QueryLogged`` event: the researcher (``sender``), the query's hash and
        the datasets it pools. Sites answer only logged queries and audit every
        logged query of the researcher, those they take no part in too.
        """
        ids = [int(i) for i in dataset_ids]
        fn = self.contract.functions.logQuery(_bytes32(query_hash, "query_hash"), ids)
        receipt = self.transact(fn, sender)
        return str(receipt["transactionHash"].to_0x_hex())

    def logged_queries(self, researcher: str) -> list[LoggedQuery]:
        """Every query ``researcher`` logged, oldest first (read from the chain)."""
        who = checked_address(researcher, "researcher")
        found = self._logs(event="QueryLogged", extra_topics=[address_topic(who)])
        return [
            LoggedQuery(
                researcher=str(e["args"]["researcher"]),
                query_hash="0x" + bytes(e["args"]["queryHash"]).hex(),
                dataset_ids=tuple(int(i) for i in e["args"]["datasetIds"]),
                block=int(e["blockNumber"]),
            )
            for e in found
        ]

    # ------------------------------------------------------------ privacy budgets
    def set_privacy_budget(
        self,
        dataset_id: int,
        budget: PrivacyBudget | None,
        *,
        sender: str | None = None,
    ) -> None:
        """Give a dataset a DP budget per researcher and grant (owner only), or remove
        it (``None``). ε is kept to 1/1000, δ as a power of ten, the noise multiplier
        to 1/1000."""
        if budget is None:
            args = (0, 0, 0)
        else:
            exponent = round(-math.log10(budget.delta))
            if not 1 <= exponent <= 30 or not math.isclose(
                budget.delta, 10.0**-exponent, rel_tol=1e-9
            ):
                raise errors.InvalidInput(
                    "on chain, a budget's delta is a power of ten (1e-5, 1e-6, …)"
                )
            epsilon = round(budget.epsilon * 1000)
            noise = round(budget.noise_multiplier * 1000)
            if not 0 < epsilon < 2**32 or not 0 < noise < 2**32:
                raise errors.InvalidInput(
                    "epsilon and the noise multiplier must be between 0.001 and 4e6"
                )
            args = (epsilon, exponent, noise)
        fn = self.contract.functions.setPrivacyBudget(int(dataset_id), *args)
        self.transact(fn, sender)

    def privacy_budget(self, dataset_id: int) -> PrivacyBudget | None:
        """The dataset's DP budget per researcher and grant, or ``None``."""
        fn = self.contract.functions.privacyBudget(int(dataset_id))
        epsilon, exponent, noise = self.call(fn)
        if not epsilon:
            return None
        return PrivacyBudget(epsilon / 1000, 10.0 ** -int(exponent), noise / 1000)

    def record_privacy_spend(
        self,
        dataset_id: int,
        researcher: str,
        answers: int,
        epsilon: float,
        *,
        sender: str | None = None,
    ) -> None:
        """Record what the researcher's current grant spent (owner only): the
        privacy ledger. ε is rounded up to 1/1000."""
        fn = self.contract.functions.recordPrivacySpend(
            int(dataset_id),
            checked_address(researcher, "researcher"),
            int(answers),
            math.ceil(epsilon * 1000 - 1e-9),
        )
        self.transact(fn, sender)

    def privacy_spent(self, dataset_id: int, researcher: str) -> PrivacySpend:
        """What the researcher's current grant on the dataset spent, as recorded."""
        access = self.access(dataset_id, researcher)
        return self.request_privacy_spent(access.request_id)

    def request_privacy_spent(self, request_id: int) -> PrivacySpend:
        """What one request's grant spent, as recorded (zero before any answer)."""
        answers, epsilon = self.call(
            self.contract.functions.privacySpent(int(request_id))
        )
        return PrivacySpend(int(request_id), int(answers), epsilon / 1000)

    # ------------------------------------------------------------ collaborations
    def create_collaboration(self, name: str, *, sender: str | None = None) -> int:
        """Start a collaboration curated by ``sender``: a list of member owners that
        a site can restrict its pooling to; return its id."""
        receipt = self.transact(
            self.contract.functions.createCollaboration(name), sender
        )
        return int(
            self.receipt_event(receipt, "CollaborationCreated")["collaborationId"]
        )

    def set_member(
        self,
        collaboration_id: int,
        owner: str,
        member: bool = True,
        *,
        sender: str | None = None,
    ) -> None:
        """Add (or, with ``member=False``, remove) an owner (curator only)."""
        fn = self.contract.functions.setMember(
            int(collaboration_id), checked_address(owner, "owner"), bool(member)
        )
        self.transact(fn, sender)

    def is_member(self, collaboration_id: int, owner: str) -> bool:
        """Whether ``owner`` is a member of the collaboration now."""
        fn = self.contract.functions.isMember(
            int(collaboration_id), checked_address(owner, "owner")
        )
        return bool(self.call(fn))

    def name_member(
        self,
        collaboration_id: int,
        owner: str,
        name: str,
        *,
        sender: str | None = None,
    ) -> None:
        """Give a member a name researchers trust (an institution's), as the
        collaboration's curator vouches for it (curator only; 1 to 200 bytes). A
        collaboration whose members are named serves as an owner directory
        (:meth:`owner_name`)."""
        if not isinstance(name, str) or not name.strip():
            raise errors.InvalidInput("give the member's public name (1 to 200 bytes)")
        fn = self.contract.functions.nameMember(
            int(collaboration_id), checked_address(owner, "owner"), name
        )
        self.transact(fn, sender)

    def owner_name(self, directory: int, owner: str) -> str | None:
        """The name ``directory``'s curator gave ``owner``, verified: ``owner`` must
        be a member now and the logged name must hash to the stored one (a node
        that alters logs is not believed). ``None``: not in the directory."""
        who = checked_address(owner, "owner")
        if not self.is_member(directory, who):
            return None
        fn = self.contract.functions.memberNameHash(int(directory), who)
        stored = bytes(self.call(fn))
        if stored == bytes(32):
            return None
        found = self._logs(
            event="MemberNamed",
            extra_topics=[uint_topic(directory), address_topic(who)],
        )
        for entry in reversed(found):
            name = str(entry["args"]["name"])
            if keccak(name.encode()) == stored:
                return name
        return None

    def collaboration_curator(self, collaboration_id: int) -> str | None:
        """The collaboration's curator, or ``None`` if there is no such one."""
        fn = self.contract.functions.collaborationCurator(int(collaboration_id))
        found = str(self.call(fn))
        return None if int(found, 16) == 0 else found

    def collaborations(self, *, curator: str | None = None) -> dict[int, str]:
        """Collaborations (of one ``curator`` if given) by id, oldest first, with the
        name each was created with. The curator is checked against the registry's
        storage; the name is only logged (a lookup aid, not a credential)."""
        who = None if curator is None else checked_address(curator, "curator")
        topics = [] if who is None else [None, address_topic(who)]
        found = self._logs(event="CollaborationCreated", extra_topics=topics)
        return {
            int(e["args"]["collaborationId"]): str(e["args"]["name"])
            for e in found
            if self.collaboration_curator(e["args"]["collaborationId"])
            == e["args"]["curator"]
        }

    # ------------------------------------------------------------------ events
    def events(self, *, from_block: int | None = None) -> pd.DataFrame:
        """Every registry event as a table, one row per event, oldest first.

        Columns: ``block``, ``time`` (UTC), ``event``, ``dataset``, ``request``,
        ``account`` (the owner, researcher or payee concerned), ``amount_wei`` (fee,
        escrow or payout as exact integers), ``details`` (the other arguments in
        words), ``tx`` (transaction hash) and ``args`` (every argument, raw).
        """
        rows = [self._event_row(entry) for entry in self._logs(from_block=from_block)]
        frame = pd.DataFrame(rows, columns=list(_EVENT_COLUMNS), dtype=object)
        # wei exceed int64: keep amounts as exact Python ints in an object column
        return frame.astype(
            {"block": "int64", "dataset": "Int64", "request": "Int64"}
        ).assign(time=pd.to_datetime(frame["time"], utc=True))

    def _event_row(self, entry: Any) -> dict[str, Any]:
        args = dict(entry["args"])
        account = args.get("researcher") or args.get("owner") or args.get("payee")
        amount = args.get("amount", args.get("fee"))
        shown = {k: v for k, v in args.items() if k not in _EVENT_MAIN}
        details = " ".join(f"{k}={_detail(k, v)}" for k, v in shown.items())
        return {
            "block": int(entry["blockNumber"]),
            "time": pd.Timestamp(
                self.block_time(entry["blockNumber"]), unit="s", tz="UTC"
            ),
            "event": entry["event"],
            "dataset": args.get("datasetId"),
            "request": args.get("requestId"),
            "account": account,
            "amount_wei": None if amount is None else int(amount),
            "details": details,
            "tx": entry["transactionHash"].to_0x_hex(),
            "args": {
                k: ("0x" + v.hex() if isinstance(v, bytes) else v)
                for k, v in args.items()
            },
        }

    # ----------------------------------------------------------------- signing
    def sign_query(
        self, researcher: str, query_hash: str, *, nonce: int
    ) -> SignedQuery:
        """Sign a query as ``researcher`` (EIP-712, bound to this chain and registry).

        Uses this client's key for ``researcher`` (environment keys, or the embedded
        chain's dev keys), else asks the node (``eth_signTypedData_v4``, as anvil's
        unlocked accounts allow). The key itself is never exposed.
        """
        who = checked_address(researcher, "researcher")
        issued_at = self.now()
        typed = query_typed_data(
            researcher=who,
            query_hash=query_hash,
            nonce=nonce,
            issued_at=issued_at,
            chain_id=self.chain_id,
            registry=self.address,
        )
        signature = self.sign_typed_data(who, typed)
        return SignedQuery(
            who, query_hash, nonce, issued_at, self.chain_id, self.address, signature
        )

    def _request_event(self, request_id: int) -> Any:
        found = self._logs(event="AccessRequested", request_id=request_id)
        if not found:
            raise errors.UnknownRequest("UnknownRequest", {"requestId": request_id})
        return found[0]["args"]

    def _logs(
        self,
        *,
        event: str | None = None,
        request_id: int | None = None,
        dataset_id: int | None = None,
        from_block: int | None = None,
        extra_topics: Sequence[Any] = (),
    ) -> list[Any]:
        """The registry's logs: of one ``event`` (default every kind), of one
        request or of one dataset (the events indexed by it first), with further
        indexed ``extra_topics``."""
        if request_id is not None and dataset_id is not None:
            raise ValueError("filter logs by a request or by a dataset, not both")
        abis = [a for a in self.event_abis.values() if event in (None, a["name"])]
        topics = list(extra_topics)
        if request_id is not None:
            abis = [a for a in abis if a["name"] in _OF_REQUEST]
            topics.insert(0, uint_topic(request_id))
        if dataset_id is not None:
            abis = [a for a in abis if _first_indexed(a) == "datasetId"]
            topics.insert(0, uint_topic(dataset_id))
        names = [a["name"] for a in abis]
        return self.logs(events=names, topics=topics, from_block=from_block)


def deploy_registry(
    w3: Web3,
    deployer: str,
    request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
    *,
    signer: LocalAccount | None = None,
) -> tuple[str, int]:
    """Deploy the registry from ``deployer`` (signed with ``signer`` when given, else
    by the node); return (address, block number)."""
    connection = Connection(w3, signers=() if signer is None else (signer,))
    receipt = Ledger.deploy_contract(
        connection,
        int(request_timeout),
        sender=deployer if signer is None else signer.address,
    )
    return str(receipt["contractAddress"]), int(receipt["blockNumber"])


# ------------------------------------------------------------------- helpers
#: Seconds before a researcher's refund completes within which a key is not released:
#: a release mined after the refund would reveal the key unpaid.
RELEASE_MARGIN = 600


def _first_indexed(abi: dict[str, Any]) -> str | None:
    """The name of an event's first indexed argument."""
    return next((i["name"] for i in abi["inputs"] if i["indexed"]), None)


def _signers_from_env() -> list[LocalAccount]:
    """The accounts of ``$HEALTHLAB_PRIVATE_KEY`` (comma-separated) and of the lines of
    ``$HEALTHLAB_KEY_FILE`` (``#`` starts a comment line); blanks around a key are
    dropped, everything else must be the key (see :mod:`healthlab.ledger.keys`)."""
    keys: list[tuple[str, str]] = []
    listed = os.environ.get("HEALTHLAB_PRIVATE_KEY")
    if listed:
        parts = listed.split(",")
        keys += [
            (part.strip(), "HEALTHLAB_PRIVATE_KEY" + (f" (key {i})" if i > 1 else ""))
            for i, part in enumerate(parts, 1)
        ]
    key_file = os.environ.get("HEALTHLAB_KEY_FILE")
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise errors.ConfigurationError(
                f"HEALTHLAB_KEY_FILE={key_file} does not exist"
            )
        if path.stat().st_mode & 0o077:
            raise errors.ConfigurationError(
                f"{key_file} is readable by other users; run `chmod 600 {key_file}`"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None:  # raised here: the decoding error would quote a byte
            raise errors.InvalidPrivateKey(
                f"HEALTHLAB_KEY_FILE {key_file} is not UTF-8 text: write one hex key "
                "a line"
            )
        keys += [
            (ln.strip(), f"HEALTHLAB_KEY_FILE {key_file}, line {number}")
            for number, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    return [account_from_key(key, source=source) for key, source in keys]


def _first_node_account(w3: Web3, url: str) -> str:
    accounts = w3.eth.accounts
    if not accounts:
        raise errors.ConfigurationError(
            f"the node at {url} has no unlocked accounts; set HEALTHLAB_PRIVATE_KEY or "
            "HEALTHLAB_KEY_FILE to deploy"
        )
    return str(accounts[0])


def _bytes32(value: str | bytes, name: str) -> bytes:
    if isinstance(value, str):
        text = value[2:] if value.startswith(("0x", "0X")) else value
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise errors.InvalidInput(
                f"{name} must be 32 bytes as 64 hex digits"
            ) from None
    if not isinstance(value, bytes) or len(value) != 32:
        raise errors.InvalidInput(f"{name} must be 32 bytes (e.g. a sha256 digest)")
    return value


_NODE_KEY_FORM = (
    "the SuperNode's ECDSA P-384 public key as the 97-byte uncompressed point "
    "0x04 || X || Y (key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))"
)


def _mask_key(value: bytes) -> bytes:
    """A site's X25519 public key, checked: 32 raw bytes, not zero."""
    form = "the site's X25519 public key as 32 raw bytes (Site.mask_public_key)"
    if not isinstance(value, bytes | bytearray | memoryview):
        raise errors.InvalidInput(
            f"mask_key must be {form}, not {type(value).__name__}"
        )
    key = bytes(value)
    if len(key) != 32:
        raise errors.InvalidInput(f"mask_key must be {form}, not {len(key)} bytes")
    if key == bytes(32):
        raise errors.InvalidInput(f"mask_key is all zeros: pass {form}")
    return key


def _node_key(value: bytes) -> bytes:
    """A SuperNode's P-384 public key, checked: an uncompressed point on the curve."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise errors.InvalidInput(
            f"node_key must be {_NODE_KEY_FORM}, not {type(value).__name__}"
        )
    key = bytes(value)
    if key.startswith(b"ecdsa-sha2-nistp384"):
        raise errors.InvalidInput(
            f"node_key is an OpenSSH key line: load it with cryptography's "
            f"load_ssh_public_key and pass {_NODE_KEY_FORM}"
        )
    if len(key) != 97:
        raise errors.InvalidInput(
            f"node_key must be {_NODE_KEY_FORM}, not {len(key)} bytes"
        )
    if key[0] != 0x04:
        raise errors.InvalidInput(
            f"node_key starts with 0x{key[0]:02x}, not 0x04: pass {_NODE_KEY_FORM}"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), key)
    except ValueError:
        raise errors.InvalidInput(
            f"node_key is not a point on the P-384 curve: pass {_NODE_KEY_FORM}"
        ) from None
    return key


def _uint(value: int, name: str, bits: int = 256) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or value >= 1 << bits
    ):
        raise errors.InvalidInput(
            f"{name} must be a whole number from 0 to 2**{bits}-1"
        )
    return value


_EVENT_COLUMNS = (
    "block",
    "time",
    "event",
    "dataset",
    "request",
    "account",
    "amount_wei",
    "details",
    "tx",
    "args",
)
_EVENT_MAIN = {
    "datasetId",
    "requestId",
    "researcher",
    "owner",
    "payee",
    "amount",
    "fee",
}


def _detail(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()[:12] + "…"
    if key in ("codes", "terms"):
        return code_names(value) or "none"
    if key == "expiresAt":
        return pd.Timestamp(int(value), unit="s", tz="UTC").strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    return str(value)
