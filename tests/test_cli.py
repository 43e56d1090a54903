"""The ``healthlab`` command against a real anvil node, and its one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from healthlab import cli
from healthlab.ledger import Ledger, deploy_registry
from healthlab.ledger.client import DEFAULT_REQUEST_TIMEOUT
from healthlab.ledger.node import AnvilNode
from healthlab.services import free_port
from tests.conftest import ETHER, content_hash

FEE = ETHER // 100
HTTPS_POINTER = "https://hospital.example/cohort.csv"
#: Longer than pandas' default column width (50), so truncation would show.
IPFS_POINTER = (
    "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi/cohort.parquet"
)
COMMANDS = ["status", "datasets", "events", "deploy"]


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, f"healthlab {' '.join(args)}: {result.output}"
    return result


def register(ledger: Ledger, pointer: str = HTTPS_POINTER) -> int:
    return ledger.register_dataset(
        pointer, content_hash(), fee_wei=FEE, terms="HMB|NCU", sender=ledger.accounts[1]
    )


def deployed_address(output: str) -> str:
    match = re.fullmatch(r"registry at (0x[0-9a-fA-F]{40}) on chain 31337\n", output)
    assert match, f"unexpected deploy output {output!r}"
    return match[1]


@pytest.mark.anvil
def test_deploy_records_a_registry_for_the_chain(anvil: AnvilNode, home: Path) -> None:
    result = invoke("deploy", "--rpc-url", anvil.url, "--request-timeout", "600")

    address = deployed_address(result.output)
    found = Ledger.connect(anvil.url, deploy=False)  # through the record only
    assert found.address == address
    assert found.contract.functions.requestTimeout().call() == 600


@pytest.mark.anvil
def test_deploy_again_deploys_a_new_registry_with_the_requested_timeout(
    anvil: AnvilNode, home: Path
) -> None:
    first = deployed_address(invoke("deploy", "--rpc-url", anvil.url).output)

    second = deployed_address(
        invoke("deploy", "--rpc-url", anvil.url, "--request-timeout", "600").output
    )

    found = Ledger.connect(anvil.url, deploy=False)
    timeout = found.contract.functions.requestTimeout().call()
    assert (second != first, timeout) == (True, 600), (
        f"`healthlab deploy` promises a new registry; it reported {second} "
        f"(first deploy: {first}) whose request timeout is {timeout} s, not the "
        "600 s asked for"
    )
    assert found.address == second, "the record must point to the new registry"


@pytest.mark.anvil
@pytest.mark.parametrize("source", ["record", "--registry", "HEALTHLAB_REGISTRY"])
def test_status_shows_the_node_registry_and_counters(
    anvil: AnvilNode, home: Path, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.connect(anvil.url)  # deploys and records in the empty home
    ds = register(ledger)
    ledger.request_access(ds, "CVD risk", "HMB|NCU", sender=ledger.accounts[2])
    address: str = ledger.address
    datasets, requests, timeout, escrow = 1, 1, DEFAULT_REQUEST_TIMEOUT, FEE
    args = ["status", "--rpc-url", anvil.url]
    if source != "record":  # another registry, named explicitly, wins over the record
        address, _ = deploy_registry(ledger.w3, ledger.accounts[0], 600)
        datasets, requests, timeout, escrow = 0, 0, 600, 0
        if source == "--registry":
            args += ["--registry", address]
        else:
            monkeypatch.setenv("HEALTHLAB_REGISTRY", address)

    output = invoke(*args).output

    assert output.splitlines() == [
        f"node            {anvil.url} (chain 31337)",
        f"registry        {address}",
        f"latest block    {ledger.w3.eth.block_number}",
        f"datasets        {datasets}",
        f"requests        {requests}",
        f"request timeout {timeout} s",
        f"escrow + credit {escrow} wei",
    ]


@pytest.mark.anvil
def test_datasets_lists_every_dataset_with_its_full_pointer(
    anvil: AnvilNode, home: Path
) -> None:
    ledger = Ledger.connect(anvil.url)
    ids = [register(ledger, HTTPS_POINTER), register(ledger, IPFS_POINTER)]

    lines = invoke("datasets", "--rpc-url", anvil.url).output.splitlines()

    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    assert sorted(rows) == ids, f"one row per dataset expected:\n{lines}"
    for number, pointer in zip(ids, (HTTPS_POINTER, IPFS_POINTER), strict=True):
        row = rows[number]
        assert pointer in row, f"dataset {number}: {pointer} not shown in {row}"
        assert ledger.accounts[1] in row
        assert "HMB|NCU" in row


@pytest.mark.anvil
@pytest.mark.parametrize("command", ["datasets", "events"])
def test_listing_an_empty_registry_says_none(
    anvil: AnvilNode, home: Path, command: str
) -> None:
    Ledger.connect(anvil.url)  # a new registry: no dataset, no event

    assert invoke(command, "--rpc-url", anvil.url).output == "(none)\n"


@pytest.mark.anvil
@pytest.mark.parametrize("from_approval", [False, True], ids=["all", "--from-block"])
def test_events_lists_the_event_names_in_order(
    anvil: AnvilNode, home: Path, from_approval: bool
) -> None:
    ledger = Ledger.connect(anvil.url)
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    ds = register(ledger)
    req = ledger.request_access(ds, "CVD risk", "HMB|NCU", sender=researcher)
    ledger.approve(req, sender=owner)  # the fee is paid to the owner in it
    approval_block = ledger.last_receipt["blockNumber"]
    args = ["events", "--rpc-url", anvil.url]
    if from_approval:
        args += ["--from-block", str(approval_block)]

    output = invoke(*args).output

    names = [i["name"] for i in ledger.contract.abi if i["type"] == "event"]
    shown = re.findall(rf"\b({'|'.join(names)})\b", output)
    everything = [
        "DatasetRegistered",
        "AccessRequested",
        "AccessGranted",
        "FeePaid",
    ]
    assert shown == (everything[2:] if from_approval else everything)


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``healthlab.cli.main()`` as the console script does; return the exit code."""
    monkeypatch.setattr(sys, "argv", ["healthlab", *argv])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer replaces it
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return int(stop.value.code or 0)


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_node_is_one_line_naming_the_url(
    command: str,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    code = run_main([command, "--rpc-url", url], monkeypatch)

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith(f"error: cannot reach an Ethereum node at {url} "), err
    assert err.count("\n") == 1, f"one line expected, got:\n{err}"


@pytest.mark.anvil
@pytest.mark.parametrize("command", ["status", "datasets", "events"])
@pytest.mark.parametrize("registry", ["not recorded", "--registry without code"])
def test_missing_registry_is_one_line_naming_the_url(
    command: str,
    registry: str,
    anvil: AnvilNode,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [command, "--rpc-url", anvil.url]
    expected = f"error: no registry is recorded for the chain at {anvil.url}; "
    if registry != "not recorded":
        nowhere = "0x" + "de" * 20
        args += ["--registry", nowhere]
        expected = f"error: no contract at {nowhere} on {anvil.url}; "

    code = run_main(args, monkeypatch)

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith(expected), err
    assert err.count("\n") == 1, f"one line expected, got:\n{err}"
    assert not (home / "deployments.json").exists(), "read commands must not deploy"


def test_installed_command_reports_an_unreachable_node_without_traceback(
    home: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    script = Path(sys.executable).with_name("healthlab")

    done = subprocess.run(
        [str(script), "status", "--rpc-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"error: cannot reach an Ethereum node at {url} ")
    assert done.stderr.count("\n") == 1, f"one line expected, got:\n{done.stderr}"


def write_notebook(path: Path, source: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


def test_demo_runs_every_notebook_on_the_embedded_chain_one_line_each(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from healthlab import notebooks

    folder = tmp_path / "notebooks"
    folder.mkdir()
    # which chain the kernel would use: `make demo` must not follow a node that
    # happens to be configured in the shell
    write_notebook(
        folder / "00_where.ipynb",
        "import os\nimport pandas as pd\nfrom healthlab.notebooks import show\n"
        "show(pd.DataFrame({'rpc': [os.environ.get('HEALTHLAB_RPC_URL', 'none')]}),"
        " 'where')",
    )
    write_notebook(
        folder / "01_broken.ipynb", "raise RuntimeError('broken on purpose')"
    )
    monkeypatch.setattr(notebooks, "NOTEBOOKS_DIR", folder)
    monkeypatch.setenv("HEALTHLAB_RPC_URL", "http://127.0.0.1:1")
    out = tmp_path / "reports"

    result = CliRunner().invoke(cli.app, ["demo", "--out", str(out)])

    assert result.exit_code == 1, result.output  # a failed notebook fails the demo
    lines = result.stdout.splitlines()
    assert lines[0:2] == ["", f"reports in {out} (open the .html files):"]
    assert re.fullmatch(
        r"  00_where: 1 table, 0 figures, \d+\.\d s -> 00_where\.html", lines[2]
    ), lines
    assert lines[3].startswith(
        "  01_broken: FAILED — 01_broken.ipynb failed in cell 1 with RuntimeError: "
        "broken on purpose; the executed copy with the traceback is "
    ), lines
    assert re.fullmatch(r"1 of 2 notebooks ran in \d+ s", lines[4]), lines
    assert len(lines) == 5
    assert notebooks.tables(out / "00_where.ipynb")["where"]["rpc"].tolist() == ["none"]
    assert (out / "00_where.html").is_file()
    assert "running 00_where …" in result.stderr
