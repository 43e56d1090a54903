"""The secure-sum protocol's messages as JSON, for sites in other processes.

A deployed site (:mod:`healthlab.federated.deploy.statistics`) receives the same
objects a site in this process does — the signed :class:`~protocol.Query`, the peers'
keys, the holder announcements, the public CKKS context, the survivors and their
confirmations — and answers with the same :class:`~protocol.HolderFlags`,
:class:`~protocol.Contribution` and :class:`~protocol.Reveal`. This module writes
them as JSON (bytes as base64) and reads them back, checking their shape: a
malformed message is refused with :class:`~healthlab.errors.DataRefused`, and
nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from healthlab import errors
from healthlab.encrypted.keys import CKKSParams, IntegrityError, PublicContext
from healthlab.encrypted.protocol import Contribution, HolderFlags, Query, Reveal
from healthlab.errors import DataRefused, HealthLabError
from healthlab.ledger.signing import SignedQuery

__all__ = [
    "decode",
    "dump",
    "encode",
    "error_from",
    "error_to",
    "load",
]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise DataRefused("a message field that carries bytes is not base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        raise DataRefused("a message field that carries bytes is not base64") from None


def _str_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DataRefused("a message field is not a mapping of names")
    return dict(value)


def encode(value: Any) -> Any:
    """``value`` (a protocol object, or lists / mappings / scalars of them) as JSON
    data, each object tagged with its type."""
    if isinstance(value, Query):
        return {"@": "query", **value.as_dict()}
    if isinstance(value, SignedQuery):
        return {"@": "signed", **vars(value)}
    if isinstance(value, HolderFlags):
        return {
            "@": "flags",
            "site": value.site,
            "query_hash": value.query_hash,
            "masked": [int(m) for m in value.masked],
            "tags": dict(value.tags),
            "participant": value.participant,
            "ephemeral": _b64(value.ephemeral),
            "threshold": int(value.threshold),
            "commitment": value.commitment,
            "shares": {k: _b64(v) for k, v in value.shares.items()},
        }
    if isinstance(value, Contribution):
        return {
            "@": "contribution",
            "site": value.site,
            "query_hash": value.query_hash,
            "fingerprint": value.fingerprint,
            "n_totals": int(value.n_totals),
            "ciphertexts": [_b64(c) for c in value.ciphertexts],
            "modulus": int(value.modulus),
            "confirms": dict(value.confirms),
        }
    if isinstance(value, Reveal):
        return {
            "@": "reveal",
            "site": value.site,
            "query_hash": value.query_hash,
            "shares": {
                k: [kind, [int(x) for x in np.asarray(share).ravel()]]
                for k, (kind, share) in value.shares.items()
            },
        }
    if isinstance(value, PublicContext):
        return {
            "@": "public",
            "data": _b64(value.data),
            "params": {
                "poly_modulus_degree": value.params.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(value.params.coeff_mod_bit_sizes),
                "scale_bits": value.params.scale_bits,
            },
        }
    if isinstance(value, bytes):
        return {"@": "bytes", "data": _b64(value)}
    if isinstance(value, (frozenset, set)):
        return {"@": "set", "items": sorted(encode(v) for v in value)}
    if isinstance(value, np.ndarray):
        return encode(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {"@": "map", "items": {str(k): encode(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise HealthLabError(f"a {type(value).__name__} cannot be sent to a site")


def decode(data: Any) -> Any:
    """The objects :func:`encode` wrote; a malformed message raises
    :class:`~healthlab.errors.DataRefused`."""
    try:
        return _decode(data)
    except DataRefused:
        raise
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataRefused("a protocol message is malformed; it was not used") from None


def _decode(data: Any) -> Any:
    if isinstance(data, list):
        return [_decode(v) for v in data]
    if not isinstance(data, dict):
        if data is None or isinstance(data, (str, int, float, bool)):
            return data
        raise DataRefused("a protocol message holds a value of an unknown kind")
    tag = data.get("@")
    if tag == "map":
        return {k: _decode(v) for k, v in _str_map(data["items"]).items()}
    if tag == "bytes":
        return _bytes(data["data"])
    if tag == "set":
        return frozenset(_decode(v) for v in data["items"])
    if tag == "query":
        return Query(
            kind=str(data["kind"]),
            spec=_str_map(data["spec"]),
            n_totals=int(data["n_totals"]),
            min_rows=int(data["min_rows"]),
            min_sites=int(data["min_sites"]),
            nonce=int(data["nonce"]),
            participants=tuple(str(p) for p in data["participants"]),
        )
    if tag == "signed":
        return SignedQuery(
            researcher=str(data["researcher"]),
            query_hash=str(data["query_hash"]),
            nonce=int(data["nonce"]),
            issued_at=int(data["issued_at"]),
            chain_id=int(data["chain_id"]),
            registry=str(data["registry"]),
            signature=str(data["signature"]),
        )
    if tag == "flags":
        return HolderFlags(
            site=str(data["site"]),
            query_hash=str(data["query_hash"]),
            masked=tuple(int(m) for m in data["masked"]),
            tags={k: str(v) for k, v in _str_map(data["tags"]).items()},
            participant=str(data["participant"]),
            ephemeral=_bytes(data["ephemeral"]),
            threshold=int(data["threshold"]),
            commitment=str(data["commitment"]),
            shares={k: _bytes(v) for k, v in _str_map(data["shares"]).items()},
        )
    if tag == "contribution":
        return Contribution(
            site=str(data["site"]),
            query_hash=str(data["query_hash"]),
            fingerprint=str(data["fingerprint"]),
            n_totals=int(data["n_totals"]),
            ciphertexts=tuple(_bytes(c) for c in data["ciphertexts"]),
            modulus=int(data["modulus"]),
            confirms={k: str(v) for k, v in _str_map(data["confirms"]).items()},
        )
    if tag == "reveal":
        shares: dict[str, tuple[str, np.ndarray]] = {}
        for k, (kind, values) in _str_map(data["shares"]).items():
            shares[k] = (str(kind), np.asarray([int(x) for x in values], np.int64))
        return Reveal(str(data["site"]), str(data["query_hash"]), shares)
    if tag == "public":
        params = data["params"]
        return PublicContext(
            _bytes(data["data"]),
            CKKSParams(
                poly_modulus_degree=int(params["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(
                    int(b) for b in params["coeff_mod_bit_sizes"]
                ),
                scale_bits=int(params["scale_bits"]),
            ),
        )
    raise DataRefused("a protocol message holds an object of an unknown kind")


def dump(value: Any) -> bytes:
    """``value`` as the bytes of one message."""
    return json.dumps(encode(value), separators=(",", ":")).encode()


def load(raw: bytes) -> Any:
    """The value of one message's bytes (refused when they are not one)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DataRefused("a protocol message is not JSON; it was not used") from None
    return decode(data)


#: Errors a site's refusal may name; any other class arrives as HealthLabError.
_NAMED: dict[str, type[HealthLabError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, HealthLabError)
} | {"IntegrityError": IntegrityError}


def error_to(exc: BaseException) -> dict[str, str]:
    """A site's refusal as message data: its class name and its message (which,
    as every site error, names the rule and the site, never a value)."""
    name = type(exc).__name__ if isinstance(exc, HealthLabError) else "HealthLabError"
    return {"error": name if name in _NAMED else "HealthLabError", "message": str(exc)}


def error_from(data: Mapping[str, Any]) -> HealthLabError:
    """The error a site's refusal names, as this process's class."""
    cls = _NAMED.get(str(data.get("error")), HealthLabError)
    message = str(data.get("message", "the site refused"))
    try:
        return cls(message)
    except TypeError:  # an error class with other arguments
        return HealthLabError(message)
