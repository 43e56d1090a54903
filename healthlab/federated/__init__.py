"""Federated learning across sites with Flower, gated by on-chain grants.

``train(sites, target, features=None, model="logistic", rounds=…)`` runs a Flower
ServerApp (the study) and ClientApps (the sites) on Flower's simulation runtime in
this process and returns a :class:`FederatedResult` with ``predict_proba``,
``predict``, ``history`` and ``receipt``. Every setting of a study, with its default
and validation, is a field of :class:`~healthlab.federated.spec.StudySpec`.

The names are imported on first use, so that ``healthlab.federated.spec`` loads
without Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from healthlab.federated.run import FederatedResult, train
    from healthlab.federated.server_app import RoundReport
    from healthlab.federated.spec import StudySpec

__all__ = ["FederatedResult", "RoundReport", "StudySpec", "train"]

_HOMES = {
    "FederatedResult": "healthlab.federated.run",
    "train": "healthlab.federated.run",
    "RoundReport": "healthlab.federated.server_app",
    "StudySpec": "healthlab.federated.spec",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _HOMES:
        raise AttributeError(f"module 'healthlab.federated' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
