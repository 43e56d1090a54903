"""The encrypted statistics over Flower's deployment: a SuperLink with TLS and node
authentication, four SuperNodes (one per hospital, each its own port, FLWR_HOME,
data, keys and state), and ``DeployedSites.open`` on loopback. Every statistic
equals the same call on the same sites in this process exactly; the processes are
stopped by PID, SuperNodes before the SuperLink."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from healthlab import encrypted
from healthlab.encrypted.keys import KeyHolder
from healthlab.errors import DataRefused
from healthlab.federated.deploy import DeployedSites, SiteNode, SuperLink
from healthlab.ledger.node import AnvilNode
from tests.test_deploy import require_flower
from tests.test_deployed_statistics import (
    COHORT,
    NAMES,
    Consortium,
    make_consortium,
    statistics_calls,
)

pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def deployed(
    anvil: AnvilNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Consortium, DeployedSites, dict[str, float]]]:
    require_flower()
    consortium = make_consortium(anvil, tmp_path_factory.mktemp("flower-stats"))
    seconds: dict[str, float] = {}
    started = time.monotonic()
    link = SuperLink()  # TLS with a fresh study CA, node authentication on
    nodes: list[SiteNode] = []
    sites: DeployedSites | None = None
    try:
        link.start(timeout=60)
        link.register_datasets(consortium.ledger, consortium.datasets.values())
        nodes = [
            SiteNode(link.address, c, root_certificates=link.root_certificates)
            for c in consortium.configs
        ]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(90)
        seconds["processes up"] = time.monotonic() - started
        opened = time.monotonic()
        sites = DeployedSites.open(
            link.address,
            consortium.ledger,
            datasets=list(consortium.datasets.values()),
            root_certificates=link.root_certificates,
            node_timeout=60,
        )
        seconds["session open"] = time.monotonic() - opened
        yield consortium, sites, seconds
    finally:
        if sites is not None:
            sites.close()
        import os

        if os.environ.get("HL_DEBUG_LOGS"):
            for node in nodes:
                print(node.runtime_output()[-6000:])
        for node in nodes:  # SuperNodes first
            node.stop()
            node.close()
        link.stop()
        link.close()
        shown = {k: round(v, 2) for k, v in seconds.items()}
        print(f"\ndeployed statistics timings (s): {shown}")


def test_deployed_statistics_equal_the_in_process_calls(
    deployed: tuple[Consortium, DeployedSites, dict[str, float]],
) -> None:
    consortium, sites, seconds = deployed
    r = consortium.researcher
    keys = KeyHolder()
    local = consortium.local()
    assert [s.name for s in sites] == NAMES
    # a Gaussian GLM (one IRLS step); the binomial fit over the same site code
    # is compared in test_deployed_statistics (each IRLS step is two queries)
    calls = statistics_calls(r, keys, glm="gaussian")
    import pandas as pd

    for name, call in calls.items():
        here = call(local)
        began = time.monotonic()
        there = call(sites)
        seconds[name] = time.monotonic() - began
        pd.testing.assert_frame_equal(there, here, check_exact=True, obj=name)


def test_deployed_sites_apply_their_own_disclosure_rules(
    deployed: tuple[Consortium, DeployedSites, dict[str, float]],
) -> None:
    """An identifier cannot group rows at a deployed site either."""
    consortium, sites, _ = deployed
    with pytest.raises(DataRefused, match=r"identifier") as refused:
        encrypted.describe(
            sites, ["age"], by="patient_id", researcher=consortium.researcher
        )
    assert "C0" not in str(refused.value) and "A0" not in str(refused.value)


def test_a_deployed_sites_data_is_its_registered_file(
    deployed: tuple[Consortium, DeployedSites, dict[str, float]],
) -> None:
    _, sites, _ = deployed
    from healthlab.ledger import sha256_of

    assert {s.content_hash for s in sites} == {
        sha256_of(COHORT / f"{n}.csv") for n in NAMES
    }
