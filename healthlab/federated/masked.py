"""Masked sums between the sites of a deployed study, that the sites can check.

Every value a site sends in a deployment — its standardization moments, its
weighted model update, its held-out metric sums — is a vector of exact fixed-point
digits (:func:`healthlab.encrypted.encoding.encode_totals`) plus pairwise masks
shared with its neighbours in the step's mask graph (X25519 keys bound on chain;
every other member up to :data:`~healthlab.encrypted.secagg.COMPLETE_UP_TO`
members, then a Harary graph of O(log n) neighbours, as SecAgg+ and the
statistics), so that a single site's vector is uniform noise and only the sum over
all members is readable.

A site also **tags** its vector for every other member with a key only the two of
them share (HMAC-SHA256 under an X25519-derived key). The server relays the
members' vectors with the next message; each site checks every tag meant for it
and its own vector, sums them itself and so knows the aggregate without trusting
the server: the next model is the one the sites' own updates produce, not one the
server chooses. A server that drops, alters, replays, invents or shows different
sites different vectors fails the check at every site it tries it on, which
refuses before it computes anything from the sum. (Tags only for the mask graph's
neighbours are not enough: a site acts on a sum before anyone could tell it the
list was forged — its refusals or not, from its own rows, are then answers about
them.) Each step's masks and tags are also keyed to a digest of every list the
site has opened (``chain``) and carry a check total (each member adds 1; the sum
must be the member count): sites that opened different lists do not cancel, and
their sum is refused as noise. The tags are O(n) per site (32 bytes and an HMAC
per member and step, under a pair key derived once); the masks are O(log n).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from healthlab.encrypted import secagg
from healthlab.encrypted.encoding import (
    DIGITS,
    MODULUS,
    decode_sum,
    encode_totals,
    mask_digits,
    mask_vector,
)
from healthlab.encrypted.keys import IntegrityError
from healthlab.errors import DataRefused, InvalidInput
from healthlab.sites import Site

__all__ = [
    "Contribution",
    "contribute",
    "from_record",
    "open_sum",
    "server_sum",
    "to_record",
]

_TAG = 32


@dataclass(frozen=True)
class Contribution:
    """One member's masked digits for one step, tagged for every other member."""

    member: str
    digits: np.ndarray
    tags: bytes
    #: the mask modulus of the sum (:func:`~healthlab.encrypted.secagg.modulus` of
    #: the members): 2^16 up to 16 members
    modulus: int = MODULUS

    @property
    def digest(self) -> str:
        """sha256 of the digits (what a site remembers of what it sent)."""
        return hashlib.sha256(_bytes(self.digits, self.modulus)).hexdigest()


def _width(modulus: int) -> str:
    """Each masked digit on the wire: 2 bytes up to 2^16, 4 beyond."""
    return "<u2" if modulus <= MODULUS else "<u4"


def _bytes(digits: np.ndarray, modulus: int = MODULUS) -> bytes:
    return np.asarray(digits, dtype=_width(modulus)).tobytes()


def _message(
    step: bytes,
    member: str,
    digits: np.ndarray,
    modulus: int = MODULUS,
    chain: bytes = b"",
) -> bytes:
    """What a tag covers: the step (its label's digest), the lists the member
    opened before (``chain``), the member and its digits."""
    return (
        b"tag|"
        + step
        + b"|"
        + chain
        + b"|"
        + member.encode()
        + b"|"
        + _bytes(digits, modulus)
    )


def _digest(label: str) -> bytes:
    """A step's label (it names every member) as 32 bytes: what the tags, the mask
    keys and the graph are bound to, at a cost that does not grow with the
    members."""
    return hashlib.sha256(label.encode()).digest()


def graph(peers: Mapping[str, bytes], label: str) -> dict[str, tuple[str, ...]]:
    """The step's mask graph over the members (the same at every site)."""
    return secagg.neighbours(list(peers), _digest(label))


def chain(previous: bytes, step: str, contributions: Sequence[Contribution]) -> bytes:
    """The digest of the lists a site has opened: ``previous`` and this step's
    list (every member's vector, by member)."""
    digest = hashlib.sha256(previous + b"|" + step.encode())
    for c in sorted(contributions, key=lambda c: c.member):
        body = _bytes(c.digits, c.modulus)
        digest.update(b"%d|%s|%d|" % (len(c.member), c.member.encode(), len(body)))
        digest.update(body)
    return digest.digest()


def contribute(
    site: Site,
    peers: Mapping[str, bytes],
    me: str,
    totals: Sequence[float] | np.ndarray,
    label: str,
    chain: bytes = b"",
) -> Contribution:
    """``totals`` and the check total 1 as masked digits, masked with this member's
    neighbours in the step's graph and tagged for every other member, under keys
    bound to ``chain`` (the lists this site opened before)."""
    digits = encode_totals([*np.asarray(totals, dtype=float).tolist(), 1.0])
    modulus = secagg.modulus(len(peers))
    near = graph(peers, label)[me]
    context = _digest(label) + b"|" + chain
    seeds = site.pairwise_seeds({v: peers[v] for v in (*near, me)}, context, me=me)
    masked = mask_digits(digits, mask_vector(seeds, digits.size, modulus), modulus)
    # one long-lived tag key per pair (an HKDF per member once a run would be n
    # per site and step); each tag binds the step and the chain in its message
    keys = site.pairwise_keys(peers, b"healthlab-tag", b"", me=me)
    message = _message(_digest(label), me, masked, modulus, chain)
    tags = b"".join(
        hmac.new(keys[peer], message, hashlib.sha256).digest() for peer in sorted(keys)
    )
    return Contribution(me, masked, tags, modulus)


def to_record(step: str, contributions: Sequence[Contribution]) -> ConfigRecord:
    """The members' contributions as a message record (relayed by the server)."""
    ordered = sorted(contributions, key=lambda c: c.member)
    return ConfigRecord(
        {
            "step": step,
            "members": [c.member for c in ordered],
            "digits": [_bytes(c.digits, c.modulus) for c in ordered],
            "tags": [c.tags for c in ordered],
        }
    )


def from_record(record: ConfigRecord) -> tuple[str, list[Contribution]]:
    """``(step, contributions)`` from :func:`to_record`'s record."""
    values: Any = dict(record)
    try:
        members = [str(m) for m in values["members"]]
        digits = [bytes(d) for d in values["digits"]]
        tags = [bytes(t) for t in values["tags"]]
        step = str(values["step"])
    except (KeyError, TypeError) as exc:
        raise DataRefused(f"the relayed contributions are malformed ({exc})") from None
    if not len(members) == len(digits) == len(tags):
        raise DataRefused("the relayed contributions are malformed")
    try:
        modulus = secagg.modulus(len(members))
    except InvalidInput:
        raise DataRefused("the relayed contributions are malformed") from None
    width = _width(modulus)
    if any(len(d) % np.dtype(width).itemsize for d in digits):
        raise DataRefused("the relayed contributions are malformed")
    return step, [
        Contribution(m, np.frombuffer(d, dtype=width).astype(np.int64), t, modulus)
        for m, d, t in zip(members, digits, tags, strict=True)
    ]


def open_sum(
    site: Site,
    peers: Mapping[str, bytes],
    me: str,
    contributions: Sequence[Contribution],
    label: str,
    *,
    own_digest: str,
    n_totals: int,
    chain: bytes = b"",
) -> list[float]:
    """The exact sum of the members' totals, after checking every member's tag
    for ``me`` (under ``chain``, the lists this site opened before) and the check
    total.

    Refuses (:class:`~healthlab.errors.DataRefused`) unless the contributions are
    exactly one per member of ``peers``, this site's is the one it sent
    (``own_digest``), every other's carries a valid tag for this site and the
    masks cancel.
    """
    by_member = {c.member: c for c in contributions}
    if sorted(by_member) != sorted(peers) or len(by_member) != len(contributions):
        raise DataRefused(
            f"the relayed contributions are from {sorted(by_member)}, not exactly the "
            f"study's members {sorted(peers)}"
        )
    keys = site.pairwise_keys(peers, b"healthlab-tag", b"", me=me)
    size = (n_totals + 1) * DIGITS
    order = {p: i for i, p in enumerate(sorted(peers))}
    step = _digest(label)  # once: the label names every member
    for member, contribution in sorted(by_member.items()):
        if contribution.digits.size != size:
            raise DataRefused(f"{member}'s contribution has the wrong size")
        if len(contribution.tags) != (len(peers) - 1) * _TAG:
            raise DataRefused(f"{member}'s contribution has the wrong tags")
        if member == me:
            if contribution.digest != own_digest:
                raise DataRefused(
                    "the relayed copy of this site's contribution differs"
                )
            continue
        # this site's place among the member's tags: the others, sorted
        start = (order[me] - (order[member] < order[me])) * _TAG
        got = contribution.tags[start : start + _TAG]
        want = hmac.new(
            keys[member],
            _message(step, member, contribution.digits, contribution.modulus, chain),
            hashlib.sha256,
        ).digest()
        if not hmac.compare_digest(got, want):
            raise DataRefused(
                f"{member}'s relayed contribution does not carry its tag for this "
                "site: altered, replayed, not from that member, or masked after "
                "other relayed sums than this site's"
            )
    return _decode(contributions, n_totals)


def server_sum(contributions: Sequence[Contribution], n_totals: int) -> list[float]:
    """The server's view: the sum of every member's masked digits (masks cancel)."""
    return _decode(contributions, n_totals)


def _decode(contributions: Sequence[Contribution], n_totals: int) -> list[float]:
    n = len(contributions)
    modulus = secagg.modulus(n)
    if any(c.modulus != modulus for c in contributions):
        raise DataRefused("the contributions were masked for another set of members")
    total = np.sum([c.digits for c in contributions], axis=0)
    refused = DataRefused(
        "the members' masks do not cancel: some member masked after other relayed "
        "sums than its neighbours (the server showed the sites different lists) or "
        "sent a malformed vector; nothing of this step is released"
    )
    try:
        sums = decode_sum(total.astype(np.float64), n_totals + 1, n, modulus=modulus)
    except (IntegrityError, InvalidInput, ValueError, OverflowError):
        raise refused from None
    if sums[-1] != n:  # every member adds exactly 1
        raise refused
    return sums[:-1]
