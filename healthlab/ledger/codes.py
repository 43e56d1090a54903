"""Machine-readable use terms and purposes (GA4GH DUO-style bit codes).

A dataset's *terms* list the purposes it permits and the requirements it sets; a
request's *codes* list the purposes it pursues and attest the requirements it meets.
The bit values mirror the constants of ``HealthLabRegistry.sol``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Codes", "as_codes", "code_names", "permits"]


class Codes(enum.IntFlag):
    """DUO-style codes; combine with ``|`` (e.g. ``Codes.HMB | Codes.NCU``).

    Purposes: ``GRU`` general research use (permits every purpose), ``HMB``
    health/medical/biomedical research (permits ``DS``), ``DS`` disease-specific
    research, ``POA`` population origins or ancestry, ``MDS`` methods development.

    Modifiers: on terms they are requirements, on a request attestations that they are
    met: ``NCU`` non-commercial use, ``IRB`` ethics approval, ``PUB`` publication.
    ``COL`` (collaboration required) is a term only: such datasets are always reviewed
    by their owner, never approved automatically.

    ``DL`` (download): on terms, researchers may download the (encrypted) content and
    receive its key once approved — without it a dataset is compute-only (studies run
    at the sites); on a request, the researcher asks for a download grant.
    """

    GRU = 1 << 0
    HMB = 1 << 1
    DS = 1 << 2
    POA = 1 << 3
    MDS = 1 << 4
    NCU = 1 << 8
    IRB = 1 << 9
    PUB = 1 << 10
    COL = 1 << 11
    DL = 1 << 12


PURPOSES = Codes.GRU | Codes.HMB | Codes.DS | Codes.POA | Codes.MDS
ATTESTABLE = Codes.NCU | Codes.IRB | Codes.PUB
KNOWN = PURPOSES | ATTESTABLE | Codes.COL | Codes.DL
_PURPOSE_MASK = 0xFF

DESCRIPTIONS = {
    Codes.GRU: "general research use",
    Codes.HMB: "health/medical/biomedical research",
    Codes.DS: "disease-specific research",
    Codes.POA: "population origins or ancestry research",
    Codes.MDS: "methods development",
    Codes.NCU: "non-commercial use",
    Codes.IRB: "ethics approval",
    Codes.PUB: "publication of results",
    Codes.COL: "collaboration with the data owner",
    Codes.DL: "download of the encrypted content",
}


def as_codes(value: Codes | int | str | Iterable[str | Codes]) -> Codes:
    """Parse codes from a flag, an int, ``"HMB|NCU"``/``"HMB,NCU"`` or a list of names.

    Examples
    --------
    >>> as_codes("HMB|NCU") == Codes.HMB | Codes.NCU
    True
    """
    from healthlab.errors import InvalidInput

    if isinstance(value, Codes):
        return value
    if isinstance(value, int):
        if value < 0 or value & ~int(KNOWN):
            raise InvalidInput(f"unknown code bits in {value:#x}; use healthlab.Codes")
        return Codes(value)
    names: Iterable[str | Codes]
    if isinstance(value, str):
        names = [p for p in value.replace(",", "|").split("|") if p.strip()]
    else:
        names = value
    result = Codes(0)
    for name in names:
        if isinstance(name, Codes):
            result |= name
            continue
        key = name.strip().upper()
        if key not in Codes.__members__:
            known = ", ".join(Codes.__members__)
            raise InvalidInput(f"unknown use code {name!r}; known codes: {known}")
        result |= Codes[key]
    return result


def permits(codes: Codes | int, terms: Codes | int) -> bool:
    """Whether a request carrying ``codes`` satisfies a dataset's ``terms``.

    Mirrors the contract: GRU permits every purpose, HMB permits DS, every attestable
    requirement of the terms must be attested, a request must state a purpose, and a
    download request needs terms that allow downloads.
    """
    codes, terms = int(codes), int(terms)
    if codes & ~int(KNOWN) or codes & Codes.COL:
        return False
    purposes = codes & _PURPOSE_MASK
    if not purposes:
        return False
    allowed = terms & _PURPOSE_MASK
    if allowed & Codes.GRU:
        allowed = _PURPOSE_MASK
    if allowed & Codes.HMB:
        allowed |= Codes.DS
    if purposes & ~allowed:
        return False
    if codes & Codes.DL and not terms & Codes.DL:
        return False
    required = terms & int(ATTESTABLE)
    return codes & required == required


def code_names(codes: Codes | int) -> str:
    """The codes' names joined by ``|`` (``"HMB|NCU"``), in the order of
    :class:`Codes`; ``""`` for none."""
    return "|".join(c.name or "" for c in Codes if int(codes) & c)


def describe(codes: Codes | int) -> str:
    """Human-readable list of the codes set, e.g. ``"HMB (health/…), NCU (…)"``."""
    flags = [c for c in Codes if int(codes) & c]
    return ", ".join(f"{c.name} ({DESCRIPTIONS[c]})" for c in flags) or "none"
