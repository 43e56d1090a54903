"""Differential privacy at the sites: a dataset owner's budget, the Gaussian noise a
site adds to its totals, and the accountant that says what was spent.

A dataset's owner may give it a privacy budget ``(ε, δ)`` per researcher and grant
(on chain, :meth:`Ledger.set_privacy_budget`; or in a teaching site's
:class:`PrivacyBudget`). Then every statistic the site answers that researcher is
a Gaussian mechanism: the site clips each row's values to the query's public
bounds, so one row (a patient) changes each total ``j`` by at most ``Δ_j``, and
adds ``N(0, σ_j²)`` to it, ``σ_j = z·√d·Δ_j`` (``z``: the budget's noise
multiplier, ``d``: the totals one row touches; :func:`moments_scales`). The site
does this itself, not trusting other sites' noise: the guarantee holds for each
site against a researcher who colludes with every other one.

Accounting. ``k`` Gaussian mechanisms of multipliers ``z_i`` compose exactly into
one of multiplier ``(Σ z_i⁻²)^(-1/2)`` (Gaussian differential privacy; Dong, Roth &
Su 2019), whose ``ε(δ)`` the PRV accountant (``prv-accountant``, Gopi, Lee &
Wutschitz 2021) computes; the upper bound of its estimate is used. A site refuses
the query that would take the spent ``ε`` above the budget. Under a budget the
site's differencing audit is replaced by the accounting (DP makes a difference of
answers noise of the stated scale); the minimum rows per cell and sites per result
still hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from healthlab.errors import InvalidInput

__all__ = [
    "PrivacyBudget",
    "epsilon_spent",
    "gaussian_noise",
    "moments_scales",
]

#: The accountant's error bounds (ε absolute; δ relative to the δ asked).
EPS_ERROR = 0.01


@dataclass(frozen=True)
class PrivacyBudget:
    """What a site's owner allows one researcher per grant.

    Attributes
    ----------
    epsilon, delta:
        The total ``(ε, δ)`` the researcher may spend on the dataset.
    noise_multiplier:
        ``z``: every answer's noise is ``z`` times its sensitivity. Larger ``z``:
        more answers from the same budget, each noisier.
    """

    epsilon: float
    delta: float = 1e-5
    noise_multiplier: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise InvalidInput("a privacy budget's epsilon must be positive")
        if not 0 < self.delta < 1:
            raise InvalidInput("a privacy budget's delta must be in (0, 1)")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise InvalidInput("the noise multiplier must be positive")

    def spent(self, answers: int) -> float:
        """ε spent by ``answers`` answers at this budget's noise multiplier."""
        return epsilon_spent([self.noise_multiplier] * answers, self.delta)

    def allows(self, answers: int) -> bool:
        """Whether ``answers`` answers fit in the budget."""
        return self.spent(answers) <= self.epsilon


def epsilon_spent(noise_multipliers: Sequence[float], delta: float) -> float:
    """ε (upper bound, at ``delta``) of Gaussian mechanisms of these multipliers,
    composed: one Gaussian mechanism of multiplier ``(Σ z⁻²)^(-1/2)``, accounted by
    ``prv-accountant``. 0 for no mechanism."""
    if not noise_multipliers:
        return 0.0
    mu = math.sqrt(sum(1.0 / (z * z) for z in noise_multipliers))
    return _epsilon(round(1.0 / mu, 12), float(delta))


@lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, delta: float) -> float:
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import GaussianMechanism

    accountant = PRVAccountant(
        prvs=[GaussianMechanism(noise_multiplier=noise_multiplier)],
        max_self_compositions=[1],
        eps_error=EPS_ERROR,
        delta_error=delta / 1000,
    )
    _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[1])
    return max(0.0, float(upper))


def moments_scales(
    bounds: Sequence[Sequence[float]],
    center: Sequence[float],
    *,
    order: int,
    cross: bool,
    groups: int,
) -> np.ndarray:
    """What one row can change in each total of a moments query, and so the
    noise's standard deviation per total per unit of noise multiplier.

    The layout is the query's: ``[dropped] + groups × [n, Σ(x-c), Σ(x-c)² | the
    upper triangle of Σ(x-c)(x-c)ᵀ]``. A row is dropped, or in one group; its
    ``|x - c|`` is at most ``reach = max(hi - c, c - lo)`` per column (values
    clipped to ``[lo, hi]``). Each total ``j`` gets noise ``z · √d · Δ_j`` (``d``
    totals per group): then the row's change, divided by the noise, has L2 norm at
    most ``1/z`` — a Gaussian mechanism of multiplier ``z``."""
    low = np.asarray([b[0] for b in bounds], dtype=float)
    high = np.asarray([b[1] for b in bounds], dtype=float)
    c = np.asarray(center, dtype=float)
    reach = np.maximum(high - c, c - low)
    per_group = [1.0, *reach.tolist()]
    if order == 2:
        if cross:
            upper = np.triu_indices(reach.size)
            per_group += np.outer(reach, reach)[upper].tolist()
        else:
            per_group += (reach**2).tolist()
    d = len(per_group)
    scales = [1.0, *(per_group * groups)]
    return np.asarray(scales) * math.sqrt(d)


def gaussian_noise(
    size: int, scale: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``size`` draws of ``N(0, scale²)`` from the operating system's entropy."""
    generator = rng or np.random.default_rng()
    return generator.normal(0.0, scale, size)
