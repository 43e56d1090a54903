"""A site's disclosure auditor: no combination of answers isolates fewer than k rows.

Every statistic a site answers is a sum over a subset of its rows (a group, a cell,
a bin, the complete cases of some columns). A researcher who combines answers —
differencing two subsets, inclusion–exclusion over four, site sets, groups and bins
— learns ``Σ v_i f(row_i)`` for every vector ``v`` in the span of the answered
subsets' indicator vectors. The auditor refuses a query when, together with what
the site answered before, that span would contain a vector whose support is
non-empty and smaller than ``k`` rows: then some linear combination of answers is a
statistic of fewer than ``k`` of the site's rows.

How (sound for every combination, not a list of shapes):

1. **Atoms.** The rows are grouped by which answered (or asked) subsets include
   them. Every vector in the span is constant on atoms, so its support is a union
   of atoms; only atoms smaller than ``k`` can take part in a support smaller than
   ``k``.
2. **Rank test.** With ``U`` an orthonormal basis of the span (in atom
   coordinates), a set ``T`` of atoms is the support of a vector in the span iff
   ``U_T U_Tᵀ`` has eigenvalue 1 (deleting the rows of ``T`` lowers the rank). The
   auditor tests every set of small atoms whose rows total fewer than ``k`` (for
   ``k = 3``: single atoms of 1 or 2 rows, pairs of 1-row atoms). If there are too
   many such sets to test, it refuses: a refusal is always safe.

3. **Protected sets.** A group a query pooled over too few sites (a ``by=`` group
   one site holds) is sent as zeros, and the site's rows in it are *protected*: a
   later query is refused when the span of the answered subsets would contain the
   protected set's indicator (e.g. all rows minus the released groups), since the
   pooled difference would be that one site's statistic. The test is a rank test
   on the atoms of the answered subsets and the protected set.

Subsets of different columns are audited together (one span over all answers):
stricter than needed when the columns differ, never weaker. A refused query's
subsets are kept too: a later query must not make a subset isolable that the
refused one would have made isolable (so refusals cannot be probed around), while
the soundness test itself runs against the answers actually released.

4. **Data updates.** The memory follows the rows, not the file: each row's values
   are hashed, and when the site's data changes (a new content hash) the stored
   subsets are mapped onto the new rows — an unchanged row keeps its place, a new
   or edited row takes a new one, and a row no longer held stays as a *ghost* in
   the earlier answers it was part of. So answers before and after an update that
   removes, adds or edits one or two patients differ in fewer than ``k`` places,
   and are refused like any differencing.

Cost: the auditor keeps the finest atoms of every subset it has met and tests each
span on them (``O(atoms × rank)``, no pass over the rows); a query costs one pass
over the rows per new subset that is a union of kept atoms, and one per up to 30
that split atoms. Measured in ``benchmarks/audit.py``: a ``describe`` at 1M rows
after 190 answered queries takes 0.97–1.06× a fresh one (it was 4.4×).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from healthlab.errors import DisclosureRefused, TooFewRows

__all__ = [
    "Atoms",
    "Auditor",
    "covers",
    "isolable",
    "isolated",
    "isolated_atoms",
    "isolated_sites",
    "reaches",
]

#: What the auditor keeps per researcher: subsets answered, refused, protected.
_FIELDS = ("answered", "refused", "protected")
_SET_FIELDS = ("site_sets", "site_sets_refused", "dp_answers")
#: Above this many candidate small sets, the auditor refuses rather than test them.
MAX_CANDIDATES = 200_000
_TOL = 1e-8


def _combine(columns: np.ndarray) -> np.ndarray:
    """One hash per row of several columns' value hashes (FNV-style, mod 2⁶⁴)."""
    key = np.full(len(columns), 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(columns.shape[1]):
        key = (key ^ columns[:, j]) * prime
    return key


def _pack(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes()


def _unpack(packed: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n).astype(bool)


def _atoms(
    matrix: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows used by any column of ``matrix`` (rows × subsets, boolean), and their
    atoms: (used rows, each used row's atom, atom signatures, atom sizes).

    Found on the rows packed to bytes: a 1-D unique is ~100x faster than
    ``np.unique(axis=0)`` on 1M rows."""
    used = np.flatnonzero(matrix.any(axis=1))
    packed = np.ascontiguousarray(np.packbits(matrix[used], axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse, sizes = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    return used, np.ravel(inverse), matrix[used][first], sizes


def _rank(matrix: np.ndarray) -> int:
    if matrix.size == 0:
        return 0
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return int(np.sum(s > _TOL * max(1.0, float(s[0]))))


def reaches(masks: Sequence[np.ndarray], target: np.ndarray) -> bool:
    """Whether a non-zero combination of the indicators of ``masks`` is supported
    inside ``target``'s rows: then answers over ``masks`` determine a statistic of
    some of ``target``'s rows alone (``rank(M) > rank(M outside target)``)."""
    target = np.asarray(target, dtype=bool)
    if not target.any() or not masks:
        return False
    matrix = np.stack([*(np.asarray(m, dtype=bool) for m in masks), target], axis=1)
    _, _, signatures, _ = _atoms(matrix)
    outside = ~signatures[:, -1]
    return _rank(signatures[:, :-1]) > _rank(signatures[outside, :-1])


class Atoms:
    """The rows of a site grouped by which subsets hold them, kept as an atom id per
    row, each atom's membership signature and an orthonormal basis of the span —
    extended by new subsets in one pass over the rows (:meth:`extend`), not
    recomputed from every subset.

    The basis ``q`` (atoms × rank) is orthonormal over *rows*: ``Σ_a size_a q_a q_aᵀ
    = I``, so refining atoms keeps it (children inherit their parent's row) and a
    new subset is added by Gram–Schmidt against it, ``O(atoms × rank)``. Scaled by
    ``√size`` it is an orthonormal basis in atom coordinates (:meth:`basis`),
    which the support tests use.
    """

    def __init__(self, n_rows: int) -> None:
        self.inverse = np.zeros(n_rows, dtype=np.int64)
        self.signatures = np.zeros((1, 0), dtype=bool)
        self.q = np.zeros((1, 0), dtype=np.float64)
        self._sizes: np.ndarray | None = None

    @property
    def sizes(self) -> np.ndarray:
        """Rows per atom (computed once per refinement)."""
        if self._sizes is None:
            self._sizes = np.bincount(self.inverse, minlength=self.signatures.shape[0])
        return self._sizes

    def basis(self) -> np.ndarray:
        """An orthonormal basis of the span in atom coordinates (atoms × rank)."""
        return self.q * np.sqrt(self.sizes.astype(np.float64))[:, None]

    def extend(self, masks: Sequence[np.ndarray]) -> Atoms:
        """These atoms refined by ``masks`` (a new object; this one is unchanged)."""
        out = Atoms.__new__(Atoms)
        out.inverse, out.signatures, out.q = self.inverse, self.signatures, self.q
        out._sizes = self._sizes
        start = 0
        while start < len(masks):
            # up to 30 subsets' bits per pass; fewer when that keeps the keys in a
            # table no larger than ~4 per row (compacted without a sort)
            room = (4 * out.inverse.size + 4096) // out.signatures.shape[0]
            fit = max(int(room).bit_length() - 1, 0)
            width = min(len(masks) - start, 30)
            if 4 <= fit < width:
                width = fit
            batch = [np.asarray(m, dtype=bool) for m in masks[start : start + width]]
            start += width
            bits = np.zeros(out.inverse.size, dtype=np.int64)
            for i, mask in enumerate(batch):
                bits |= mask.astype(np.int64) << i
            keys = (out.inverse << len(batch)) | bits
            present, inverse = _compact(keys, out.signatures.shape[0] << len(batch))
            shifts = np.arange(len(batch), dtype=np.int64)
            added = (
                ((present & ((1 << len(batch)) - 1))[:, None] >> shifts) & 1
            ).astype(bool)
            parents = present >> len(batch)
            out.signatures = np.concatenate([out.signatures[parents], added], axis=1)
            out.q = out.q[parents]
            out.inverse = inverse
            out._sizes = None
            sizes = out.sizes.astype(np.float64)
            for column in added.T:
                out.q = _orthonormalize(out.q, column.astype(np.float64), sizes)
        return out


def _compact(keys: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``keys`` (ascending) and each key's index among them: what
    ``np.unique(keys, return_inverse=True)`` gives, by a table over ``[0, space)``
    when that is not much larger than ``keys`` (no sort of the rows: O(rows))."""
    if space > 4 * keys.size + 4096:
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, np.ravel(inverse).astype(np.int64)
    seen = np.zeros(space, dtype=bool)
    seen[keys] = True
    distinct = np.flatnonzero(seen)
    index = np.empty(space, dtype=np.int64)
    index[distinct] = np.arange(distinct.size, dtype=np.int64)
    return distinct.astype(np.int64), index[keys]


def _orthonormalize(q: np.ndarray, column: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``q`` with ``column``'s part outside its span appended (inner product
    weighted by ``sizes``), when that part is not (numerically) zero."""
    norm0 = np.sqrt(column @ (sizes * column))
    if norm0 == 0:
        return q
    v = column.copy()
    for _ in range(2):  # twice: Gram–Schmidt with reorthogonalization
        if q.shape[1]:
            v -= q @ (q.T @ (sizes * v))
    norm = np.sqrt(v @ (sizes * v))
    if norm <= _TOL * norm0:
        return q
    return np.concatenate([q, (v / norm)[:, None]], axis=1)


class _Memory:
    """The finest atoms of every subset an auditor has met (answered, refused,
    asked): an atom id per row, one row of each atom, and each atom's membership
    of every subset (a column per distinct subset, found by its packed bytes).

    A span over some of the subsets is tested on *its* atoms — the fine atoms
    grouped by their membership of those subsets, which is what :class:`Atoms`
    would form from the rows — so a test touches no row. A subset seen before
    costs nothing, one that is a union of atoms one pass over the rows (its value
    on each atom's row, compared with it), and only one that splits atoms refines
    them (one pass per up to 30 such subsets). Bases of spans and what they
    isolate are kept per set of subsets, so the test of an answered query's span
    is not repeated when the next query asks the same subsets again."""

    #: spans whose basis is kept (the answered span, with the refused, ...)
    _KEPT = 8

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.inverse = np.zeros(n_rows, dtype=np.int64)
        self.sizes = np.array([n_rows], dtype=np.int64)
        self._row = np.zeros(1, dtype=np.int64)  # a row of each atom
        self.members = np.zeros((1, 0), dtype=bool)  # atoms × subsets
        self._index: dict[bytes, int] = {}
        self._objects: dict[bytes, bytes] = {}  # each key of _index, to itself
        self._bases: dict[frozenset[int], np.ndarray] = {}
        self._found: dict[tuple[frozenset[int], int], set[frozenset[int]] | None] = {}

    def add(
        self, packed: Sequence[bytes], masks: Sequence[np.ndarray] | None = None
    ) -> list[int]:
        """The columns of the subsets ``packed`` (masks, when given, are those
        subsets unpacked), added where new: atoms split only where they must."""
        pending: dict[bytes, np.ndarray] = {}
        for i, p in enumerate(packed):
            if p in self._index or p in pending:
                continue
            mask = _unpack(p, self.n_rows) if masks is None else masks[i]
            if self.n_rows:
                values = mask[self._row]
                if np.array_equal(values[self.inverse], mask):
                    self._index[p] = self.members.shape[1]
                    self._objects[p] = p
                    self.members = np.concatenate(
                        [self.members, values[:, None]], axis=1
                    )
                    continue
            pending[p] = mask
            if len(pending) >= self._width():
                self._split(pending)
                pending = {}
        if pending:
            self._split(pending)
        return [self._index[p] for p in packed]

    def intern(self, packed: bytes) -> bytes:
        """The subset ``packed`` as the object this memory keeps for it (if any):
        the auditor stores that one, so looking it up again compares no bytes."""
        return self._objects.get(packed, packed)

    def _width(self) -> int:
        """Subsets per refining pass: up to 30, fewer when that keeps the keys in a
        table no larger than ~4 per row (compacted without a sort)."""
        room = (4 * self.n_rows + 4096) // self.sizes.size
        fit = max(int(room).bit_length() - 1, 0)
        return fit if 4 <= fit < 30 else 30

    def _split(self, pending: dict[bytes, np.ndarray]) -> None:
        """Refine the atoms by ``pending`` (subsets that are not unions of them)."""
        width = len(pending)
        bits = np.zeros(self.n_rows, dtype=np.int64)
        for i, mask in enumerate(pending.values()):
            bits |= mask.astype(np.int64) << i
        keys = (self.inverse << width) | bits
        present, inverse = _compact(keys, self.sizes.size << width)
        shifts = np.arange(width, dtype=np.int64)
        added = (((present & ((1 << width) - 1))[:, None] >> shifts) & 1).astype(bool)
        parents = present >> width
        for i, p in enumerate(pending):
            self._index[p] = self.members.shape[1] + i
            self._objects[p] = p
        self.members = np.concatenate([self.members[parents], added], axis=1)
        self.inverse = inverse
        self.sizes = np.bincount(inverse, minlength=present.size)
        self._row = np.empty(present.size, dtype=np.int64)
        self._row[inverse] = np.arange(self.n_rows, dtype=np.int64)  # any row of each
        # children keep their parent's row of a basis (orthonormal over rows still);
        # what a span isolates is kept as sets of atoms: found again when needed
        self._bases = {key: q[parents] for key, q in self._bases.items()}
        self._found = {}

    def basis(self, columns: Sequence[int]) -> np.ndarray:
        """An orthonormal basis (over rows: weighted by atom sizes) of the span of
        ``columns``, one row per atom: from the largest kept span inside it, by
        Gram–Schmidt in the order given."""
        want = frozenset(columns)
        have: frozenset[int] = frozenset()
        q = np.zeros((self.sizes.size, 0), dtype=np.float64)
        for key, kept in self._bases.items():
            if len(have) < len(key) <= len(want) and key <= want:
                have, q = key, kept
        if have != want:
            sizes = self.sizes.astype(np.float64)
            for c in dict.fromkeys(columns):
                if c not in have:
                    q = _orthonormalize(q, self.members[:, c].astype(np.float64), sizes)
        self._bases.pop(want, None)
        self._bases[want] = q
        while len(self._bases) > self._KEPT:
            del self._bases[next(iter(self._bases))]
        return q

    def isolated(
        self, columns: Sequence[int], k: int, units: np.ndarray | None = None
    ) -> set[frozenset[int]] | None:
        """:func:`isolated` for the span of ``columns``: without ``units`` as sets
        of (fine) atoms, whose rows are the row sets; with them, as row sets."""
        key = (frozenset(columns), k if units is None else -k)
        if key not in self._found:
            self._found[key] = self._isolated(columns, k, units)
            while len(self._found) > self._KEPT:
                del self._found[next(iter(self._found))]
        return self._found[key]

    def _isolated(
        self, columns: Sequence[int], k: int, units: np.ndarray | None
    ) -> set[frozenset[int]] | None:
        found: set[frozenset[int]] = set()
        chosen = self.members[:, sorted(set(columns))]
        if k <= 1 or not chosen.any():
            return found
        # the span's own atoms: fine atoms with the same membership of its subsets
        packed = np.ascontiguousarray(np.packbits(chosen, axis=1))
        keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, first, coarse = np.unique(keys, return_index=True, return_inverse=True)
        coarse = np.ravel(coarse)
        if units is not None:
            return _isolated_units(
                np.arange(self.n_rows),
                coarse[self.inverse],
                chosen[first],
                np.asarray(units),
                k,
            )
        sizes = np.bincount(coarse, weights=self.sizes, minlength=first.size)
        sizes = np.rint(sizes).astype(np.int64)
        basis = self.basis(columns)[first] * np.sqrt(sizes.astype(np.float64))[:, None]
        hits = _small_sets(basis, sizes, k)
        if hits is None:
            return None
        involved = {a for combo in hits for a in combo}
        fine: dict[int, list[int]] = {a: [] for a in involved}
        for atom, group in enumerate(coarse.tolist()):
            if group in fine:
                fine[group].append(atom)
        sets = {a: frozenset(atoms) for a, atoms in fine.items()}
        return {frozenset.union(*map(sets.__getitem__, combo)) for combo in hits}

    def rows(self, found: set[frozenset[int]]) -> set[frozenset[int]]:
        """Sets of atoms (:meth:`isolated` without units) as the row sets."""
        if not found:
            return set()
        involved = sorted(set().union(*found))
        wanted = np.zeros(self.sizes.size, dtype=bool)
        wanted[involved] = True
        rows = np.flatnonzero(wanted[self.inverse])  # fewer than k rows per atom
        rows_of: dict[int, list[int]] = {a: [] for a in involved}
        for row, atom in zip(rows.tolist(), self.inverse[rows].tolist(), strict=True):
            rows_of[atom].append(row)
        return {frozenset(r for a in atoms for r in rows_of[a]) for atoms in found}


def isolated(
    masks: Sequence[np.ndarray], k: int, units: np.ndarray | None = None
) -> set[frozenset[int]] | None:
    """The row sets of fewer than ``k`` rows that are the support of a vector in the
    span of ``masks`` (boolean, over the same rows): what combinations of answers
    over ``masks`` would isolate. ``None`` when there are too many candidate sets to
    test (treat as unsafe).

    With ``units`` (an integer code per row: the person a row belongs to, when rows
    are user-days), sizes are counted in distinct units: the row sets found are
    those whose rows belong to fewer than ``k`` units, however many rows they are.
    """
    if not masks or k <= 1:
        return set()
    rows = [np.asarray(m, dtype=bool) for m in masks]
    memory = _Memory(rows[0].size)
    found = memory.isolated(memory.add([_pack(m) for m in rows], rows), k, units)
    if found is None or units is not None:
        return found
    return memory.rows(found)


def isolated_atoms(
    atoms: Atoms, k: int, units: np.ndarray | None = None
) -> set[frozenset[int]] | None:
    """:func:`isolated` on atoms already formed (atoms extended by subsets, see
    :class:`Atoms`)."""
    found: set[frozenset[int]] = set()
    inverse, signatures = atoms.inverse, atoms.signatures
    if k <= 1 or not signatures.any():
        return found
    if units is not None:
        used = np.arange(inverse.size)
        return _isolated_units(used, inverse, signatures, np.asarray(units), k)
    hits = _small_sets(atoms.basis(), atoms.sizes, k)
    if hits is None:
        return None
    if hits:  # the rows of each small atom hit, from one pass over the atom ids
        involved = np.unique(np.concatenate([np.asarray(c) for c in hits]))
        wanted = np.zeros(signatures.shape[0], dtype=bool)
        wanted[involved] = True
        rows = np.flatnonzero(wanted[inverse])  # fewer than k rows per atom
        rows_of: dict[int, list[int]] = {int(a): [] for a in involved}
        for row, atom in zip(rows.tolist(), inverse[rows].tolist(), strict=True):
            rows_of[atom].append(row)
        for combo in hits:
            found.add(frozenset(r for a in combo for r in rows_of[a]))
    return found


def _small_sets(
    basis: np.ndarray, sizes: np.ndarray, k: int
) -> list[tuple[int, ...]] | None:
    """The sets of atoms, fewer than ``k`` rows together, that hold the support of
    a vector in the span (``basis``: orthonormal, atoms × rank); ``None`` when there
    are too many candidate sets to test."""
    hits: list[tuple[int, ...]] = []
    small = np.flatnonzero(sizes < k)
    if small.size == 0:
        return hits
    leverage = np.einsum("ij,ij->i", basis, basis)
    # an atom with (numerically) zero leverage is in no support of the span; the
    # atom of rows in no subset has a zero signature, so zero leverage
    live = small[leverage[small] > _TOL].astype(np.int64)
    # one atom: the span holds a vector on it alone iff its leverage is 1
    hits += [(int(a),) for a in live[leverage[live] > 1.0 - 1e-9]]
    count = live.size
    if k > 2 and live.size > 1:
        # two atoms: the largest eigenvalue of their 2x2 Gram matrix (closed form),
        # among pairs small enough together (counted without listing them all)
        order = np.argsort(sizes[live], kind="stable")
        ascending = sizes[live][order]
        ends = np.searchsorted(ascending, k - ascending)
        count += (int(ends.sum()) - int(np.count_nonzero(2 * ascending < k))) // 2
        if count > MAX_CANDIDATES:
            return None
        # that eigenvalue is at most the pair's trace (the other one is >= 0): a
        # pair reaching 1 has an atom of leverage 1/2 or more, so only pairs with
        # one are listed, and computed where their leverages sum to about 1
        high = np.flatnonzero(leverage[live] > (1.0 - 1e-6) / 2)
        ends = np.searchsorted(ascending, k - sizes[live[high]])
        starts = np.repeat(np.cumsum(ends) - ends, ends)
        i = np.repeat(high, ends)
        j = order[np.arange(i.size) - starts]
        is_high = np.zeros(live.size, dtype=bool)
        is_high[high] = True
        once = (i != j) & (~is_high[j] | (j > i))  # a pair of two high atoms once
        i, j = i[once], j[once]
        la, lb = leverage[live[i]], leverage[live[j]]
        near = la + lb > 1.0 - 1e-6
        i, j, la, lb = i[near], j[near], la[near], lb[near]
        c = np.einsum("ij,ij->i", basis[live[i]], basis[live[j]])
        top = (la + lb) / 2 + np.sqrt(((la - lb) / 2) ** 2 + c**2)
        hits += [
            (int(live[x]), int(live[y]))
            for x, y in zip(i[top > 1 - 1e-9], j[top > 1 - 1e-9], strict=True)
        ]
    for size in range(3, k):  # larger sets (k > 3): one by one
        for combo in itertools.combinations(live.tolist(), size):
            if int(sizes[list(combo)].sum()) >= k:
                continue
            count += 1
            if count > MAX_CANDIDATES:
                return None
            rows = basis[list(combo)]
            if np.linalg.eigvalsh(rows @ rows.T)[-1] > 1.0 - 1e-9:
                hits.append(tuple(combo))
    return hits


def _basis(signatures: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the span, in atom coordinates (atoms × rank)."""
    u, s, _ = np.linalg.svd(signatures.astype(np.float64), full_matrices=False)
    rank = int(np.sum(s > _TOL * max(1.0, float(s[0]))))
    return u[:, :rank]


def _isolated_units(
    used: np.ndarray,
    inverse: np.ndarray,
    signatures: np.ndarray,
    codes: np.ndarray,
    k: int,
) -> set[frozenset[int]] | None:
    """:func:`isolated` counting distinct units: for every set ``U`` of fewer than
    ``k`` units that is a union of atoms' unit sets, whether the span holds a
    vector supported on the atoms whose units all lie in ``U``."""
    found: set[frozenset[int]] = set()
    pairs = np.unique(np.stack([inverse, codes.astype(np.int64)], axis=1), axis=0)
    per_atom = np.bincount(pairs[:, 0], minlength=signatures.shape[0])
    small = np.flatnonzero(per_atom < k)
    if small.size == 0:
        return found
    basis = _basis(signatures)
    leverage = np.einsum("ij,ij->i", basis, basis)
    live = [int(a) for a in small if leverage[a] > _TOL]
    unit_sets = {a: frozenset(int(c) for c in pairs[pairs[:, 0] == a, 1]) for a in live}
    distinct = sorted(set(unit_sets.values()), key=sorted)
    count = 0
    for size in range(1, k):
        for combo in itertools.combinations(distinct, size):
            union = frozenset().union(*combo)
            if len(union) >= k:
                continue
            count += 1
            if count > MAX_CANDIDATES:
                return None
            atoms = [a for a in live if unit_sets[a] <= union]
            rows = basis[atoms]
            if np.linalg.eigvalsh(rows @ rows.T)[-1] > 1.0 - 1e-9:
                members = np.isin(inverse, atoms)
                found.add(frozenset(int(r) for r in used[members]))
    return found


def isolated_sites(
    sets: Sequence[Iterable[str]], need: int
) -> set[frozenset[str]] | None:
    """The sets of fewer than ``need`` sites that some combination of results pooled
    over ``sets`` (participant sets) would single out: ``T`` is singled out when the
    span of the sets' indicator vectors holds a non-zero vector supported on ``T``,
    i.e. ``rank(V) > rank(V without T's columns)``. ``None`` when there are too many
    candidate sets to test (treat as unsafe).

    Every vector of the span is constant on each *atom* (the sites that are in
    exactly the same sets), so the test runs on unions of whole atoms: the sites of a
    1,000-site study asked twice form two or three atoms, not 1,000 columns. The
    sets returned are those unions (every other singled-out set contains one):
    compare two answers with :func:`covers`."""
    found: set[frozenset[str]] = set()
    listed = [frozenset(s) for s in sets]
    if need <= 1 or not listed:
        return found
    universe = sorted(frozenset().union(*listed))
    groups: dict[tuple[bool, ...], list[str]] = {}
    for name in universe:
        groups.setdefault(tuple(name in s for s in listed), []).append(name)
    atoms = list(groups.values())
    matrix = np.array(list(groups), dtype=float).T  # sets × atoms
    rank = _rank(matrix)
    small = [i for i, members in enumerate(atoms) if len(members) < need]
    count = 0

    def extend(chosen: list[int], size: int, start: int) -> bool:
        nonlocal count
        for position in range(start, len(small)):
            atom = small[position]
            total = size + len(atoms[atom])
            if total >= need:
                continue
            combo = [*chosen, atom]
            count += 1
            if count > MAX_CANDIDATES:
                return False
            rest = [i for i in range(len(atoms)) if i not in combo]
            if rank > _rank(matrix[:, rest]):
                found.add(frozenset(n for i in combo for n in atoms[i]))
            if not extend(combo, total, position + 1):
                return False
        return True

    if not extend([], 0, 0):
        return None
    return found


def covers(before: set[frozenset[str]], after: set[frozenset[str]]) -> bool:
    """Whether every set :func:`isolated_sites` found in ``after`` contains one it
    found in ``before`` (nothing newly singled out)."""
    return all(any(b <= a for b in before) for a in after)


def isolable(
    masks: Sequence[np.ndarray], k: int, units: np.ndarray | None = None
) -> bool:
    """Whether some combination of answers over ``masks`` isolates fewer than
    ``k`` rows (or units) — or the audit cannot tell, which counts as yes."""
    sets = isolated(masks, k, units)
    return sets is None or bool(sets)


class Auditor:
    """What one site answered one researcher (subsets of its rows), kept in memory
    and, with ``path``, in a JSON file (across calls, processes and restarts).

    The memory is bound to the site's data: ``content_hash`` changes when the data
    does, and then the file's old subsets (over other rows) no longer apply.
    """

    def __init__(
        self,
        n_rows: int,
        content_hash: str,
        path: str | os.PathLike[str] | None = None,
        *,
        units: np.ndarray | None = None,
        unit_name: str = "rows",
        row_keys: np.ndarray | None = None,
        columns: Sequence[str] | None = None,
        column_keys: np.ndarray | None = None,
    ) -> None:
        #: The auditor's row space: the site's current rows, then the rows of
        #: earlier data no longer held (see :meth:`_carry_over`).
        self.n_rows = n_rows
        self.n_current = n_rows
        #: where each current row sits in the row space
        self.position = np.arange(n_rows, dtype=np.int64)
        self.content_hash = content_hash
        #: a hash per row of its values: memory follows the rows across data updates
        self._keys = (
            None if row_keys is None else np.asarray(row_keys, dtype=np.uint64).copy()
        )
        #: a label per row for the person it belongs to (rows = user-days): then
        #: every size the auditor checks counts distinct persons
        self._unit_keys: np.ndarray | None = None
        self.units: np.ndarray | None = None
        if units is not None:
            self._unit_keys = np.asarray([str(u) for u in units], dtype=object)
            self.units = pd.factorize(self._unit_keys)[0]
        self._identity = True
        self.columns = None if columns is None else sorted(columns)
        #: per place of the row space, a hash of each column's value (columns in
        #: ``columns`` order), and whether the place was made by a data update:
        #: a query that reads only columns in which an updated row equals a row
        #: no longer held sums the same values as that row did (see :meth:`lift`)
        self._space_columns: np.ndarray | None = None
        self._born = np.zeros(n_rows, dtype=bool)
        if column_keys is not None and self.columns is not None:
            keys_2d = np.asarray(column_keys, dtype=np.uint64)
            if keys_2d.shape == (n_rows, len(self.columns)):
                self._space_columns = keys_2d.copy()
        self._columns_dirty = True
        #: the columns the query being audited reads (None: not known)
        self._reading: frozenset[str] | None = None
        self._remapped: dict[frozenset[str], np.ndarray | None] = {}
        #: why the memory cannot follow the data (then every query is refused)
        self.frozen: str | None = None
        self.unit_name = unit_name
        self.path = Path(path) if path is not None else None
        self.answered: dict[str, list[bytes]] = {}
        self.refused: dict[str, list[bytes]] = {}
        self.protected: dict[str, list[bytes]] = {}
        #: participant sets of the queries this site answered / refused, per researcher
        self.site_sets: dict[str, list[list[str]]] = {}
        self.site_sets_refused: dict[str, list[list[str]]] = {}
        #: the noise multiplier of every DP answer, per researcher and grant
        self.dp_answers: dict[str, list[float]] = {}
        self._memory: _Memory | None = None
        self._load()

    # ----------------------------------------------------------- persistence
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        stored = json.loads(self.path.read_text())
        same = stored.get("content_hash") == self.content_hash
        if not same and not self._carry_over(stored):
            if any(stored.get(f) for f in (*_FIELDS, "site_sets")):
                # fail closed: a fresh memory would let the answers before and
                # after this change be differenced (a removed patient's values)
                self.frozen = (
                    "its data changed in a way its memory of earlier answers cannot "
                    "follow (other columns, or cells that cannot be hashed)"
                )
            return
        if same and "position" in stored:
            self._set_space(
                _decode(stored["position"], np.int64),
                _decode(stored["space_keys"], np.uint64),
                _decode_units(stored.get("space_units")),
            )
            stored_columns = self._stored_columns(self.n_rows)
            if stored_columns is not None:
                self._space_columns, self._born = stored_columns
                self._columns_dirty = False
        old_n = int(stored.get("space_rows", stored.get("n_rows", self.n_rows)))
        for field in _FIELDS:
            target = getattr(self, field)
            for who, packed in stored.get(field, {}).items():
                target[who] = [
                    _pack(_pad(_unpack(base64.b64decode(p), old_n), self.n_rows))
                    for p in packed
                ]
        for field in _SET_FIELDS:
            getattr(self, field).update(stored.get(field, {}))

    def _check_frozen(self, site: str) -> None:
        if self.frozen:
            raise DisclosureRefused(
                f"site {site}: {self.frozen}; it answers nothing until its operator "
                "restores the data's columns, or deliberately moves the memory file "
                "(audit-<site>.json in the state directory) aside"
            )

    def _carry_over(self, stored: dict[str, Any]) -> bool:
        """Map the stored memory onto changed data by the rows' value hashes.

        A row whose values are unchanged keeps its place (and what it was part
        of); a new or changed row is a new place that no earlier answer included;
        a row no longer held stays in the row space as a *ghost*, still part of the
        earlier answers it was in. So "all rows" before and after one patient is
        removed, added or changed differ in 1–2 places of the space — isolable,
        and refused — while unchanged rows are audited as before. Without row keys
        (an older memory file) the memory starts afresh."""
        if self._keys is None or "space_keys" not in stored:
            return False
        if stored.get("columns") is not None and stored["columns"] != self.columns:
            return False  # another schema: rows cannot be matched by their values
        old_keys = _decode(stored["space_keys"], np.uint64)
        old_current = set(_decode(stored["position"], np.int64).tolist())
        free: dict[int, list[int]] = {}
        for place, key in enumerate(old_keys.tolist()):
            free.setdefault(key, []).append(place)
        # rows still held first (a ghost may come back: the same values again)
        for places in free.values():
            places.sort(key=lambda p: (p not in old_current, p))
        position = np.empty(self.n_current, dtype=np.int64)
        extra: list[int] = []
        for i, key in enumerate(self._keys.tolist()):
            slots = free.get(key)
            if slots:
                position[i] = slots.pop(0)
            else:
                position[i] = len(old_keys) + len(extra)
                extra.append(key)
        keys = np.concatenate([old_keys, np.asarray(extra, dtype=np.uint64)])
        # each place's column hashes: the earlier places' from the stored file,
        # the new ones' from the current rows (an older memory without the file
        # cannot say which values an updated row shares with a removed one)
        old_columns = self._stored_columns(len(old_keys))
        current_columns = self._space_columns
        self._space_columns = None
        if old_columns is not None and current_columns is not None:
            space_columns = np.zeros((len(keys), current_columns.shape[1]), np.uint64)
            space_columns[: len(old_keys)] = old_columns[0]
            space_columns[position] = current_columns
            born = np.zeros(len(keys), dtype=bool)
            born[: len(old_keys)] = old_columns[1]
            born[len(old_keys) :] = True
            self._space_columns, self._born = space_columns, born
        elif current_columns is not None and self._unit_keys is None:
            # a memory written before the column hashes were kept: a row an update
            # made may equal a row no longer held in the columns a query reads
            # (an edit elsewhere), which then sums what that row did — unknown
            # here, so an update that both drops and makes rows fails closed
            held = np.zeros(len(keys), dtype=bool)
            held[position] = True
            if extra and not held[: len(old_keys)].all():
                self.frozen = (
                    "its memory of earlier answers predates the per-column row "
                    "hashes, and its data changed by rows both removed or edited and "
                    "added, which that memory cannot tell apart"
                )
        self._columns_dirty = True
        units = None
        if self._unit_keys is not None:
            old_units = _decode_units(stored.get("space_units"))
            if old_units is None or len(old_units) != len(old_keys):
                return False
            units = np.empty(len(keys), dtype=object)
            units[: len(old_keys)] = old_units
            units[position] = self._unit_keys
        self._set_space(position, keys, units)
        return True

    def _set_space(
        self, position: np.ndarray, keys: np.ndarray, units: np.ndarray | None
    ) -> None:
        if len(position) != self.n_current:
            return  # not this data's layout: keep the identity
        self.position = position
        self._space_keys = keys
        self.n_rows = len(keys)
        self._identity = self.n_rows == self.n_current and bool(
            np.array_equal(position, np.arange(self.n_current))
        )
        if units is not None:
            self._space_units = units
            self.units = pd.factorize(units)[0]

    @contextlib.contextmanager
    def reading(self, columns: Iterable[str] | None) -> Iterator[None]:
        """Audit within this block as a query that reads ``columns`` (None: not
        known, every updated row a place of its own)."""
        before = self._reading
        self._reading = None if columns is None else frozenset(map(str, columns))
        try:
            yield
        finally:
            self._reading = before

    def lift(
        self, mask: np.ndarray, columns: Iterable[str] | None = None
    ) -> np.ndarray:
        """A mask over the site's current rows, as a mask over the row space (which
        keeps earlier rows no longer held), for a query reading ``columns`` (or
        those of the :meth:`reading` block)."""
        if columns is None:
            return self._lift(mask)
        with self.reading(columns):
            return self._lift(mask)

    def _lift(self, mask: np.ndarray) -> np.ndarray:
        """A mask over the site's current rows, as a mask over the row space.

        A row a data update made (an edit, an added patient) is a place of its
        own; but for a query whose columns it shares, value for value, with a row
        no longer held (the same patient before an edit in a column the query
        does not read), it sums exactly what that row did, and takes that row's
        place — else "all rows" before and after an edit elsewhere plus one
        removal would differ in three places, and the difference be the removed
        patient's values. Each such earlier row stands for one current row."""
        mask = np.asarray(mask, dtype=bool)
        position = self._positions()
        if position is None:
            if self._identity:
                return mask
            position = self.position
        lifted = np.zeros(self.n_rows, dtype=bool)
        lifted[position] = mask
        return lifted

    def _positions(self) -> np.ndarray | None:
        """Where each current row sits for the query being audited, when an
        updated row takes the place of an earlier one (else None)."""
        columns = self._reading
        if (
            columns is None
            or self._space_columns is None
            or self.units is not None
            or self.columns is None
            or self._identity
        ):
            return None
        if columns in self._remapped:
            return self._remapped[columns]
        result: np.ndarray | None = None
        if columns <= set(self.columns):
            index = [self.columns.index(c) for c in sorted(columns)]
            held = np.zeros(self.n_rows, dtype=bool)
            held[self.position] = True
            ghosts = np.flatnonzero(~held)
            fresh = np.flatnonzero(self._born[self.position])
            if len(ghosts) and len(fresh):
                keys = _combine(self._space_columns[:, index])
                free: dict[int, list[int]] = {}
                for place in ghosts.tolist():
                    free.setdefault(int(keys[place]), []).append(place)
                position = self.position.copy()
                order = fresh[np.argsort(self.position[fresh], kind="stable")]
                moved = False
                for row in order.tolist():
                    slots = free.get(int(keys[self.position[row]]))
                    if slots:
                        position[row] = slots.pop(0)
                        moved = True
                result = position if moved else None
        self._remapped[columns] = result
        return result

    @property
    def _columns_path(self) -> Path | None:
        if self.path is None:
            return None
        return self.path.with_name(self.path.stem + ".columns.npy")

    def _stored_columns(self, places: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored column hashes of ``places`` places and which of them a data
        update made, when the file holds exactly that layout."""
        path = self._columns_path
        if path is None or self.columns is None or not path.exists():
            return None
        try:
            stored = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if stored.dtype != np.uint64 or stored.shape != (places, len(self.columns) + 1):
            return None
        return stored[:, :-1].copy(), stored[:, -1].astype(bool)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = getattr(self, "_space_keys", self._keys)
        space: dict[str, Any] = {}
        if keys is not None:
            units = getattr(self, "_space_units", self._unit_keys)
            space = {
                "space_rows": self.n_rows,
                "position": _encode(self.position),
                "space_keys": _encode(np.asarray(keys, dtype=np.uint64)),
                "space_units": None
                if units is None
                else [str(u) for u in np.asarray(units).tolist()],
            }
        if self.frozen:
            return  # the stored memory stays as it was, for its operator
        columns_path = self._columns_path
        if (
            columns_path is not None
            and self._columns_dirty
            and self._space_columns is not None
            and len(self._space_columns) == self.n_rows
        ):
            table = np.column_stack(
                [self._space_columns, self._born.astype(np.uint64)]
            ).astype(np.uint64)
            tmp_columns = columns_path.with_name(columns_path.name + ".tmp")
            fd = os.open(tmp_columns, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, table, allow_pickle=False)
            os.replace(tmp_columns, columns_path)
            self._columns_dirty = False
        data = {
            "content_hash": self.content_hash,
            "n_rows": self.n_rows,
            "columns": self.columns,
            **space,
            **{
                field: {
                    who: [base64.b64encode(p).decode() for p in packed]
                    for who, packed in getattr(self, field).items()
                }
                for field in _FIELDS
            },
            **{field: getattr(self, field) for field in _SET_FIELDS},
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.path)

    # --------------------------------------------------------------- checks
    def _masks(self, field: str, researcher: str) -> list[np.ndarray]:
        """What was kept under ``field`` — for every researcher, not only this one:
        a researcher with a second account (or colleagues who pool their answers)
        must not start from an empty memory. Stricter than per researcher, never
        weaker; DP budgets stay per grant."""
        return [_unpack(p, self.n_rows) for p in self._packed(field)]

    def _sets(self, field: str) -> list[list[str]]:
        found: list[list[str]] = []
        for sets in getattr(self, field).values():
            found.extend(s for s in sets if s not in found)
        return found

    def check(
        self,
        site: str,
        researcher: str | None,
        masks: Iterable[np.ndarray],
        k: int,
        *,
        differencing: bool = True,
    ) -> None:
        """Refuse (and remember the refusal) unless answering ``masks`` keeps every
        combination of this researcher's answers at ``k`` rows or more (with
        ``differencing=False``: every subset itself)."""
        self._check_frozen(site)
        who = (researcher or "").lower()
        # one mask per distinct subset (a query's columns often share theirs)
        distinct = _distinct([m for m in (self._lift(m) for m in masks) if m.any()])
        new = list(distinct.values())
        if any(self._size(m) < k for m in new):
            self._refuse(who, new)
            raise TooFewRows(
                f"site {site}: a subset, group, cell or bin of this query would "
                f"summarize fewer than {k} {self.unit_name} (the site's minimum); use "
                "wider bins, fewer groups or more data"
            )
        if not differencing:
            return
        memory = self._atoms()
        answered = memory.add(self._packed("answered"))
        asked = memory.add(list(distinct), new)
        # a query refused before and asked again must not count as its own excuse
        asking = set(asked)
        probed = [c for c in memory.add(self._packed("refused")) if c not in asking]
        found = memory.isolated([*answered, *asked], k, self.units)
        unsafe = found is None or bool(found)
        if not unsafe and probed:
            # refused queries count as answered: nothing may become isolable that
            # was not already isolable with them
            before = memory.isolated([*answered, *probed], k, self.units)
            after = memory.isolated([*answered, *probed, *asked], k, self.units)
            unsafe = before is None or after is None or not after <= before
        if unsafe:
            self._refuse(who, new)
            raise TooFewRows(
                f"site {site}: together with what this site answered before, this "
                f"query would let a combination of answers summarize fewer than {k} "
                f"of its {self.unit_name} (differencing); declare the study's analysis "
                "population up front, or ask for the same subsets as before"
            )

    def check_record(
        self, site: str, researcher: str | None, masks: Iterable[np.ndarray]
    ) -> None:
        """A citizen site's audit: refuse (and remember the refusal) unless every
        non-empty subset of ``masks`` is the site's *record* — the one non-empty
        subset it answered before (anyone), or, the first time, one subset.

        With one row every subset is that row or empty, so this never refuses; a
        site of a few rows of one person answers the same rows every time. Then
        every combination of answers weighs each citizen's rows alike (a multiple
        of its record), so what it isolates is a set of *sites*, which the pooled
        holder count and the site-set audit (:func:`isolated_sites`, ``need`` the
        pooled minimum) keep at the pooled minimum or more. Sizes are not tested:
        any subset of one person's rows is that person's."""
        self._check_frozen(site)
        who = (researcher or "").lower()
        new = _unique([m for m in (self._lift(m) for m in masks) if m.any()])
        record = {_pack(m) for m in new} | set(self._packed("answered"))
        if len(record) > 1:
            self._refuse(who, new)
            raise TooFewRows(
                f"site {site} is a citizen's site: it answers one set of its rows "
                "(its record), and this query would sum another (some of its rows, "
                "or other rows than before), so answers could be differenced within "
                "one person's rows; ask for all of the citizens' rows, as before"
            )

    def _atoms(self) -> _Memory:
        """The atoms of every subset kept or asked (all researchers), kept between
        queries and refined by each query's subsets where they split atoms."""
        if self._memory is None or self._memory.n_rows != self.n_rows:
            self._memory = _Memory(self.n_rows)
        return self._memory

    def _packed(self, field: str) -> list[bytes]:
        stored: list[bytes] = []
        seen: set[bytes] = set()
        for packed in getattr(self, field).values():
            for p in packed:
                if p not in seen:
                    seen.add(p)
                    stored.append(p)
        return stored

    def _size(self, mask: np.ndarray) -> int:
        if self.units is None:
            return int(mask.sum())
        return int(np.unique(self.units[mask]).size)

    def check_protected(
        self,
        site: str,
        researcher: str | None,
        masks: Iterable[np.ndarray],
        protected: Iterable[np.ndarray] = (),
    ) -> None:
        """Refuse (and remember the refusal) when answering ``masks`` would let a
        combination of answers be supported inside a protected set — kept from
        before, or ``protected`` now (:func:`reaches`): it would be a statistic of
        (some of) that set's rows, which were pooled over too few sites."""
        who = (researcher or "").lower()
        new = [m for m in (self._lift(m) for m in masks) if m.any()]
        guarded = _unique(
            [
                *self._masks("protected", who),
                *(m for m in (self._lift(p) for p in protected) if m.any()),
            ]
        )
        if not guarded:
            return
        released = _unique([*self._masks("answered", who), *new])
        unsafe = any(reaches(released, p) for p in guarded)
        probed = self._masks("refused", who)
        if not unsafe and probed:
            before = _unique([*self._masks("answered", who), *probed])
            after = _unique([*before, *new])
            unsafe = any(reaches(after, p) and not reaches(before, p) for p in guarded)
        if unsafe:
            self._refuse(who, new)
            raise TooFewRows(
                f"site {site}: a group held by too few sites to be pooled (or rows "
                "that too few sites leave out) could be found by difference between "
                "this query's answers and earlier ones (e.g. all rows minus the "
                "released groups, or minus the complete cases); ask for the same "
                "groups as before, group rows more coarsely, or declare the study's "
                "population up front"
            )

    def check_sites(
        self,
        site: str,
        researcher: str | None,
        participants: Iterable[str],
        others: Iterable[Iterable[str]],
        need: int,
    ) -> None:
        """Refuse (and remember the refusal) unless pooling over ``participants``,
        with the participant sets this site answered this researcher before and
        ``others`` (the researcher's logged queries this site took no part in),
        keeps every combination of results over at least ``need`` sites."""
        who = (researcher or "").lower()
        new = sorted(set(participants))
        answered = [*self._sets("site_sets"), *(sorted(set(o)) for o in others)]
        unsafe = _unsafe_sites([*answered, new], need)
        probed = self._sets("site_sets_refused")
        if not unsafe and probed:
            before = isolated_sites([*answered, *probed], need)
            after = isolated_sites([*answered, *probed, new], need)
            unsafe = before is None or after is None or not covers(before, after)
        if unsafe:
            known = self.site_sets_refused.setdefault(who, [])
            if new not in known:
                known.append(new)
            self._save()
            raise DisclosureRefused(
                f"site {site}: together with this researcher's other queries (the "
                "shared query log), this query's set of sites would let a "
                f"combination of results single out fewer than {need} sites "
                "(site-set differencing); ask every query of a study of the same "
                "sites"
            )

    def record_dp(self, key: str, noise_multiplier: float) -> None:
        """Count one DP answer (its noise multiplier) against ``key``'s budget."""
        self.dp_answers.setdefault(key, []).append(float(noise_multiplier))
        self._save()

    def record_sites(self, researcher: str | None, participants: Iterable[str]) -> None:
        """Remember the participant set of an answered query."""
        who = (researcher or "").lower()
        known = self.site_sets.setdefault(who, [])
        new = sorted(set(participants))
        if new not in known:
            known.append(new)
        self._save()

    def record(
        self,
        researcher: str | None,
        masks: Iterable[np.ndarray],
        protected: Iterable[np.ndarray] = (),
    ) -> None:
        """Remember an answered query's subsets, and the sets it protects."""
        who = (researcher or "").lower()
        self._add("answered", who, [self._lift(m) for m in masks])
        self._add("protected", who, [self._lift(p) for p in protected])
        self._save()

    def refuse(self, researcher: str | None, masks: Iterable[np.ndarray]) -> None:
        """Remember ``masks`` as refused for ``researcher``."""
        self._refuse((researcher or "").lower(), [self._lift(m) for m in masks])

    def _refuse(self, who: str, masks: list[np.ndarray]) -> None:
        self._add("refused", who, masks)
        self._save()

    def _add(self, field: str, who: str, masks: Iterable[np.ndarray]) -> None:
        known = getattr(self, field).setdefault(who, [])
        for mask in masks:
            packed = _pack(mask)
            if self._memory is not None:
                packed = self._memory.intern(packed)
            if np.asarray(mask).any() and packed not in known:
                known.append(packed)


def _pad(mask: np.ndarray, n: int) -> np.ndarray:
    """A mask over an earlier, smaller row space, over the row space of ``n``."""
    if mask.size == n:
        return mask
    out = np.zeros(n, dtype=bool)
    out[: mask.size] = mask
    return out


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode()


def _decode(text: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def _decode_units(values: list[str] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=object)


def _unique(masks: list[np.ndarray]) -> list[np.ndarray]:
    return list(_distinct(masks).values())


def _distinct(masks: list[np.ndarray]) -> dict[bytes, np.ndarray]:
    """The distinct ``masks``, by their packed bytes (in order)."""
    out: dict[bytes, np.ndarray] = {}
    for mask in masks:
        out.setdefault(_pack(mask), mask)
    return out


def _unsafe_sites(sets: list[list[str]], need: int) -> bool:
    found = isolated_sites(_unique_sets(sets), need)
    return found is None or bool(found)


def _unique_sets(sets: list[list[str]]) -> list[list[str]]:
    out: list[list[str]] = []
    for s in sets:
        if s not in out:
            out.append(s)
    return out
