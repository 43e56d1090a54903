"""The in-clear ClientApp (``secure="none"``): the site. It holds the data and the
grant gate.

Before every round (train or evaluate) the site checks the study's researcher still
holds a live grant on its dataset; without one it refuses and no parameter or metric
leaves it. Its update and held-out metric sums leave it in clear; the masked
protocol, the default, is :mod:`healthlab.federated.masked_site`.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from healthlab.errors import AccessDenied, DataRefused, DisclosureRefused
from healthlab.federated.study import Study
from healthlab.federated.task import TrainConfig, metrics

__all__ = ["make_client_app", "refusal"]


def _c(message: Message) -> Any:
    """A message's records, untyped (Flower types each record as a union)."""
    return message.content


def refusal(msg: Message, site: str, reason: str) -> Message:
    """A reply that says the site refused, and carries nothing else."""
    content = RecordDict({"status": ConfigRecord({"site": site, "refused": reason})})
    return Message(content, reply_to=msg)


def make_client_app(study: Study) -> ClientApp:
    """A ClientApp whose node ``partition-id`` *i* is ``study.sites[i]``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = study.site(int(context.node_config["partition-id"]))
        config = _c(msg)["config"]
        try:
            study.gate(site)
            data = study.data(site)
        except (AccessDenied, DataRefused, DisclosureRefused) as exc:
            return refusal(msg, site.name, str(exc))
        params = _c(msg)["arrays"].to_numpy_ndarrays()
        local = TrainConfig(
            **{
                **study.config.__dict__,
                "seed": study.config.seed + int(config["round"]),
            }
        )
        if "proximal-mu" in config:
            local = TrainConfig(
                **{**local.__dict__, "proximal_mu": float(config["proximal-mu"])}
            )
        new = study.model.fit(params, data.x_train, data.y_train, local)
        n = len(data.y_train)
        if study.update_hook is not None:
            new, n = study.update_hook(site.name, new, n)
        content = RecordDict(
            {
                "arrays": ArrayRecord([np.asarray(p) for p in new]),
                "metrics": MetricRecord({"num-examples": n}),
                "status": ConfigRecord({"site": site.name}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = study.site(int(context.node_config["partition-id"]))
        try:
            study.gate(site)
            data = study.data(site)
        except (AccessDenied, DataRefused, DisclosureRefused) as exc:
            return refusal(msg, site.name, str(exc))
        if len(data.y_test) < site.policy.min_rows:
            return refusal(msg, site.name, "too few held-out rows to report metrics")
        params = _c(msg)["arrays"].to_numpy_ndarrays()
        sums = metrics(study.model, params, data.x_test, data.y_test)
        content = RecordDict(
            {
                "metrics": MetricRecord(cast(Any, sums)),
                "status": ConfigRecord({"site": site.name}),
            }
        )
        return Message(content, reply_to=msg)

    return app
