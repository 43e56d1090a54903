"""The ClientApp: the site. It holds the data and the grant gate.

Before every round (train or evaluate) the site checks the study's researcher still
holds a live grant on its dataset; without one it refuses and no parameter or metric
leaves it. Secure aggregation (``secure="ckks"``) sends the weighted parameters as
exact, masked, CKKS-encrypted totals instead of plain arrays.
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

from healthlab.encrypted.encoding import encode_totals, mask_digits, mask_vector
from healthlab.encrypted.keys import PublicContext
from healthlab.errors import AccessDenied, DataRefused, DisclosureRefused
from healthlab.federated.study import Study
from healthlab.federated.task import TrainConfig, metrics
from healthlab.sites import Site

__all__ = ["make_client_app", "refusal"]


def _c(message: Message) -> Any:
    """A message's records, untyped (Flower types each record as a union)."""
    return message.content


def refusal(msg: Message, site: str, reason: str) -> Message:
    """A reply that says the site refused, and carries nothing else."""
    content = RecordDict({"status": ConfigRecord({"site": site, "refused": reason})})
    return Message(content, reply_to=msg)


def _secure_peers(study: Study, site: Site, names: list[str]) -> dict[str, bytes]:
    """The members of a secure round with their mask keys. The server picks which
    of the study's sites take part (those that did not refuse); the keys are the
    study's own, never the server's, so it cannot add a member or swap a key."""
    keys = {s.name: s.mask_public_key for s in study.sites}
    unknown = sorted(set(names) - set(keys))
    if unknown:
        raise DisclosureRefused(f"{unknown} are not sites of this study")
    if site.name not in names:
        raise DisclosureRefused(f"site {site.name} is not among the round's members")
    if len(set(names)) < site.policy.min_sites:
        raise DisclosureRefused(
            f"site {site.name}: a secure round needs at least {site.policy.min_sites} "
            f"sites; {len(set(names))} take part"
        )
    return {name: keys[name] for name in names}


def make_client_app(study: Study, public: PublicContext | None = None) -> ClientApp:
    """A ClientApp whose node ``partition-id`` *i* is ``study.sites[i]``."""
    app = ClientApp()
    cache: dict[str, object] = {}

    def loaded() -> object:
        """The public context, deserialized once per study (not every round)."""
        if "context" not in cache:
            assert public is not None
            cache["context"] = public.load()
        return cache["context"]

    @app.query()
    def ready(msg: Message, context: Context) -> Message:
        """Grant check and this site's mask key, before a secure round."""
        site = study.site(int(context.node_config["partition-id"]))
        try:
            study.gate(site)
        except AccessDenied as exc:
            return refusal(msg, site.name, str(exc))
        status = ConfigRecord({"site": site.name, "mask_key": site.mask_public_key})
        return Message(RecordDict({"status": status}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = study.site(int(context.node_config["partition-id"]))
        config = _c(msg)["config"]
        try:
            study.gate(site)
            data = study.data(site)
            if study.secure == "ckks":
                peers = _secure_peers(study, site, [str(p) for p in config["peers"]])
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
        status = ConfigRecord({"site": site.name})
        if study.secure == "ckks":
            assert public is not None
            flat = np.concatenate([np.ravel(p) for p in new])
            digits = encode_totals(np.concatenate([flat * n, [float(n)]]))
            seeds = site.pairwise_seeds(
                peers, f"{study.hash}|{config['round']}".encode()
            )
            masked = mask_digits(digits, mask_vector(seeds, digits.size))
            import tenseal as ts

            context_ = loaded()
            slots = public.params.slots
            blobs = [
                ts.ckks_vector(
                    context_, masked[i : i + slots].astype(np.float64)
                ).serialize()
                for i in range(0, masked.size, slots)
            ]
            status["ciphertexts"] = blobs
            status["fingerprint"] = public.fingerprint
            content = RecordDict({"status": status})
        else:
            content = RecordDict(
                {
                    "arrays": ArrayRecord([np.asarray(p) for p in new]),
                    "metrics": MetricRecord({"num-examples": n}),
                    "status": status,
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
