"""Federated studies on Flower's deployment runtime, on loopback.

One SuperLink and four SuperNodes, one per site, each started on its own port with
its own FLWR_HOME, data (three CSV files and a SQLite table), key material and state;
the researcher holds grants on anvil; ``healthlab study`` signs a 2-round study and
runs it with ``flwr run --stream``; the processes are stopped by PID, SuperNodes
before the SuperLink. The deployed model is the in-process simulation's model.

The site's ClientApp handlers are also called in-process (no Flower processes) to
show what a site refuses: unsigned or altered studies, replayed signatures, datasets
outside the study, revoked grants, data that differs from what was registered.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    RecordDict,
)
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from healthlab import cli
from healthlab.data.stores import SQLStore
from healthlab.encrypted.encoding import (
    DIGITS,
    decode_sum,
    encode_totals,
    mask_vector,
)
from healthlab.errors import HealthLabError, InvalidInput
from healthlab.federated import FederatedResult, train
from healthlab.federated.deploy import (
    SiteConfig,
    SiteNode,
    StudySpec,
    SuperLink,
    bind_site_keys,
    find_flower,
    launch_study,
    load_result,
    load_site_key,
    write_app,
    write_run_config,
)
from healthlab.federated.deployed_client import app as client_app
from healthlab.federated.deployed_client import preprocessing_record
from healthlab.federated.masked import Contribution, server_sum, to_record
from healthlab.federated.masked_site import RELAYED
from healthlab.federated.study import Preprocessing
from healthlab.ledger import Ledger, sha256_of
from healthlab.ledger.client import deploy_registry
from healthlab.ledger.node import AnvilNode
from healthlab.sites import Site

pytestmark = pytest.mark.anvil

TARGET = "target"
FEATURES = [str(c) for c in load_breast_cancer(as_frame=True).frame.columns[:8]]
SITES = ["site_0", "site_1", "site_2", "site_3"]
ROUNDS = 2
#: Rows per site: unequal, so FedAvg's weighting matters.
SIZES = (180, 150, 120, 119)
GRANT_SECONDS = 7 * 24 * 3600
#: Sites started as SiteNode objects; site_2 runs through `healthlab site-node`.
NODE_SITES = [name for name in SITES if name != "site_2"]


def require_flower() -> None:
    """Skip locally / fail under CI when Flower's commands are missing."""
    missing = [
        n
        for n in ("flower-superlink", "flower-supernode", "flwr")
        if not find_flower(n)
    ]
    if missing:
        message = f"{missing} not installed: run `make setup` (flwr>=1.41,<1.42)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def site_frames() -> dict[str, pd.DataFrame]:
    frame = load_breast_cancer(as_frame=True).frame[[*FEATURES, TARGET]]
    shuffled = frame.sample(frac=1.0, random_state=7).reset_index(drop=True)
    bounds = np.cumsum((0, *SIZES))
    return {
        name: shuffled.iloc[bounds[i] : bounds[i + 1]].reset_index(drop=True)
        for i, name in enumerate(SITES)
    }


def registry(anvil: AnvilNode) -> Ledger:
    """A registry of its own on the session's anvil (nothing recorded in HOME)."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil.url))
    address, _ = deploy_registry(w3, w3.eth.accounts[0])
    return Ledger.connect(anvil.url, address, deploy=False)


def grant(ledger: Ledger, content: str, owner: str, researcher: str, tag: str) -> int:
    """Register a dataset (auto-approved, free) and give ``researcher`` its grant."""
    ds = ledger.register_dataset(
        f"https://{tag}.hospital.example/data.csv",
        content,
        grant_seconds=GRANT_SECONDS,
        terms="HMB",
        auto_approve=True,
        sender=owner,
    )
    ledger.request_access(ds, "deployment test", "HMB", sender=researcher)
    assert ledger.has_access(ds, researcher), f"no grant on dataset {ds}"
    return ds


# ------------------------------------------------------------ the study config
BASE = StudySpec(target=TARGET, features=tuple(FEATURES), datasets=(4, 5, 6))


@pytest.mark.parametrize(
    "change",
    [
        {"target": "mean radius", "features": ("mean texture",)},
        {"features": tuple(reversed(FEATURES))},
        {"model": "mlp"},
        {"rounds": 4},
        {"strategy": "median", "secure": "none"},
        {"secure": "none"},
        {"epochs": 11},
        {"lr": 0.25},
        {"seed": 1},
        {"test_fraction": 0.3},
        {"standardize": False},
        {"min_sites": 3},
        {"dp_noise_multiplier": 1.0, "dp_clipping_norm": 1.0, "secure": "none"},
        {"datasets": (4, 5)},
    ],
)
def test_study_hash_covers_every_setting_the_sites_compute_with(
    change: dict[str, Any],
) -> None:
    assert replace(BASE, **change).hash != BASE.hash


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"strategy": "median"}, "needs each site's update"),
        ({"strategy": "trimmed"}, "needs each site's update"),
        ({"dp_noise_multiplier": 1.0, "dp_clipping_norm": 1.0}, "server-side DP"),
        ({"secure": "ckks"}, "secure must be"),
    ],
)
def test_a_masked_study_refuses_what_needs_each_sites_update(
    change: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        replace(BASE, **change)


@pytest.mark.parametrize(
    "change",
    [
        {"node_timeout": 5.0, "round_timeout": 7.0, "expected_sites": 9},
        {"result_path": "/elsewhere/result.json"},
        {"epochs": 10, "lr": 0.5},  # the logistic model's defaults, spelled out
    ],
)
def test_study_hash_ignores_operation_and_resolved_defaults(
    change: dict[str, Any],
) -> None:
    assert replace(BASE, **change).hash == BASE.hash


def test_written_app_gives_flower_the_study_back(tmp_path: Path) -> None:
    from flwr.common.config import (
        get_fused_config_from_dir,
        parse_config_args,
        validate_config,
    )

    study = replace(BASE, rounds=7, lr=0.05, dropna=True, result_path="/r.json")
    app = write_app(tmp_path / "app")
    overrides = write_run_config(tmp_path / "run-config.toml", study)
    config = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert valid, errors  # what `flwr run` checks before building the FAB
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "healthlab.federated.deployed_server:app",
        "clientapp": "healthlab.federated.deployed_client:app",
    }
    # `flwr run --run-config FILE` parses the file this way, then fuses it
    run_config = get_fused_config_from_dir(app, parse_config_args([str(overrides)]))
    assert StudySpec.from_run_config(run_config) == study
    # every study ships the same bundle: the one the sites pin
    other = write_app(tmp_path / "other")
    assert (other / "pyproject.toml").read_bytes() == (
        app / "pyproject.toml"
    ).read_bytes()


def test_node_config_survives_flowers_parser(tmp_path: Path) -> None:
    site = SiteConfig(
        name="site_x",
        dataset_id=12,
        rpc_url="http://127.0.0.1:8545",
        registry="0x" + "ab" * 20,
        data=str(tmp_path / "a folder" / "data.csv"),
        state_dir=str(tmp_path / "state"),
        verify_content=True,
    )
    assert SiteConfig.from_node_config(_node_config(site)) == site


# ---------------------------------------------------------------- deployment
@dataclass
class Deployment:
    """What the module's one deployed study produced (processes already stopped)."""

    frames: dict[str, pd.DataFrame]
    datasets: dict[str, int]
    content_hashes: dict[str, str]
    ledger: Ledger
    researcher: str
    raw: dict[str, Any]
    result: FederatedResult
    cli_output: str
    too_few_sites: str
    ports: dict[str, int]
    node_ids: dict[str, int]
    seconds: dict[str, float]
    stopped: dict[str, dict[str, Any]] = field(default_factory=dict)


class _CliNode:
    """``healthlab site-node`` in a subprocess; its output read by a thread."""

    def __init__(self, args: list[str]) -> None:
        healthlab = Path(sys.executable).parent / "healthlab"
        self.process = subprocess.Popen(
            [str(healthlab), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def wait_connected(self, timeout: float) -> tuple[int, int]:
        """(node id, SuperNode pid) once the command says it is connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "".join(self.lines)
            match = re.search(r"SuperNode (\d+) connected to \S+ \(pid (\d+)\)", text)
            if match:
                return int(match[1]), int(match[2])
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"`healthlab site-node` did not connect within {timeout} s:\n"
            + "".join(self.lines)[-3000:]
        )

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID (the command stops its SuperNode); its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return int(self.process.returncode)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def deployment(
    anvil: AnvilNode, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    """Chain, data, a SuperLink, three SuperNodes, one signed 2-round study, stop."""
    require_flower()
    started = time.monotonic()
    work = tmp_path_factory.mktemp("deploy")
    ledger = registry(anvil)
    owner, researcher = ledger.accounts[6], ledger.accounts[7]
    frames = site_frames()
    paths = {}
    for name, frame in frames.items():
        paths[name] = work / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    # site_2 keeps its rows in a SQL database instead
    db_url = f"sqlite:///{work / 'site_2.db'}"
    store = SQLStore(db_url)
    try:
        store.write_table("cohort", pd.read_csv(paths["site_2"]))
        sql_frame = store.read_table("cohort")
    finally:
        store.close()
    hashes = {name: sha256_of(paths[name]) for name in NODE_SITES}
    hashes["site_2"] = Site("site_2", sql_frame).content_hash
    datasets = {
        name: grant(ledger, hashes[name], owner, researcher, name) for name in SITES
    }
    configs = {
        name: SiteConfig(
            name=name,
            dataset_id=datasets[name],
            rpc_url=anvil.url,
            registry=ledger.address,
            data=str(paths[name]),
            state_dir=str(work / f"state_{name}"),
            verify_content=True,
        )
        for name in NODE_SITES
    }
    # each owner binds its site's mask and node keys to the dataset on chain
    for name in NODE_SITES:
        bind_site_keys(ledger, configs[name], sender=owner)
    cli_site = replace(
        configs["site_0"],
        name="site_2",
        dataset_id=datasets["site_2"],
        data=None,
        table="cohort",
        sql_url=db_url,
        state_dir=str(work / "state_site_2"),
    )
    bind_site_keys(ledger, cli_site, sender=owner)
    link = SuperLink()  # TLS with a fresh study CA, node authentication on
    nodes: list[SiteNode] = []
    cli_node: _CliNode | None = None
    cli_supernode_pid: int | None = None
    seconds: dict[str, float] = {"chain and data": time.monotonic() - started}
    stopped: dict[str, dict[str, Any]] = {}
    try:
        link.start(timeout=60)
        ca = link.root_certificates
        # the researcher admits exactly the nodes bound to the study's datasets
        link.register_datasets(ledger, [datasets[n] for n in SITES])
        for name in NODE_SITES:
            nodes.append(SiteNode(link.address, configs[name], root_certificates=ca))
        for node in nodes:  # launched together, then waited for
            node.launch()
        cli_node = _CliNode(
            [
                "site-node",
                "--superlink",
                link.address,
                "--site",
                "site_2",
                "--sql-url",
                db_url,
                "--table",
                "cohort",
                "--dataset-id",
                str(datasets["site_2"]),
                "--rpc-url",
                anvil.url,
                "--registry",
                ledger.address,
                "--state-dir",
                str(work / "state_site_2"),
                "--root-certificates",
                str(ca),
                "--verify-content",
            ]
        )
        for node in nodes:
            node.wait_ready(60)
        cli_node_id, cli_supernode_pid = cli_node.wait_connected(90)
        seconds["processes up"] = time.monotonic() - started - sum(seconds.values())
        result_path = work / "result.json"
        study_started = time.monotonic()
        outcome = CliRunner().invoke(
            cli.app,
            [
                "study",
                "--superlink",
                link.address,
                "--rpc-url",
                anvil.url,
                "--registry",
                ledger.address,
                "--researcher",
                researcher,
                "--datasets",
                ",".join(str(datasets[n]) for n in SITES),
                "--target",
                TARGET,
                "--features",
                ",".join(FEATURES),
                "--rounds",
                str(ROUNDS),
                "--sites",
                str(len(SITES)),
                "--min-sites",
                str(len(SITES)),
                "--node-timeout",
                "60",
                "--round-timeout",
                "90",
                "--result",
                str(result_path),
                "--root-certificates",
                str(ca),
            ],
        )
        seconds["study"] = time.monotonic() - study_started
        assert outcome.exit_code == 0, (
            f"healthlab study failed: {outcome.output[-4000:]}\n"
            f"{outcome.exception!r}\nSuperLink log:\n{link.log()[-3000:]}"
        )
        raw = json.loads(result_path.read_text())
        result = load_result(raw, ledger=ledger)
        # a study that needs more sites than are connected fails with a clear error
        too_few_started = time.monotonic()
        with pytest.raises(HealthLabError) as too_few:
            launch_study(
                link.address,
                StudySpec(
                    target=TARGET,
                    features=tuple(FEATURES),
                    rounds=1,
                    min_sites=len(SITES) + 1,
                    expected_sites=len(SITES) + 1,
                    node_timeout=3.0,
                ),
                workdir=work / "too-few",
                root_certificates=ca,
                timeout=120,
            )
        seconds["too few sites"] = time.monotonic() - too_few_started
        ports = {"superlink": link.port, **{n.site.name: n.port for n in nodes}}
        node_ids = {n.site.name: int(n.node_id or 0) for n in nodes}
        node_ids["site_2"] = cli_node_id
    finally:
        stop_started = time.monotonic()
        for node in nodes:  # SuperNodes first
            pids = node.group()
            node.stop()
            code = node.process.returncode if node.process else None
            stopped[node.site.name] = {
                "pids": pids,
                "code": code,
                "alive": [p for p in pids if _alive(p)],
                "at": time.monotonic(),
            }
        if cli_node is not None:
            code = cli_node.stop()
            pids = [cli_node.process.pid]
            if cli_supernode_pid is not None:
                pids.append(cli_supernode_pid)
            deadline = time.monotonic() + 15
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            stopped["site_2"] = {
                "pids": pids,
                "code": code,
                "alive": [p for p in pids if _alive(p)],
                "at": time.monotonic(),
            }
        link_pids = link.group()
        link.stop()
        stopped["superlink"] = {
            "pids": link_pids,
            "code": link.process.returncode if link.process else None,
            "alive": [p for p in link_pids if _alive(p)],
            "at": time.monotonic(),
        }
        seconds["stop"] = time.monotonic() - stop_started
        for node in nodes:
            node.close()
        link.close()
    seconds["total"] = time.monotonic() - started
    print(f"\ndeployment timings (s): { {k: round(v, 1) for k, v in seconds.items()} }")
    return Deployment(
        frames,
        datasets,
        hashes,
        ledger,
        researcher,
        raw,
        result,
        outcome.output,
        str(too_few.value),
        ports,
        node_ids,
        seconds,
        stopped,
    )


def test_two_rounds_complete_with_every_site(deployment: Deployment) -> None:
    history = deployment.result.history
    assert deployment.raw["status"] == "finished", deployment.raw.get("error")
    assert history["round"].tolist() == [1, 2]
    for _, row in history.iterrows():
        assert sorted(row["sites"]) == SITES, f"round {row['round']}: {row['sites']}"
        assert row["n_sites"] == len(SITES)
        assert row["refused"] == {}, f"round {row['round']} refusals: {row['refused']}"
        assert row["rejected"] == {}, (
            f"round {row['round']} rejected: {row['rejected']}"
        )
        assert row["per_site"] == {}, "a site's own metrics reached the server"
    weights = np.concatenate([p.ravel() for p in deployment.result.params])
    assert weights.shape == (len(FEATURES) + 1,)
    assert np.isfinite(weights).all()
    assert np.abs(weights).max() > 0.1, "the model did not move from its zero start"
    assert history["loss"].iloc[1] < history["loss"].iloc[0]
    assert "2 round(s) in" in deployment.cli_output, deployment.cli_output[-2000:]


def test_a_study_needing_more_sites_than_connected_fails_clearly(
    deployment: Deployment,
) -> None:
    message = deployment.too_few_sites
    assert "the study failed on the SuperLink" in message, message
    assert f"only {len(SITES)} site node(s) connected" in message, message
    assert f"the study needs {len(SITES) + 1}" in message, message
    assert deployment.seconds["too few sites"] < 60, deployment.seconds


def test_sites_run_on_their_own_ports_and_nodes(deployment: Deployment) -> None:
    ports = list(deployment.ports.values())
    assert len(set(ports)) == len(ports) == len(SITES), deployment.ports
    assert len(set(deployment.node_ids.values())) == len(SITES), deployment.node_ids
    assert all(v > 0 for v in deployment.node_ids.values()), deployment.node_ids


def test_deployed_model_equals_the_in_process_simulation(
    deployment: Deployment,
) -> None:
    simulated = train(
        deployment.frames,
        TARGET,
        FEATURES,
        rounds=ROUNDS,
        min_sites=len(SITES),
        progress=lambda report: None,
    )
    for deployed, local in zip(deployment.result.params, simulated.params, strict=True):
        np.testing.assert_allclose(deployed, local, rtol=1e-9, atol=1e-12)
    columns = ["loss", "accuracy"]
    np.testing.assert_allclose(
        deployment.result.history[columns].to_numpy(),
        simulated.history[columns].to_numpy(),
        rtol=1e-9,
    )
    assert deployment.result.history["accuracy"].iloc[-1] >= 0.85
    # nothing per site reached the server: the history has pooled values only
    assert all(row == {} for row in deployment.result.history["per_site"])
    # the AUC is pooled from 10 coarse score bins: equal to that AUC on the pooled
    # held-out rows, and near the exact one
    from sklearn.metrics import roc_auc_score

    from healthlab.federated.masked_site import (
        HIST_LEVELS,
        eval_totals,
        score_histogram,
    )
    from healthlab.federated.masked_study import pooled_metrics
    from healthlab.federated.study import split_test

    result = deployment.result
    rows = {
        name: frame[split_test(len(frame), 0.2, 0, name)]
        for name, frame in deployment.frames.items()
    }
    held_out = pd.concat(rows.values())

    def xy(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        x = result.preprocessing.apply(frame[FEATURES].to_numpy(dtype=np.float64))
        return x, frame[TARGET].to_numpy(dtype=np.float64)

    # the finest level at which no site has a non-empty cell below its 3 rows
    def small(counts: np.ndarray) -> bool:
        return bool(np.any((counts > 0) & (counts < 3)))

    level = next(
        (
            bins
            for bins in HIST_LEVELS
            if not any(
                small(score_histogram(result.model, result.params, *xy(f), bins))
                for f in rows.values()
            )
        ),
        None,
    )
    last = result.history.iloc[-1]
    if level is None:  # some site would show a cell below 3 rows at every level
        assert "auc" not in result.history or np.isnan(last["auc"]), last
        return
    x, y = xy(held_out)
    binned = pooled_metrics(
        result.model,
        list(eval_totals(result.model, result.params, x, y, 3)),
        list(score_histogram(result.model, result.params, x, y, level)),
    )
    assert last["auc"] == pytest.approx(binned["auc"], rel=1e-12)
    # binning only splits the pairs tied in a bin in half: bounded by their share
    exact = roc_auc_score(y, result.predict_proba(held_out))
    counts = score_histogram(result.model, result.params, x, y, level)
    neg, pos = counts[:level], counts[level:]
    tied = float((neg * pos).sum() / (neg.sum() * pos.sum()))
    assert abs(last["auc"] - exact) <= 0.5 * tied + 1e-12, (last["auc"], exact, tied)


def test_pooled_standardization_equals_pandas_on_the_pooled_rows(
    deployment: Deployment,
) -> None:
    pooled = pd.concat(deployment.frames.values())[FEATURES]
    prep = deployment.result.preprocessing
    np.testing.assert_allclose(prep.center, pooled.mean().to_numpy(), rtol=1e-12)
    matrix = np.asarray(prep.matrix)
    np.testing.assert_allclose(
        np.diag(matrix), 1.0 / pooled.std(ddof=1).to_numpy(), rtol=1e-10
    )
    assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0


def test_receipt_names_each_sites_dataset_hash_and_grant(
    deployment: Deployment,
) -> None:
    receipt = deployment.result.receipt
    assert receipt["gated"] is True
    assert receipt["researcher"] == deployment.researcher
    by_name = {s["name"]: s for s in receipt["sites"]}
    assert sorted(by_name) == SITES
    for name in SITES:
        ds = deployment.datasets[name]
        access = deployment.ledger.access(ds, deployment.researcher)
        assert by_name[name]["dataset_id"] == ds
        assert by_name[name]["request_id"] == access.request_id
        assert by_name[name]["content_hash"] == deployment.content_hashes[name]


def test_processes_are_stopped_by_pid_supernodes_before_superlink(
    deployment: Deployment,
) -> None:
    stopped = deployment.stopped
    assert sorted(stopped) == [*SITES, "superlink"]
    for name, record in stopped.items():
        assert record["pids"], f"{name}: no process was recorded"
        assert record["alive"] == [], f"{name}: still running {record['alive']}"
        assert record["code"] is not None, f"{name} did not exit"
        if name != "superlink":
            assert record["at"] < stopped["superlink"]["at"]
    assert stopped["site_2"]["code"] == 0, "healthlab site-node did not exit cleanly"
    # a SuperNode's group held Flower's SuperExec besides the node itself
    assert len(stopped["site_0"]["pids"]) >= 2, stopped["site_0"]


# --------------------------------------------------- the site, in-process
_ids = itertools.count(1)


@dataclass
class GatedSite:
    """One site's config, its signed study and the chain behind them."""

    config: SiteConfig
    study: StudySpec
    ledger: Ledger
    owner: str
    researcher: str
    frame: pd.DataFrame


@pytest.fixture(scope="module")
def chain(anvil: AnvilNode) -> Ledger:
    return registry(anvil)


def make_site(chain: Ledger, folder: Path, name: str, frame: pd.DataFrame) -> GatedSite:
    owner, researcher = chain.accounts[8], chain.accounts[9]
    path = folder / f"{name}.csv"
    frame.to_csv(path, index=False)
    ds = grant(chain, sha256_of(path), owner, researcher, f"{name}-{folder.name}")
    # one dataset alone cannot take part in a masked sum (that needs >= 2 sites):
    # these tests show the gates on the in-clear path its operator allowed
    config = SiteConfig(
        name=name,
        dataset_id=ds,
        rpc_url=str(chain.rpc_url),
        registry=chain.address,
        data=str(path),
        state_dir=str(folder / f"state_{name}"),
        verify_content=True,
        require_secure=False,
    )
    bind_site_keys(chain, config, sender=owner)
    signed = StudySpec(
        target=TARGET,
        features=tuple(FEATURES),
        rounds=2,
        datasets=(ds,),
        standardize=False,
        secure="none",
    ).sign(chain, researcher)
    return GatedSite(config, signed, chain, owner, researcher, frame)


_seeds = itertools.count(100)


@pytest.fixture
def site(chain: Ledger, tmp_path: Path) -> GatedSite:
    """A gated site with rows of its own (every dataset's content is unique)."""
    rows = site_frames()["site_0"].sample(frac=1.0, random_state=next(_seeds))
    return make_site(chain, tmp_path, "site_a", rows.reset_index(drop=True))


def ask(
    site: SiteConfig,
    study: StudySpec,
    action: str,
    *,
    run_id: int = 1,
    state: RecordDict | None = None,
    content: RecordDict | None = None,
) -> Any:
    """Call the deployed ClientApp as a SuperNode would; the reply's content."""
    metadata = Metadata(
        run_id=run_id,
        message_id=f"message-{next(_ids)}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=action,
    )
    message = Message(
        content or RecordDict({"config": ConfigRecord({})}), metadata=metadata
    )
    context = Context(
        run_id=run_id,
        node_id=1,
        node_config=_node_config(site),
        state=state if state is not None else RecordDict(),
        run_config=study.to_run_config(),
    )
    return client_app(message, context).content


def _node_config(site: SiteConfig) -> dict[str, Any]:
    """The node config Flower parses from ``site.node_config()``."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([site.node_config()]))


def train_message(site: GatedSite, round_: int = 1) -> RecordDict:
    prep = Preprocessing.identity(len(FEATURES))
    params = [np.zeros(len(FEATURES)), np.zeros(1)]
    return RecordDict(
        {
            "arrays": ArrayRecord(params),
            "config": ConfigRecord({"round": round_}),
            "preprocessing": preprocessing_record(prep),
        }
    )


def refused(content: Any) -> str:
    status = content["status"]
    assert "refused" in status, f"expected a refusal, got {dict(status)}"
    assert "arrays" not in content and "metrics" not in content
    return str(status["refused"])


def test_site_joins_a_signed_study_while_the_grant_is_live(site: GatedSite) -> None:
    status = ask(site.config, site.study, "query.hello")["status"]
    assert "refused" not in status, status.get("refused")
    assert status["site"] == "site_a"
    assert status["rows"] == len(site.frame)
    assert status["dataset-id"] == site.config.dataset_id
    assert status["content-hash"] == sha256_of(site.config.data or "")
    assert status["member"] == f"dataset-{site.config.dataset_id}"
    assert "mask-key" not in status  # the keys come from the chain, not the server
    key = Path(site.config.state_dir or "") / "mask-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rounds": 50}, "differ from what the researcher signed"),
        ({"features": tuple(FEATURES[:3])}, "differ from what the researcher signed"),
        ({"signature": ""}, "only takes part in studies signed"),
    ],
)
def test_site_refuses_a_study_altered_after_signing_or_unsigned(
    site: GatedSite, change: dict[str, Any], reason: str
) -> None:
    altered = replace(site.study, **change)
    assert reason in refused(ask(site.config, altered, "query.hello"))
    assert reason in refused(
        ask(site.config, altered, "train", content=train_message(site))
    )


def test_site_refuses_a_signature_replayed_in_another_run(site: GatedSite) -> None:
    assert (
        "refused"
        not in ask(site.config, site.study, "query.hello", run_id=11)["status"]
    )
    # the same run may present it again (e.g. after the node restarted) ...
    assert (
        "refused"
        not in ask(site.config, site.study, "query.hello", run_id=11)["status"]
    )
    # ... another run may not
    reason = refused(ask(site.config, site.study, "query.hello", run_id=12))
    assert "already used in run 11" in reason


def test_site_refuses_a_study_that_does_not_include_its_dataset(
    site: GatedSite,
) -> None:
    other = StudySpec(
        target=TARGET,
        features=tuple(FEATURES),
        datasets=(site.config.dataset_id + 1000,),
    ).sign(site.ledger, site.researcher)
    assert "not part of the signed study" in refused(
        ask(site.config, other, "query.hello")
    )


def test_site_stops_training_from_the_round_after_its_grant_is_revoked(
    site: GatedSite,
) -> None:
    state = RecordDict()
    assert (
        "refused"
        not in ask(site.config, site.study, "query.hello", state=state)["status"]
    )
    first = ask(
        site.config, site.study, "train", state=state, content=train_message(site)
    )
    assert "refused" not in first["status"], first["status"].get("refused")
    assert first["metrics"]["num-examples"] == len(site.frame) - round(
        0.2 * len(site.frame)
    )
    assert np.isfinite(first["arrays"].to_numpy_ndarrays()[0]).all()
    site.ledger.revoke(site.config.dataset_id, site.researcher, sender=site.owner)
    second = ask(
        site.config, site.study, "train", state=state, content=train_message(site, 2)
    )
    assert "no longer live" in refused(second)
    evaluation = ask(
        site.config, site.study, "evaluate", state=state, content=train_message(site, 2)
    )
    assert "no longer live" in refused(evaluation)


def test_site_refuses_data_that_differs_from_the_registered_hash(
    site: GatedSite,
) -> None:
    path = Path(site.config.data or "")
    path.write_text(path.read_text().replace("\n1", "\n2", 1))  # one value changed
    reason = refused(ask(site.config, site.study, "query.hello"))
    assert "does not match the content hash registered" in reason


def test_masked_moments_reveal_only_the_pooled_totals(
    chain: Ledger, tmp_path: Path
) -> None:
    configs, datasets, researcher, frames = _moments_sites(chain, tmp_path, "moments")
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), datasets=tuple(datasets)
    ).sign(chain, researcher)
    masked = [
        np.asarray(ask(c, study, "query.moments")["arrays"].to_numpy_ndarrays()[0])
        for c in configs
    ]
    p = len(FEATURES)
    n_totals = 1 + p + p * (p + 1) // 2
    # the totals and the check total (each member adds 1)
    assert masked[0].shape == ((n_totals + 1) * DIGITS,)
    plain = encode_totals([*_moment_totals(frames["site_0"]), 1.0])
    assert np.mean(masked[0] == plain) < 0.01, "site_0's digits are not masked"
    decoded = decode_sum(
        np.sum(masked, axis=0).astype(np.float64), n_totals + 1, len(SITES)
    )
    expected = sum(_moment_totals(frames[name]) for name in SITES)
    np.testing.assert_allclose(decoded[:-1], expected, rtol=1e-14)
    assert decoded[0] == sum(SIZES)
    assert decoded[-1] == len(SITES)


def _moments_sites(
    chain: Ledger,
    folder: Path,
    tag: str,
    frames: dict[str, pd.DataFrame] | None = None,
) -> tuple[list[SiteConfig], list[int], str, dict[str, pd.DataFrame]]:
    """Three gated sites with rows of their own and keys bound on chain."""
    owner, researcher = chain.accounts[8], chain.accounts[9]
    frames = frames or {
        name: frame.sample(frac=1.0, random_state=next(_seeds)).reset_index(drop=True)
        for name, frame in site_frames().items()
    }
    configs, datasets = [], []
    for i, name in enumerate(SITES):
        path = folder / f"{name}.csv"
        frames[name].to_csv(path, index=False)
        tag_i = f"{tag}-{i}-{folder.name}"
        ds = grant(chain, sha256_of(path), owner, researcher, tag_i)
        datasets.append(ds)
        configs.append(
            SiteConfig(
                name=name,
                dataset_id=ds,
                rpc_url=str(chain.rpc_url),
                registry=chain.address,
                data=str(path),
                key_path=str(folder / f"{name}.pem"),
            )
        )
        bind_site_keys(chain, configs[-1], sender=owner)
    return configs, datasets, researcher, frames


def _digits(reply: Any) -> np.ndarray:
    return np.asarray(reply["arrays"].to_numpy_ndarrays()[0])


def _moment_totals(frame: pd.DataFrame) -> np.ndarray:
    x = frame[FEATURES].to_numpy(dtype=np.float64)
    upper = np.triu_indices(len(FEATURES))
    return np.concatenate([[len(x)], x.sum(axis=0), (x.T @ x)[upper]])


def test_a_server_cannot_choose_the_peers_or_their_keys(
    chain: Ledger, tmp_path: Path
) -> None:
    """The server names a peer whose key it holds (or drops the others): the site
    masks over exactly the signed datasets with their chain-bound keys anyway, so
    removing the mask the server can compute leaves noise, not the site's totals."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from healthlab.encrypted.encoding import mask_digits

    configs, datasets, researcher, frames = _moments_sites(chain, tmp_path, "peers")
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), datasets=tuple(datasets)
    ).sign(chain, researcher)
    members = ",".join(sorted(f"dataset-{d}" for d in datasets))
    # the mask keys' context: the step's label as a digest, then the (empty) chain
    label = f"{study.hash}|moments|1|{members}".encode()
    context = hashlib.sha256(label).digest() + b"|"
    plain = encode_totals([*_moment_totals(frames["site_0"]), 1.0])
    victim = Site(
        "site_0", frames["site_0"], mask_key=load_site_key(str(configs[0].key_path))
    )
    me = f"dataset-{datasets[0]}"
    evil = X25519PrivateKey.generate()
    evil_public = evil.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    attacker = Site("evil", pd.DataFrame({"a": [0]}), mask_key=evil)
    evil_mask = mask_vector(
        attacker.pairwise_seeds(
            {"evil": evil_public, me: victim.mask_public_key}, context, me="evil"
        ),
        plain.size,
    )

    def unmask(digits: np.ndarray) -> np.ndarray:
        return np.asarray(np.mod(digits + evil_mask, 1 << 16))

    # the attack works on a site that takes its peers from the server (control)
    trusting = mask_digits(
        plain,
        mask_vector(
            victim.pairwise_seeds(
                {me: victim.mask_public_key, "evil": evil_public}, context, me=me
            ),
            plain.size,
        ),
    )
    assert np.array_equal(unmask(trusting), plain)
    honest = _digits(ask(configs[0], study, "query.moments"))
    crafted = [
        {"peers": [me, "evil"], "peer-keys": [victim.mask_public_key, evil_public]},
        {
            "peers": ["site_0", "site_1"],
            "peer-keys": [victim.mask_public_key, evil_public],
        },
        {"peers": [me], "peer-keys": [victim.mask_public_key]},
    ]
    for config in crafted:
        got = _digits(
            ask(
                configs[0],
                study,
                "query.moments",
                content=RecordDict({"config": ConfigRecord(config)}),
            )
        )
        assert np.array_equal(got, honest), f"the server's {config['peers']} mattered"
        share = np.mean(unmask(got) == plain)
        assert share < 0.02, f"the server recovered {share:.0%} of site_0's digits"
    # a member list of the server's own: refused, nothing sent
    others = [f"dataset-{d}" for d in datasets[1:]]
    for proposed in ([me, "evil"], [me, *others[:1]], [me, *others, "evil"]):
        content = RecordDict({"config": ConfigRecord({"members": proposed})})
        reason = refused(ask(configs[0], study, "query.moments", content=content))
        assert "are not the signed study's datasets" in reason


def test_a_masked_sum_is_refused_without_every_peers_key_bound(
    chain: Ledger, tmp_path: Path
) -> None:
    configs, datasets, researcher, _ = _moments_sites(chain, tmp_path, "unbound")
    stranger = chain.accounts[5]
    # a dataset of the study whose owner never bound keys
    unbound = grant(
        chain, "0x" + "77" * 32, stranger, researcher, f"unbound-{tmp_path.name}"
    )
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), datasets=(*datasets, unbound)
    ).sign(chain, researcher)
    for action in ("query.hello", "query.moments"):
        reason = refused(ask(configs[0], study, action))
        assert f"dataset {unbound} of the study has no site keys bound" in reason


def test_a_site_refuses_when_its_key_is_not_the_bound_one_or_is_reused(
    chain: Ledger, tmp_path: Path
) -> None:
    from healthlab.federated.deploy import make_node_key, node_public_point

    configs, datasets, researcher, _ = _moments_sites(chain, tmp_path, "rebound")
    owner = chain.accounts[8]
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), datasets=tuple(datasets)
    ).sign(chain, researcher)
    # the owner rotated site_1's keys; its node still holds the old one
    bind_site_keys(
        chain, replace(configs[1], key_path=str(tmp_path / "new.pem")), sender=owner
    )
    reason = refused(ask(configs[1], study, "query.moments"))
    assert "its mask key is not the one bound" in reason
    # a researcher's own dataset, bound to site_0's public mask key, in the study
    mine = chain.accounts[5]
    copycat = grant(chain, "0x" + "78" * 32, mine, researcher, f"copy-{tmp_path.name}")
    victim = chain.site_keys(datasets[0])
    assert victim is not None
    node = node_public_point(make_node_key(tmp_path / "copy-node"))
    chain.bind_site_keys(copycat, victim.mask_key, node, sender=mine)
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), datasets=(datasets[0], copycat)
    ).sign(chain, researcher)
    reason = refused(ask(configs[0], study, "query.moments"))
    assert "bound to the same mask key" in reason


def test_site_keys_command_binds_the_nodes_keys_as_the_owner(
    chain: Ledger, tmp_path: Path
) -> None:
    from healthlab.federated.deploy import node_public_point

    owner, researcher = chain.accounts[8], chain.accounts[9]
    ds = grant(chain, "0x" + "79" * 32, owner, researcher, f"cli-{tmp_path.name}")
    state = tmp_path / "state"
    args = [
        "site-keys",
        "--dataset-id",
        str(ds),
        "--state-dir",
        str(state),
        "--rpc-url",
        str(chain.rpc_url),
        "--registry",
        chain.address,
    ]
    shown = CliRunner().invoke(cli.app, args)
    assert shown.exit_code == 0, shown.output
    assert "no keys bound on chain" in shown.output
    stranger = CliRunner().invoke(cli.app, [*args, "--bind", "--owner", researcher])
    assert stranger.exit_code != 0 and chain.site_keys(ds) is None
    bound = CliRunner().invoke(cli.app, [*args, "--bind", "--owner", owner])
    assert bound.exit_code == 0, bound.output
    keys = chain.site_keys(ds)
    assert keys is not None
    assert keys.node_key == node_public_point(state / "node-key")
    site = Site(
        "s", pd.DataFrame({"a": [1]}), mask_key=load_site_key(state / "mask-key.pem")
    )
    assert keys.mask_key == site.mask_public_key


# ------------------------------------------- masked rounds, in-process
class _Server:
    """The server side of the masked protocol, driven by hand (it relays only)."""

    def __init__(self, configs: list[SiteConfig], study: StudySpec) -> None:
        self.configs, self.study = configs, study
        self.states = [RecordDict() for _ in configs]

    def step(
        self, action: str, rnd: int | None, relayed: ConfigRecord | None, **extra: Any
    ) -> list[Any]:
        replies = []
        for config, state in zip(self.configs, self.states, strict=True):
            records: dict[str, Any] = {
                "config": ConfigRecord({} if rnd is None else {"round": rnd})
            }
            if relayed is not None:
                records[RELAYED] = ConfigRecord(dict(relayed))
            records.update(extra)
            replies.append(
                ask(
                    config, self.study, action, state=state, content=RecordDict(records)
                )
            )
        return replies


def _contributions(replies: list[Any]) -> list[Contribution]:
    out = []
    for reply in replies:
        status = reply["status"]
        assert "refused" not in status, status.get("refused")
        out.append(
            Contribution(str(status["member"]), _digits(reply), bytes(status["tags"]))
        )
    return out


def test_masked_rounds_equal_fedavg_and_show_the_server_nothing_per_site(
    chain: Ledger, tmp_path: Path
) -> None:
    configs, datasets, researcher, frames = _moments_sites(chain, tmp_path, "masked")
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), rounds=2, datasets=tuple(datasets)
    ).sign(chain, researcher)
    server = _Server(configs, study)
    moments = _contributions(server.step("query.moments", None, None))
    relayed = to_record("moments", moments)
    p = len(FEATURES)
    size = p + 1  # logistic: weights and intercept
    models = []
    for rnd in (1, 2):
        replies = server.step("train", rnd, relayed)
        sent = _contributions(replies)
        # each site's upload looks uniform; only the sum is the weighted update
        for contribution, config in zip(sent, configs, strict=True):
            values = np.asarray(contribution.digits)
            assert np.mean(values < (1 << 12)) < 0.2, f"{config.name} is not masked"
        sums = server_sum(sent, size + 1)
        models.append(np.asarray(sums[:-1]) / sums[-1])
        relayed = to_record(f"train-{rnd}", sent)
        evaluated = _contributions(server.step("evaluate", rnd, relayed))
        assert all(np.mean(c.digits < (1 << 12)) < 0.2 for c in evaluated)
    simulated = train(
        frames,
        TARGET,
        FEATURES,
        rounds=2,
        min_sites=len(SITES),
        progress=lambda r: None,
    )
    flat = np.concatenate([np.ravel(a) for a in simulated.params])
    np.testing.assert_allclose(models[-1], flat, rtol=1e-9, atol=1e-12)


def _first_round(
    chain: Ledger,
    tmp_path: Path,
    tag: str,
    frames: dict[str, pd.DataFrame] | None = None,
) -> tuple[_Server, list[Contribution], list[SiteConfig]]:
    configs, datasets, researcher, _ = _moments_sites(chain, tmp_path, tag, frames)
    study = StudySpec(
        target=TARGET, features=tuple(FEATURES), rounds=2, datasets=tuple(datasets)
    ).sign(chain, researcher)
    server = _Server(configs, study)
    moments = _contributions(server.step("query.moments", None, None))
    sent = _contributions(server.step("train", 1, to_record("moments", moments)))
    return server, sent, configs


def test_a_site_refuses_relayed_contributions_the_server_altered(
    chain: Ledger, tmp_path: Path
) -> None:
    server, sent, _ = _first_round(chain, tmp_path, "altered")
    flipped = sent[1].digits.copy()
    flipped[0] ^= 1
    forged = [
        (
            [sent[0], Contribution(sent[1].member, flipped, sent[1].tags), *sent[2:]],
            "does not carry its tag",
        ),
        (sent[:-1], "not exactly the study's members"),
        ([*sent[:-1], sent[1]], "not exactly the study's members"),
        (
            [*sent[:-1], Contribution("dataset-999999", sent[-1].digits, b"")],
            "not exactly the study's members",
        ),
    ]
    for contributions, reason in forged:
        replies = server.step("evaluate", 1, to_record("train-1", contributions))
        assert reason in refused(replies[0]), reason
    # its own upload swapped for another's: the site notices
    swapped = [Contribution(sent[0].member, sent[1].digits, sent[0].tags), *sent[1:]]
    replies = server.step("evaluate", 1, to_record("train-1", swapped))
    assert "copy of this site's contribution differs" in refused(replies[0])
    # a step of another round, replayed
    replies = server.step("evaluate", 1, to_record("train-2", sent))
    assert "expects 'train-1'" in refused(replies[0])
    # no contributions at all: the site will not evaluate a model it did not derive
    assert "carries no relayed contributions" in refused(
        server.step("evaluate", 1, None)[0]
    )


def test_a_site_ignores_the_model_and_transform_the_server_sends(
    chain: Ledger, tmp_path: Path
) -> None:
    """A crafted model and a crafted transform change nothing: the site trains and
    evaluates only what the sites' own sums give."""
    server, sent, _ = _first_round(chain, tmp_path, "crafted")
    relayed = to_record("train-1", sent)
    fork = copy.deepcopy(server.states)
    honest = [_digits(r) for r in server.step("evaluate", 1, relayed)]
    server.states = fork  # a site contributes to a step once: ask a copy again
    crafted_model = ArrayRecord([np.full(len(FEATURES), 1e3), np.full(1, -50.0)])
    crafted_prep = preprocessing_record(
        Preprocessing(tuple([0.0] * len(FEATURES)), tuple(np.eye(len(FEATURES)) * 1e6))
    )
    again = server.step(
        "evaluate",
        1,
        relayed,
        arrays=crafted_model,
        **{"preprocessing": crafted_prep},
    )
    for before, after in zip(honest, again, strict=True):
        assert np.array_equal(before, _digits(after))


def test_one_steps_message_gives_what_the_separate_steps_give(
    chain: Ledger, tmp_path: Path
) -> None:
    """The pipelined round (``query.steps``: the held-out sums of round 1 and the
    update of round 2 from the relayed updates of round 1) sends exactly what the
    separate ``evaluate`` and ``train`` messages send, and a step is given once."""
    from healthlab.federated.masked_site import MEMBERS

    server, sent, _ = _first_round(chain, tmp_path, "steps")
    relayed = to_record("train-1", sent)
    fork = copy.deepcopy(server.states)
    evaluated = [_digits(r) for r in server.step("evaluate", 1, relayed)]
    trained = [_digits(r) for r in server.step("train", 2, relayed)]
    server.states = fork
    members = sorted(c.member for c in sent)
    config = ConfigRecord(
        {MEMBERS: members, "eval-round": 1, "train-round": 2, "hist-round": 0}
    )
    replies = server.step("query.steps", None, relayed, config=config)
    for reply, want_eval, want_train in zip(replies, evaluated, trained, strict=True):
        status = reply["status"]
        assert "refused" not in status, status.get("refused")
        assert list(status["steps"]) == ["eval-1", "train-2"]
        got_eval, got_train = reply["arrays"].to_numpy_ndarrays()
        assert np.array_equal(got_eval, want_eval)
        assert np.array_equal(got_train, want_train)
    # the same steps again (a server wanting a second sum of them): refused
    again = server.step("query.steps", None, relayed, config=config)
    assert "already contributed" in refused(again[0])
    # a histogram without the relayed evaluation it needs: refused
    config = ConfigRecord({MEMBERS: members, "hist-round": 1})
    assert "no relayed contributions" in refused(
        server.step("query.steps", None, relayed, config=config)[0]
    )


def test_a_site_flags_every_histogram_level_with_a_cell_below_its_minimum() -> None:
    from healthlab.federated.masked_site import (
        HIST_LEVELS,
        eval_totals,
        histogram_level,
    )
    from healthlab.federated.task import get_model

    model = get_model("logistic")
    params = [np.array([4.0]), np.array([0.0])]
    x = np.linspace(-2, 2, 40).reshape(-1, 1)
    y = (x[:, 0] > 0).astype(float)
    fine = eval_totals(model, params, x, y, min_cell=1)
    assert list(fine[3:]) == [0.0] * len(HIST_LEVELS)
    assert histogram_level(list(fine)) == HIST_LEVELS[0]
    # one patient alone at the far end of the score range: every level that would
    # show its cell is flagged
    x_lone = np.vstack([x, [[9.0]]])
    y_lone = np.append(y, 0.0)
    lone = eval_totals(model, params, x_lone, y_lone, min_cell=3)
    assert lone[3] == 1, "the finest histogram was not flagged"
    assert lone[0] == 41  # n and the other sums are still sent
    pooled = list(fine + lone)
    assert histogram_level(pooled) != HIST_LEVELS[0]


def _separable(seed: int) -> dict[str, pd.DataFrame]:
    """Sites whose classes a linear model separates: no misclassified patient, so
    coarse histograms have no small cells."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, size in zip(SITES, (120, 100, 80, 80), strict=True):
        y = np.arange(size) % 2
        x = rng.normal(size=(size, len(FEATURES))) * 0.3
        x[:, 0] += np.where(y == 1, 4.0, -4.0)
        frame = pd.DataFrame(x, columns=FEATURES)
        frame[TARGET] = y
        out[name] = frame
    return out


@pytest.mark.parametrize("separable", [True, False], ids=["histogram", "objection"])
def test_histograms_come_only_at_a_level_no_site_objects_to(
    chain: Ledger, tmp_path: Path, separable: bool
) -> None:
    from healthlab.federated.masked_site import eval_size, histogram_level

    frames = _separable(next(_seeds)) if separable else None
    server, sent, _ = _first_round(chain, tmp_path, "histogram", frames)
    relayed = to_record("train-1", sent)
    evaluated = _contributions(server.step("evaluate", 1, relayed))
    sums = server_sum(evaluated, eval_size("binary"))
    level = histogram_level(sums)
    replies = server.step("query.histogram", 1, to_record("eval-1", evaluated))
    if separable:
        assert level is not None, "a separable study gives a histogram"
        counts = server_sum(_contributions(replies), 2 * level)
        assert all(c == 0 or c >= 3 for c in counts), counts
        assert sum(counts) == sums[0]
    elif level is None:
        assert all("below some site's minimum" in refused(r) for r in replies)
    # a server claiming nobody objected, with an altered evaluation: refused
    forged = evaluated[1].digits.copy()
    forged[3 * 13] ^= 1
    altered = [
        evaluated[0],
        Contribution(evaluated[1].member, forged, evaluated[1].tags),
        *evaluated[2:],
    ]
    replies = server.step("query.histogram", 1, to_record("eval-1", altered))
    assert "does not carry its tag" in refused(replies[0])


def test_a_site_that_requires_secure_aggregation_refuses_an_in_clear_study(
    chain: Ledger, tmp_path: Path
) -> None:
    configs, datasets, researcher, _ = _moments_sites(chain, tmp_path, "clear")
    study = StudySpec(
        target=TARGET,
        features=tuple(FEATURES),
        datasets=tuple(datasets),
        secure="none",
    ).sign(chain, researcher)
    for action in ("query.hello", "train", "evaluate"):
        reason = refused(ask(configs[0], study, action, content=train_message_for()))
        assert "takes part only in studies with secure" in reason, action


def train_message_for() -> RecordDict:
    params = [np.zeros(len(FEATURES)), np.zeros(1)]
    return RecordDict(
        {"arrays": ArrayRecord(params), "config": ConfigRecord({"round": 1})}
    )
