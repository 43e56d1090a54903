"""Every-value mode: sites encrypt each value and the aggregator computes on rows.

This is the mode an aggregator needs when it must compute on rows (here: squares for
the variance), and the mode that teaches what encrypting site totals saves: the upload
grows from one ciphertext per site to one per 4096 values.

Each site divides its values by a public bound ``B`` (so squares stay far inside what
CKKS carries) and encrypts them 4096 at a time. The aggregator, holding an evaluation
context (public, relinearization and Galois keys — never the secret key), adds the
ciphertexts, squares each one *without* relinearizing or rescaling (cheap: the size-3
products are added and relinearized once), packs Σx into the imaginary part of the
complex slots (Σx² + iΣx: one multiplication by a plaintext that is exactly i) and
folds every slot into one with rotations, so the key holder decrypts only the totals
Σx and Σx² — never a slot that holds a few rows.

On one machine (teaching, tests) every party shares the cores: the sites' encryption
runs in a process pool of ``cores - 1`` workers plus this process, which encrypts the
next chunk itself whenever the pool's next ciphertext is not ready, and aggregates as
ciphertexts arrive; the count query's secure sum runs while the pool encrypts.

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
import itertools
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tenseal as ts
import tenseal.sealapi as sealapi

from healthlab.encrypted.keys import (
    CKKSParams,
    IntegrityError,
    KeyHolder,
    PublicContext,
)
from healthlab.encrypted.protocol import (
    Query,
    Totals,
    prepare_query,
    sign_query,
)
from healthlab.encrypted.stats import population_columns, release
from healthlab.encrypted.tables import ResultTable
from healthlab.errors import DataRefused, InvalidInput
from healthlab.site_data import numeric_column
from healthlab.sites import LEFT_OUT, Site, as_sites

__all__ = [
    "EncryptedValues",
    "describe_values",
    "encrypt_values",
    "max_rows",
    "square_bias_factor",
]

#: Noise of one folded slot sum per ciphertext added, in units of the public bound,
#: at scale 2^40 (measured: ~6e-5 on the folded sum of 49 ciphertexts of 4096 values
#: when Σx was rotated at scale 2^40; packed with Σx² it is now rotated at 2^80 and
#: measures ~10× less, so this stays an upper estimate).
NOISE_PER_SLOT = 1.5e-7

#: bits kept free above the largest folded total a ciphertext must carry
HEADROOM_BITS = 3


def rounding_quantum(n_ciphertexts: int, slots: int, scale_bits: int = 40) -> float:
    """Power of two at least 4× the expected noise of a folded every-value total.

    The key holder rounds decrypted totals to this quantum, so raw decryptions —
    which could leak the secret key (Li–Micciancio 2021) — never leave it. The noise
    is relative to the scale: a scale below 2^40 coarsens the quantum as much.
    """
    noise = NOISE_PER_SLOT * math.sqrt(max(1, n_ciphertexts) * slots)
    noise *= 2.0 ** max(0, 40 - scale_bits)
    return float(2.0 ** math.ceil(math.log2(4 * noise)))


def max_rows(params: CKKSParams) -> int:
    """The most rows per column ``describe_values`` can sum under ``params``.

    The folded Σx² + iΣx (values scaled into [-1, 1], at scale 2^2s) must stay below
    half the data modulus, with :data:`HEADROOM_BITS` to spare.
    """
    data_bits = sum(params.coeff_mod_bit_sizes[:-1])
    spare = data_bits - 1 - 2 * params.scale_bits - HEADROOM_BITS - 0.5  # |·| ≤ √2 n
    return int(2.0**spare) if spare > 0 else 0


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
#: tasks in flight per worker when the consumer's process encrypts too: enough for
#: the workers to go on while it finishes a column (~50 ms), few enough that little
#: is left queued at the end, when it takes back what the pool has not started
LOCAL_IN_FLIGHT_PER_WORKER = 3


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


class _EncryptionStream:
    """Encrypt several arrays as one stream of ``(array index, ciphertext file)``.

    ``array(i)`` gives array ``i`` of ``count`` when the stream first needs its
    chunks, so a caller can start the pool on the first array and prepare the rest
    while it works. Chunks go to the pool through one bounded window of tasks, so
    the workers never wait between arrays (sites, columns) or while the consumer —
    the aggregator — finishes a column. The consumer takes each file (loads or reads
    it, then may unlink it); whatever is left is removed when the stream is closed.

    ``local``: the consumer's own process is one more lane. Whenever the pool's
    next result is not ready, it encrypts the next chunk itself instead of waiting
    (at the end it takes back tasks the pool has not started), so a consumer that
    also aggregates shares the cores with ``workers`` processes instead of
    competing with one per core. Results then come in completion order; without
    ``local`` they come in submission order. Without a pool, every chunk is
    encrypted in process.
    """

    def __init__(
        self,
        count: int,
        array: Callable[[int], np.ndarray],
        public: PublicContext,
        pool: ProcessPoolExecutor | None,
        workers: int = 1,
        *,
        local: bool = False,
    ) -> None:
        self._array = array
        self._count = count
        self._public = public
        self._pool = pool
        self._local = local
        per_worker = LOCAL_IN_FLIGHT_PER_WORKER if local else IN_FLIGHT_PER_WORKER
        self._window = per_worker * max(1, workers)
        self._first_window = IN_FLIGHT_PER_WORKER * max(1, workers)
        self._chunks = self._all_chunks()
        self._reclaimed: deque[tuple[int, np.ndarray]] = deque()
        self._pending: deque[_Task] = deque()
        self.spool = tempfile.mkdtemp(prefix="healthlab-ct-", dir=_spool_parent())

    def _all_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        slots = self._public.params.slots
        for i in range(self._count):
            for chunk in _chunks(self._array(i), slots):
                yield i, chunk

    def _submit(self) -> None:
        assert self._pool is not None
        batch = list(itertools.islice(self._chunks, BATCH))
        if batch:
            chunks = [c for _, c in batch]
            work = self._pool.submit(_encrypt_batch, chunks, self.spool)
            self._pending.append(_Task(batch, work))

    def start(self) -> None:
        """Fill the window: the pool's workers start encrypting.

        The first window is the deep one even with ``local``: it keeps the workers
        busy while the consumer prepares (e.g. runs the count query) before it
        takes any result.
        """
        if self._pool is not None:
            while len(self._pending) < self._first_window:
                before = len(self._pending)
                self._submit()
                if len(self._pending) == before:
                    return

    def _front(self) -> Iterator[tuple[int, str]]:
        """The oldest task's files (waiting for it); a new task takes its place
        (none while more than the window is in flight)."""
        task = self._pending.popleft()
        if len(self._pending) < self._window:
            self._submit()
        owners = [i for i, _ in task.batch]
        yield from zip(owners, task.future.result(), strict=True)

    def _next_local(self) -> tuple[int, np.ndarray] | None:
        """The next chunk for this process: a new one, else one the pool has not
        started (its task cancelled)."""
        if not self._reclaimed:
            item = next(self._chunks, None)
            if item is not None:
                return item
            for task in reversed(self._pending):
                if task.future.cancel():
                    self._reclaimed.extendleft(reversed(task.batch))
            self._pending = deque(t for t in self._pending if not t.future.cancelled())
        return self._reclaimed.popleft() if self._reclaimed else None

    def results(self) -> Iterator[tuple[int, str]]:
        """``(array index, ciphertext file)`` for every chunk of every array."""
        if self._pool is None:
            context = self._public.load()
            for i, chunk in self._chunks:
                yield i, _encrypt_to(context, chunk, self.spool)
            return
        self.start()
        context = self._public.load() if self._local else None
        while True:
            if self._pending and (context is None or self._pending[0].future.done()):
                yield from self._front()
                continue
            item = self._next_local() if context is not None else None
            if item is not None:
                assert context is not None
                yield item[0], _encrypt_to(context, item[1], self.spool)
            elif self._pending:
                yield from self._front()
            else:
                return

    def close(self) -> None:
        """Cancel what has not started, wait for what has, remove every file."""
        for task in self._pending:
            task.future.cancel()
        for task in self._pending:
            with contextlib.suppress(Exception):
                task.future.result()
        self._pending.clear()
        shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> _EncryptionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Task:
    """Chunks sent to the pool in one task, and its future list of files."""

    batch: list[tuple[int, np.ndarray]]
    future: Future[list[str]]


def _encrypt_many(
    arrays: Sequence[np.ndarray],
    public: PublicContext,
    pool: ProcessPoolExecutor | None,
    workers: int = 1,
    *,
    local: bool = False,
) -> Iterator[tuple[int, str]]:
    """Encrypt ``arrays`` as one stream: ``(array index, ciphertext file)``.

    The consumer takes each file; what is left is removed when the stream ends.
    ``local``: this process encrypts too (see :class:`_EncryptionStream`).
    """
    with _EncryptionStream(
        len(arrays), arrays.__getitem__, public, pool, workers, local=local
    ) as stream:
        yield from stream.results()


def _ready() -> None:
    """A no-op task: submitting one per worker starts the pool's processes."""


def _warm(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start ``pool``'s workers now (each loads the public context) instead of on
    the first real task."""
    for _ in range(workers):
        pool.submit(_ready)


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
        if self.linear is None:
            self.linear, self.squares = value, sealapi.Ciphertext()
            self.evaluator.square(value, self.squares)
        else:  # add, then square in place: no new ciphertext to allocate
            self.evaluator.add_inplace(self.linear, value)
            self.evaluator.square_inplace(value)
            self.evaluator.add_inplace(self.squares, value)
        self.count += 1

    def finish(self) -> bytes:
        """Σx and Σx², folded together: one serialized SEAL ciphertext whose every
        slot holds the complex number Σx² + i·Σx
        (:meth:`KeyHolder.decrypt_folded_pair` reads both).

        Σx is multiplied by i at scale 2^s — a plaintext that is exactly 2^s·X^(N/2),
        since X^(N/2) is i at every slot — which brings it to Σx²'s scale 2^2s and
        into the imaginary part, so one fold of rotations serves both sums, and Σx
        is rotated at scale 2^2s, where the rotations' noise is negligible.
        """
        if self.linear is None:
            raise DataRefused("no values to aggregate")
        self.evaluator.relinearize_inplace(self.squares, self.context.relin_keys().data)
        times_i = sealapi.Plaintext()
        sealapi.CKKSEncoder(self.seal).encode(
            1j, self.linear.parms_id(), self.linear.scale, times_i
        )
        self.evaluator.multiply_plain_inplace(self.linear, times_i)
        self.evaluator.add_inplace(self.squares, self.linear)
        _fold(self.squares, self.evaluator, self.context, self.slots)
        with tempfile.TemporaryDirectory(prefix="healthlab-agg-") as tmp:
            return _save(self.squares, Path(tmp))


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
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
) -> ResultTable:
    """``count``, ``mean``, ``std``, ``var``, ``sum`` with every value encrypted.

    ``bound`` is a public bound on ``|x|`` per column (a site refuses values beyond
    it). Precision is that of CKKS, not exact: the decrypted totals are rounded to
    a power of two above their noise (:func:`rounding_quantum`, ~1e-5 of the bound
    for a few thousand values), so means and standard deviations come within about
    1e-6 relative; :func:`healthlab.encrypted.describe` is exact and far cheaper.

    ``workers``: processes that encrypt (default: one per core) — this one, which also
    aggregates, and a pool of ``workers - 1``; 1 encrypts in this process only.
    ``dropna``: a row missing any of ``columns`` is dropped from all of them and
    counted in a ``missing`` row, as in :func:`healthlab.encrypted.describe`.
    ``on_refusal``: ``"raise"`` (default) stops when a site refuses; ``"skip"`` asks
    the others again, as long as enough remain. ``population``: the study's declared
    analysis population, as in :func:`healthlab.encrypted.describe`.

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
    public = keys.public_context()  # sites encrypt with the public key only
    count = workers if workers is not None else (os.cpu_count() or 1)
    # ``count`` processes encrypt: this one (which also aggregates) and a pool of
    # ``count - 1`` workers
    with encryption_pool(public, count - 1) if count > 1 else _no_pool() as pool:
        if pool is not None:  # the workers start while the sites check the queries
            _warm(pool, count - 1)
        return _describe_values(
            site_list,
            cols,
            bounds,
            keys,
            public,
            pool,
            count,
            researcher,
            dropna,
            min_sites,
            on_refusal,
            population_columns(population),
        )


def _describe_values(
    site_list: list[Site],
    cols: list[str],
    bounds: dict[str, float],
    keys: KeyHolder,
    public: PublicContext,
    pool: ProcessPoolExecutor | None,
    workers: int,
    researcher: str | None,
    dropna: bool,
    min_sites: int,
    on_refusal: str,
    population: list[str],
) -> ResultTable:
    query = Query(
        "values",
        {"columns": cols, "dropna": dropna, "population": population},
        2,
        min_sites=min_sites,
    )
    # every site authorizes the count query and checks it against its policy
    rows = _SiteRows(cols, bounds, dropna, population)
    prepared = prepare_query(
        site_list,
        query,
        rows.count_totals,
        keys=keys,
        researcher=researcher,
        on_refusal=on_refusal,
    )
    participants = prepared.sites
    upload = Query(
        "values-upload",
        {
            "columns": cols,
            "bounds": bounds,
            "dropna": dropna,
            "population": population,
        },
        0,
    )
    signed = sign_query(participants, upload, researcher)
    for site in participants:  # every site checks the second query too
        site.authorize(signed, query_hash=upload.hash)
    work = [(c, s) for c in cols for s in participants]

    def scaled(i: int) -> np.ndarray:
        return rows.scaled(*work[i])

    slots = public.params.slots
    # one stream for every site and column: the pool encrypts the next column while
    # the aggregator finishes this one; this process encrypts too when it would
    # otherwise wait
    local = pool is not None
    with _EncryptionStream(
        len(work), scaled, public, pool, max(1, workers - 1), local=local
    ) as stream:
        stream.start()  # the pool encrypts the first column while ...
        # ... every site scales and checks every column against its bound before
        # the aggregator takes anything, so a refusal leaves no partial upload
        expected = dict.fromkeys(cols, 0)
        for i, (column, _) in enumerate(work):
            expected[column] += -(-scaled(i).size // slots)
        counted = prepared.finish(keys)  # the count's secure sum
        for site in participants:
            _ = site.content_hash  # for the receipt, while the pool works
        evaluation = keys.evaluation_context()
        n = counted.totals[1]
        if n > max_rows(public.params):  # before the aggregator takes anything
            raise InvalidInput(
                f"{n:,.0f} rows are more than these CKKS parameters can sum in "
                f"every-value mode (at most {max_rows(public.params):,}); use more or "
                "larger coefficient moduli (the default parameters), or describe()"
            )
        # the count's masked-sum round counts too
        uploads: dict[str, int] = {
            s.name: counted.upload_bytes.get(s.name, 0) for s in participants
        }
        results = {}
        aggregators: dict[str, ValueAggregator] = {}
        for i, path in stream.results():
            column, site = work[i]
            if column not in aggregators:
                aggregators[column] = ValueAggregator(
                    evaluation, accepted=public.fingerprint
                )
            aggregator = aggregators[column]
            uploads[site.name] += os.path.getsize(path)
            aggregator.add_file(site.name, public.fingerprint, path)
            os.unlink(path)
            if aggregator.count < expected[column]:
                continue
            del aggregators[column]  # every ciphertext of this column is in
            s2, s1 = keys.decrypt_folded_pair(
                aggregator.finish(), fingerprint=evaluation.fingerprint
            )
            b = bounds[column]
            quantum = rounding_quantum(
                aggregator.count, slots, public.params.scale_bits
            )
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
    missing = [c for c in cols if c not in results]
    if missing:  # cannot happen: the count query refuses columns without rows
        raise DataRefused(f"no values were aggregated for {missing}")
    results = {c: results[c] for c in cols}
    table = pd.DataFrame(results)
    # withheld (None) when too few sites leave rows out: one site's count
    left_out = None if counted.missing_withheld else round(counted.totals[0])
    if dropna or population:  # as in describe(): rows dropped, outside or missing
        table.loc["missing"] = np.nan if left_out is None else counted.totals[0]
    return release(
        table,
        [counted],
        missing=left_out,
        kind="describe",
        parameters={
            "columns": cols,
            "mode": "every value",
            "bounds": bounds,
            "population": population,
        },
        encryption={
            "mode": "every value",
            "upload_bytes": uploads,
            "rounding": "to 4x the expected CKKS noise (rounding_quantum)",
        },
    )


@contextmanager
def _no_pool() -> Iterator[None]:
    yield None


class _SiteRows:
    """At the sites: each site's rows of the asked columns, selected once for the
    count query and for the values it encrypts.

    With ``dropna``, a row missing any of the columns is dropped from all of them,
    so every column's sums cover the ``n`` rows the count query counted.
    """

    def __init__(
        self,
        columns: Sequence[str],
        bounds: Mapping[str, float],
        dropna: bool,
        population: Sequence[str] = (),
    ) -> None:
        self._columns = list(columns)
        self._bounds = bounds
        self._dropna = dropna
        self._population = list(population)
        self._rows: dict[str, tuple[pd.DataFrame, int]] = {}
        self._scaled: dict[tuple[str, str], np.ndarray] = {}

    def _kept(self, site: Site) -> tuple[pd.DataFrame, int]:
        if site.name not in self._rows:
            self._rows[site.name] = site.rows(
                self._columns, dropna=self._dropna, population=self._population
            )
        return self._rows[site.name]

    def count_totals(self, site: Site, query: Query) -> Totals:
        """The count query's site computation: rows dropped, rows kept."""
        kept, dropped = self._kept(site)
        for column in self._columns:  # numbers only: refused here, before any upload
            if not _plainly_numeric(kept[column]):
                self.scaled(column, site)
        mask = np.zeros(site.n_rows, dtype=bool)
        mask[kept.index.to_numpy()] = True
        subsets = {c: [mask] for c in self._columns}
        if not mask.all():  # the rows left out: their count is released too
            subsets[LEFT_OUT] = [~mask]
        return [float(dropped), float(len(kept))], subsets

    def scaled(self, column: str, site: Site) -> np.ndarray:
        """``column`` at ``site`` divided by its public bound (refused beyond it)."""
        key = (column, site.name)
        if key not in self._scaled:
            kept, _ = self._kept(site)
            x = numeric_column(site.name, kept[column], column)
            self._scaled[key] = _scale(site, column, x, self._bounds[column])
        return self._scaled[key]


def _plainly_numeric(values: pd.Series) -> bool:
    """A column of numbers or booleans (converted later, when its values are
    encrypted); anything else is converted and checked in the count query."""
    dtype = values.dtype
    return bool(
        (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))
        and not pd.api.types.is_complex_dtype(dtype)
    )


def _scale(site: Site, column: str, x: np.ndarray, bound: float) -> np.ndarray:
    """At the site: ``x`` divided by its public bound (refused beyond it)."""
    if x.size and np.abs(x).max() > bound:
        raise DataRefused(
            f"site {site.name}: {column!r} exceeds the public bound {bound:g}; "
            "raise the bound"
        )
    return np.asarray(x / bound)
