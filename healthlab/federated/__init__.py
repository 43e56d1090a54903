"""Federated learning across sites with Flower, gated by on-chain grants.

``train(sites, target, features=None, model="logistic", rounds=…)`` runs a Flower
ServerApp (the study) and ClientApps (the sites) on Flower's simulation runtime in
this process and returns a :class:`FederatedResult` with ``predict_proba``,
``predict``, ``history`` and ``receipt``.
"""

from __future__ import annotations

from healthlab.federated.run import FederatedResult, train
from healthlab.federated.server_app import RoundReport

__all__ = ["FederatedResult", "RoundReport", "train"]
