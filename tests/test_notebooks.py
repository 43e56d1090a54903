"""The notebooks (issue 6): every notebook executed headless with fast parameters
through ``healthlab report`` (papermill, then HTML), and what it produced checked
against the library and pandas; executed notebooks scanned for keys and tokens;
committed notebooks stripped, parameterized and shaped like a Pythia cookbook.

The four notebooks run concurrently, once per session, in their own kernels
(~65 s on 2 busy cores; each alone takes 8-25 s). Tables are read back exactly from
the machine-readable copy ``show()`` displays next to the HTML, so a table's
``result_hash`` can be checked against its receipt in this process.
"""

from __future__ import annotations

import ast
import json
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
from typer.testing import CliRunner

from healthlab import Site, cli, encrypted
from healthlab.data import load_cohort_sites
from healthlab.errors import InvalidInput
from healthlab.ledger import Ledger
from healthlab.notebooks import (
    NOTEBOOKS_DIR,
    TABLE_MIMETYPE,
    compare,
    notebook_path,
    open_study,
    parse_parameters,
    plot_metric,
    revoke_after,
    run_notebook,
    show,
    table_one,
    tables,
)
from healthlab.receipts import Receipt, result_hash, verify

SITES = ["site_a", "site_b", "site_c", "site_d"]
#: Fast parameters per notebook; every parameter a test relies on is named here.
FAST: dict[str, dict[str, Any]] = {
    "00_tour": {"rounds": 2, "columns": ["age", "sbp"]},
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


def _command(stem: str, out: Path) -> list[str]:
    params = [f"{k}={json.dumps(v)}" for k, v in FAST[stem].items()]
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


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every notebook run once, concurrently, through the ``report`` command."""
    out = tmp_path_factory.mktemp("reports")
    env = dict(
        os.environ,
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
    results: dict[str, Run] = {}
    failures = []
    for stem, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"{stem}: exit {proc.returncode}\n{stdout}\n{stderr}")
            continue
        path = out / f"{stem}.ipynb"
        nb = nbformat.read(path, as_version=4)
        results[stem] = Run(nb, path, out / f"{stem}.html", stdout)
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
    pd.testing.assert_frame_equal(
        a, b, check_exact=False, rtol=rtol, atol=0, check_names=False
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
    run = runs[stem]
    everything = (run.path.read_text() + run.html.read_text()).lower()
    leaked = KNOWN_KEYS & set(HEX64.findall(everything))
    assert not leaked, f"private keys in the executed notebook or report: {leaked}"

    receipts = run.receipts()
    assert receipts, "no receipt printed by a cell tagged 'receipt'"
    public: set[str] = {
        h[2:] for h in (s.content_hash for s in _sample_sites())
    }  # registered on chain
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
    assert [c for c in checks.index if c.startswith("anchor")] == [
        f"anchor {i}" for i in range(1, 5)
    ]
    (receipt,) = run.receipts().values()
    assert receipt.hash == receipt["receipt_hash"]
    assert verify(receipt, run.tables["describe"]).ok, "the shown table is not it"
    assert [s["name"] for s in receipt["sites"]] == SITES
    assert len(receipt["anchors"]) == len(SITES)
    assert receipt["gated"] is True


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


def test_statistics_corr_and_ols_equal_the_library(
    stats: dict[str, pd.DataFrame],
) -> None:
    p = FAST["03_encrypted_statistics"]
    reference = pooled()[p["corr_columns"]].dropna().corr()
    np.testing.assert_allclose(
        stats["corr"].to_numpy(), reference.to_numpy(), atol=1e-13
    )
    model = encrypted.ols(frames(), p["response"], p["covariates"], dropna=True)
    close(stats["ols"], model)
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
    p = FAST["03_encrypted_statistics"]
    printed = runs["03_encrypted_statistics"].printed()
    assert "DisclosureRefused: site site_c: 1 subset(s)" in printed
    assert "fewer than 3 rows" in printed
    others = pd.concat([f for n, f in frames().items() if n != "site_c"])
    counts, _ = np.histogram(others[p["histogram_column"]], bins=p["narrow_edges"])
    assert stats["histogram-partial"]["count"].tolist() == counts.tolist()
    took_part = stats["partial-receipt"]["took part"]
    assert took_part.to_dict() == {
        "site_a": True,
        "site_b": True,
        "site_d": True,
        "site_c": False,
    }


def test_statistics_receipt_verifies_and_tampering_is_caught(
    stats: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    assert stats["verification"]["passed"].all(), stats["verification"]
    tampered = stats["verification-tampered"]["passed"]
    assert tampered[~tampered].index.tolist() == ["result hash"]
    receipt = runs["03_encrypted_statistics"].receipts()["receipt"]
    assert receipt.hash == receipt["receipt_hash"]
    assert receipt["parameters"]["by"] == FAST["03_encrypted_statistics"]["by"]
    assert [a["request_id"] for a in receipt["anchors"]] == [1, 2, 3, 4]


# ------------------------------------------------- 04 federated training
@pytest.fixture(scope="module")
def fl(runs: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return runs["04_federated_training"].tables


def test_federated_history_has_the_asked_rounds(fl: dict[str, pd.DataFrame]) -> None:
    rounds = FAST["04_federated_training"]["rounds"]
    history = fl["history"]
    assert history.index.tolist() == list(range(1, rounds + 1))
    assert (history["sites"] == ", ".join(SITES)).all()
    assert fl["auc-by-site"].columns.tolist() == SITES
    assert len(fl["auc-by-site"]) == rounds


def test_revocation_stops_the_site_from_the_next_round(
    fl: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["04_federated_training"]
    history, site, after = (
        fl["history-revoked"],
        p["revoke_site"],
        p["revoke_after_round"],
    )
    assert len(history) == p["rounds"]
    for rnd, row in history.iterrows():
        if rnd <= after:
            assert row["sites"] == ", ".join(SITES) and row["refused"] == "", rnd
        else:
            assert site not in row["sites"] and row["refused"] == site, rnd
            assert row["n_sites"] == len(SITES) - 1
    printed = runs["04_federated_training"].printed()
    assert f"the owner of {site} revoked the grant after round {after}" in printed
    assert f"{site} grant live: False" in printed
    receipt = fl["receipt-revoked"].loc[site]
    assert receipt["took part"].tolist() == [True, False]
    assert "no longer live" in receipt["refusal"].iloc[1]


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
    assert row["verified"] and row["anchored requests"] == "1, 2, 3, 4", row
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
    overall = encrypted.describe(frames(), p["columns"], dropna=True)
    grouped = encrypted.describe(frames(), p["columns"], by=p["by"], dropna=True)
    counts = {c: encrypted.crosstab(frames(), c, p["by"]) for c in p["categorical"]}
    expected = table_one(overall, grouped, counts)
    pd.testing.assert_frame_equal(report["table1"], expected, check_names=False)


def test_report_figures_and_tables_equal_the_library(
    report: dict[str, pd.DataFrame],
) -> None:
    p = FAST["06_study_report"]
    close(report["corr"], encrypted.corr(frames(), p["columns"], dropna=True))
    close(
        report["ols"],
        encrypted.ols(frames(), p["response"], p["covariates"], dropna=True),
    )
    counts, _ = np.histogram(pooled()[p["histogram_column"]], p["histogram_edges"])
    assert report["histogram"]["count"].tolist() == counts.tolist()
    assert report["history"].index.tolist() == list(range(1, p["rounds"] + 1))
    assert report["odds-ratios"].index.tolist() == p["features"]
    np.testing.assert_allclose(
        report["odds-ratios"]["odds ratio"],
        np.exp(report["odds-ratios"]["coefficient"]),
        rtol=1e-12,
    )


def test_report_anchors_and_verifies_every_result(
    report: dict[str, pd.DataFrame], runs: dict[str, Run]
) -> None:
    p = FAST["06_study_report"]
    provenance = report["provenance"]
    assert len(provenance) == 6 + len(p["categorical"])
    assert provenance["verified"].all(), provenance["problems"]
    assert (provenance["anchored requests"] == "1, 2, 3, 4").all()
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
    assert table.attrs == {"max_abs": 2.0, "max_rel": 0.25}
    assert table.loc[("s", "x"), "abs diff"] == 0.5
    assert table.loc[("s", "y"), "rel diff"] == 0.0, "a zero reference divides by 1"
    with pytest.raises(InvalidInput, match="share no rows"):
        compare(a, b.rename(index={"m": "q", "s": "r"}))


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
    assert ledger.credit(study.owners["site_a"]) == 10**15, "the fee was not paid"
    parties = study.parties()
    assert parties["has access"].tolist()[:4] == [True, False, True, False]
    with pytest.raises(InvalidInput, match="unknown sites"):
        open_study(ledger, parts, purpose="test", grant=["site_z"])


def test_revoke_after_refuses_an_unknown_site_before_training(ledger: Ledger) -> None:
    parts = {name: frame.head(30) for name, frame in list(frames().items())[:2]}
    study = open_study(ledger, parts, purpose="test")
    with pytest.raises(InvalidInput, match="no site 'site_z'"):
        revoke_after(study, "site_z", 1)
