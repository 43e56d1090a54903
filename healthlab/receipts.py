"""Receipts: what produced a result, under which grants — hashed, anchored, verifiable.

A receipt records the study (kind, queries, parameters), the researcher, every site
that took part with the content hash of its data and — for gated sites — the request,
its transaction and the transaction that granted it, the package version, and the
sha256 of the result. Its own hash can be anchored on chain against each grant
(``Ledger.record_result``), and :func:`verify` checks a receipt and a result against
the chain. Receipts never hold keys, purpose text or row-level values.

Examples
--------
>>> table = encrypted.describe(sites, ["age"], researcher=me)
>>> receipt = table.receipt
>>> receipt.anchor(ledger, sender=me)  # doctest: +SKIP
>>> verify(receipt, table, ledger).ok  # doctest: +SKIP
True
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from healthlab.errors import HealthLabError, InvalidInput

if TYPE_CHECKING:
    from healthlab.ledger import Ledger
    from healthlab.sites import Site

__all__ = [
    "Receipt",
    "Verification",
    "anchor_hash",
    "build_receipt",
    "result_hash",
    "verify",
]

RECEIPT_VERSION = 1


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), default=_plain, allow_nan=True
    )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def result_hash(result: pd.DataFrame | pd.Series | Mapping[str, Any] | Any) -> str:
    """``sha256:<hex>`` of a result's values, index and columns (floats exactly)."""
    if isinstance(result, pd.Series):
        result = result.to_frame()
    if isinstance(result, pd.DataFrame):
        split = result.to_dict(orient="split")
        body: Any = {
            "index": [_cell(v) for v in split["index"]],
            "columns": [_cell(v) for v in split["columns"]],
            "data": [[_cell(v) for v in row] for row in split["data"]],
        }
    else:
        body = result
    return "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()


def _cell(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_cell(v) for v in value]
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return repr(number) if not math.isfinite(number) else number
    if isinstance(value, np.integer):
        return int(value)
    return value


def anchor_hash(receipt_hash: str, request_id: int) -> str:
    """The bytes32 anchored for one grant: sha256(receipt hash ‖ request id)."""
    digest = hashlib.sha256(f"{receipt_hash}|{int(request_id)}".encode()).hexdigest()
    return "0x" + digest


class Receipt(dict[str, Any]):
    """A result's receipt: a JSON-ready mapping with hashing and anchoring."""

    @property
    def body(self) -> dict[str, Any]:
        """The hashed part (everything but the hash itself and the anchors)."""
        return {k: v for k, v in self.items() if k not in ("receipt_hash", "anchors")}

    @property
    def hash(self) -> str:
        """``sha256:<hex>`` of the canonical JSON of :attr:`body`."""
        return "sha256:" + hashlib.sha256(_canonical(self.body).encode()).hexdigest()

    def to_json(self, indent: int | None = 1) -> str:
        """The receipt as JSON (for a report or an archive)."""
        return json.dumps(dict(self), indent=indent, default=_plain)

    @classmethod
    def from_json(cls, text: str) -> Receipt:
        """Read a receipt written by :meth:`to_json`.

        Text that is not a JSON object is refused with
        :class:`~healthlab.errors.InvalidInput` naming the line and column, never the
        text.
        """
        where = ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            where = f" (line {exc.lineno}, column {exc.colno})"
            data = None
        except (TypeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):  # raised here: the parser's error is not chained
            raise InvalidInput(
                f"not a receipt: a receipt is the JSON object Receipt.to_json writes"
                f"{where}; load the receipt file as it was saved"
            )
        return cls(data)

    def anchor(
        self, ledger: Ledger, *, sender: str | None = None
    ) -> list[dict[str, Any]]:
        """Record this receipt's hash against every grant it names; return the anchors.

        Sent by the researcher holding the grants, while they are live. Anchors
        already on chain are kept (anchoring again is safe); when a grant refuses
        (revoked, expired), the anchors made so far stay in the receipt and the
        error is raised.
        """
        requests = sorted(
            {s["request_id"] for s in self["sites"] if s.get("request_id")}
        )
        if not requests:
            raise InvalidInput("an ungated result has no grant to anchor against")
        sender = sender or self.get("researcher")
        done = {a["request_id"]: a for a in self.get("anchors", [])}
        try:
            for request_id in requests:
                digest = anchor_hash(self["receipt_hash"], request_id)
                if ledger.result_recorded(request_id, digest):  # anchored before
                    done.setdefault(request_id, {"request_id": request_id, "tx": None})
                    continue
                tx = ledger.record_result(request_id, digest, sender=sender)
                done[request_id] = {"request_id": request_id, "tx": tx}
        finally:  # what did land on chain is kept even when a later grant refuses
            self["anchors"] = [done[r] for r in requests if r in done]
        return list(self["anchors"])


@dataclass
class Verification:
    """The outcome of :func:`verify`: every check with its detail."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return bool(self.checks) and all(passed for _, passed, _ in self.checks)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def problems(self) -> list[str]:
        """The failed checks, in words."""
        return [
            f"{name}: {detail}" for name, passed, detail in self.checks if not passed
        ]

    def raise_for_problems(self) -> None:
        """Raise :class:`~healthlab.errors.HealthLabError` listing what failed."""
        if not self.ok:
            raise HealthLabError("receipt does not verify: " + "; ".join(self.problems))

    def add(self, name: str, passed: bool, detail: str = "") -> None:
        """Record one check."""
        self.checks.append((name, bool(passed), detail))


def build_receipt(
    *,
    kind: str,
    result: Any,
    queries: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    sites: Sequence[Site],
    researcher: str | None,
    refused: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Receipt:
    """Build (and hash) the receipt of ``result``."""
    from healthlab import __version__

    records = []
    chain: dict[str, Any] | None = None
    for site in sites:
        record: dict[str, Any] = {
            "name": site.name,
            "content_hash": site.content_hash,
            "dataset_id": site.dataset_id,
        }
        if site.gated and researcher is not None:
            ledger = site.ledger
            assert ledger is not None
            assert site.dataset_id is not None
            chain = {"chain_id": ledger.chain_id, "registry": ledger.address}
            access = ledger.access(site.dataset_id, researcher)
            request = ledger.request(access.request_id)
            record.update(
                {
                    "request_id": request.id,
                    "request_tx": request.request_tx,
                    "grant_tx": request.decision_tx,
                    "grant_expires_at": request.expires_at,
                }
            )
        records.append(record)
    receipt = Receipt(
        {
            "receipt_version": RECEIPT_VERSION,
            "kind": kind,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "package": {"name": "healthlab", "version": __version__},
            "researcher": researcher,
            "chain": chain,
            "gated": chain is not None,
            "sites": records,
            "refused": dict(refused or {}),
            "queries": [json.loads(_canonical(q)) for q in queries],
            "parameters": json.loads(_canonical(dict(parameters))),
            "result_hash": result_hash(result),
            **dict(extra or {}),
        }
    )
    receipt["receipt_hash"] = receipt.hash
    return receipt


def verify(
    receipt: Mapping[str, Any],
    result: Any | None = None,
    ledger: Ledger | None = None,
) -> Verification:
    """Check a receipt: its own hash, the result's hash, and its grants on chain.

    With ``ledger``, every gated site's request must exist on that chain for that
    dataset and researcher, created and granted by the transactions the receipt
    names, and every anchor must be recorded against its request.
    """
    report = Verification()
    r = Receipt(receipt)
    report.add("receipt hash", r.hash == r.get("receipt_hash"), "body was changed")
    if result is not None:
        report.add(
            "result hash", result_hash(result) == r.get("result_hash"), "result differs"
        )
    if ledger is None:
        return report
    chain = r.get("chain") or {}
    report.add(
        "chain",
        chain.get("chain_id") == ledger.chain_id
        and str(chain.get("registry", "")).lower() == ledger.address.lower(),
        "the receipt names another chain or registry",
    )
    for site in r.get("sites", []):
        request_id = site.get("request_id")
        if not request_id:
            report.add(f"site {site['name']}", False, "no grant recorded (ungated)")
            continue
        try:
            request = ledger.request(int(request_id))
        except HealthLabError as exc:
            report.add(f"site {site['name']} request", False, str(exc))
            continue
        registered = _registered_hash(ledger, site.get("dataset_id"))
        report.add(
            f"site {site['name']} data",
            registered is not None
            and registered.lower() == str(site.get("content_hash", "")).lower(),
            "the site's data is not what its dataset registered on chain",
        )
        report.add(
            f"site {site['name']} request",
            request.dataset_id == site.get("dataset_id")
            and request.researcher.lower() == str(r.get("researcher", "")).lower()
            and request.request_tx == site.get("request_tx")
            and request.decision_tx == site.get("grant_tx")
            and request.expires_at is not None,
            f"request {request_id} on chain does not match the receipt",
        )
    for entry in r.get("anchors", []):
        found = ledger.result_recorded(
            entry["request_id"],
            anchor_hash(str(r.get("receipt_hash")), entry["request_id"]),
        )
        report.add(
            f"anchor {entry['request_id']}",
            found,
            "not recorded on chain under this request",
        )
    return report


def _registered_hash(ledger: Ledger, dataset_id: Any) -> str | None:
    try:
        return ledger.dataset(int(dataset_id)).content_hash
    except (HealthLabError, TypeError, ValueError):
        return None
