"""Every-value mode: sites encrypt each value and the aggregator computes on rows.

This is the mode an aggregator needs when it must compute on rows (here: squares for
the variance), and the mode that teaches what encrypting site totals saves: the upload
grows from one ciphertext per site to one per 4096 values.

Each site divides its values by a public bound ``B`` (so squares stay far inside what
CKKS carries) and encrypts them 4096 at a time, spread over a process pool so both
cores work. The aggregator, holding an evaluation context (public, relinearization
and Galois keys — never the secret key), adds the ciphertexts, squares each one
*without* relinearizing or rescaling (cheap: the size-3 products are added and
relinearized once), and folds every slot into one with rotations, so the key holder
decrypts only the totals Σx and Σx² — never a slot that holds a few rows.

The squaring bias: rescaling after a multiplication divides by the dropped prime
``q`` (≈ 2^40 but not equal) while TenSEAL labels the result with scale 2^40, which
biases every squared value by the factor ``2^40 / q`` (~1e-7 relative here). We do
not rescale — the product keeps its exact scale 2^80, which SEAL tracks — so there is
no bias; :func:`square_bias_factor` gives the correction for code that does.
The pooled count travels through the exact masked sum of site totals.

Transport: a value ciphertext travels as SEAL saves it (compressed, with SEAL's
header), as a file in a private spool directory (in memory under ``/dev/shm``). The
aggregator loads it straight into SEAL: no TenSEAL envelope to parse and copy, and
no pipe for the pool's workers to block on while the aggregator computes. SEAL
refuses a ciphertext made under other parameters when loading it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tenseal as ts
import tenseal.sealapi as sealapi

from healthlab.encrypted.keys import IntegrityError, KeyHolder, PublicContext
from healthlab.encrypted.protocol import Query, Totals, _sign, run_query
from healthlab.encrypted.stats import attach_receipt
from healthlab.errors import DataRefused, InvalidInput
from healthlab.sites import Site, as_sites

__all__ = [
    "EncryptedValues",
    "describe_values",
    "encrypt_values",
    "square_bias_factor",
]

#: Noise of one folded slot sum per ciphertext added, in units of the public bound
#: (measured: ~6e-5 on the folded sum of 49 ciphertexts of 4096 values).
NOISE_PER_SLOT = 1.5e-7


def rounding_quantum(n_ciphertexts: int, slots: int) -> float:
    """Power of two at least 4× the expected noise of a folded every-value total.

    The key holder rounds decrypted totals to this quantum, so raw decryptions —
    which could leak the secret key (Li–Micciancio 2021) — never leave it.
    """
    noise = NOISE_PER_SLOT * math.sqrt(max(1, n_ciphertexts) * slots)
    return float(2.0 ** math.ceil(math.log2(4 * noise)))


_worker_context: ts.Context | None = None


def _init_worker(public: bytes) -> None:
    global _worker_context
    _worker_context = ts.context_from(public)


def _encrypt_to(context: ts.Context, chunk: np.ndarray, spool: str) -> str:
    """Encrypt ``chunk`` and save the SEAL ciphertext as a new file in ``spool``."""
    fd, path = tempfile.mkstemp(dir=spool, suffix=".ct")
    os.close(fd)
    ts.ckks_vector(context, chunk).ciphertext()[0].save(path)
    return path


def _encrypt_batch(chunks: list[np.ndarray], spool: str) -> list[str]:
    """In a pool worker: encrypt ``chunks`` into files in ``spool``; return paths.

    Ciphertexts travel through files, not back through the pool's pipe: the
    aggregator's TenSEAL calls hold the GIL for a millisecond at a time, which
    starves the thread that drains the pipe and would leave the workers blocked on
    writes instead of encrypting.
    """
    assert _worker_context is not None
    return [_encrypt_to(_worker_context, chunk, spool) for chunk in chunks]


def _spool_parent() -> str | None:
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp inside it, mode 700
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _take(path: str) -> bytes:
    """Read a spooled ciphertext (SEAL's serialization) and remove its file."""
    try:
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


#: chunks per task sent to a pool worker, and tasks in flight per worker: enough
#: queued work (~60 ciphertexts, ~20 MB) to keep the workers busy while the
#: aggregator finishes a column, bounded so memory does not grow with the data
BATCH = 4
IN_FLIGHT_PER_WORKER = 8


def _chunks(values: np.ndarray, slots: int) -> list[np.ndarray]:
    padded = np.zeros(-(-values.size // slots) * slots)  # zeros add nothing to sums
    padded[: values.size] = values
    return [padded[i : i + slots] for i in range(0, padded.size, slots)]


def encryption_pool(
    public: PublicContext, workers: int | None = None
) -> ProcessPoolExecutor:
    """A process pool whose workers hold ``public`` (loaded once per worker)."""
    count = workers if workers is not None else (os.cpu_count() or 1)
    return ProcessPoolExecutor(
        max(1, count), initializer=_init_worker, initargs=(public.data,)
    )


def _encrypt_many(
    arrays: Sequence[np.ndarray],
    public: PublicContext,
    pool: ProcessPoolExecutor | None,
    workers: int = 1,
) -> Iterator[tuple[int, str]]:
    """Encrypt several arrays as one stream: ``(array index, ciphertext file)``.

    The consumer takes each file (loads or reads it, then may unlink it); whatever
    is left is removed when the stream ends. Every chunk of every array goes
    through one bounded window of pool tasks (``workers`` ×
    :data:`IN_FLIGHT_PER_WORKER`), so the workers never wait between arrays (sites,
    columns) or while the consumer — the aggregator — finishes a
    column; results come back in submission order.
    """
    slots = public.params.slots
    chunks = [(i, c) for i, a in enumerate(arrays) for c in _chunks(a, slots)]
    spool = tempfile.mkdtemp(prefix="healthlab-ct-", dir=_spool_parent())
    if pool is None or len(chunks) < 4:
        context = public.load()
        try:
            for i, chunk in chunks:
                yield i, _encrypt_to(context, chunk, spool)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        return
    batches = deque(chunks[k : k + BATCH] for k in range(0, len(chunks), BATCH))
    pending: deque[tuple[list[int], Future[list[str]]]] = deque()

    def submit() -> None:
        batch = batches.popleft()
        owners = [i for i, _ in batch]
        work = pool.submit(_encrypt_batch, [c for _, c in batch], spool)
        pending.append((owners, work))

    try:
        while batches and len(pending) < IN_FLIGHT_PER_WORKER * max(1, workers):
            submit()
        while pending:
            owners, future = pending.popleft()
            if batches:
                submit()
            yield from zip(owners, future.result(), strict=True)
    finally:
        for _, future in pending:  # an abandoned stream cancels what has not started
            future.cancel()
        for _, future in pending:  # and waits for what has, before removing files
            with contextlib.suppress(Exception):
                future.result()
        shutil.rmtree(spool, ignore_errors=True)


def encrypt_values(
    values: np.ndarray, public: PublicContext, *, workers: int | None = None
) -> list[bytes]:
    """Encrypt ``values`` 4096 at a time; ``workers`` processes (default: all cores).

    Each ciphertext is SEAL's serialization, as the sites upload it
    (:meth:`ValueAggregator.add` takes it).
    """
    count = workers if workers is not None else (os.cpu_count() or 1)
    if count <= 1 or len(_chunks(values, public.params.slots)) < 4:
        return [_take(p) for _, p in _encrypt_many([values], public, None)]
    with encryption_pool(public, count) as pool:
        return [_take(p) for _, p in _encrypt_many([values], public, pool, count)]


@dataclass
class EncryptedValues:
    """One site's encrypted, scaled values of one column."""

    site: str
    column: str
    fingerprint: str
    ciphertexts: list[bytes] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes uploaded."""
        return sum(len(c) for c in self.ciphertexts)


class ValueAggregator:
    """Aggregator: Σx and Σx² over every value of one column, folded into every slot.

    Holds the evaluation context (loaded once) and accepts ciphertexts made under the
    matching public context. Works on SEAL ciphertexts directly: squares stay
    unrelinearized (size 3) while they are added as they arrive, then the sum is
    relinearized once and folded with rotations.
    """

    def __init__(self, evaluation: PublicContext, accepted: str) -> None:
        self.context = evaluation.load()
        if not (self.context.has_galois_keys() and self.context.has_relin_keys()):
            raise IntegrityError(
                "the evaluation context lacks relinearization/Galois keys"
            )
        self.slots = evaluation.params.slots
        self.accepted = accepted
        self.seal = self.context.seal_context().data
        self.evaluator = sealapi.Evaluator(self.seal)
        self.start()

    def start(self) -> None:
        """Begin a new column."""
        self.linear: Any = None
        self.squares: Any = None
        self.count = 0

    def add(self, site: str, fingerprint: str, blob: bytes) -> None:
        """Add one site ciphertext of values (SEAL's serialization) and its square."""
        with tempfile.NamedTemporaryFile(dir=_spool_parent(), suffix=".ct") as tmp:
            tmp.write(blob)
            tmp.flush()
            self.add_file(site, fingerprint, tmp.name)

    def add_file(self, site: str, fingerprint: str, path: str) -> None:
        """Add one site ciphertext of values (a SEAL ciphertext file) and its square."""
        if fingerprint != self.accepted:
            raise IntegrityError(f"site {site} encrypted under another key")
        value = sealapi.Ciphertext()
        try:
            value.load(self.seal, path)
        except (RuntimeError, ValueError) as exc:  # SEAL: invalid for these parms
            raise IntegrityError(
                f"site {site} sent a ciphertext that does not load under this "
                f"study's parameters ({exc})"
            ) from None
        square = sealapi.Ciphertext()
        self.evaluator.square(value, square)
        if self.linear is None:
            self.linear, self.squares = value, square
        else:
            self.evaluator.add_inplace(self.linear, value)
            self.evaluator.add_inplace(self.squares, square)
        self.count += 1

    def finish(self) -> tuple[bytes, bytes]:
        """The folded Σx and Σx² (serialized SEAL ciphertexts)."""
        if self.linear is None:
            raise DataRefused("no values to aggregate")
        self.evaluator.relinearize_inplace(self.squares, self.context.relin_keys().data)
        with tempfile.TemporaryDirectory(prefix="healthlab-agg-") as tmp:
            folded = []
            for ciphertext in (self.linear, self.squares):
                _fold(ciphertext, self.evaluator, self.context, self.slots)
                folded.append(_save(ciphertext, Path(tmp)))
        return folded[0], folded[1]


def _fold(ciphertext: Any, evaluator: Any, context: ts.Context, slots: int) -> None:
    """Add every rotation of ``ciphertext`` so each slot holds the sum of all slots."""
    galois = context.galois_keys().data
    step = 1
    while step < slots:
        rotated = sealapi.Ciphertext()
        evaluator.rotate_vector(ciphertext, step, galois, rotated)
        evaluator.add_inplace(ciphertext, rotated)
        step *= 2


def _save(ciphertext: Any, directory: Path) -> bytes:
    path = directory / "ct"
    ciphertext.save(str(path))
    return path.read_bytes()


def square_bias_factor(public: PublicContext) -> float:
    """``q / 2^scale``: multiply a TenSEAL ``square()`` result by this to unbias it.

    TenSEAL rescales a product by the last data prime ``q`` but labels it with scale
    2^scale, so every squared value decrypts ``2^scale / q`` times too large (about
    1.3e-7 relative with the default primes). This module never rescales products;
    the factor is for code that uses TenSEAL's arithmetic directly.
    """
    moduli = (
        public.load().seal_context().data.key_context_data().parms().coeff_modulus()
    )
    dropped = moduli[len(moduli) - 2].value()
    return float(dropped / 2.0**public.params.scale_bits)


def _count_totals(site: Site, query: Query) -> Totals:
    columns = list(query.spec["columns"])
    kept, dropped = site.rows(columns, dropna=bool(query.spec.get("dropna")))
    mask = np.zeros(site.n_rows, dtype=bool)
    mask[kept.index.to_numpy()] = True
    return [float(dropped), float(len(kept))], {c: [mask] for c in columns}


def describe_values(
    sites: Sequence[Site] | Mapping[str, pd.DataFrame],
    columns: Sequence[str],
    *,
    bound: float | Mapping[str, float],
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    workers: int | None = None,
    min_sites: int = 2,
) -> pd.DataFrame:
    """``count``, ``mean``, ``std``, ``var``, ``sum`` with every value encrypted.

    ``bound`` is a public bound on ``|x|`` per column (a site refuses values beyond
    it). Precision is that of CKKS, not exact: the decrypted totals are rounded to
    a power of two above their noise (:func:`rounding_quantum`, ~1e-5 of the bound
    for a few thousand values), so means and standard deviations come within about
    1e-6 relative; :func:`healthlab.encrypted.describe` is exact and far cheaper.

    Examples
    --------
    >>> describe_values(
    ...     {"a": frame_a, "b": frame_b}, ["age"], bound=120
    ... )  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    cols = list(columns)
    bounds = {c: float(bound[c] if isinstance(bound, Mapping) else bound) for c in cols}
    if any(not np.isfinite(b) or b <= 0 for b in bounds.values()):
        raise InvalidInput("bounds must be positive and finite")
    keys = keys or KeyHolder()
    query = Query("values", {"columns": cols, "dropna": dropna}, 2, min_sites=min_sites)
    counted = run_query(
        site_list, query, _count_totals, keys=keys, researcher=researcher
    )
    n = counted.totals[1]
    participants = counted.sites
    evaluation = keys.evaluation_context()
    upload = Query(
        "values-upload", {"columns": cols, "bounds": bounds, "dropna": dropna}, 0
    )
    signed = _sign(participants, upload, researcher)
    for site in participants:  # every site checks the second query too
        site.authorize(signed, query_hash=upload.hash)
    results = {}
    # the count's masked-sum round counts too
    uploads: dict[str, int] = {
        s.name: counted.upload_bytes.get(s.name, 0) for s in participants
    }
    public = keys.public_context()  # sites encrypt with the public key only
    aggregator = ValueAggregator(evaluation, accepted=public.fingerprint)
    count = workers if workers is not None else (os.cpu_count() or 1)
    # at the sites: every column scaled and checked against its bound before
    # anything is encrypted, so a refusal leaves no partial upload
    work = [(c, s) for c in cols for s in participants]
    scaled = [_site_column(s, c, bounds[c], dropna) for c, s in work]
    with encryption_pool(public, count) if count > 1 else _no_pool() as pool:
        # one stream for every site and column: the pool encrypts the next column
        # while the aggregator finishes this one
        stream = _encrypt_many(scaled, public, pool, count)
        next_item = next(stream, None)
        for column in cols:
            aggregator.start()
            while next_item is not None and work[next_item[0]][0] == column:
                site = work[next_item[0]][1]
                path = next_item[1]
                uploads[site.name] += os.path.getsize(path)
                aggregator.add_file(site.name, public.fingerprint, path)
                os.unlink(path)
                next_item = next(stream, None)
            s1_blob, s2_blob = aggregator.finish()
            s1 = keys.decrypt_folded(s1_blob, fingerprint=evaluation.fingerprint)
            s2 = keys.decrypt_folded(s2_blob, fingerprint=evaluation.fingerprint)
            b = bounds[column]
            quantum = rounding_quantum(aggregator.count, evaluation.params.slots)
            total = round(s1 / quantum) * quantum * b
            squares = round(s2 / quantum) * quantum * b * b
            mean = total / n
            var = (squares - total * total / n) / (n - 1)
            results[column] = {
                "count": n,
                "mean": mean,
                "std": np.sqrt(var),
                "var": var,
                "sum": total,
            }
    table = pd.DataFrame(results)
    return attach_receipt(
        table,
        [counted],
        kind="describe",
        parameters={"columns": cols, "mode": "every value", "bounds": bounds},
        encryption={
            "mode": "every value",
            "upload_bytes": uploads,
            "rounding": "to 4x the expected CKKS noise (rounding_quantum)",
        },
    )


@contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def _site_column(site: Site, column: str, bound: float, dropna: bool) -> np.ndarray:
    """At the site: one column scaled by its public bound (refused beyond it)."""
    kept, _ = site.rows([column], dropna=dropna)
    x = kept[column].to_numpy(dtype=np.float64)
    if x.size and np.abs(x).max() > bound:
        raise DataRefused(
            f"site {site.name}: {column!r} exceeds the public bound {bound:g}; "
            "raise the bound"
        )
    return np.asarray(x / bound)
