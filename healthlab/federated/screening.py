"""Screening and clipping of the sites' updates: a Flower strategy wrapper.

:class:`Screening` wraps the strategy that aggregates, the way Flower's own
``DifferentialPrivacyServerSideFixedClipping`` wraps its strategy: ``configure_train``,
``configure_evaluate``, ``aggregate_evaluate`` and ``summary`` are the inner
strategy's, and ``start`` is the base class's loop over these methods.
``aggregate_train`` screens the raw replies first and hands only the accepted ones to
the inner ``aggregate_train``:

1. drop errors and malformed replies, and note refusals (a site without a live grant);
2. reject updates with a wrong shape, NaN or infinite values, or a norm (distance
   from the global model sent out) above ``max_update_norm``;
3. clip the remaining updates to ``clip_norm``, if set;
4. cap each example count (``num-examples``, FedAvg's weight) at the training rows
   the site registered;
5. reject, when three or more updates remain, any more than 10x the round's median
   norm; record each reply the sites owed that did not come before the deadline;
6. raise :class:`~healthlab.errors.TooFewSites` if fewer than ``min_sites`` remain.

What it accepted, refused and rejected is kept per round in :attr:`Screening.screened`.

Order of the wrappers, outermost first: ``Screening``, then Flower's
``DifferentialPrivacyServerSideFixedClipping`` (if DP is on), then the aggregating
strategy (FedAvg, FedProx, …). The outermost wrapper's ``aggregate_train`` sees the
replies first, as they arrived, so the screen goes outside and DP inside:

* the DP wrapper aggregates nothing if any reply carries an error, so one site whose
  network failed would cost the whole round; the screen drops that reply first;
* a NaN update is still NaN after DP's clipping and noise, and poisons any mean;
  it has to go before DP clips and before the inner strategy averages;
* counts must be capped before the inner strategy weights by them;
* DP's noise goes last, on the aggregate the innermost strategy returns, so it
  covers only updates that were screened and clipped. With both ``clip_norm`` and
  DP's ``clipping_norm`` set, the screen clips first and DP clips again (both
  bounds hold).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from healthlab.errors import HealthLabError, TooFewSites

__all__ = ["Screened", "Screening", "site_status", "too_few"]

#: the site reply's metric that weighs its update (FedAvg's ``weighted_by_key``)
WEIGHT = "num-examples"
#: the relative screen: over this many times the round's median norm (and over 1.0)
MEDIAN_FACTOR = 10.0


def site_status(reply: Message) -> Any:
    """A site reply's ``status`` record (``site``, maybe ``refused``), or None."""
    if reply.has_error() or "status" not in reply.content:
        return None
    return cast(Any, reply.content)["status"]


def too_few(
    rnd: int, got: int, need: int, refused: dict[str, str], rejected: dict[str, str]
) -> str:
    """The message of :class:`~healthlab.errors.TooFewSites` for a round."""
    reasons = (
        "; ".join(f"{k}: {v}" for k, v in {**refused, **rejected}.items()) or "none"
    )
    return (
        f"round {rnd}: only {got} site(s) contributed, fewer than the {need} required "
        f"(refused or rejected: {reasons})"
    )


@dataclass
class Screened:
    """One round's screen: the sites whose updates went on, and why others did not."""

    sites: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class _Sent:
    """What ``configure_train`` sent out for a round."""

    messages: int
    shapes: list[tuple[int, ...]]
    flat: np.ndarray


class Screening(Strategy):
    """Screen and clip the sites' updates, then aggregate with ``strategy``.

    Parameters
    ----------
    strategy
        The strategy that aggregates the accepted updates (it may be Flower's DP
        wrapper around one; see the module's note on the order).
    registered
        The most training rows each site can hold, by site name: example counts
        are capped at it (at 1 for a site not in it).
    max_update_norm
        Updates farther than this from the global model are rejected.
    clip_norm
        If set, updates farther than this are scaled back to it.
    min_sites
        Fewer accepted updates than this raise :class:`TooFewSites`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        registered: Mapping[str, int],
        max_update_norm: float = 1e4,
        clip_norm: float | None = None,
        min_sites: int = 1,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.registered = dict(registered)
        self.max_update_norm = max_update_norm
        self.clip_norm = clip_norm
        self.min_sites = min_sites
        #: each screened round's outcome, by round number
        self.screened: dict[int, Screened] = {}
        self._sent: dict[int, _Sent] = {}
        self._names: dict[int, str] = {}  # node id → site, from its earlier replies

    def __repr__(self) -> str:
        return f"Screening({self.strategy!r})"

    def summary(self) -> None:
        """Log the screen's settings, then the inner strategy's."""
        log(INFO, "\t├──> Screening:")
        log(INFO, "\t│\t├── Max update norm: %s", self.max_update_norm)
        log(INFO, "\t│\t├── Clip norm: %s", self.clip_norm)
        log(INFO, "\t│\t└── Min sites: %s", self.min_sites)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages; notes the global model and how many."""
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        params = [np.asarray(a, dtype=np.float64) for a in arrays.to_numpy_ndarrays()]
        flat = np.concatenate([p.ravel() for p in params]) if params else np.zeros(0)
        self._sent[server_round] = _Sent(len(messages), [p.shape for p in params], flat)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen ``replies``, then aggregate the accepted ones with the inner
        strategy. Raises :class:`TooFewSites` if fewer than ``min_sites`` remain."""
        good, screened = self._screen(server_round, replies)
        self.screened[server_round] = screened
        if len(good) < self.min_sites:
            raise TooFewSites(
                too_few(
                    server_round,
                    len(good),
                    self.min_sites,
                    screened.refused,
                    screened.rejected,
                )
            )
        return self.strategy.aggregate_train(server_round, good)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _screen(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], Screened]:
        """The well-formed replies (clipped, counts capped) and the round's record."""
        sent = self._sent.pop(server_round, None)
        if sent is None:
            raise HealthLabError(
                f"round {server_round}: aggregate_train before configure_train; the "
                "screen measures updates against the model configure_train sent"
            )
        screened = Screened()
        refused, rejected = screened.refused, screened.rejected
        candidates: list[tuple[Message, str, float]] = []
        received = 0
        for reply in replies:
            received += 1
            status = site_status(reply)
            node = reply.metadata.src_node_id
            if status is None:
                error = reply.error.reason if reply.has_error() else "malformed reply"
                rejected[self._names.get(node, f"node {node}")] = f"error: {error}"
                continue
            site = self._names[node] = str(status["site"])
            if "refused" in status:
                refused[site] = str(status["refused"])
                continue
            content: Any = reply.content
            if not _complete(content):
                rejected[site] = "error: malformed reply"
                continue
            arrays = content["arrays"].to_numpy_ndarrays()
            if [a.shape for a in arrays] != sent.shapes:
                rejected[site] = "wrong shape"
                continue
            flat = np.concatenate(
                [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
            )
            if not np.isfinite(flat).all():
                rejected[site] = "NaN or infinite values"
                continue
            update = flat - sent.flat
            norm = float(np.linalg.norm(update))
            if norm > self.max_update_norm:
                rejected[site] = (
                    f"update norm {norm:.3g} exceeds {self.max_update_norm:g}"
                )
                continue
            if self.clip_norm is not None and norm > self.clip_norm:
                clipped = sent.flat + update * (self.clip_norm / norm)
                _replace_arrays(reply, clipped, sent.shapes)
            metrics = content["metrics"]
            claimed = int(metrics[WEIGHT])
            if claimed > self.registered.get(site, 0) or claimed < 1:
                metrics[WEIGHT] = max(1, min(claimed, self.registered.get(site, 1)))
            candidates.append((reply, site, norm))
        for missing in range(sent.messages - received):
            rejected[f"late {missing + 1}"] = "no reply before the round deadline"
        if len(candidates) >= 3:  # relative screen: far above the round's median norm
            limit = MEDIAN_FACTOR * float(np.median([n for *_, n in candidates]))
            limit += 1e-12
            kept = []
            for reply, site, norm in candidates:
                if norm > limit and norm > 1.0:
                    rejected[site] = (
                        f"update norm {norm:.3g} is over 10x the round median"
                    )
                else:
                    kept.append((reply, site, norm))
            candidates = kept
        screened.sites = [site for _, site, _ in candidates]
        return [reply for reply, _, _ in candidates], screened


def _complete(content: Any) -> bool:
    """Whether a site's train reply has its arrays and a finite example count."""
    if "arrays" not in content or "metrics" not in content:
        return False
    count = content["metrics"].get(WEIGHT)
    return isinstance(count, int | float) and math.isfinite(count)


def _replace_arrays(
    reply: Message, flat: np.ndarray, shapes: list[tuple[int, ...]]
) -> None:
    """Put ``flat`` back in the reply's arrays, under the keys they had."""
    content: Any = reply.content
    keys = list(content["arrays"].keys())
    arrays, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) if shape else 1
        arrays.append(Array(flat[start : start + size].reshape(shape)))
        start += size
    content["arrays"] = ArrayRecord(dict(zip(keys, arrays, strict=True)))
