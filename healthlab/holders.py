"""Holders across queries: no combination of pooled answers is fewer sites' own.

The holder count of one query makes every released cell (a group, a bin, a cell,
the rows left out) be held by at least ``need`` sites. Two answers can still differ
by rows only one site holds: edges 60 then 63 over two sites that both hold rows in
every bin, where only one holds rows in between — the difference of the two
``[60, 100)`` and ``[63, 100)`` counts is that site's count. This module closes
that class for every combination of the queries, over any sets of sites.

**Patterns.** Over every query a site answered (any set of sites, every researcher
alike), it groups its rows by which released cells include them: a row's
*pattern* (a site outside a query holds none of its cells). Every pooled answer,
and every linear combination of them, is at each site a sum over its patterns. A
combination depends on the sites of a set ``T`` alone only if some pattern of a
site in ``T`` is not a combination of patterns that sites outside ``T`` hold.

**The rule.** A site answers only when each of its patterns lies in the span of
its own patterns that at least ``need`` sites hold (``need`` = the pooling minimum
plus the participants that are not distinct other owners). That is sound for every
``T`` of fewer than ``need`` sites: each such shared pattern is held by a site
outside ``T``, so a combination that cancels every site outside ``T`` cancels each
shared pattern, hence each pattern of ``T``. And it lets ordinary margins through
— a table by sex and then a histogram, where one site alone has women over 90: the
site's (woman, over 90) pattern is (woman, 80–90) − (man, 80–90) + (man, over 90),
all held by both sites.

**Counting holders privately.** Each site puts each of its patterns in four buckets
of a table (by the pattern's id, a hash of its history of cells), with a fingerprint
of the id, inside the holder count's masked flags: the sites learn, per bucket,
how many sites hold a pattern there and the sum of their fingerprints — a site
holding pattern ``p`` trusts the count only when the sum is the count times ``p``'s
fingerprint (two patterns in one bucket never pass as one; a bucket that does not
verify counts as not shared, which refuses more, never less). Nobody learns which
site holds which pattern.

**Sites outside a query.** They keep their patterns while the query splits the
same patterns at the sites inside, and they do not check. So a site inside also
checks each earlier pattern that a site outside may hold (one whose queries all
had a participant this query lacks, :meth:`_Scope.possible_holders`): it must stay
in the span of the patterns ``need`` of this query's sites hold. By induction every
pattern of every site stays in the span of shared patterns: a pattern split here
was checked here, one held only outside is unchanged and still held by as many.
Sites therefore join or leave an asked set only in groups that are a pooled result
themselves (a subset of an asked set is refused: its sites cannot count the others).

A column's few-value sets and a discrete design's patterns are cells too, keyed
by the value (the design row's values), so the same cell is named alike at every
site: a value only one site holds is that site's count and sums, however the
moments or a model's iterates solve for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from healthlab.errors import DisclosureRefused, HeldByTooFewSites

__all__ = ["TABLE_VALUES", "HolderPatterns", "Pending", "buckets"]

#: per bucket: the number of sites with a pattern there, and four 16-bit
#: fingerprint digits (each site's fingerprint once per pattern)
TABLE_VALUES = 5
_DIGIT = 1 << 16
_TOL = 1e-9


def buckets(n_sites: int) -> int:
    """Buckets of the pattern table for a query over ``n_sites``: every site sums
    every site's table, so it shrinks as the sites grow."""
    if n_sites <= 4:  # few sites: a larger table, fewer false refusals
        return 16384
    if n_sites <= 16:
        return 8192
    return 2048 if n_sites <= 100 else 512


#: each pattern goes in this many buckets; it counts as shared when one of them
#: verifies (a pattern each of whose buckets holds another is rare: ~load⁴)
POSITIONS = 4


def _id(parent: bytes, query_hash: str, labels: Sequence[str]) -> bytes:
    """A pattern's id after a query: its parent's and the cells it is in."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent)
    digest.update(query_hash.encode())
    for label in labels:
        digest.update(b"\x1f" + label.encode())
    return digest.digest()


def _slots(pattern: bytes, size: int) -> tuple[list[int], list[int]]:
    """A pattern's buckets and fingerprint digits."""
    h = hashlib.blake2b(pattern, digest_size=4 * POSITIONS + 8).digest()
    places = [
        int.from_bytes(h[4 * i : 4 * i + 4], "big") % size for i in range(POSITIONS)
    ]
    base = 4 * POSITIONS
    digits = [
        int.from_bytes(h[base + 2 * i : base + 2 * i + 2], "big") for i in range(4)
    ]
    return places, digits


@dataclass
class _Scope:
    """One site's patterns over the queries of one set of sites."""

    #: per row of the auditor's row space, its pattern (0: in no released cell)
    labels: np.ndarray
    #: per pattern, its id (the empty pattern's is b"")
    ids: list[bytes] = field(default_factory=lambda: [b""])
    #: per pattern, the cells it is in (indices into this site's cells)
    vectors: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    #: this site's cells so far (distinct row sets, each a column of the span)
    n_cells: int = 0
    queries: list[str] = field(default_factory=list)
    #: per answered query, its participants (as the signed query names them)
    participants: list[tuple[str, ...]] = field(default_factory=list)
    #: per column of the span, the answered queries (indices) with a cell there
    columns: list[tuple[int, ...]] = field(default_factory=list)

    def possible_holders(self, p: int) -> frozenset[str] | None:
        """The sites that can hold pattern ``p``: those that took part in every
        query with a cell it is in (None: it is in no cell)."""
        support = {q for c in self.vectors[p] for q in self.columns[c]}
        if not support:
            return None
        return frozenset.intersection(
            *(frozenset(self.participants[q]) for q in support)
        )


@dataclass
class Pending:
    """One query's patterns at one site, before it is answered."""

    query_hash: str
    participants: tuple[str, ...]
    size: int
    #: the query's cells: a label set and a mask over the row space, each
    cells: list[tuple[tuple[str, ...], np.ndarray]]
    #: what the site's patterns become when every cell is released
    full: _Scope
    table: np.ndarray
    #: after the holder count: the released patterns and their holders
    released: _Scope | None = None
    holders: list[int] = field(default_factory=list)
    #: the patterns before this query, with the sites that may hold them
    earlier: list[tuple[tuple[int, ...], frozenset[str]]] = field(default_factory=list)

    def kept(self, inside: Iterable[str]) -> list[tuple[int, ...]]:
        """The earlier patterns that a site outside ``inside`` may still hold."""
        members = frozenset(inside)
        return [v for v, possible in self.earlier if not possible <= members]


class HolderPatterns:
    """A site's patterns over every query it answered; persistent with ``path``
    (JSON)."""

    #: the memory file's layout (1: one memory per set of sites, before the
    #: patterns spanned every set)
    VERSION = 2

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.scope: _Scope | None = None
        self._outdated = False
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("version") != self.VERSION:
                # per-set memories cannot be merged into one soundly
                self._outdated = bool(data)
                return
            stored = data["scope"]
            labels = base64.b64decode(stored["labels"])
            self.scope = _Scope(
                np.frombuffer(labels, dtype=np.int32).copy(),
                [bytes.fromhex(h) for h in stored["ids"]],
                [tuple(v) for v in stored["vectors"]],
                int(stored["n_cells"]),
                list(stored["queries"]),
                [tuple(p) for p in stored["participants"]],
                [tuple(c) for c in stored["columns"]],
            )

    def _save(self) -> None:
        if self.path is None or self.scope is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        s = self.scope
        labels = s.labels.astype(np.int32).tobytes()
        data = {
            "version": self.VERSION,
            "scope": {
                "labels": base64.b64encode(labels).decode(),
                "ids": [i.hex() for i in s.ids],
                "vectors": [list(v) for v in s.vectors],
                "n_cells": s.n_cells,
                "queries": s.queries,
                "participants": [list(p) for p in s.participants],
                "columns": [list(c) for c in s.columns],
            },
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.path)

    def _current(self, n_rows: int) -> _Scope:
        if self._outdated:
            raise DisclosureRefused(
                "this site's memory of which sites held its answers is in an earlier "
                "layout (one per set of sites), which cannot be merged soundly; its "
                "operator should start a new state directory for the site"
            )
        scope = self.scope
        if scope is None:
            return _Scope(np.zeros(n_rows, dtype=np.int32))
        if len(scope.labels) > n_rows:
            raise DisclosureRefused(
                "this site's memory of which sites held its answers does not fit "
                "its rows (its audit memory was moved aside?); it answers nothing "
                "until its operator restores both memory files"
            )
        if len(scope.labels) < n_rows:  # new rows since: in no earlier cell
            labels = np.zeros(n_rows, dtype=np.int32)
            labels[: len(scope.labels)] = scope.labels
            scope.labels = labels
        return scope

    def prepare(
        self,
        participants: Sequence[str],
        query_hash: str,
        subsets: Mapping[str, Iterable[np.ndarray]],
        extra: Sequence[tuple[str, np.ndarray]],
        lift: Callable[[np.ndarray], np.ndarray],
        n_rows: int,
        n_sites: int,
    ) -> Pending:
        """This site's patterns if the query is answered, and its table for the
        holder count (``participants``: the query's, as it names them; ``extra``:
        the blocks' masks, labelled)."""
        labelled = [
            (f"{column}\x1e{i}", np.asarray(m, dtype=bool))
            for column, masks in subsets.items()
            for i, m in enumerate(masks)
        ] + [(label, np.asarray(m, dtype=bool)) for label, m in extra]
        cells: dict[bytes, tuple[list[str], np.ndarray]] = {}
        for label, mask in labelled:
            lifted = lift(mask)
            if not lifted.any():
                continue
            key = np.packbits(lifted).tobytes()
            cells.setdefault(key, ([], lifted))[0].append(label)
        merged = [(tuple(sorted(ls)), m) for ls, m in cells.values()]
        members = _members(participants)
        base = self._current(n_rows)
        full = _refine(base, query_hash, members, merged)
        size = buckets(n_sites)
        return Pending(query_hash, members, size, merged, full, _table(full, size))

    def check(
        self,
        pending: Pending,
        summed: np.ndarray,
        hidden: Sequence[str | np.ndarray],
        need: int,
        site: str,
        lift: Callable[[np.ndarray], np.ndarray],
        modulus: int,
        enforce: bool = True,
    ) -> None:
        """Refuse unless every pattern this site would release, and every earlier
        pattern of it that sites outside this query may still hold, lies in the
        span of its patterns at least ``need`` sites hold (``summed``: every site's
        table, summed; ``hidden``: the labels of the entries withheld from this
        answer, or row sets whose every cell is withheld; ``enforce`` False: only
        what :meth:`record` keeps, for a site with nothing to protect from the
        researcher)."""
        base = self._current(len(pending.full.labels))
        if base.queries != pending.full.queries:
            # another query was answered since this one was prepared: its counts
            # are of patterns that no longer hold here
            raise HeldByTooFewSites(
                f"site {site}: another query was answered while this one waited; "
                "ask it again"
            )
        # a cell is withheld by its labels: a released entry with the same rows
        # here (all of a site's rows, and its rows missing a column it lacks) is
        # still released; a bare row set withholds every cell with those rows
        labels_out = {h for h in hidden if isinstance(h, str)}
        rows_out = {
            np.packbits(lift(np.asarray(h, dtype=bool))).tobytes()
            for h in hidden
            if not isinstance(h, str)
        }
        cells = []
        for labels, mask in pending.cells:
            if np.packbits(mask).tobytes() in rows_out:
                continue
            still = tuple(label for label in labels if label not in labels_out)
            if still:
                cells.append((still, mask))
        released = (
            pending.full
            if [labels for labels, _ in cells] == [ls for ls, _ in pending.cells]
            else _refine(base, pending.query_hash, pending.participants, cells)
        )
        holders = _holders(pending.full, released, summed, pending.size, modulus)
        # an earlier pattern that a site outside this query may hold stays as it
        # was there, while this query splits it here: it must stay a combination
        # of patterns that enough sites hold (else the difference of this answer
        # and an earlier one is those outside sites' own)
        earlier = []
        for p in np.unique(base.labels).tolist():
            possible = base.possible_holders(p)
            if possible is not None:
                earlier.append((base.vectors[p], possible))
        pending.released, pending.holders, pending.earlier = released, holders, earlier
        if enforce:
            kept = pending.kept(pending.participants)
            _check_span(released, holders, need, site, kept)

    def recheck(
        self, pending: Pending, need: int, site: str, survivors: Sequence[str]
    ) -> None:
        """The rule again, at a larger ``need`` and over the ``survivors`` (sites
        dropped after counting: they hold earlier patterns unsplit, as a site
        outside the query does); the answered query is then remembered as theirs."""
        assert pending.released is not None
        members = _members(survivors)
        kept = pending.kept(members)
        _check_span(pending.released, pending.holders, need, site, kept)
        pending.participants = members
        scope = self.scope
        last = scope.queries[-1] if scope is not None and scope.queries else None
        if scope is not None and last == pending.query_hash:
            scope.participants[-1] = members
            self._save()

    def record(self, pending: Pending) -> None:
        """Remember an answered query's released patterns."""
        if pending.released is None:
            return
        released = pending.released
        released.queries = [*released.queries, pending.query_hash]
        released.participants = [*released.participants, pending.participants]
        self.scope = released
        self._save()


def _members(participants: Iterable[str]) -> tuple[str, ...]:
    """The sites of a participant set, as the memory names them: a gated site by
    its dataset, a teaching site by its name (its participant name also carries a
    prefix of its content hash, which an update of its rows changes — the same
    site, whose own rows the auditor follows)."""
    return tuple(sorted({str(p).split("@", 1)[0] for p in participants}))


def _refine(
    base: _Scope,
    query_hash: str,
    participants: tuple[str, ...],
    cells: Sequence[tuple[tuple[str, ...], np.ndarray]],
) -> _Scope:
    """``base``'s patterns split by the query's ``cells`` (the query is answered
    by ``participants``; :meth:`HolderPatterns.record` adds them)."""
    if not cells:
        return _Scope(
            base.labels.copy(),
            list(base.ids),
            list(base.vectors),
            base.n_cells,
            list(base.queries),
            list(base.participants),
            list(base.columns),
        )
    member = np.stack([m for _, m in cells], axis=1)  # rows × cells
    keys = np.concatenate(
        [
            base.labels.astype(np.int64)[:, None].view(np.uint8),
            np.packbits(member, axis=1),
        ],
        axis=1,
    )
    rows = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1])))[:, 0]
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    parents = base.labels[first].astype(int).tolist()
    inside = [np.flatnonzero(member[r]).tolist() for r in first.tolist()]
    # each cell of the query is a new column of the span, even where its rows are
    # an earlier cell's here: the two are one row set at this site, not at a site
    # outside the query that may hold this site's earlier patterns
    query = len(base.queries)  # this query's index once recorded
    columns = [*base.columns, *([(query,)] * len(cells))]
    column = list(range(base.n_cells, base.n_cells + len(cells)))
    n_cells = base.n_cells + len(cells)
    ids: list[bytes] = [b""]
    vectors: list[tuple[int, ...]] = [()]
    index: dict[bytes, int] = {b"": 0}
    relabel = np.zeros(len(first), dtype=np.int32)
    for u in np.argsort(first).tolist():  # numbered by first row: stable
        parent = parents[u]
        if inside[u]:
            labels = sorted(label for c in inside[u] for label in cells[c][0])
            pattern = _id(base.ids[parent], query_hash, labels)
            vector = tuple(
                sorted({*base.vectors[parent], *(column[c] for c in inside[u])})
            )
        else:
            pattern, vector = base.ids[parent], base.vectors[parent]
        if pattern not in index:
            index[pattern] = len(ids)
            ids.append(pattern)
            vectors.append(vector)
        relabel[u] = index[pattern]
    return _Scope(
        relabel[inverse.reshape(-1)],
        ids,
        vectors,
        n_cells,
        list(base.queries),
        list(base.participants),
        columns,
    )


def _table(scope: _Scope, size: int) -> np.ndarray:
    """This site's pattern table: 1 and the fingerprint in each pattern's bucket."""
    table = np.zeros((size, TABLE_VALUES), dtype=np.int64)
    spoiled: set[int] = set()
    for p in np.unique(scope.labels).tolist():
        pattern = scope.ids[p]
        if not pattern:
            continue
        places, digits = _slots(pattern, size)
        for bucket in places:
            if table[bucket, 0] or bucket in spoiled:
                # two of this site's patterns in one bucket: it cannot say both,
                # so neither verifies there (refuses more, never less): a count of
                # 0 here, and a fingerprint that no count matches
                spoiled.add(bucket)
                table[bucket] = [0, 1, 0, 0, 0]
                continue
            table[bucket] = [1, *digits]
    return table.reshape(-1)


def _verified(table: np.ndarray, pattern: bytes, size: int, modulus: int) -> int:
    """How many sites hold ``pattern`` by the summed table (0: no bucket of it
    verifies)."""
    places, digits = _slots(pattern, size)
    best = 0
    for bucket in places:
        count = int(table[bucket, 0])
        if count and all(
            int(table[bucket, 1 + i]) == (count * d) % modulus
            for i, d in enumerate(digits)
        ):
            best = max(best, count)
    return best


def _holders(
    full: _Scope, released: _Scope, summed: np.ndarray, size: int, modulus: int
) -> list[int]:
    """Per released pattern, at least how many sites hold it."""
    table = np.asarray(summed, dtype=np.int64).reshape(size, TABLE_VALUES)
    pairs = np.unique(np.stack([released.labels, full.labels], axis=1), axis=0)
    finer: dict[int, set[int]] = {}
    for r, a in pairs.tolist():
        finer.setdefault(int(r), set()).add(int(a))
    counts = [0] * len(released.ids)
    for r, own in finer.items():
        pattern = released.ids[r]
        if not pattern:
            continue
        best = 0
        if pattern not in {full.ids[a] for a in own}:  # others' full pattern = it
            others = _verified(table, pattern, size, modulus)
            best = others + 1 if others else 0
        for a in own:  # every site holding a finer pattern holds this one
            best = max(best, _verified(table, full.ids[a], size, modulus))
        counts[r] = best
    return counts


def _check_span(
    scope: _Scope,
    holders: Sequence[int],
    need: int,
    site: str,
    kept: Sequence[tuple[int, ...]] = (),
) -> None:
    """Refuse unless each pattern held by fewer than ``need`` sites, and each of
    ``kept`` (earlier patterns, as columns of ``scope``), is a combination of the
    patterns at least ``need`` sites hold."""
    held = [p for p in np.unique(scope.labels).tolist() if scope.vectors[p]]
    shared = [p for p in held if holders[p] >= need]
    shared_vectors = {scope.vectors[p] for p in shared}
    alone = [scope.vectors[p] for p in held if holders[p] < need]
    alone += [v for v in kept if v and v not in shared_vectors]
    if not alone:
        return

    def matrix(vectors: Sequence[tuple[int, ...]]) -> np.ndarray:
        out = np.zeros((len(vectors), scope.n_cells))
        for i, v in enumerate(vectors):
            out[i, list(v)] = 1.0
        return out

    if shared:
        _, s, vt = np.linalg.svd(
            matrix([scope.vectors[p] for p in shared]), full_matrices=False
        )
        basis = vt[s > _TOL * max(1.0, float(s[0]))]
        test = matrix(alone)
        residual = test - (test @ basis.T) @ basis
        inside = np.linalg.norm(residual, axis=1) <= 1e-7 * np.linalg.norm(test, axis=1)
    else:
        inside = np.zeros(len(alone), dtype=bool)
    if not inside.all():
        raise HeldByTooFewSites(
            f"site {site}: together with earlier answers, this answer would let a "
            "difference of pooled results be one site's own (or fewer than "
            f"{need} sites'): some of its rows fall in cells, across the queries, "
            "that too few of the sites hold. Ask the same sites (or add or leave "
            "out sites only in groups that are a pooled result themselves) for the "
            "same groups, bins and populations as before, or coarser ones"
        )
