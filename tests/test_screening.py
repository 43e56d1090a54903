"""The screening wrapper on its own: crafted Flower replies go in, and only the honest
ones reach the inner strategy, unchanged (or clipped and capped as told); composed
with FedAvg it gives the weighted mean of the accepted updates."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.task_identity import TaskIdentity

from healthlab.errors import HealthLabError, TooFewSites
from healthlab.federated.screening import Screened, Screening

#: the global model of every test: a 2x2 weight matrix and a bias of 2
GLOBAL = [np.zeros((2, 2)), np.zeros(2)]
#: the training rows each site registered (minus the held-out)
REGISTERED = {"a": 100, "b": 100, "c": 50, "d": 100, "e": 100, "f": 100}


@pytest.fixture(autouse=True)
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower stamps on a ServerApp's messages (set by its runtime)."""
    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


class Recorder(Strategy):
    """An inner strategy that sends ``outbox`` and records what it is given."""

    def __init__(self, outbox: list[Message]) -> None:
        self.outbox = outbox
        self.received: list[Message] = []
        self.calls: list[str] = []
        self.result = (ArrayRecord(GLOBAL), MetricRecord({"round-loss": 0.25}))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.calls.append("configure_train")
        return self.outbox

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.calls.append("aggregate_train")
        self.received = list(replies)
        return self.result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.calls.append("configure_evaluate")
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        self.calls.append("aggregate_evaluate")
        return MetricRecord({"auc": 0.5})

    def summary(self) -> None:
        self.calls.append("summary")


def grid(nodes: int) -> Grid:
    """Enough of a Grid for FedAvg to sample ``nodes`` nodes (ids 1..nodes)."""
    return cast(Grid, SimpleNamespace(get_node_ids=lambda: list(range(1, nodes + 1))))


def sent(nodes: int) -> list[Message]:
    """The train messages a strategy sends to nodes 1..nodes."""
    content = RecordDict({"arrays": ArrayRecord(GLOBAL)})
    return [
        Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
        for node in range(1, nodes + 1)
    ]


def update(
    to: Message, site: str, params: list[np.ndarray], n: int | float = 10
) -> Message:
    """Site ``site``'s reply to ``to``: its new ``params`` trained on ``n`` rows."""
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.asarray(p, dtype=np.float64) for p in params]),
            "metrics": MetricRecord({"num-examples": n}),
            "status": ConfigRecord({"site": site}),
        }
    )
    return Message(content, reply_to=to)


def refusal(to: Message, site: str, reason: str) -> Message:
    status = ConfigRecord({"site": site, "refused": reason})
    return Message(RecordDict({"status": status}), reply_to=to)


def moved(by: float) -> list[np.ndarray]:
    """The global model with every entry moved by ``by``."""
    return [p + by for p in GLOBAL]


def params_of(reply: Message) -> list[np.ndarray]:
    return cast(Any, reply.content)["arrays"].to_numpy_ndarrays()


def count_of(reply: Message) -> int:
    return int(cast(Any, reply.content)["metrics"]["num-examples"])


def screen(
    inner: Strategy,
    replies: list[Message],
    out: list[Message],
    **settings: Any,
) -> tuple[Screening, ArrayRecord | None]:
    """One round through ``Screening(inner)``: configure, then aggregate ``replies``."""
    wrapper = Screening(inner, registered=REGISTERED, **settings)
    config = ConfigRecord()
    messages = wrapper.configure_train(1, ArrayRecord(GLOBAL), config, grid(len(out)))
    assert list(messages) == out
    arrays, _ = wrapper.aggregate_train(1, replies)
    return wrapper, arrays


def test_rejects_exactly_the_bad_replies_and_passes_the_rest_on_unchanged() -> None:
    out = sent(8)
    honest = [update(out[0], "a", moved(0.1), 40), update(out[1], "b", moved(-0.2), 60)]
    crafted = [
        update(out[2], "c", moved(0.3), 10**9),  # over-claims: capped at 50, kept
        update(out[3], "d", [np.full((2, 2), np.nan), np.zeros(2)]),
        update(out[4], "e", [np.zeros((2, 3)), np.zeros(2)]),
        update(out[5], "f", moved(1e5)),
        refusal(out[6], "g", "no live grant"),
        Message(Error(0, "lost its network"), reply_to=out[7]),
    ]
    before = [params_of(r) for r in honest]
    inner = Recorder(out)
    wrapper, arrays = screen(inner, honest + crafted, out)

    assert [id(r) for r in inner.received] == [id(r) for r in [*honest, crafted[0]]]
    for reply, params in zip(honest, before, strict=True):
        for got, want in zip(params_of(reply), params, strict=True):
            np.testing.assert_array_equal(got, want)
    assert [count_of(r) for r in inner.received] == [40, 60, 50]
    assert wrapper.screened[1] == Screened(
        sites=["a", "b", "c"],
        refused={"g": "no live grant"},
        rejected={
            "d": "NaN or infinite values",
            "e": "wrong shape",
            "f": "update norm 2.45e+05 exceeds 10000",
            "node 8": "error: lost its network",
        },
    )
    assert arrays is inner.result[0]  # the inner strategy's model, as it is


def test_a_late_reply_a_malformed_one_and_a_far_outlier_are_recorded() -> None:
    out = sent(7)
    bare = Message(RecordDict({"status": ConfigRecord({"site": "d"})}), reply_to=out[3])
    replies = [
        update(out[0], "a", moved(0.1)),
        update(out[1], "b", moved(0.2)),
        update(out[2], "c", moved(50.0)),  # within 1e4, but >10x the median norm
        bare,
        update(out[4], "e", moved(0.3)),
        update(out[5], "f", moved(0.1), float("nan")),
    ]  # node 7 never answers
    inner = Recorder(out)
    wrapper, _ = screen(inner, replies, out)
    assert wrapper.screened[1].sites == ["a", "b", "e"]
    assert wrapper.screened[1].rejected == {
        "c": "update norm 122 is over 10x the round median",
        "d": "error: malformed reply",
        "f": "error: malformed reply",
        "late 1": "no reply before the round deadline",
    }


def test_clip_norm_scales_long_updates_back_and_keeps_short_ones() -> None:
    out = sent(2)
    long, short = update(out[0], "a", moved(1.0)), update(out[1], "b", moved(0.1))
    inner = Recorder(out)
    screen(inner, [long, short], out, clip_norm=0.5)
    clipped = np.concatenate([p.ravel() for p in params_of(inner.received[0])])
    np.testing.assert_allclose(clipped, np.full(6, 0.5 / np.sqrt(6)))
    np.testing.assert_array_equal(params_of(inner.received[1])[0], moved(0.1)[0])
    assert list(cast(Any, long.content)["arrays"].keys()) == ["0", "1"]


def test_too_few_accepted_sites_raise_with_every_reason() -> None:
    out = sent(3)
    replies = [
        update(out[0], "a", moved(0.1)),
        refusal(out[1], "b", "no live grant"),
        update(out[2], "c", [np.full((2, 2), np.inf), np.zeros(2)]),
    ]
    inner = Recorder(out)
    with pytest.raises(TooFewSites) as caught:
        screen(inner, replies, out, min_sites=2)
    assert str(caught.value) == (
        "round 1: only 1 site(s) contributed, fewer than the 2 required (refused or "
        "rejected: b: no live grant; c: NaN or infinite values)"
    )
    assert "aggregate_train" not in inner.calls


def test_everything_but_aggregate_train_is_the_inner_strategys() -> None:
    inner = Recorder([])
    wrapper = Screening(inner, registered={})
    assert (
        list(wrapper.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid(0)))
        == []
    )
    assert wrapper.aggregate_evaluate(1, []) == MetricRecord({"auc": 0.5})
    wrapper.summary()
    assert inner.calls == ["configure_evaluate", "aggregate_evaluate", "summary"]
    with pytest.raises(HealthLabError, match="before configure_train"):
        wrapper.aggregate_train(2, [])


def test_with_fedavg_the_model_is_the_weighted_mean_of_the_accepted_updates() -> None:
    fedavg = FedAvg(fraction_evaluate=0.0)
    wrapper = Screening(fedavg, registered=REGISTERED, min_sites=2)
    out = list(wrapper.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), grid(4)))
    by_node = {m.metadata.dst_node_id: m for m in out}
    replies = [
        update(by_node[1], "a", [np.full((2, 2), 1.0), np.full(2, 2.0)], 30),
        update(by_node[2], "b", [np.full((2, 2), 4.0), np.full(2, -1.0)], 10),
        update(by_node[3], "c", [np.full((2, 2), np.nan), np.zeros(2)], 60),
        update(by_node[4], "d", [np.full((2, 2), 2.0), np.full(2, 0.5)], 10**6),
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert arrays is not None
    weights, bias = arrays.to_numpy_ndarrays()
    # a (30 rows), b (10) and d (capped at its 100 rows); c's NaN update is out
    np.testing.assert_allclose(weights, np.full((2, 2), (30 + 40 + 200) / 140))
    np.testing.assert_allclose(bias, np.full(2, (60 - 10 + 50) / 140))
    assert wrapper.screened[1].rejected == {"c": "NaN or infinite values"}


def test_the_screen_goes_outside_differential_privacy() -> None:
    """DP aggregates nothing if a reply carries an error; outside it, the screen
    drops the error first, so one failed site does not cost the round."""
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_evaluate=0.0),
        noise_multiplier=0.0,
        clipping_norm=100.0,
        num_sampled_clients=3,
    )
    wrapper = Screening(dp, registered=REGISTERED)
    out = list(wrapper.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), grid(3)))
    by_node = {m.metadata.dst_node_id: m for m in out}
    replies = [
        update(by_node[1], "a", moved(1.0), 10),
        update(by_node[2], "b", moved(3.0), 30),
        Message(Error(0, "lost its network"), reply_to=by_node[3]),
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert arrays is not None
    for got in arrays.to_numpy_ndarrays():
        np.testing.assert_allclose(got, 2.5)  # (10·1 + 30·3) / 40, no noise
    assert dp.aggregate_train(1, replies) == (None, None)  # DP alone: no model
