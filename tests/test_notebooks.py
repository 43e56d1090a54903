"""The notebooks (issue 6): every notebook executed headless with fast parameters
through ``healthlab report`` (papermill, then HTML), and what it produced checked
against the library and pandas; executed notebooks scanned for keys and tokens;
committed notebooks stripped, parameterized and shaped like a Pythia cookbook.

The seven notebooks run concurrently, once per session, in their own kernels, on
the embedded chain (``HEALTHLAB_RPC_URL`` and ``HEALTHLAB_REGISTRY`` removed), so
``01`` and ``02`` play every party; with anvil installed, ``01`` and ``02`` also run
with their defaults on a shared node, where they must not act (~65 s for the file
on 2 busy cores; each notebook alone takes 5-25 s). Tables are read back exactly
from the machine-readable copy ``show()`` displays next to the HTML, so a table's
``result_hash`` can be checked against its receipt in this process. The helpers the
researcher's and owner's pages use to share a chain (``connect_chain``,
``node_account``, ``ensure_catalogue``) are tested here too, on the embedded chain
and on an anvil node.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from eth_account import Account
from typer.testing import CliRunner
from web3 import EthereumTesterProvider

from healthlab import Site, cli, encrypted
from healthlab.data import city_days, load_city_tables, load_cohort_sites
from healthlab.errors import ChainUnreachable, InvalidInput
from healthlab.ledger import Ledger
from healthlab.ledger.node import AnvilNode, find_tool
from healthlab.notebooks import (
    CITIZEN_TERMS,
    HOSPITAL_TERMS,
    NOTEBOOKS_DIR,
    SAMPLE_DIRECTORY,
    SAMPLE_HOSPITALS,
    TABLE_MIMETYPE,
    chain_table,
    compare,
    connect_chain,
    ensure_catalogue,
    ensure_directory,
    export_html,
    node_account,
    notebook_path,
    open_study,
    parse_parameters,
    plot_metric,
    revoke_after,
    run_notebook,
    sample_datasets,
    show,
    table_one,
    tables,
)
from healthlab.receipts import Receipt, result_hash, verify
from healthlab.score import DEFAULT_WEIGHTS, health_score, score_breakdown
from healthlab.services import free_port

SITES = ["site_a", "site_b", "site_c", "site_d"]
#: Fast parameters per notebook; every parameter a test relies on is named here.
FAST: dict[str, dict[str, Any]] = {
    "00_tour": {"rounds": 2, "columns": ["age", "sbp"]},
    "01_request_access": {
        "researcher_account": 2,
        "owner_account": 1,
        "citizen_account": 3,
        "citizens": 2,
        "use": "HMB",
        "codes": ["HMB", "NCU"],
        "purpose": "Cardiovascular risk (notebook test)",
    },
    "02_approve_requests": {
        "owner_account": 1,
        "citizen_account": 3,
        "citizens": 1,
        "researcher_account": 2,
        "other_researcher_account": 4,
    },
    "03_encrypted_statistics": {
        "columns": ["age", "bmi", "sbp"],
        "by": "sex",
        "histogram_column": "age",
        "edges": [30, 40, 50, 60, 70, 90],
        "narrow_edges": [30, 40, 50, 60, 70, 80, 90],
        "row": "sex",
        "col": "cvd_event_10y",
        "corr_columns": ["age", "bmi", "sbp"],
        "response": "sbp",
        "covariates": ["age"],
    },
    "04_federated_training": {
        "rounds": 3,
        "features": ["age", "sbp", "smoker", "diabetes"],
        "target": "cvd_event_10y",
        "revoke_site": "site_d",
        "revoke_after_round": 1,
        "n_sites": 3,
        "alpha": 0.5,
    },
    "05_health_score": {
        "user": "U0002",
        "n_days": 4,
        "first_day": "2025-05-01",
        "last_day": "2025-05-14",
        "score_edges": [0, 60, 70, 80, 90, 100],
        "oracle_cities": ["coastal", "northern"],
        "oracle_fee_eth": 0.002,
        "office_account": 5,
        "worker_account": 6,
        "citizen_account": 7,
    },
    "06_study_report": {
        "rounds": 2,
        "sites": SITES,
        "columns": ["age", "bmi", "sbp"],
        "by": "sex",
        "categorical": ["smoker"],
        "histogram_column": "age",
        "histogram_edges": [30, 40, 50, 60, 70, 90],
        "response": "sbp",
        "covariates": ["age"],
        "features": ["age", "sbp", "smoker"],
    },
}
#: The pages people act on: they print no receipt (they compute no result).
PAGES = {"01_request_access", "02_approve_requests"}
COMMITTED = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
#: A key planted in the environment of every run: it must never reach an output.
CANARY_KEY = "c0ffee" * 10 + "beef"
#: eth-tester's dev keys (1 … 10) and anvil's first two well-known dev keys.
KNOWN_KEYS = {f"{i:064x}" for i in range(1, 11)} | {
    "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    CANARY_KEY,
}
#: The only receipt fields that may hold a 64-hex-digit value: public hashes.
PUBLIC_HASH_FIELDS = {
    "content_hash",
    "request_tx",
    "grant_tx",
    "tx",
    "result_hash",
    "receipt_hash",
    "public_key_fingerprint",
    "study_hash",
}
HEX64 = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
SECRET_MARKERS = ["PRIVATE KEY", "BEGIN ", "secret_key", "mnemonic"]


# ------------------------------------------------------------------ the runs
@dataclass
class Run:
    """One notebook executed by ``healthlab report``."""

    nb: nbformat.NotebookNode
    path: Path
    html: Path
    stdout: str

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        return tables(self.nb)

    def printed(self) -> str:
        """Everything the notebook printed (stdout streams)."""
        return "".join(
            o["text"]
            for c in self.nb.cells
            for o in c.get("outputs", [])
            if o["output_type"] == "stream" and o["name"] == "stdout"
        )

    def receipts(self) -> dict[str, Receipt]:
        """Receipts printed by cells tagged ``receipt``, by their ``== label``."""
        found: dict[str, Receipt] = {}
        decoder = json.JSONDecoder()
        for cell in self.nb.cells:
            if "receipt" not in cell.metadata.get("tags", []):
                continue
            text = "".join(o.get("text", "") for o in cell.outputs)
            label, i = "receipt", text.find("{")
            while i != -1:
                header = text[:i].rstrip().rsplit("\n", 1)[-1]
                if header.startswith("== "):
                    label = header[3:]
                obj, end = decoder.raw_decode(text, i)
                found[label] = Receipt(obj)
                i = text.find("{", end)
        return found


def _command(stem: str, out: Path, *, defaults: bool = False) -> list[str]:
    given = {} if defaults else FAST[stem]
    params = [f"{k}={json.dumps(v)}" for k, v in given.items()]
    flags = [x for p in params for x in ("-p", p)]
    return [
        sys.executable,
        "-c",
        "from healthlab.cli import main; main()",
        "report",
        stem,
        *flags,
        "--out",
        str(out),
    ]


@dataclass
class SharedNode:
    """An anvil node as ``make lab`` leaves it before the pages open: the sample
    catalogue registered and one request waiting, made from another client."""

    url: str
    home: Path
    request: int
    events: int


@pytest.fixture(scope="session")
def shared_node(
    anvil: AnvilNode, tmp_path_factory: pytest.TempPathFactory
) -> SharedNode:
    home = tmp_path_factory.mktemp("node-home")  # a registry of its own
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEALTHLAB_HOME", str(home))
        mp.delenv("HEALTHLAB_PRIVATE_KEY", raising=False)
        ledger, _ = connect_chain(anvil.url)
        samples = ensure_catalogue(
            ledger, node_account(ledger, 1), citizen=node_account(ledger, 3)
        )
        ensure_directory(
            ledger, node_account(ledger, 5), {node_account(ledger, 1): SAMPLE_HOSPITALS}
        )
        request = ledger.request_access(
            int(samples.loc["site_a", "dataset"]),
            "CVD risk (another client)",
            "HMB|NCU",
            sender=node_account(ledger, 2),
        )
        events = len(ledger.events())
    return SharedNode(anvil.url, home, request, events)


@pytest.fixture(scope="session")
def runs(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Run]:
    """Every notebook run once, concurrently, through the ``report`` command; with
    anvil installed, the two pages also run with their defaults on a shared node
    (``HEALTHLAB_RPC_URL``, as ``make lab`` sets it), as ``<stem>@node``."""
    out = tmp_path_factory.mktemp("reports")
    chain_settings = ("HEALTHLAB_RPC_URL", "HEALTHLAB_REGISTRY")
    inherited = {k: v for k, v in os.environ.items() if k not in chain_settings}
    env = dict(
        inherited,
        HEALTHLAB_PRIVATE_KEY="0x" + CANARY_KEY,
        HEALTHLAB_HOME=str(out / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    procs = {
        stem: subprocess.Popen(
            _command(stem, out),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stem in FAST
    }
    folders = dict.fromkeys(FAST, out)
    if find_tool("anvil") is not None:  # else the @node tests skip (fail under CI)
        node: SharedNode = request.getfixturevalue("shared_node")
        node_env = dict(env, HEALTHLAB_RPC_URL=node.url, HEALTHLAB_HOME=str(node.home))
        for stem in sorted(PAGES):
            folders[f"{stem}@node"] = out / "node"
            procs[f"{stem}@node"] = subprocess.Popen(
                _command(stem, out / "node", defaults=True),
                env=node_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
    results: dict[str, Run] = {}
    failures = []
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"{key}: exit {proc.returncode}\n{stdout}\n{stderr}")
            continue
        stem = key.split("@")[0]
        path = folders[key] / f"{stem}.ipynb"
        nb = nbformat.read(path, as_version=4)
        results[key] = Run(nb, path, folders[key] / f"{stem}.html", stdout)
    if failures:
        pytest.fail("healthlab report failed:\n" + "\n".join(failures))
    return results


@cache
def frames() -> dict[str, pd.DataFrame]:
    return load_cohort_sites()


@cache
def pooled() -> pd.DataFrame:
    return pd.concat(frames().values(), ignore_index=True)


def close(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-12) -> None:
    # a shown table is a plain frame, the library's a ResultTable (a subclass):
    # the values, labels and dtypes are compared, not the class
    pd.testing.assert_frame_equal(
        a,
        b,
        check_exact=False,
        rtol=rtol,
        atol=0,
        check_names=False,
        check_frame_type=False,
    )


# --------------------------------------------------------- committed notebooks
def test_the_issue_notebooks_of_this_slice_exist() -> None:
    assert set(FAST) <= {p.stem for p in COMMITTED}, (
        f"notebooks/ holds {[p.stem for p in COMMITTED]}"
    )
    for path in COMMITTED:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), path.name


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_committed_notebook_is_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb.metadata, "widget state is committed"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, nb.metadata.keys()
    for i, cell in enumerate(nb.cells):
        assert set(cell.metadata) <= {"tags"}, f"cell {i} metadata {cell.metadata}"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has an execution count"


def test_nbstripout_verify_accepts_the_committed_notebooks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--verify", *map(str, COMMITTED)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_first_code_cell_holds_typed_commented_parameters(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.metadata.get("tags") == ["parameters"]
    declared = papermill.inspect_notebook(str(path))
    assert declared, "no parameters declared"
    for name, info in declared.items():
        assert info["inferred_type_name"] != "None", f"{name} has no type"
        assert info["help"], f"{name} has no comment"
        assert not re.search(r"key|secret|token|passw", name, re.I), name


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_notebook_follows_the_pythia_skeleton(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[0].source.startswith("# "), "a title first"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    positions = [
        text.find(h)
        for h in (
            "## Overview",
            "## Prerequisites",
            "**Time to learn**",
            "## Imports",
            "## Summary",
            "## What next",
        )
    ]
    assert -1 not in positions and positions == sorted(positions), positions


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_notebook_cells_call_the_package_instead_of_defining_logic(
    path: Path,
) -> None:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 3, f"cell {i} defines {node.name} ({length} lines)"


# ------------------------------------------------------------ every run
@pytest.mark.parametrize("stem", sorted(FAST))
def test_notebook_runs_clean_with_the_parameters_given(
    runs: dict[str, Run], stem: str
) -> None:
    run = runs[stem]
    assert run.nb.metadata["papermill"]["parameters"] == FAST[stem]
    for i, cell in enumerate(run.nb.cells):
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"cell {i}: {output}"
            assert output.get("name") != "stderr", f"cell {i}: {output['text']}"
    assert f"report: {run.html}" in run.stdout
    assert run.html.is_file() and run.html.stat().st_size > 10_000


@pytest.mark.parametrize("stem", sorted(FAST))
def test_html_report_is_static_and_shows_no_code(
    runs: dict[str, Run], stem: str
) -> None:
    html = runs[stem].html.read_text(encoding="utf-8")
    assert "from healthlab" not in html, "code cells leaked into the report"
    assert "application/vnd.jupyter.widget-state" not in html
    figures = sum(
        "image/png" in o.get("data", {})
        for c in runs[stem].nb.cells
        for o in c.get("outputs", [])
    )
    assert html.count('src="data:image/png;base64') == figures


@pytest.mark.parametrize("stem", sorted(FAST))
def test_executed_notebook_holds_no_keys_or_tokens(
    runs: dict[str, Run], stem: str
) -> None:
    assert_no_secrets(runs[stem], stem)


def assert_no_secrets(run: Run, stem: str) -> None:
    """No known key anywhere; 64-hex values only where a receipt declares them."""
    everything = (run.path.read_text() + run.html.read_text()).lower()
    leaked = KNOWN_KEYS & set(HEX64.findall(everything))
    assert not leaked, f"private keys in the executed notebook or report: {leaked}"

    receipts = run.receipts()
    if stem in PAGES:
        assert receipts == {}, "a page printed a receipt"
    else:
        assert receipts, "no receipt printed by a cell tagged 'receipt'"
    public = _registered_hashes()  # the sample catalogue's, public on chain
    for receipt in receipts.values():
        for field, value in _walk(receipt):
            tokens = set(HEX64.findall(str(value).lower()))
            if tokens:
                assert field in PUBLIC_HASH_FIELDS, f"{field}={value} in a receipt"
                public |= tokens

    for i, cell in enumerate(run.nb.cells):
        for output in cell.get("outputs", []):
            text = _output_text(output)
            for marker in SECRET_MARKERS:
                assert marker.lower() not in text.lower(), f"cell {i}: {marker}"
            unknown = set(HEX64.findall(text.lower())) - public
            assert not unknown, (
                f"cell {i} shows 64-hex values that no receipt declares public: "
                f"{sorted(unknown)}"
            )


@cache
def _sample_sites() -> tuple[Site, ...]:
    return tuple(Site(name, frame) for name, frame in frames().items())


def _registered_hashes() -> set[str]:
    """Content hashes the sample catalogue registers: cohorts and citizen records."""
    cohorts = {s.content_hash[2:] for s in _sample_sites()}
    records = load_city_tables().patients["content_hash"].str[2:]
    return cohorts | set(records)


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _output_text(output: dict[str, Any]) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    data = {k: v for k, v in output.get("data", {}).items() if k != "image/png"}
    return json.dumps(data)


# ------------------------------------------------------------------ 00 tour
def test_tour_encrypted_mean_equals_the_library_and_pandas(
    runs: dict[str, Run],
) -> None:
    columns = FAST["00_tour"]["columns"]
    shown = runs["00_tour"].tables["describe"]
    close(shown, encrypted.describe(frames(), columns))
    reference = pooled()[columns].describe().loc[["count", "mean", "std"]]
    close(shown.loc[["count", "mean", "std"]], reference)


def test_tour_trains_the_asked_rounds_at_every_site(runs: dict[str, Run]) -> None:
    history = runs["00_tour"].tables["history"]
    rounds = FAST["00_tour"]["rounds"]
    assert history.index.tolist() == list(range(1, rounds + 1))
    assert (history["n_sites"] == len(SITES)).all()
    assert (history["refused"] == "").all()
    assert runs["00_tour"].printed().count(f"/{rounds}  4 sites") == rounds


def test_tour_receipt_is_anchored_and_verifies(runs: dict[str, Run]) -> None:
    run = runs["00_tour"]
    checks = run.tables["verification"]
    assert checks["passed"].all(), checks[~checks["passed"]]
    # one anchor per grant: each site's first request on its own dataset
    assert [c for c in checks.index if c.startswith("anchor")] == [
        f"anchor {request_id(i, 1)}" for i in range(1, 5)
    ]
    (receipt,) = run.receipts().values()
    assert receipt.hash == receipt["receipt_hash"]
    assert verify(receipt, run.tables["describe"]).ok, "the shown table is not it"
    assert [s["name"] for s in receipt["sites"]] == SITES
    assert len(receipt["anchors"]) == len(SITES)
    assert receipt["gated"] is True


def request_id(dataset: int, number: int) -> int:
    """The registry's id of request ``number`` (1, 2, ...) on ``dataset``."""
    return dataset << 40 | number


#: The grants a study over the four sample sites anchors under: each site's first
#: request on its own dataset.
FIRST_REQUESTS = ", ".join(str(request_id(i, 1)) for i in range(1, 5))


# --------------------------------------------------- 01 request access
def dev_account(index: int) -> str:
    """The embedded chain's account ``index``: its key is ``index + 1``."""
    return str(Account.from_key((index + 1).to_bytes(32, "big")).address)


ETH_WEI = 10**18


@pytest.fixture(scope="module")
def page01(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["01_request_access"].tables


def test_request_page_registers_the_sample_catalogue(
    page01: dict[str, pd.DataFrame],
) -> None:
    p = FAST["01_request_access"]
    samples = page01["samples"]
    specs = sample_datasets(p["citizens"])
    assert samples.index.tolist() == [*SITES, "U0001", "U0002"]
    assert samples["dataset"].tolist() == list(range(1, len(specs) + 1))
    assert samples["registered now"].all(), "the embedded chain starts empty"
    for spec in specs:
        row = samples.loc[spec.name]
        assert (row["pointer"], row["content hash"]) == (
            spec.pointer,
            spec.content_hash,
        )
        assert row["terms"] == spec.terms and row["fee (ETH)"] == (
            f"{spec.fee_wei / ETH_WEI:g}"
        ), spec.name
    owners = samples["owner"]
    assert (owners[SITES] == dev_account(p["owner_account"])).all()
    assert (owners[["U0001", "U0002"]] == dev_account(p["citizen_account"])).all()
    catalogue = page01["catalogue"]
    # use=HMB keeps the terms that permit health research: all but DS-only site_d
    kept = samples.drop(index="site_d")["dataset"].tolist()
    assert catalogue.index.tolist() == kept
    assert (
        catalogue["pointer"].tolist()
        == samples.loc[samples["dataset"].isin(kept), "pointer"].tolist()
    )
    # the sample directory vouches for the hospitals' owner; the citizens are in none
    names = catalogue["owner name"]
    hospitals = samples.loc[["site_a", "site_b", "site_c"], "dataset"].tolist()
    citizens = samples.loc[["U0001", "U0002"], "dataset"].tolist()
    assert (names[hospitals] == SAMPLE_HOSPITALS).all(), names.to_dict()
    assert (names[citizens] == "unverified").all(), names.to_dict()


def test_request_page_shows_the_fee_then_pays_exactly_it(
    page01: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["01_request_access"]
    quote = page01["quote"]
    terms, fee, days = HOSPITAL_TERMS["site_a"]
    assert quote.index.tolist() == [1], "the catalogue's first dataset: site_a"
    row = quote.loc[1]
    assert (row["fee (wei)"], row["fee (ETH)"]) == (str(fee), "0.01")
    assert (row["terms"], row["grant (days)"]) == (terms, days)
    assert (row["your codes"], row["permitted"]) == ("|".join(p["codes"]), True)
    requests = page01["my_requests"]
    first = request_id(1, 1)
    assert requests.index.tolist() == [first]
    mine = requests.loc[first]
    assert (mine["dataset"], mine["status"]) == (1, "PENDING")
    assert mine["paid (ETH)"] == "0.01"
    assert mine["codes"] == "HMB|NCU" and mine["expires"] == ""
    # the chain's own log agrees with the panel: one request, the fee in escrow
    events = page01["events"]
    assert events["event"].tolist() == ["DatasetRegistered"] * 6 + [
        "CollaborationCreated",  # the sample owner directory, named once
        "MemberSet",
        "MemberNamed",
        "AccessRequested",  # the purpose, sealed to the owner, is in its call data
    ]
    last = events.iloc[-1]
    assert (last["dataset"], last["request"]) == (1, first)
    assert last["account"] == dev_account(p["researcher_account"])
    assert last["amount (wei)"] == str(fee)
    printed = runs["01_request_access"].printed()
    assert f"you are the researcher {dev_account(p['researcher_account'])}" in printed
    assert f"request #{first} on dataset #1: PENDING; paid 0.01 ETH into escrow" in (
        printed
    )


def test_request_page_html_shows_panel_notes_not_widget_state(
    runs: dict[str, Run],
) -> None:
    html = runs["01_request_access"].html.read_text(encoding="utf-8")
    assert "Datasets: 8 on chain" not in html, "citizens=2: six datasets"
    assert "Datasets: 6 on chain, 5 shown (an interactive panel" in html
    assert "Request form of " in html
    assert "unpkg.com" not in html and "widget-view+json" not in html


# ------------------------------------------------- 02 approve requests
@pytest.fixture(scope="module")
def page02(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["02_approve_requests"].tables


def test_owner_page_lists_requests_with_codes_purpose_fee_and_history(
    page02: dict[str, pd.DataFrame],
) -> None:
    p = FAST["02_approve_requests"]
    assert page02["pending_requests-when-opened"].empty
    mine = page02["catalogue"]
    assert mine.index.tolist() == [1, 2, 3, 4], "the owner's four hospital cohorts"
    assert (mine["owner"] == dev_account(p["owner_account"])).all()
    assert (mine["owner name"] == SAMPLE_HOSPITALS).all(), "named by the directory"
    pending = page02["pending_requests-with-two-requests"]
    assert pending.index.tolist() == [request_id(1, 1), request_id(1, 2)]
    assert pending["researcher"].tolist() == [
        dev_account(p["researcher_account"]),
        dev_account(p["other_researcher_account"]),
    ]
    assert (pending["dataset"] == 1).all() and (pending["codes"] == "HMB|NCU").all()
    assert (pending["fee (ETH)"] == "0.01").all()
    assert pending["purpose"].tolist() == [
        "Cardiovascular risk factors across hospitals",
        "Blood pressure trends",
    ]
    assert (pending[["earlier requests", "earlier grants"]] == 0).all().all()
    assert page02["earnings-with-two-requests"]["credit (wei)"].tolist() == ["0"]


@pytest.mark.parametrize(
    ("step", "pending", "grants", "credit_wei", "paid"),
    [  # approving pays the fee at once: nothing waits to be withdrawn
        ("after-approving", [request_id(1, 2)], [request_id(1, 1)], 0, "0.01"),
        ("after-declining", [], [request_id(1, 1)], 0, "0.01"),
        ("after-revoking", [], [], 0, "0.01"),
    ],
)
def test_owner_page_shows_the_inbox_after_each_decision(
    page02: dict[str, pd.DataFrame],
    step: str,
    pending: list[int],
    grants: list[int],
    credit_wei: int,
    paid: str,
) -> None:
    assert page02[f"pending_requests-{step}"].index.tolist() == pending
    assert page02[f"live_grants-{step}"].index.tolist() == grants
    earnings = page02[f"earnings-{step}"].iloc[0]
    assert earnings["credit (wei)"] == str(credit_wei)
    assert earnings["paid out (ETH)"] == paid
    assert (earnings["pending"], earnings["live grants"]) == (len(pending), len(grants))


def test_owner_page_decisions_are_on_chain_with_their_amounts(
    page02: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["02_approve_requests"]
    owner = dev_account(p["owner_account"])
    approved = dev_account(p["researcher_account"])
    declined = dev_account(p["other_researcher_account"])
    events = page02["events"]
    setup = events.iloc[: 4 + p["citizens"] + 3]  # the samples, then their directory
    assert setup["event"].tolist()[-3:] == [
        "CollaborationCreated",
        "MemberSet",
        "MemberNamed",
    ]
    story = events.iloc[len(setup) :]
    assert story["event"].tolist() == [
        "AccessRequested",
        "AccessRequested",
        "AccessGranted",
        "FeePaid",
        "AccessDeclined",
        "AccessRevoked",
    ]
    decisions = story
    assert decisions["account"].tolist() == [
        approved,
        declined,
        approved,
        owner,
        declined,
        approved,
    ]
    assert decisions["amount (wei)"].tolist()[:2] == [str(10**16)] * 2
    assert decisions["amount (wei)"].iloc[3] == str(10**16), "the owner was paid"
    printed = runs["02_approve_requests"].printed()
    first, second = request_id(1, 1), request_id(1, 2)
    assert f"approved request #{first}: {approved} may use dataset #1" in printed
    assert (
        f"declined request #{second} on dataset #1; 0.01 ETH credited back to "
        f"{declined}" in printed
    )
    assert "0.01 ETH paid to you" in printed
    assert f"revoked request #{first}: {approved} no longer has access" in printed
    assert "error" not in printed


# ------------------------------------------------------ 05 health score
@cache
def scored_days() -> pd.DataFrame:
    """Every user-day with its score and holding site, computed here with pandas."""
    city = load_city_tables()
    days = city_days(city)
    site = days["user_id"].map(city.patients.set_index("user_id")["site"])
    return days.assign(score=health_score(days), site=site)


def _period_rows() -> pd.DataFrame:
    p = FAST["05_health_score"]
    days = scored_days()
    dates = pd.to_datetime(days["date"])
    keep = (dates >= p["first_day"]) & (dates <= p["last_day"])
    return days[keep & days["score"].notna()]


@pytest.fixture(scope="module")
def score05(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["05_health_score"].tables


def test_score_formula_table_holds_the_library_weights(
    score05: dict[str, pd.DataFrame],
) -> None:
    factors = score05["factors"]
    assert factors["weight"].to_dict() == DEFAULT_WEIGHTS
    assert factors.loc["steps", "curve (input→value)"] == (
        "0→0, 5000→0.5, 7500→0.8, 10000→1"
    )


def test_score_breakdown_equals_the_library_on_the_citizens_days(
    score05: dict[str, pd.DataFrame],
) -> None:
    p = FAST["05_health_score"]
    days = scored_days()
    rows = days[days["user_id"] == p["user"]].sort_values("date").head(p["n_days"])
    expected = score_breakdown(rows).set_axis(
        pd.to_datetime(rows["date"]).dt.strftime("%Y-%m-%d").tolist()
    )
    shown = score05["breakdown"]
    close(shown, expected)
    np.testing.assert_allclose(
        shown["score"], health_score(rows).to_numpy(), rtol=1e-12
    )
    assert score05["inputs"]["steps"].tolist() == rows["steps"].tolist()


def test_score_city_aggregates_equal_pandas_and_single_site_cities_are_refused(
    score05: dict[str, pd.DataFrame],
) -> None:
    rows = _period_rows()
    aggregates = score05["city-scores"]
    assert aggregates.index.tolist() == ["coastal", "inland", "northern"]
    coastal = rows[rows["city_id"] == "coastal"]["score"]
    expected = pd.DataFrame(
        {
            "user-days": [float(len(coastal))],
            "mean": [coastal.mean()],
            "std": [coastal.std()],
            "sem": [coastal.sem()],
        },
        index=pd.Index(["coastal"], name="city"),
    )
    close(aggregates.loc[["coastal"], ["user-days", "mean", "std", "sem"]], expected)
    assert aggregates.loc["coastal", "sites"] == "site_a, site_b"
    for city, site in (("inland", "site_c"), ("northern", "site_d")):
        refused = aggregates.loc[city]
        assert refused["sites"] == site and np.isnan(refused["mean"]), city
        assert refused["refused"].startswith("TooFewSites: only 1 site(s)"), city
    assert score05["city-scores-vs-pandas"]["rel diff"].max() < 1e-12


def test_score_histogram_counts_equal_numpy_and_its_receipt_verifies(
    score05: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["05_health_score"]
    counts, _ = np.histogram(_period_rows()["score"], bins=p["score_edges"])
    shown = score05["histogram"]
    assert shown["count"].tolist() == counts.tolist()
    (receipt,) = runs["05_health_score"].receipts().values()
    assert receipt["kind"] == "histogram"
    assert [s["name"] for s in receipt["sites"]] == SITES
    assert verify(receipt, shown).ok, "the shown histogram is not the receipt's"


def test_score_oracle_answers_pandas_mean_or_refuses_on_chain(
    score05: dict[str, pd.DataFrame],
) -> None:
    p = FAST["05_health_score"]
    rows = _period_rows()
    asked = score05["oracle-asked"]
    assert asked["status"].tolist() == ["PENDING"] * len(p["oracle_cities"])
    assert (asked["fee (ETH)"] == f"{p['oracle_fee_eth']:g}").all()
    answered = score05["oracle"]
    assert answered["city"].tolist() == p["oracle_cities"]
    coastal = answered.loc[1]
    scores = rows[rows["city_id"] == "coastal"]["score"]
    assert coastal["status"] == "FULFILLED"
    assert coastal["score"] == math.floor(scores.mean() * 100 + 0.5) / 100
    assert (coastal["user-days"], coastal["sites"]) == (len(scores), 2)
    assert coastal["requester"] == dev_account(p["citizen_account"])
    northern = answered.loc[2]
    assert (northern["status"], northern["refusal"]) == ("REFUSED", "TOO_FEW_SITES")
    assert northern["score"] is None or np.isnan(northern["score"])
    actions = score05["oracle-actions"]
    assert actions["action"].tolist() == ["fulfilled", "refused"]
    assert actions.loc[1, "score x100"] == round(coastal["score"] * 100)


# ------------------------------------------------- 03 encrypted statistics
@pytest.fixture(scope="module")
def stats(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["03_encrypted_statistics"].tables


def test_statistics_describe_equals_library_and_pandas(
    stats: dict[str, pd.DataFrame],
) -> None:
    p = FAST["03_encrypted_statistics"]
    close(stats["describe"], encrypted.describe(frames(), p["columns"], dropna=True))
    reference = pooled()[p["columns"]].dropna().describe()
    rows = ["count", "mean", "std"]
    close(stats["describe"].loc[rows], reference.loc[rows], rtol=1e-13)
    assert stats["describe-vs-pandas"]["rel diff"].max() < 1e-13


def test_statistics_counts_equal_numpy_and_pandas_exactly(
    stats: dict[str, pd.DataFrame],
) -> None:
    p = FAST["03_encrypted_statistics"]
    counts, _ = np.histogram(pooled()[p["histogram_column"]], bins=p["edges"])
    assert stats["histogram"]["count"].tolist() == counts.tolist()
    table = pd.crosstab(pooled()[p["row"]].astype(str), pooled()[p["col"]].astype(str))
    assert stats["crosstab"].to_numpy().tolist() == table.to_numpy().tolist()
    assert stats["crosstab"].index.tolist() == table.index.tolist()


def test_statistics_logit_odds_ratios_equal_statsmodels(
    stats: dict[str, pd.DataFrame],
) -> None:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    formula = "cvd_event_10y ~ age + C(sex) + smoker + sbp"  # the notebook's default
    rows = pooled()[["cvd_event_10y", "age", "sex", "smoker", "sbp"]].dropna()
    reference = smf.glm(formula, rows, family=sm.families.Binomial()).fit(tol=1e-14)
    odds = stats["odds_ratios"]
    assert odds.index.tolist() == ["age", "C(sex)[T.M]", "smoker", "sbp"]
    expected = np.exp(reference.params.reindex(odds.index))
    np.testing.assert_allclose(odds["odds_ratio"], expected, rtol=1e-8)
    ci = np.exp(reference.conf_int().reindex(odds.index))
    np.testing.assert_allclose(odds["0.025"], ci[0], rtol=1e-7)
    np.testing.assert_allclose(odds["0.975"], ci[1], rtol=1e-7)


def test_statistics_kaplan_meier_and_cox_equal_statsmodels(
    stats: dict[str, pd.DataFrame],
) -> None:
    """The notebook's survival cells: Kaplan–Meier on the grid equals statsmodels'
    SurvfuncRight on the grid-rounded follow-up, the Cox hazard ratios its PHReg."""
    import statsmodels.api as sm

    from healthlab.encrypted.survival import ceil_to_grid

    grid = [0, 2, 4, 6, 8, 10]  # the notebook's default
    rows = pooled()
    t = ceil_to_grid(rows["followup_years"].to_numpy(), grid)
    e = np.where(np.isfinite(t), rows["cvd_event_10y"].to_numpy(), 0)
    t = np.where(np.isfinite(t), t, grid[-1] + 1)
    reference = sm.SurvfuncRight(t, e)
    table = stats["kaplan_meier"]
    expected = pd.Series(reference.surv_prob, index=reference.surv_times)
    np.testing.assert_allclose(
        table["survival"], expected.reindex(table["time"]), rtol=1e-12
    )
    assert table["at_risk"].iloc[0] == len(rows)
    # the Cox model on its own, coarser grid (the notebook's cox_grid)
    cox_grid = [0, 4, 8, 10]
    t = ceil_to_grid(rows["followup_years"].to_numpy(), cox_grid)
    e = np.where(np.isfinite(t), rows["cvd_event_10y"].to_numpy(), 0)
    t = np.where(np.isfinite(t), t, cox_grid[-1] + 1)
    formula = "age + C(sex) + sbp"
    model = sm.PHReg.from_formula(
        f"_t ~ {formula}", rows.assign(_t=t), status=e, ties="breslow"
    ).fit(method="newton", tol=1e-14)
    names = model.model.exog_names
    ratios = stats["hazard_ratios"]
    assert sorted(ratios.index) == sorted(names)
    expected_hr = pd.Series(np.exp(model.params), index=names).reindex(ratios.index)
    np.testing.assert_allclose(ratios["hazard_ratio"], expected_hr, rtol=1e-8)
    ci = pd.DataFrame(np.exp(model.conf_int()), index=names).reindex(ratios.index)
    np.testing.assert_allclose(ratios["0.025"], ci[0], rtol=1e-7)
    np.testing.assert_allclose(ratios["0.975"], ci[1], rtol=1e-7)


def test_statistics_corr_and_ols_equal_the_library(
    stats: dict[str, pd.DataFrame],
) -> None:
    p = FAST["03_encrypted_statistics"]
    reference = pooled()[p["corr_columns"]].dropna().corr()
    np.testing.assert_allclose(
        stats["corr"].to_numpy(), reference.to_numpy(), atol=1e-13
    )
    model = encrypted.ols(frames(), p["response"], p["covariates"], dropna=True)
    close(stats["ols"], model.to_frame())
    rows = pooled()[[*p["covariates"], p["response"]]].dropna()
    design = np.column_stack([np.ones(len(rows)), rows[p["covariates"]]])
    coef = np.linalg.lstsq(design, rows[p["response"]], rcond=None)[0]
    np.testing.assert_allclose(stats["ols"]["coef"], coef, rtol=1e-10)


def test_statistics_gated_results_equal_the_simulation(
    stats: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    differences = stats["gated-vs-simulated"]
    assert differences.index.tolist() == [
        "describe",
        "histogram",
        "crosstab",
        "corr",
        "ols",
    ]
    assert (differences.to_numpy() == 0).all(), differences
    p = FAST["03_encrypted_statistics"]
    library = encrypted.describe(frames(), p["columns"], by=p["by"], dropna=True)
    close(stats["table1"], library.loc[["count", "mean", "std"]])
    receipt = runs["03_encrypted_statistics"].receipts()["receipt"]
    assert receipt["result_hash"] == result_hash(library), (
        "the anchored Table 1 differs from the library's result on the same rows"
    )


def test_statistics_shows_and_explains_a_disclosure_refusal(
    stats: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    printed = runs["03_encrypted_statistics"].printed()
    # TooFewRows: the DisclosureRefused of the cell rule and of differencing
    assert "TooFewRows: site site_c: a subset, group, cell or bin" in printed
    assert "fewer than 3 rows" in printed
    # asking the three others instead would give site_c's counts by difference
    # from the all-site histogram: refused too (site-set differencing)
    assert "site-set differencing" in printed
    assert "histogram-partial" not in stats


def test_statistics_answers_a_declared_population_whole(
    stats: dict[str, pd.DataFrame],
) -> None:
    p = FAST["03_encrypted_statistics"]
    complete = pooled().dropna(subset=p["columns"])
    table = stats["population"]
    assert table.loc["Table 1", "rows"] == len(complete)
    assert table.loc["regression", "rows"] == len(complete)
    assert (table["rows"] == table["pandas (complete cases)"]).all()


def test_statistics_receipt_verifies_and_tampering_is_caught(
    stats: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    assert stats["verification"]["passed"].all(), stats["verification"]
    tampered = stats["verification-tampered"]["passed"]
    assert tampered[~tampered].index.tolist() == ["result hash"]
    receipt = runs["03_encrypted_statistics"].receipts()["receipt"]
    assert receipt.hash == receipt["receipt_hash"]
    assert receipt["parameters"]["by"] == FAST["03_encrypted_statistics"]["by"]
    # each site's dataset, registered for the study, got its first request
    firsts = sorted(
        request_id(s["dataset_id"], 1) for s in receipt["sites"] if s.get("request_id")
    )
    assert [a["request_id"] for a in receipt["anchors"]] == firsts
    assert len(firsts) == 4


# ------------------------------------------------- 04 federated training
@pytest.fixture(scope="module")
def fl(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["04_federated_training"].tables


def test_federated_history_has_the_asked_rounds(
    fl: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    rounds = FAST["04_federated_training"]["rounds"]
    history = fl["history"]
    assert history.index.tolist() == list(range(1, rounds + 1))
    assert (history["sites"] == ", ".join(SITES)).all()
    receipt = runs["04_federated_training"].receipts()["receipt"]
    # masked by default: the server learnt pooled metrics only
    assert receipt["parameters"]["secure"] == "masked"
    assert (history["n_sites"] == len(SITES)).all()


def test_revocation_stops_the_masked_study_with_a_named_error(
    runs: dict[str, Run],
) -> None:
    p = FAST["04_federated_training"]
    site, after = p["revoke_site"], p["revoke_after_round"]
    printed = runs["04_federated_training"].printed()
    assert f"the owner of {site} revoked the grant after round {after}" in printed
    stopped = [line for line in printed.splitlines() if "the study stopped" in line]
    assert len(stopped) == 1, printed
    assert site in stopped[0] and "no longer live" in stopped[0], stopped[0]
    assert f"round {after + 1}" in stopped[0], stopped[0]
    assert f"{site} grant live: False" in printed


def test_federated_model_comes_close_to_centralized_training(
    fl: dict[str, pd.DataFrame],
) -> None:
    table = fl["vs-centralized"]
    federated, central = table.loc["federated"], table.loc["centralized (scikit-learn)"]
    assert federated["held-out rows"] == central["held-out rows"] > 900
    assert abs(federated["auc"] - central["auc"]) < 0.01, table
    assert abs(federated["accuracy"] - central["accuracy"]) < 0.02, table


def test_iid_and_dirichlet_splits_differ_in_label_skew(
    fl: dict[str, pd.DataFrame],
) -> None:
    p = FAST["04_federated_training"]
    splits = fl["splits"]
    names = list(dict.fromkeys(splits.index.get_level_values(0)))
    assert names == ["IID", f"non-IID (alpha={p['alpha']})"]
    share = pooled()[p["target"]].mean()
    for name in names:
        part = splits.loc[name]
        assert len(part) == p["n_sites"] and part["rows"].sum() == len(pooled())
    iid_shares = splits.loc["IID", "event share"]
    assert (iid_shares - share).abs().max() < 0.03, iid_shares
    skewed = splits.loc[names[1], "event share"]
    assert skewed.max() - skewed.min() > 0.3, skewed
    comparison = fl["iid-vs-noniid"]
    assert comparison.index.get_level_values(0).unique().tolist() == names


def test_federated_receipt_is_anchored_and_verifies(
    fl: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    row = fl["provenance"].loc["federated model"]
    assert row["verified"] and row["anchored requests"] == FIRST_REQUESTS, row
    receipt = runs["04_federated_training"].receipts()["receipt"]
    assert receipt.hash == receipt["receipt_hash"] == row["receipt hash"]
    assert len(receipt["history"]) == FAST["04_federated_training"]["rounds"]


# ------------------------------------------------------ 06 study report
@pytest.fixture(scope="module")
def report(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["06_study_report"].tables


def test_report_table_one_equals_the_library_result(
    report: dict[str, pd.DataFrame],
) -> None:
    p = FAST["06_study_report"]
    ask = {"population": p["columns"]}  # the report declares its population
    overall = encrypted.describe(frames(), p["columns"], **ask)
    grouped = encrypted.describe(frames(), p["columns"], by=p["by"], **ask)
    counts = {
        c: encrypted.crosstab(frames(), c, p["by"], **ask) for c in p["categorical"]
    }
    expected = table_one(overall, grouped, counts)
    pd.testing.assert_frame_equal(report["table1"], expected, check_names=False)


def test_report_figures_and_tables_equal_the_library(
    report: dict[str, pd.DataFrame],
) -> None:
    p = FAST["06_study_report"]
    ask = {"population": p["columns"]}  # every table over the same rows
    close(report["corr"], encrypted.corr(frames(), p["columns"], **ask))
    close(
        report["ols"],
        encrypted.ols(frames(), p["response"], p["covariates"], **ask).to_frame(),
    )
    complete = pooled().dropna(subset=p["columns"])
    counts, _ = np.histogram(complete[p["histogram_column"]], p["histogram_edges"])
    assert report["histogram"]["count"].tolist() == counts.tolist()
    assert report["history"].index.tolist() == list(range(1, p["rounds"] + 1))
    assert report["odds-ratios"].index.tolist() == p["features"]
    np.testing.assert_allclose(
        report["odds-ratios"]["odds ratio"],
        np.exp(report["odds-ratios"]["coefficient"]),
        rtol=1e-12,
    )


def test_report_logistic_odds_ratios_equal_statsmodels(
    report: dict[str, pd.DataFrame],
) -> None:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    p = FAST["06_study_report"]
    rows = pooled().dropna(subset=p["columns"])
    formula = f"{p.get('target', 'cvd_event_10y')} ~ {' + '.join(p['features'])}"
    reference = smf.glm(formula, rows, family=sm.families.Binomial()).fit(tol=1e-14)
    odds = report["logit-odds-ratios"]
    assert odds.index.tolist() == p["features"]
    expected = np.exp(reference.params.reindex(odds.index))
    np.testing.assert_allclose(odds["odds_ratio"], expected, rtol=1e-8)
    ci = np.exp(reference.conf_int().reindex(odds.index))
    np.testing.assert_allclose(odds["0.025"], ci[0], rtol=1e-7)
    np.testing.assert_allclose(odds["0.975"], ci[1], rtol=1e-7)


def test_report_anchors_and_verifies_every_result(
    report: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["06_study_report"]
    provenance = report["provenance"]
    assert len(provenance) == 6 + len(p["categorical"])
    assert provenance["verified"].all(), provenance["problems"]
    assert (provenance["anchored requests"] == FIRST_REQUESTS).all()
    receipts = runs["06_study_report"].receipts()
    assert list(receipts) == provenance.index.tolist()
    for label, receipt in receipts.items():
        assert receipt.hash == provenance.loc[label, "receipt hash"], label
    shown = {"Figure 1": "histogram", "Table 2": "corr", "Table 3": "ols"}
    for label, key in shown.items():
        assert verify(receipts[label], report[key]).ok, f"{label} != its receipt"


# ------------------------------------------------------- headless runs (fast)
@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["rounds=5"], {"rounds": 5}),
        (["alpha=0.25", "by=sex"], {"alpha": 0.25, "by": "sex"}),
        (['columns=["age", "bmi"]'], {"columns": ["age", "bmi"]}),
        (["title=A = B"], {"title": "A = B"}),
        (["flag=true"], {"flag": True}),
    ],
)
def test_parse_parameters_reads_json_else_text(
    pairs: list[str], expected: dict[str, Any]
) -> None:
    assert parse_parameters(pairs) == expected


@pytest.mark.parametrize("pair", ["rounds", "=5", "two words=1"])
def test_parse_parameters_refuses_malformed_pairs(pair: str) -> None:
    with pytest.raises(InvalidInput, match="NAME=VALUE"):
        parse_parameters([pair])


@pytest.mark.parametrize(
    "parameters",
    [
        {"private_key": "0x1234"},
        {"api_token": "abc"},
        {"password": "hunter2"},
        {"title": "0x" + "ab" * 32},
        {"title": "cd" * 32},
    ],
    ids=["key", "token", "password", "hex-key-0x", "hex-key"],
)
def test_run_notebook_refuses_secrets_before_starting_a_kernel(
    parameters: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="looks like a secret"):
        run_notebook("06_study_report", parameters, tmp_path)
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_run_notebook_refuses_unknown_parameters(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no parameter\(s\) \['roundz'\]"):
        run_notebook("00_tour", {"roundz": 2}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_command_refuses_a_key_as_parameter(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli.app,
        ["report", "06", "-p", "private_key=" + "ab" * 32, "--out", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidInput), result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("06", "06_study_report"),
        ("06_study_report", "06_study_report"),
        ("06_study_report.ipynb", "06_study_report"),
        ("00_tour", "00_tour"),
    ],
)
def test_notebook_path_finds_a_notebook_by_name_or_number(name: str, stem: str) -> None:
    assert notebook_path(name) == NOTEBOOKS_DIR / f"{stem}.ipynb"


@pytest.mark.parametrize("name", ["0", "99", "tour"])
def test_notebook_path_refuses_ambiguous_or_unknown_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="no single notebook"):
        notebook_path(name)


# ----------------------------------------------------------- helpers (fast)
def _displayed(frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> pd.DataFrame:
    """Show ``frame``, put the bundle in a notebook, read it back with tables()."""
    import IPython.display

    bundles: list[dict[str, Any]] = []
    monkeypatch.setattr(
        IPython.display, "display", lambda obj, raw=False: bundles.append(obj)
    )
    show(frame, "t", title="a title", digits=2)
    (bundle,) = bundles
    assert (
        "a title" in bundle["text/plain"] and "<h4>a title</h4>" in bundle["text/html"]
    )
    output = nbformat.v4.new_output("display_data", data=bundle)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[output])])
    nbformat.validate(nb)
    nb = nbformat.reads(nbformat.writes(nb), as_version=4)
    return tables(nb)["t"]


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame(
            [[1 / 3, 2.5e-17, -7.0], [4.0, 1e300, 0.1]],
            index=["mean", "std"],
            columns=pd.MultiIndex.from_tuples(
                [("F", "age"), ("F", "bmi"), ("M", "age")]
            ),
        ),
        pd.DataFrame(
            [[2269, 328], [1950, 703]],
            index=pd.Index(["F", "M"], name="sex"),
            columns=pd.Index(["0", "1"], name="cvd"),
        ),
        pd.DataFrame(
            {"left": [30.0, 40.0], "right": [40.0, 90.0], "count": [437, 916]}
        ),
    ],
    ids=["multiindex-floats", "crosstab-ints", "histogram"],
)
def test_show_keeps_every_digit_for_tables(
    frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    back = _displayed(frame, monkeypatch)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert result_hash(back) == result_hash(frame), "a receipt would not verify"


def test_show_rounds_only_what_people_see(monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython.display

    bundles: list[dict[str, Any]] = []
    monkeypatch.setattr(
        IPython.display, "display", lambda obj, raw=False: bundles.append(obj)
    )
    show(pd.DataFrame({"x": [1 / 3]}), "t", digits=2)
    assert (
        "0.33" in bundles[0]["text/plain"] and "0.333" not in bundles[0]["text/plain"]
    )
    assert bundles[0][TABLE_MIMETYPE]["data"] == [[1 / 3]]


def test_compare_reports_the_largest_differences() -> None:
    a = pd.DataFrame({"x": [1.0, 2.0], "y": [10.0, 0.0]}, index=["m", "s"])
    b = a.copy()
    b.loc["s", "x"] = 2.5
    b.loc["m", "y"] = 8.0
    table = compare(a, b)
    assert table.figures() == {"max_abs": 2.0, "max_rel": 0.25, "withheld": 0}
    assert (table.max_abs, table.max_rel, table.n_withheld) == (2.0, 0.25, 0)
    assert table.loc[("s", "x"), "abs diff"] == 0.5
    assert table.loc[("s", "y"), "rel diff"] == 0.0, "a zero reference divides by 1"
    with pytest.raises(InvalidInput, match="share no rows"):
        compare(a, b.rename(index={"m": "q", "s": "r"}))


def test_helpers_show_withheld_cells_as_withheld() -> None:
    """A bin or cell the sites withheld (<NA>) is named by compare, drawn hatched
    by plot_histogram and shown "withheld" by table_one — never read as 0."""
    from healthlab.notebooks import plot_histogram

    ours = pd.DataFrame(
        {"count": pd.array([5, None, 7], dtype="Int64")}, index=["a", "b", "c"]
    )
    table = compare(ours, pd.DataFrame({"count": [5, 2, 7]}, index=["a", "b", "c"]))
    assert table.n_withheld == 1
    assert table.loc[("b", "count"), "withheld"]
    hist = pd.DataFrame(
        {
            "left": [0.0, 10.0, 20.0],
            "right": [10.0, 20.0, 30.0],
            "count": pd.array([4, None, 6], dtype="Int64"),
        }
    )
    figure = plot_histogram(hist)
    assert figure is not None
    hatched = [p for p in figure.axes[0].patches if p.get_hatch() == "//"]
    assert len(hatched) == 1
    cross = pd.DataFrame(
        {
            "F": pd.array([10, None], dtype="Int64"),
            "M": pd.array([12, 8], dtype="Int64"),
        },
        index=pd.Index(["no", "yes"], name="smoker"),
    )
    overall = pd.DataFrame({"age": [30.0, 50.0, 9.0]}, index=["count", "mean", "std"])
    grouped = pd.concat({"F": overall, "M": overall}, axis=1)
    one = table_one(overall, grouped, {"smoker": cross})
    assert one.loc["smoker = yes, n (%)", "F"] == "withheld"
    assert one.loc["smoker = no, n (%)", "F"] == "10 (share withheld)"
    assert one.loc["smoker = yes, n (%)", "M"] == "8 (40.0 %)"
    assert one.loc["smoker = no, n (%)", "overall"] == "22 (share withheld)"
    assert one.loc["smoker = yes, n (%)", "overall"] == "withheld"


def test_plots_fall_back_to_none_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history = pd.DataFrame({"round": [1, 2], "auc": [0.7, 0.8]})
    figure = plot_metric({"a": history, "b": history}, "auc")
    assert figure is not None and len(figure.axes[0].lines) == 2
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert plot_metric({"a": history}, "auc") is None


def test_open_study_registers_every_site_and_grants_the_chosen_ones(
    ledger: Ledger,
) -> None:
    parts = {name: frame.head(60) for name, frame in frames().items()}
    study = open_study(
        ledger, parts, purpose="test", fee_wei=10**15, grant=["site_a", "site_c"]
    )
    assert study.owners == {n: ledger.accounts[1 + i] for i, n in enumerate(parts)}
    assert study.researcher == ledger.accounts[5]
    for name, frame in parts.items():
        dataset = ledger.dataset(study.datasets[name])
        assert dataset.owner == study.owners[name]
        assert dataset.content_hash == Site(name, frame).content_hash
        granted = ledger.has_access(study.datasets[name], study.researcher)
        assert granted == (name in ("site_a", "site_c")), name
    assert sorted(study.requests) == ["site_a", "site_c"]
    paid = ledger.events().query("event == 'FeePaid'")
    assert paid["account"].tolist() == [study.owners["site_a"], study.owners["site_c"]]
    assert paid["amount_wei"].tolist() == [10**15] * 2, "the fee was not paid"
    parties = study.parties()
    assert parties["has access"].tolist()[:4] == [True, False, True, False]
    with pytest.raises(InvalidInput, match="unknown sites"):
        open_study(ledger, parts, purpose="test", grant=["site_z"])


def test_revoke_after_refuses_an_unknown_site_before_training(ledger: Ledger) -> None:
    parts = {name: frame.head(30) for name, frame in list(frames().items())[:2]}
    study = open_study(ledger, parts, purpose="test")
    with pytest.raises(InvalidInput, match="no site 'site_z'"):
        revoke_after(study, "site_z", 1)


# ------------------------------------------- parties and chains (fast, anvil)
def test_connect_chain_without_a_node_is_the_embedded_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HEALTHLAB_RPC_URL", raising=False)
    ledger, shared = connect_chain("  ")
    assert shared is False
    assert ledger.rpc_url is None
    assert isinstance(ledger.w3.provider, EthereumTesterProvider)
    other, _ = connect_chain()
    ledger.register_dataset(
        "https://a.example/x", "0x" + "11" * 32, sender=ledger.accounts[1]
    )
    assert len(ledger.datasets()) == 1
    assert other.datasets().empty, "each kernel gets its own embedded chain"


@pytest.mark.parametrize(
    ("url", "source"),
    [
        ("ws://127.0.0.1:8545", "rpc_url"),
        ("127.0.0.1:8545", "rpc_url"),
        ("ftp://user:s3cr3tt0ken@node.example/", "rpc_url"),
        ("", "HEALTHLAB_RPC_URL"),
    ],
)
def test_connect_chain_refuses_what_is_not_an_http_node(
    monkeypatch: pytest.MonkeyPatch, url: str, source: str
) -> None:
    monkeypatch.setenv("HEALTHLAB_RPC_URL", "file:///tmp/s3cr3tt0ken")
    with pytest.raises(InvalidInput, match=f"^{source} must be a node's http") as err:
        connect_chain(url)
    assert "s3cr3tt0ken" not in str(err.value), "a URL may carry a token"


def test_connect_chain_says_how_to_start_a_node_when_none_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path))
    monkeypatch.delenv("HEALTHLAB_RPC_URL", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ChainUnreachable, match="make node"):
        connect_chain(url)
    monkeypatch.setenv("HEALTHLAB_RPC_URL", url)
    with pytest.raises(ChainUnreachable, match=re.escape(url)):
        connect_chain("")


def test_chain_table_never_shows_credentials_of_a_node_url(ledger: Ledger) -> None:
    table = chain_table(ledger, False)["value"]
    assert table["chain"].startswith("embedded chain")
    assert table["registry"] == ledger.address
    assert table["accounts"] == "10"
    ledger.rpc_url = "https://user:s3cr3t@node.example:8545/v3/0123456789abcdef?k=1"
    shown = chain_table(ledger, True)["value"]
    assert shown["node"] == "https://node.example:8545"
    assert shown["chain"].startswith("shared node")


def test_node_account_picks_the_chains_accounts_by_number(ledger: Ledger) -> None:
    assert [node_account(ledger, i) for i in range(10)] == [
        dev_account(i) for i in range(10)
    ]
    for bad, message in ((10, "0-9"), (-1, "0-9"), (True, "by its number")):
        with pytest.raises(InvalidInput, match=message):
            node_account(ledger, bad)  # type: ignore[arg-type]


def test_ensure_catalogue_registers_each_sample_dataset_once(ledger: Ledger) -> None:
    owner, citizen = ledger.accounts[1], ledger.accounts[3]
    first = ensure_catalogue(ledger, owner, citizen=citizen, citizens=1)
    specs = sample_datasets(1)
    assert first.index.tolist() == [s.name for s in specs]
    assert first["registered now"].all()
    for spec in specs:
        record = ledger.dataset(int(first.loc[spec.name, "dataset"]))
        assert (record.pointer, record.content_hash) == (
            spec.pointer,
            spec.content_hash,
        )
        assert (record.fee_wei, record.grant_seconds) == (
            spec.fee_wei,
            spec.grant_days * 86400,
        )
        expected_owner = owner if spec.kind == "hospital cohort" else citizen
        assert record.owner == expected_owner, spec.name
    terms, fee, days = CITIZEN_TERMS
    assert (specs[-1].terms, specs[-1].fee_wei, specs[-1].grant_days) == (
        terms,
        fee,
        days,
    )
    assert specs[0].content_hash == Site("site_a", frames()["site_a"]).content_hash
    block = ledger.w3.eth.block_number
    again = ensure_catalogue(ledger, owner, citizen=citizen, citizens=1)
    assert ledger.w3.eth.block_number == block, "a second call sent transactions"
    assert not again["registered now"].any()
    pd.testing.assert_frame_equal(
        again.drop(columns="registered now"), first.drop(columns="registered now")
    )
    more = ensure_catalogue(ledger, owner, citizen=citizen, citizens=2)
    assert more["registered now"].tolist() == [False] * 5 + [True]
    assert more.index[-1] == "U0002"
    assert len(ledger.datasets()) == len(SITES) + 2


def test_ensure_catalogue_never_adopts_a_squatters_registration(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stranger registered site_b's pointer and hash first: the hospital's own
    dataset is registered all the same (the catalogue never lists the stranger's);
    a race with another of the owner's own kernels reuses that kernel's dataset."""
    owner, stranger = ledger.accounts[1], ledger.accounts[3]
    specs = {s.name: s for s in sample_datasets(1)}
    taken = specs["site_b"]
    squat = ledger.register_dataset(
        taken.pointer, taken.content_hash, terms="GRU", sender=stranger
    )
    # another kernel of the owner registers site_c between our read and our write
    racing = specs["site_c"]
    original = ledger.register_dataset
    raced: list[int] = []

    def register(uri: str, content_hash: str, **kwargs: Any) -> int:
        if content_hash == racing.content_hash and not raced:
            raced.append(original(uri, content_hash, **kwargs))
        return original(uri, content_hash, **kwargs)

    monkeypatch.setattr(ledger, "register_dataset", register)
    table = ensure_catalogue(ledger, owner, citizens=1)
    assert raced, "the race was not staged"
    assert table.loc["site_b", "dataset"] != squat
    assert table.loc["site_b", "owner"] == owner
    assert table.loc["site_b", "registered now"]
    assert table.loc["site_c", "dataset"] == raced[0]
    assert not table.loc["site_c", "registered now"]
    assert (table.loc[["site_a", "site_b", "site_c"], "owner"] == owner).all()
    assert table["registered now"].sum() == 4
    again = ensure_catalogue(ledger, owner, citizens=1)
    assert not again["registered now"].any()
    assert again["dataset"].tolist() == table["dataset"].tolist()


def test_ensure_directory_names_the_owners_once_and_reuses_the_oldest(
    ledger: Ledger,
) -> None:
    """Called again (another kernel) it sends nothing; a second directory of the
    same title (a race) is ignored for the oldest; a stranger's directory of that
    title is never used; a changed name is set again."""
    owner, citizen, stranger, curator = (ledger.accounts[i] for i in (1, 3, 4, 5))
    decoy = ledger.create_collaboration(SAMPLE_DIRECTORY, sender=stranger)
    ledger.set_member(decoy, citizen, sender=stranger)
    ledger.name_member(decoy, citizen, SAMPLE_HOSPITALS, sender=stranger)
    directory = ensure_directory(ledger, curator, {owner: SAMPLE_HOSPITALS})
    assert directory != decoy and ledger.collaboration_curator(directory) == curator
    assert ledger.owner_name(directory, owner) == SAMPLE_HOSPITALS
    assert ledger.owner_name(directory, citizen) is None, "only the named owners"
    events = len(ledger.events())
    assert ensure_directory(ledger, curator, {owner: SAMPLE_HOSPITALS}) == directory
    assert len(ledger.events()) == events, "a second call sent something"
    raced = ledger.create_collaboration(SAMPLE_DIRECTORY, sender=curator)
    assert ensure_directory(ledger, curator, {owner: "Renamed"}) == directory
    assert ledger.owner_name(directory, owner) == "Renamed"
    assert ledger.owner_name(raced, owner) is None
    assert ledger.collaborations(curator=curator) == {
        directory: SAMPLE_DIRECTORY,
        raced: SAMPLE_DIRECTORY,
    }
    assert list(ledger.collaborations()) == [decoy, directory, raced]


@pytest.mark.parametrize("citizens", [-1, True, 241, 2.0])
def test_sample_datasets_refuse_impossible_citizen_counts(citizens: Any) -> None:
    with pytest.raises(InvalidInput, match="citizen"):
        sample_datasets(citizens)


def test_pages_on_anvil_share_one_registry_and_catalogue(
    anvil: AnvilNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two kernels on one node (the researcher's and the owner's) see one catalogue:
    the registry recorded by the first is found by the second, the catalogue is
    registered once, and a request made from one is pending in the other."""
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path))  # a registry of our own
    monkeypatch.delenv("HEALTHLAB_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("HEALTHLAB_RPC_URL", f"http://127.0.0.1:{free_port()}")
    researcher_page, shared = connect_chain(anvil.url)  # the parameter wins
    assert shared and researcher_page.rpc_url == anvil.url
    monkeypatch.setenv("HEALTHLAB_RPC_URL", anvil.url)
    owner_page, shared = connect_chain("")
    assert shared and owner_page.address == researcher_page.address
    owner = node_account(owner_page, 1)
    assert owner == node_account(researcher_page, 1)
    first = ensure_catalogue(researcher_page, node_account(researcher_page, 1))
    second = ensure_catalogue(owner_page, owner)
    assert first["registered now"].all() and not second["registered now"].any()
    assert second["dataset"].tolist() == first["dataset"].tolist()
    researcher = node_account(researcher_page, 2)
    request = researcher_page.request_access(
        int(first.loc["site_a", "dataset"]), "CVD risk", "HMB|NCU", sender=researcher
    )
    seen = owner_page.request(request)
    assert (seen.researcher, seen.status.name) == (researcher, "PENDING")
    assert seen.amount_wei == HOSPITAL_TERMS["site_a"][1]


def test_export_html_leaves_widget_state_out(tmp_path: Path) -> None:
    view = {"model_id": "abc123", "version_major": 2, "version_minor": 0}
    output = nbformat.v4.new_output(
        "display_data",
        data={
            "application/vnd.jupyter.widget-view+json": view,
            "text/plain": "a panel",
            "text/html": "<p><i>a static note for reports</i></p>",
        },
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[output])])
    nb.metadata["widgets"] = {
        "application/vnd.jupyter.widget-state+json": {
            "state": {"abc123": {"model_name": "VBoxModel", "state": {}}},
            "version_major": 2,
            "version_minor": 0,
        }
    }
    path = tmp_path / "panel.ipynb"
    nbformat.write(nb, path)
    html = export_html(path).read_text(encoding="utf-8")
    assert "a static note for reports" in html
    assert "widget-state" not in html and "unpkg.com" not in html
    assert "widget-view+json" not in html


# ------------------------------------------ the pages on a shared node (anvil)
@pytest.fixture(scope="module")
def node_pages(runs: dict[str, Run], shared_node: SharedNode) -> dict[str, Run]:
    """01 and 02 run with their defaults on the shared node (needs anvil)."""
    return {stem: runs[f"{stem}@node"] for stem in sorted(PAGES)}


def test_pages_on_a_shared_node_never_act_by_themselves(
    node_pages: dict[str, Run], shared_node: SharedNode
) -> None:
    researcher = node_pages["01_request_access"]
    tables01 = researcher.tables
    assert tables01["chain"].loc["chain", "value"].startswith("shared node")
    assert not tables01["samples"]["registered now"].any(), "registered twice"
    assert len(tables01["samples"]) == len(SITES) + 4
    names = tables01["catalogue"]["owner name"]
    assert set(names) == {SAMPLE_HOSPITALS, "unverified"}, "the sample directory"
    mine = tables01["my_requests"]
    assert mine.index.tolist() == [shared_node.request]
    assert mine.loc[shared_node.request, "status"] == "PENDING"
    assert len(tables01["events"]) == shared_node.events, "the page sent something"
    assert "shared node: press 'request access' above" in researcher.printed()
    assert "paid" not in researcher.printed()

    owner = node_pages["02_approve_requests"]
    tables02 = owner.tables
    pending = tables02["pending_requests-when-opened"]
    assert pending.index.tolist() == [shared_node.request]
    # another client made the request: the owner's page reads the purpose the
    # researcher sealed to it, checked against its hash on chain
    assert pending.loc[shared_node.request, "purpose"] == "CVD risk (another client)"
    assert not any(k.endswith("-with-two-requests") for k in tables02)
    assert len(tables02["events"]) == shared_node.events
    assert "requests come from researchers' pages" in owner.printed()

    with pytest.MonkeyPatch.context() as mp:  # the chain itself, read afterwards
        mp.setenv("HEALTHLAB_HOME", str(shared_node.home))
        ledger, shared = connect_chain(shared_node.url)
    assert shared and ledger.request(shared_node.request).status.name == "PENDING"
    assert len(ledger.events()) == shared_node.events


@pytest.mark.parametrize("stem", sorted(PAGES))
def test_pages_on_a_shared_node_run_clean_and_hold_no_keys(
    node_pages: dict[str, Run], stem: str
) -> None:
    run = node_pages[stem]
    assert run.nb.metadata["papermill"]["parameters"] == {}, "defaults, as make lab"
    for i, cell in enumerate(run.nb.cells):
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"cell {i}: {output}"
            assert output.get("name") != "stderr", f"cell {i}: {output['text']}"
    assert f"report: {run.html}" in run.stdout
    assert_no_secrets(run, stem)
