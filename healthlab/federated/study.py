"""A federated study's shared settings and each site's prepared data (at the site)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from healthlab.errors import AccessDenied, DataRefused, DisclosureRefused, InvalidInput
from healthlab.federated.task import Model, TrainConfig
from healthlab.ledger.signing import SignedQuery
from healthlab.site_data import numeric, numeric_column
from healthlab.sites import Site

__all__ = ["Preprocessing", "SiteData", "Study", "UpdateHook", "check_live_grant"]

#: ``hook(site, params, n_examples) -> (params, n_examples)``: replaces what a site
#: sends — to simulate a compromised site when testing the server's defences.
UpdateHook = Callable[[str, list[np.ndarray], int], tuple[list[np.ndarray], int]]


@dataclass(frozen=True)
class Preprocessing:
    """Public transform from pooled statistics: ``(x - center) @ matrix``."""

    center: tuple[float, ...]
    matrix: tuple[tuple[float, ...], ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform raw features."""
        return np.asarray((x - np.asarray(self.center)) @ np.asarray(self.matrix))

    @classmethod
    def identity(cls, p: int) -> Preprocessing:
        """No transform."""
        return cls(tuple([0.0] * p), tuple(tuple(row) for row in np.eye(p).tolist()))


@dataclass
class SiteData:
    """A site's prepared rows (kept at the site)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_index: list[Any]


@dataclass
class Study:
    """Everything the ServerApp and the ClientApps of one study agree on."""

    sites: list[Site]
    features: list[str]
    target: str
    model: Model
    config: TrainConfig
    preprocessing: Preprocessing
    researcher: str | None = None
    signed: SignedQuery | None = None
    test_fraction: float = 0.2
    seed: int = 0
    dropna: bool = False
    update_hook: UpdateHook | None = None
    _data: dict[str, SiteData] = field(default_factory=dict, repr=False)
    _authorized: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hash(self) -> str:
        """``0x`` + sha256 of the public settings (what the researcher signs)."""
        public = {
            "kind": "federated",
            "features": self.features,
            "target": self.target,
            "model": self.model.name,
            "config": asdict(self.config),
            "preprocessing": asdict(self.preprocessing),
            "sites": [s.name for s in self.sites],
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }
        text = json.dumps(public, sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(text.encode()).hexdigest()

    def site(self, partition_id: int) -> Site:
        """The site a simulated node stands for."""
        return self.sites[int(partition_id)]

    def gate(self, site: Site) -> None:
        """The grant gate, before every round: signature once, grant every time."""
        if not site.gated:
            return
        with self._lock:
            first = site.name not in self._authorized
            if first:
                site.authorize(self.signed, query_hash=self.hash)
                self._authorized.add(site.name)
        if not first:
            assert self.researcher is not None
            check_live_grant(site, self.researcher)

    def mark_authorized(self, site: Site) -> None:
        """Record that ``site`` verified the researcher's signature another way (the
        deployment runtime checks its own signed study); the grant is still checked
        every round."""
        with self._lock:
            self._authorized.add(site.name)

    def data(self, site: Site) -> SiteData:
        """The site's train/test rows, transformed (computed once, at the site)."""
        with self._lock:
            if site.name not in self._data:
                self._data[site.name] = self._prepare(site)
            return self._data[site.name]

    def held_out_index(self, site: Site) -> list[Any]:
        """The site's held-out rows (their positions), without preparing the rest."""
        kept, _ = site.rows([*self.features, self.target], dropna=self.dropna)
        test = split_test(len(kept), self.test_fraction, self.seed, site.name)
        return list(kept.index[test])

    def _prepare(self, site: Site) -> SiteData:
        kept, _ = site.rows([*self.features, self.target], dropna=self.dropna)
        x = self.preprocessing.apply(numeric(site.name, kept, list(self.features)))
        y = numeric_column(site.name, kept[self.target], self.target)
        if self.model.task == "binary" and not np.isin(y, (0.0, 1.0)).all():
            raise DataRefused(
                f"site {site.name}: target {self.target!r} must be 0/1 for a "
                f"{self.model.name} model"
            )
        test = split_test(len(y), self.test_fraction, self.seed, site.name)
        if int((~test).sum()) < site.policy.min_rows:
            # an update from 1-2 rows is a function of those patients' values
            raise DisclosureRefused(
                f"site {site.name}: fewer than {site.policy.min_rows} rows to train on "
                "(after holding out test_fraction of them); leave the site out"
            )
        return SiteData(x[~test], y[~test], x[test], y[test], list(kept.index[test]))


def check_live_grant(site: Site, researcher: str) -> None:
    """A gated site's grant check before every contribution after the first."""
    if not site.gated:
        return
    assert site.ledger is not None
    assert site.dataset_id is not None
    if not site.ledger.has_access(site.dataset_id, researcher):
        raise AccessDenied(
            f"site {site.name}: the grant on dataset {site.dataset_id} is no longer "
            "live (revoked or expired); this site stops contributing"
        )


def split_test(n: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """A fixed held-out mask for a site: reproducible from (seed, site name)."""
    if not 0 <= fraction < 1:
        raise InvalidInput("test_fraction must be in [0, 1)")
    digest = int.from_bytes(
        hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "big"
    )
    rng = np.random.default_rng(digest)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: round(fraction * n)]] = True
    return mask
