"""Exact fixed-point encoding of site totals into small CKKS slots, with pairwise masks.

CKKS is approximate: a slot carries about 1e-9 absolute error. Site totals such as
Σx² for a million values of 1e6 (1e18) would lose everything. So each total ``v``
(a float64) is turned into the exact integer ``V = round(v · 2^F) + OFFSET`` and
written as ``DIGITS`` base-2^12 digits.
Each site adds masks to every digit modulo a power of two ``M`` — 2^16 up to 16
sites, and ``2^(12 + ⌈log2 n⌉)`` for ``n`` sites beyond
(:func:`healthlab.encrypted.secagg.modulus`); the masks cancel mod ``M`` (or are
rebuilt and removed, :mod:`healthlab.encrypted.secagg`), so the key holder, after
decrypting the *sum* across sites and rounding each slot to an integer, recovers
every digit sum exactly (it is below ``M``) and rebuilds the exact sum of the ``V``
with Python integers. A single site's masked digits are uniform noise to anyone,
the key holder included. Decrypted slots stay exact well beyond: 1,000 sums of
values below 2^26 decrypted with no error at all.

Every decrypted slot must be within a few 1e-3 of an integer in range, and unused
slots must be 0: a ciphertext under another key, an overflow or tampering fails this
check instead of decrypting to garbage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from healthlab.encrypted.keys import IntegrityError
from healthlab.errors import InvalidInput

__all__ = [
    "DIGITS",
    "FRACTION_BITS",
    "MAX_ABS",
    "MAX_SITES",
    "decode_sum",
    "encode_totals",
    "mask_stream",
    "mask_vector",
]

DIGIT_BITS = 12
MOD_BITS = 16
MODULUS = 1 << MOD_BITS
#: Sites whose digit sums still fit below the default (2^16) mask modulus.
MAX_SITES = 1 << (MOD_BITS - DIGIT_BITS)
#: Fractional bits kept of every total (resolution 2^-64 ≈ 5e-20).
FRACTION_BITS = 64
#: Digits per total: 13 × 12 = 156 bits = sign + 91 integer bits + 64 fractional bits.
DIGITS = 13
_TOTAL_BITS = DIGITS * DIGIT_BITS
_OFFSET = 1 << (_TOTAL_BITS - 1)
#: Largest magnitude a single site total may have (2^91 ≈ 2.5e27).
MAX_ABS = float(1 << (_TOTAL_BITS - 1 - FRACTION_BITS))
_TOLERANCE = 0.05  # decrypted slots must sit this close to an integer


def encode_totals(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Digits (int64, ``len(values) * DIGITS`` of them) of the exact fixed-point totals.

    Raises :class:`~healthlab.errors.InvalidInput` for NaN, infinity or a magnitude at
    or above :data:`MAX_ABS`, which the encoding cannot carry.
    """
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise InvalidInput("a total is NaN or infinite; it cannot be encrypted")
    if array.size and np.abs(array).max() >= MAX_ABS:
        raise InvalidInput(
            f"a total reaches {MAX_ABS:.3g} in magnitude, beyond what the encoding "
            "carries; rescale the column (e.g. other units)"
        )
    digits = np.empty(array.size * DIGITS, dtype=np.int64)
    base_mask = (1 << DIGIT_BITS) - 1
    for i, value in enumerate(array.tolist()):
        # float * 2**F is exact; round() on it gives the nearest integer exactly
        fixed = round(math.ldexp(value, FRACTION_BITS)) + _OFFSET
        for k in range(DIGITS):
            digits[i * DIGITS + k] = (fixed >> (DIGIT_BITS * k)) & base_mask
    return digits


def mask_stream(seed: bytes, size: int, modulus: int = MODULUS) -> np.ndarray:
    """``size`` uniform values in ``[0, modulus)`` (a power of two) from SHAKE-256 of
    ``seed``: 2 bytes a value up to 2^16, 4 beyond."""
    width = 2 if modulus <= MODULUS else 4
    stream = hashlib.shake_256(seed).digest(width * size)
    values = np.frombuffer(stream, dtype="<u2" if width == 2 else "<u4")
    return np.mod(values.astype(np.int64), modulus)


def mask_vector(
    seeds: Sequence[tuple[bytes, int]], size: int, modulus: int = MODULUS
) -> np.ndarray:
    """The sum of pairwise masks mod ``modulus`` (2^16 by default) for one site.

    ``seeds`` holds ``(seed, sign)`` pairs: +1 when this site adds the pair's stream,
    -1 when it subtracts it (the other site of the pair does the opposite), so the
    masks of all sites cancel modulo the modulus. The stream is SHAKE-256 of the seed.
    """
    total = np.zeros(size, dtype=np.int64)
    for seed, sign in seeds:
        total += sign * mask_stream(seed, size, modulus)
    return np.mod(total, modulus)


def mask_digits(
    digits: np.ndarray, mask: np.ndarray, modulus: int = MODULUS
) -> np.ndarray:
    """Masked digits: uniform in [0, modulus) to anyone without the other masks."""
    return np.asarray(np.mod(digits + mask, modulus), dtype=np.int64)


def decode_sum(
    slots: np.ndarray,
    n_totals: int,
    n_sites: int,
    *,
    modulus: int = MODULUS,
    correction: np.ndarray | None = None,
) -> list[float]:
    """Rebuild ``n_totals`` sums across ``n_sites`` from decrypted slot values.

    Every used slot must be near an integer in ``[0, n_sites · modulus)`` and every
    unused slot near 0; otherwise :class:`IntegrityError` (another key, overflow,
    tampering). ``correction`` (mod ``modulus``) is subtracted first: the masks that
    did not cancel (a self mask, a dropped site's pairwise masks); the digit sums
    left must then be sums of ``n_sites`` digits.
    """
    if n_sites < 1 or n_sites * ((1 << DIGIT_BITS) - 1) >= modulus:
        raise InvalidInput(
            f"{n_sites} site(s) cannot be summed exactly under a mask modulus of "
            f"2^{modulus.bit_length() - 1} (healthlab.encrypted.secagg.modulus)"
        )
    used = n_totals * DIGITS
    rounded = np.rint(slots)
    if np.abs(slots - rounded).max(initial=0.0) > _TOLERANCE:
        raise IntegrityError(
            "the decrypted aggregate is not made of integers: a ciphertext was made "
            "under another key, overflowed or was tampered with"
        )
    body, rest = rounded[:used], rounded[used:]
    if rest.size and np.abs(rest).max() > 0:
        raise IntegrityError("unused slots of the aggregate are not zero: tampering?")
    if body.size and (body.min() < 0 or body.max() >= n_sites * modulus):
        raise IntegrityError("an aggregate slot is out of range: tampering or overflow")
    digit_sums = np.mod(body.astype(np.int64), modulus)
    if correction is not None:
        digit_sums = np.mod(
            digit_sums - np.asarray(correction[:used], np.int64), modulus
        )
        if digit_sums.size and digit_sums.max() > n_sites * ((1 << DIGIT_BITS) - 1):
            raise IntegrityError(
                "the unmasked aggregate is not a sum of digits: a contribution or a "
                "revealed share was tampered with"
            )
    totals = []
    scale = 1 << FRACTION_BITS
    for i in range(n_totals):
        exact = 0
        for k in range(DIGITS):
            exact += int(digit_sums[i * DIGITS + k]) << (DIGIT_BITS * k)
        exact -= n_sites * _OFFSET
        totals.append(exact / scale)  # int / int: correctly rounded float
    return totals
