"""Statistics on the deployment (issue 16, point 3): ``describe`` of two columns over
four SuperNodes on loopback (TLS, node authentication), each a hospital of the
sample cohort, and where the time goes.

Run by ``make bench`` (``.venv/bin/python benchmarks/deployed_stats.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary against
the target (≤ 2 s for a deployed ``describe`` over 4 SuperNodes).

It starts an anvil node, a SuperLink and four SuperNodes (their own ports, homes and
temp dirs; stopped by PID), opens one session, runs ``describe`` ``--repeat`` times
and prints the median, and the median round trip of one protocol step (every site
answers one message: relay → SuperLink → SuperNode → site runtime and back) against
the time the sites spent answering it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab import encrypted
from healthlab.encrypted.keys import KeyHolder
from healthlab.federated.deploy import (
    DeployedSites,
    SiteConfig,
    SiteNode,
    SuperLink,
    bind_site_keys,
)
from healthlab.federated.deploy.statistics import RelayChannel
from healthlab.ledger import Ledger, sha256_of
from healthlab.ledger.client import deploy_registry
from healthlab.ledger.node import AnvilNode

TARGET_SECONDS = 2.0
COHORT = Path(__file__).resolve().parent.parent / "data_samples" / "cohort"
NAMES = ["site_a", "site_b", "site_c", "site_d"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.1)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}")
    with tempfile.TemporaryDirectory(prefix="hl-bench-deployed-") as tmp:
        work = Path(tmp)
        with AnvilNode() as anvil:
            run(anvil, work, args.repeat, args.poll)


def run(anvil: AnvilNode, work: Path, repeat: int, poll: float) -> None:
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil.url))
    address, _ = deploy_registry(w3, w3.eth.accounts[0])
    ledger = Ledger.connect(anvil.url, address, deploy=False)
    researcher = ledger.accounts[9]
    configs = []
    for i, name in enumerate(NAMES):
        owner = ledger.accounts[1 + i]
        path = COHORT / f"{name}.csv"
        ds = ledger.register_dataset(
            f"https://{name}.example/cohort",
            sha256_of(path),
            terms="HMB",
            auto_approve=True,
            sender=owner,
        )
        ledger.request_access(ds, "benchmark", "HMB", sender=researcher)
        config = SiteConfig(
            name=name,
            dataset_id=ds,
            rpc_url=anvil.url,
            registry=ledger.address,
            data=str(path),
            state_dir=str(work / name),
        )
        bind_site_keys(ledger, config, sender=owner)
        configs.append(config)
    link = SuperLink()
    nodes: list[SiteNode] = []
    rounds: list[float] = []
    exchange = RelayChannel.exchange

    def timed(self, bodies, timeout):  # type: ignore[no-untyped-def]
        began = time.monotonic()
        try:
            return exchange(self, bodies, timeout)
        finally:
            rounds.append(time.monotonic() - began)

    RelayChannel.exchange = timed  # type: ignore[method-assign]
    try:
        link.start(timeout=60)
        link.register_datasets(ledger, [c.dataset_id for c in configs])
        nodes = [
            SiteNode(
                link.address, c, root_certificates=link.root_certificates, poll=poll
            )
            for c in configs
        ]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(90)
        began = time.monotonic()
        with DeployedSites.open(
            link.address,
            ledger,
            datasets=[c.dataset_id for c in configs],
            root_certificates=link.root_certificates,
        ) as sites:
            opened = time.monotonic() - began
            keys = KeyHolder()
            times = []
            per_call = []
            for _ in range(repeat):
                rounds.clear()
                began = time.monotonic()
                encrypted.describe(
                    sites, ["age", "sbp"], researcher=researcher, keys=keys
                )
                times.append(time.monotonic() - began)
                per_call.append(list(rounds))
    finally:
        RelayChannel.exchange = exchange  # type: ignore[method-assign]
        for node in nodes:
            node.stop()
            node.close()
        link.stop()
        link.close()
    steps = [r for call in per_call for r in call]
    median = statistics.median(times)
    print(f"session open (ServerApp started, sites' hello): {opened:.2f} s")
    print(
        f"describe over {len(NAMES)} SuperNodes: median {median:.2f} s of {repeat} "
        f"(min {min(times):.2f}, max {max(times):.2f}); "
        f"{len(per_call[0])} round trips each, median {statistics.median(steps):.3f} s "
        f"(node poll {poll:g} s)"
    )
    verdict = "meets" if median <= TARGET_SECONDS else "misses"
    print(
        f"summary: deployed describe over 4 SuperNodes {median:.2f} s — {verdict} the "
        f"target of {TARGET_SECONDS:g} s"
    )


if __name__ == "__main__":
    main()
