"""The encrypted statistics on a deployment: the same calls, the same site code.

Four gated sites (the sample cohort's hospitals, each its own owner, grants and
site keys on anvil) answer as deployed sites — each from its node config, data file
and ``state-dir`` — through the wire format (:class:`InProcessNodes`: the site
runtime's handler without Flower's processes). Every statistic equals the same call
on the same sites in this process exactly. The Flower deployment itself (a SuperLink,
four SuperNodes, TLS) is in ``test_deploy_statistics_flower``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthlab import encrypted
from healthlab.encrypted import wire
from healthlab.encrypted.keys import KeyHolder
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
)
from healthlab.federated.deploy import (
    DeployedSites,
    InProcessNodes,
    SiteConfig,
    bind_site_keys,
)
from healthlab.federated.deploy.answers import answer
from healthlab.ledger import Ledger, sha256_of
from healthlab.ledger.node import AnvilNode
from healthlab.sites import Site
from tests.test_deploy import grant, registry

pytestmark = pytest.mark.anvil

COHORT = Path(__file__).resolve().parent.parent / "data_samples" / "cohort"
NAMES = ["site_a", "site_b", "site_c", "site_d"]


@dataclass
class Consortium:
    ledger: Ledger
    researcher: str
    configs: list[SiteConfig]
    owners: dict[str, str]
    datasets: dict[str, int]

    def local(self) -> list[Site]:
        """The same sites in this process (their own in-memory auditors)."""
        return [
            Site(
                c.name,
                COHORT / f"{c.name}.csv",
                dataset_id=c.dataset_id,
                ledger=self.ledger,
            )
            for c in self.configs
        ]

    def deployed(self, tmp: Path | None = None) -> DeployedSites:
        configs = self.configs
        if tmp is not None:  # fresh state dirs (a fresh auditor), same keys
            configs = [
                replace(c, state_dir=str(tmp / c.name), key_path=_key(c))
                for c in configs
            ]
        return DeployedSites(InProcessNodes(configs), self.ledger)


def _key(config: SiteConfig) -> str:
    return config.key_path or str(Path(str(config.state_dir)) / "mask-key.pem")


@pytest.fixture(scope="module")
def consortium(
    anvil: AnvilNode, tmp_path_factory: pytest.TempPathFactory
) -> Consortium:
    return make_consortium(anvil, tmp_path_factory.mktemp("deployed-stats"))


def make_consortium(anvil: AnvilNode, work: Path) -> Consortium:
    """The four hospitals on a registry of their own: each its owner, grant to
    the researcher, node config and site keys bound on chain."""
    ledger = registry(anvil)
    researcher = ledger.accounts[9]
    configs, owners, datasets = [], {}, {}
    for i, name in enumerate(NAMES):
        owner = ledger.accounts[1 + i]
        path = COHORT / f"{name}.csv"
        ds = grant(ledger, sha256_of(path), owner, researcher, name)
        config = SiteConfig(
            name=name,
            dataset_id=ds,
            rpc_url=anvil.url,
            registry=ledger.address,
            data=str(path),
            state_dir=str(work / f"state_{name}"),
            verify_content=True,
        )
        bind_site_keys(ledger, config, sender=owner)
        configs.append(config)
        owners[name], datasets[name] = owner, ds
    return Consortium(ledger, researcher, configs, owners, datasets)


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=True)


#: What one statistic call gives (a frame to compare exactly).
Call = Callable[[Any], pd.DataFrame]


def statistics_calls(
    r: str, keys: KeyHolder, *, glm: str = "binomial"
) -> dict[str, Call]:
    """The statistics compared on a deployment: each a call on ``sites``. ``glm``:
    the family of the model fitted (a binomial fit takes two queries per IRLS step;
    a Gaussian one, one step)."""
    # (not + diabetes: site_c's 5 smokers with diabetes cannot carry a logit's
    # Newton path — its iterates' weighted functions of their ages; refused)
    formula = (
        "cvd_event_10y ~ age + smoker + sbp"
        if glm == "binomial"
        else "sbp ~ age + C(sex) + smoker"
    )
    return {
        "describe": lambda s: encrypted.describe(
            s, ["age", "sbp"], researcher=r, keys=keys
        ).to_frame(),
        "describe_by": lambda s: encrypted.describe(
            s, ["age", "sbp"], by="sex", researcher=r, keys=keys
        ).to_frame(),
        "histogram": lambda s: encrypted.histogram(
            s, "age", [30, 40, 50, 60, 70, 90], researcher=r, keys=keys
        ).to_frame(),
        "crosstab": lambda s: encrypted.crosstab(
            s, "sex", "smoker", researcher=r, keys=keys
        ).to_frame(),
        "corr": lambda s: encrypted.corr(
            s, ["age", "sbp", "bmi"], dropna=True, researcher=r, keys=keys
        ).to_frame(),
        "ols": lambda s: encrypted.ols(
            s, "sbp", ["age", "bmi"], dropna=True, researcher=r, keys=keys
        ).to_frame(),
        "glm": lambda s: encrypted.glm(
            s,
            formula,
            family=glm,
            researcher=r,
            keys=keys,
        ).to_frame(),
    }


def test_every_statistic_equals_the_same_call_in_process(
    consortium: Consortium, tmp_path: Path
) -> None:
    r = consortium.researcher
    keys = KeyHolder()
    local = consortium.local()
    sites = consortium.deployed(tmp_path)
    assert [s.name for s in sites] == NAMES
    # the Flower test compares the others over real processes; here the calls it
    # leaves out (the binomial fit) and two that every other one builds on
    calls = {
        k: v
        for k, v in statistics_calls(r, keys).items()
        if k in ("describe", "describe_by", "glm")
    }
    for name, call in calls.items():
        here = call(local)
        there = call(sites)
        _frames_equal(there, here)
        assert there.size > 0, name


def test_a_deployed_result_carries_the_receipt_of_each_sites_grant(
    consortium: Consortium, tmp_path: Path
) -> None:
    sites = consortium.deployed(tmp_path)
    table = encrypted.describe(sites, ["age"], researcher=consortium.researcher)
    receipt = table.receipt
    assert receipt is not None
    named = {s["dataset_id"] for s in receipt["sites"]}
    assert named == set(consortium.datasets.values())
    assert all(s.get("grant_tx") for s in receipt["sites"])
    assert {s["content_hash"] for s in receipt["sites"]} == {
        sha256_of(COHORT / f"{n}.csv") for n in NAMES
    }


def test_the_deployed_sites_auditor_remembers_across_sessions(
    consortium: Consortium, tmp_path: Path
) -> None:
    """The four-query inclusion-exclusion attack, split over two sessions (a new
    session, new site objects, the same state dirs): the fourth query is refused."""
    r = consortium.researcher
    # control: with no memory, the fourth query alone is answered
    fresh = consortium.deployed(tmp_path / "fresh")
    encrypted.describe(fresh, ["age", "bmi", "glucose"], dropna=True, researcher=r)
    first = consortium.deployed(tmp_path / "remembering")
    encrypted.describe(first, ["age"], researcher=r)
    encrypted.describe(first, ["age", "bmi"], dropna=True, researcher=r)
    encrypted.describe(first, ["age", "glucose"], dropna=True, researcher=r)
    from healthlab.federated.deploy import answers

    answers.forget()  # the site runtimes restart: only the state dirs remain
    again = consortium.deployed(tmp_path / "remembering")
    with pytest.raises(DisclosureRefused, match=r"combination|differenc|determine"):
        encrypted.describe(again, ["age", "bmi", "glucose"], dropna=True, researcher=r)


def test_a_server_that_swaps_a_peers_mask_key_is_refused(
    consortium: Consortium, tmp_path: Path
) -> None:
    """The relay names a key it holds for one peer: every site checks the peers'
    keys against the chain and refuses before sending anything."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    sites = consortium.deployed(tmp_path)
    forged = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    sites[1].mask_public_key = forged
    with pytest.raises(DisclosureRefused, match="bound on chain"):
        encrypted.describe(sites, ["age"], researcher=consortium.researcher)


def test_a_site_runs_no_computation_the_package_does_not_register(
    consortium: Consortium,
) -> None:
    """A query whose kind names no registered computation (or a message that is
    not a protocol message) is refused at the site; nothing is evaluated."""
    config = consortium.configs[0]
    bad = [
        b"not json",
        wire.dump({"step": "eval", "args": {}}),
        wire.dump({"step": "prepare", "args": {"query": "__import__('os')"}}),
        b'{"step": "prepare", "args": {"query": {"@": "pickle", "data": "gASV"}}}',
    ]
    for body in bad:
        reply = wire.load(answer(body, config, 7))
        assert "refused" in reply and "ok" not in reply
    query = encrypted.Query("exec", {"code": "print(1)"}, 1, participants=("1", "2"))
    reply = wire.load(
        answer(wire.dump({"step": "prepare", "args": {"query": query}}), config, 7)
    )
    assert reply["refused"]["error"] in (
        "DataRefused",
        "SignatureInvalid",
        "AccessDenied",
    )


def test_a_site_that_stops_answering_after_the_masks_are_set_is_recovered(
    anvil: AnvilNode, tmp_path: Path
) -> None:
    """site_d answers prepare (with its announcement), then goes offline: the sum
    over the other three is recovered from its neighbours' shares, equals the
    in-process result over those three, and the receipt says who dropped."""
    # a registry of its own: the survivors' site set goes into the shared query
    # log, and later queries over all four sites would be refused as differencing
    consortium = make_consortium(anvil, tmp_path / "chain")
    r = consortium.researcher
    sites = consortium.deployed(tmp_path)
    nodes = sites.channel
    assert isinstance(nodes, InProcessNodes)
    exchange = nodes.exchange

    def dropping(bodies, timeout):  # type: ignore[no-untyped-def]
        steps = {wire.load(b)["step"] for b in bodies.values()}
        if steps & {"count_holders", "contribute", "reveal"}:
            nodes.offline = {4}
        return exchange(bodies, timeout)

    nodes.exchange = dropping  # type: ignore[method-assign]
    table = encrypted.describe(sites, ["age"], researcher=r, min_sites=2)
    nodes.offline = set()
    three = [s for s in consortium.local() if s.name != "site_d"]
    frames = {s.name: pd.read_csv(COHORT / f"{s.name}.csv") for s in three}
    pooled = pd.concat(frames.values())["age"]
    assert table.to_frame().loc["count", "age"] == len(pooled)
    assert table.to_frame().loc["mean", "age"] == pytest.approx(
        pooled.mean(), rel=1e-13
    )
    assert table.receipt["dropped"] == ["site_d"]


def test_bad_wire_data_is_refused_with_a_named_error() -> None:
    for raw in (b"[", b'{"@": "flags", "site": 1}', b'{"@": "bytes", "data": "%%"}'):
        with pytest.raises(DataRefused):
            wire.load(raw)
    assert isinstance(
        wire.error_from({"error": "NoSuchThing", "message": "m"}), HealthLabError
    )
    assert np.array_equal(wire.load(wire.dump(np.arange(3))), [0, 1, 2])


def test_a_site_silent_at_reveal_is_still_in_the_sum(
    consortium: Consortium, tmp_path: Path
) -> None:
    """site_d contributes, then does not answer the reveal step: its neighbours'
    shares of its self mask rebuild what the sum needs, and the result equals the
    in-process call over all four sites."""
    r = consortium.researcher
    keys = KeyHolder()
    sites = consortium.deployed(tmp_path)
    nodes = sites.channel
    assert isinstance(nodes, InProcessNodes)
    exchange = nodes.exchange

    def silent_at_reveal(bodies, timeout):  # type: ignore[no-untyped-def]
        steps = {wire.load(b)["step"] for b in bodies.values()}
        nodes.offline = {4} if "reveal" in steps else set()
        return exchange(bodies, timeout)

    nodes.exchange = silent_at_reveal  # type: ignore[method-assign]
    there = encrypted.describe(sites, ["age", "sbp"], researcher=r, keys=keys)
    here = encrypted.describe(
        consortium.local(), ["age", "sbp"], researcher=r, keys=keys
    )
    _frames_equal(there.to_frame(), here.to_frame())


def test_a_signed_query_replayed_after_a_site_restart_is_refused(
    consortium: Consortium, tmp_path: Path
) -> None:
    """The relay keeps a signed prepare message and sends it again in another run
    after the site's process has forgotten everything (new site objects, the same
    state dir): the site refuses the replay."""
    from healthlab.federated.deploy import answers

    sites = consortium.deployed(tmp_path)
    nodes = sites.channel
    assert isinstance(nodes, InProcessNodes)
    kept: list[bytes] = []
    exchange = nodes.exchange

    def keeping(bodies, timeout):  # type: ignore[no-untyped-def]
        for node, body in bodies.items():
            if node == 1 and wire.load(body)["step"] == "prepare":
                kept.append(body)
        return exchange(bodies, timeout)

    nodes.exchange = keeping  # type: ignore[method-assign]
    encrypted.describe(sites, ["age"], researcher=consortium.researcher)
    assert kept
    answers.forget()  # the site runtime restarts
    reply = wire.load(answer(kept[0], nodes.configs[1], 99))
    assert reply["refused"]["error"] == "SignatureInvalid"
    assert "replay" in reply["refused"]["message"]


def test_what_does_not_run_on_a_deployment_is_refused_by_name(
    consortium: Consortium, tmp_path: Path
) -> None:
    """Every-value mode computes with code the sites have registered for no query
    kind: refused before any site is asked, with an error that says why."""
    sites = consortium.deployed(tmp_path)
    with pytest.raises(InvalidInput, match="deployed"):
        encrypted.describe_values(
            sites, ["age"], bound=150, researcher=consortium.researcher
        )
    with pytest.raises(InvalidInput, match="deployed site"):
        sites[0].rows(["age"])
