"""Secure aggregation at scale: a sparse mask graph and sums that survive dropouts.

The design is SecAgg+ (Bell et al., CCS 2020) on top of the project's exact digit
encoding (:mod:`healthlab.encrypted.encoding`):

* **A sparse mask graph.** Each site shares pairwise masks only with its
  neighbours in a Harary graph ``H(k, n)`` — the sites in a pseudo-random ring
  order (drawn from the signed query's hash, which no site chooses), each joined to
  the ``k/2`` before and after it. :func:`degree` gives ``k``: every other site
  while ``n`` is small, and ``O(log n)`` beyond (the smallest degree for which, with
  a third of the sites dropping at random, the chance that some neighbourhood
  loses too many to be recovered stays below :data:`FAILURE_TARGET`). A site's
  cost is then about constant as sites grow.
* **Double masking.** A site's masked digits carry a *self mask* (from a fresh
  seed ``b``) and pairwise masks (from a fresh, per-query X25519 key ``e``). Both
  seeds are split among the site's neighbours by Shamir's scheme with threshold
  ``t``. Once the contributions are in, every surviving site reveals, for each
  neighbour, a share of ``b`` when that neighbour's contribution is in the sum, or a
  share of ``e`` when it is not — never both. The key holder rebuilds the self
  masks of the survivors and the pairwise masks the dropped sites left behind, and
  subtracts them: the exact sum over the survivors.
* **Why a late site stays hidden.** A site declared dropped has its pairwise masks
  rebuilt, but its self mask never is: a contribution that arrives late (or that a
  server held back) is still uniform noise.
* **Why equivocation fails.** With ``2t > k + c`` (``c``: neighbours that may be
  the researcher's own), no server that tells one neighbour "dropped" and another
  "alive" collects ``t`` shares of both seeds of a site, since every honest
  neighbour reveals at most one of them.

Shamir's scheme runs over the prime field of the Mersenne prime 2^31 − 1 with
numpy, a 16-byte secret as five 30-bit limbs each shared alone (information-
theoretic secrecy holds limb by limb). pycryptodome's GF(2^128) implementation
took 184 ms for one split of 150 shares here — 6 minutes for one query of 1,000
sites; this one takes well under a millisecond.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from healthlab.encrypted.encoding import DIGIT_BITS
from healthlab.errors import InvalidInput

__all__ = [
    "COMPLETE_UP_TO",
    "DROPOUT_TARGET",
    "FAILURE_TARGET",
    "MAX_SITES",
    "PRIME",
    "combine",
    "commitment",
    "degree",
    "ephemeral_key",
    "modulus",
    "neighbours",
    "pair_seed",
    "self_mask",
    "split",
    "threshold",
]

#: The share of sites a sum is built to lose (at random) and still be recovered.
DROPOUT_TARGET = 1 / 3
#: The chance, at that dropout rate, that some neighbourhood loses too many.
FAILURE_TARGET = 1e-3
#: Most sites one masked sum carries: digit sums stay below a 2^26 mask modulus,
#: and decrypted CKKS slots up to 2^40 (measured exact at 1,000 × 2^26).
MAX_SITES = 1 << 14
#: Studies up to this many sites mask with every other site (the strongest masks,
#: and any minority of dropouts recovered); beyond, the sparse graph.
COMPLETE_UP_TO = 32
#: The prime field of the secret shares (a Mersenne prime: products fit int64).
PRIME = (1 << 31) - 1
_LIMB_BITS = 30
_LIMBS = 5  # 5 × 30 bits ≥ 128 bits of a 16-byte secret
SECRET_BYTES = 16


def modulus(n_sites: int) -> int:
    """The mask modulus of a sum over ``n_sites``: 2^16 up to 16 sites (as before),
    then just large enough that the sum of ``n_sites`` 12-bit digits stays below it."""
    if not 1 <= n_sites <= MAX_SITES:
        raise InvalidInput(f"between 1 and {MAX_SITES} sites can be summed exactly")
    bits = DIGIT_BITS + max(4, math.ceil(math.log2(n_sites)))
    return 1 << bits


@lru_cache(maxsize=256)
def degree(n_sites: int) -> int:
    """Neighbours of each site in the mask graph of ``n_sites`` (even, unless every
    other site is a neighbour): the smallest ``k`` such that, with
    :data:`DROPOUT_TARGET` of the sites dropping at random, the expected number of
    sites whose neighbourhood keeps fewer than ``t = k/2 + 1`` is below
    :data:`FAILURE_TARGET` — or ``n − 1`` when that is no more."""
    from scipy.stats import hypergeom

    n = n_sites
    if n <= COMPLETE_UP_TO:
        return max(0, n - 1)
    dropped = math.floor(n * DROPOUT_TARGET)
    for k in range(2, n - 1, 2):
        # a neighbourhood of k fails when k/2 or more of it drop (t = k/2 + 1)
        if n * hypergeom(n - 1, dropped, k).sf(k // 2 - 1) <= FAILURE_TARGET:
            return k
    return n - 1


def threshold(k: int, untrusted: int = 0) -> int:
    """Shares that rebuild a seed split among ``k`` neighbours, ``untrusted`` of
    which may be the researcher's: the least ``t`` with ``2t > k + untrusted`` (so
    no equivocating server gets ``t`` shares of both seeds), at most ``k``."""
    return max(1, min(k, (k + min(k, untrusted)) // 2 + 1))


def neighbours(members: Sequence[str], seed: bytes) -> dict[str, tuple[str, ...]]:
    """The mask graph: each member's neighbours, sorted. A Harary graph over the
    members in the ring order of ``sha256(seed | member)``; every other member when
    :func:`degree` says so."""
    return dict(_graph(tuple(sorted(set(members))), seed))


@lru_cache(maxsize=64)
def _graph(names: tuple[str, ...], seed: bytes) -> dict[str, tuple[str, ...]]:
    """:func:`neighbours` of sorted, distinct ``names`` (each site of a simulation
    computes the same graph: once is enough)."""
    n = len(names)
    k = degree(n)
    if k >= n - 1:
        return {m: tuple(x for x in names if x != m) for m in names}
    ring = sorted(
        names, key=lambda m: hashlib.sha256(seed + b"|" + m.encode()).digest()
    )
    half = k // 2
    out: dict[str, tuple[str, ...]] = {}
    for i, m in enumerate(ring):
        near = {ring[(i + d) % n] for d in range(-half, half + 1) if d}
        out[m] = tuple(sorted(near))
    return out


def ephemeral_key(seed: bytes, context: bytes) -> X25519PrivateKey:
    """The per-query X25519 key of a site's pairwise masks, from its 16-byte seed
    (the seed, not the key, is what the neighbours hold shares of)."""
    raw = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"healthlab-ephemeral-mask-key|" + context,
    ).derive(seed)
    return X25519PrivateKey.from_private_bytes(raw)


#: Field elements (limbs) of one 16-byte secret's share.
LIMBS = _LIMBS


def _limbs(secret: bytes) -> np.ndarray:
    """Limbs of a secret of one or more 16-byte blocks (5 limbs a block)."""
    if not secret or len(secret) % SECRET_BYTES:
        raise InvalidInput(f"a shared secret is a multiple of {SECRET_BYTES} bytes")
    mask = (1 << _LIMB_BITS) - 1
    out = []
    for start in range(0, len(secret), SECRET_BYTES):
        value = int.from_bytes(secret[start : start + SECRET_BYTES], "big")
        out += [(value >> (_LIMB_BITS * i)) & mask for i in range(_LIMBS)]
    return np.array(out, dtype=np.int64)


def _unlimb(limbs: np.ndarray) -> bytes:
    out = b""
    values = limbs.tolist()
    for start in range(0, len(values), _LIMBS):
        value = 0
        for i, limb in enumerate(values[start : start + _LIMBS]):
            if not 0 <= limb < (1 << _LIMB_BITS):
                raise ValueError("not a secret of this scheme")
            value |= int(limb) << (_LIMB_BITS * i)
        if value >= 1 << (8 * SECRET_BYTES):
            raise ValueError("not a secret of this scheme")
        out += value.to_bytes(SECRET_BYTES, "big")
    return out


def pair_seed(shared: bytes, a: str, b: str, context: bytes) -> bytes:
    """The seed of the pairwise mask of sites ``a`` and ``b`` for one query, from
    their ephemeral X25519 secret (either side computes it)."""
    pair = "|".join(sorted((a, b))).encode()
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"healthlab-pair-mask|" + pair + b"|" + context,
    ).derive(shared)


def self_mask(seed: bytes, size: int, modulus: int, context: bytes) -> np.ndarray:
    """A site's self mask for one query: uniform in ``[0, modulus)``."""
    from healthlab.encrypted.encoding import mask_stream

    return mask_stream(
        hashlib.sha256(b"healthlab-self-mask|" + context + seed).digest(), size, modulus
    )


def commitment(seed: bytes, context: bytes) -> str:
    """What a site announces of its self-mask seed: the key holder checks the seed it
    rebuilds from the shares against it (a wrong share is named, not summed)."""
    return hashlib.sha256(b"healthlab-self-commit|" + context + seed).hexdigest()


def _field_elements(count: int) -> np.ndarray:
    """``count`` uniform elements of the field, from the OS's randomness."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        raw = np.frombuffer(secrets.token_bytes(4 * (count + 8)), dtype="<u4")
        values = (raw & 0x7FFFFFFF).astype(np.int64)
        out = np.concatenate([out, values[values < PRIME]])
    return out[:count]


def split(secret: bytes, t: int, xs: Sequence[int]) -> np.ndarray:
    """Shamir shares of ``secret`` (one or more 16-byte blocks) at the points ``xs``
    (distinct, in ``1..PRIME−1``), any ``t`` of which rebuild it: an array
    ``(len(xs), 5 × blocks)`` — each block's 5 limbs shared alone, so a block's
    columns can be revealed without the others."""
    points = np.asarray(xs, dtype=np.int64)
    if not 1 <= t <= points.size or t >= 1 << 15:
        raise InvalidInput(f"a threshold of {t} with {points.size} shares")
    if len(set(points.tolist())) != points.size or points.min(initial=1) < 1:
        raise InvalidInput("share points must be distinct and positive")
    limbs = _limbs(secret)
    coefficients = _field_elements((t - 1) * limbs.size).reshape(t - 1, limbs.size)
    powers = _powers(tuple(points.tolist()), t - 1)  # x^1 .. x^(t-1), mod p
    # powers @ coefficients mod p without overflow: the coefficients in 16-bit halves
    # (a product < 2^47, a sum of t of them < 2^63 while t < 2^15)
    low = (powers @ (coefficients & 0xFFFF)) % PRIME
    high = (powers @ (coefficients >> 16)) % PRIME
    shares = ((high << 16) % PRIME + low) % PRIME
    return np.asarray((shares + limbs[None, :]) % PRIME, dtype=np.int64)


@lru_cache(maxsize=64)
def _powers(points: tuple[int, ...], degree: int) -> np.ndarray:
    """``x^1 .. x^degree`` mod :data:`PRIME` for each point (one table per graph
    degree and threshold: every site of a query uses the same)."""
    table = np.ones((len(points), degree), dtype=np.int64)
    x = np.asarray(points, dtype=np.int64)
    column = np.ones(len(points), dtype=np.int64)
    for d in range(degree):
        column = (column * x) % PRIME
        table[:, d] = column
    table.setflags(write=False)
    return table


def combine(
    shares: Mapping[int, np.ndarray] | Sequence[tuple[int, np.ndarray]], t: int
) -> bytes:
    """The secret from ``t`` (or more; the first ``t`` are used) shares
    ``{x: share}``; :class:`ValueError` when fewer are given or they do not make
    a secret of this scheme."""
    items = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    if len(items) < t:
        raise ValueError(f"{len(items)} shares, {t} needed")
    items = items[:t]
    xs = np.array([x for x, _ in items], dtype=np.int64)
    try:
        ys = np.array([np.asarray(y, dtype=np.int64) for _, y in items])
    except (ValueError, OverflowError, TypeError):
        raise ValueError("shares of different shapes") from None
    if ys.ndim != 2 or ys.min(initial=0) < 0 or ys.max(initial=0) >= PRIME:
        raise ValueError("a share is not made of field elements")
    if xs.min(initial=1) < 1 or xs.max(initial=1) >= PRIME:
        raise ValueError("a share point is not in the field")
    if len(set(xs.tolist())) != xs.size:
        raise ValueError("two shares at one point")
    # Lagrange at 0: λ_i = Π_{j≠i} x_j / (x_j − x_i)
    diff = (xs[None, :] - xs[:, None]) % PRIME
    np.fill_diagonal(diff, 1)
    numerator = np.ones(t, dtype=np.int64)
    denominator = np.ones(t, dtype=np.int64)
    for j in range(t):
        xj = np.where(np.arange(t) == j, 1, xs[j])
        numerator = (numerator * xj) % PRIME
        denominator = (denominator * diff[:, j]) % PRIME
    inverses = np.array(
        [pow(int(d), PRIME - 2, PRIME) for d in denominator], dtype=np.int64
    )
    weights = (numerator * inverses) % PRIME
    limbs = np.zeros(ys.shape[1], dtype=np.int64)
    for w, y in zip(weights, ys, strict=True):
        limbs = (limbs + (int(w) * y) % PRIME) % PRIME
    return _unlimb(limbs)
