"""A deployed study's result: the JSON the ServerApp writes, as a FederatedResult."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from healthlab.errors import HealthLabError
from healthlab.federated.spec import StudySpec

if TYPE_CHECKING:
    from healthlab.federated.run import FederatedResult
    from healthlab.ledger import Ledger
    from healthlab.sites import Site

__all__ = ["load_result"]


class _Declared:
    """A site as the researcher knows it: name, dataset and content hash (no data)."""

    def __init__(
        self,
        name: str,
        dataset_id: int | None,
        content_hash: str | None,
        ledger: Ledger | None,
    ) -> None:
        self.name = name
        self.dataset_id = dataset_id
        self.content_hash = content_hash
        self.ledger = ledger if dataset_id is not None else None

    @property
    def gated(self) -> bool:
        return self.ledger is not None


def load_result(
    source: str | os.PathLike[str] | Mapping[str, Any], *, ledger: Ledger | None = None
) -> FederatedResult:
    """A :class:`~healthlab.federated.FederatedResult` from a deployed study's JSON.

    ``test_index`` is empty: the held-out rows stay at the sites. With the
    researcher's ``ledger`` the receipt names each site's grant.
    """
    from healthlab.federated.run import FederatedResult
    from healthlab.federated.server_app import RoundReport
    from healthlab.federated.study import Preprocessing
    from healthlab.federated.task import get_model
    from healthlab.receipts import build_receipt

    raw = (
        dict(source)
        if isinstance(source, Mapping)
        else json.loads(Path(source).read_text())
    )
    if raw.get("status") != "finished":
        raise HealthLabError(f"the study did not finish: {raw.get('error')}")
    study = raw["study"]
    params = [
        np.asarray(values, dtype=np.float64).reshape(shape)
        for values, shape in zip(raw["params"], raw["shapes"], strict=True)
    ]
    prep = Preprocessing(
        tuple(raw["preprocessing"]["center"]),
        tuple(tuple(row) for row in raw["preprocessing"]["matrix"]),
    )
    rounds = [RoundReport(**r) for r in raw["rounds"]]
    taken = {s for r in rounds for s in r.sites}
    sites = [
        _Declared(s["name"], s.get("dataset_id"), s.get("content_hash"), ledger)
        for s in raw["sites"]
        if s["name"] in taken
    ]
    researcher = study.get("researcher") or None
    receipt = build_receipt(
        kind="federated",
        result={f"param{i}": p.tolist() for i, p in enumerate(params)},
        queries=[{"kind": "federated-deployment", "study_hash": raw["study_hash"]}],
        parameters={
            **{k: v for k, v in study.items() if k not in StudySpec.SIGNATURE_FIELDS},
            "runtime": "flower-deployment",
        },
        sites=cast("list[Site]", sites),  # stand-ins: name, dataset, hash, ledger
        researcher=researcher,
        refused={k: v for r in rounds for k, v in r.refused.items()},
        extra={
            "history": [
                {"round": r.round, "sites": r.sites, **r.pooled} for r in rounds
            ]
        },
    )
    features = list(study["features"])
    return FederatedResult(
        get_model(study["model"]),
        params,
        features,
        study["target"],
        prep,
        rounds,
        receipt,
        {},
    )
