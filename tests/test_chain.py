"""``healthlab chain up|status|down``: the one local anvil node that JupyterLab's
kernels, the Voilà page and reports share (``make lab``, ``make dashboard``).

Every test uses its own port and folder; nodes are stopped by PID at the end. The
first test goes through the installed command in a subprocess, as make does: the node
must outlive the command that started it and must not hold the pipe ``$(...)`` reads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from healthlab import cli
from healthlab.errors import ChainUnreachable, ConfigurationError
from healthlab.ledger import Ledger
from healthlab.ledger.node import AnvilNode, LocalChain, check_single_user, other_users
from healthlab.ledger.records import Status
from healthlab.services import free_port
from tests.conftest import ETHER, content_hash, require

pytestmark = pytest.mark.anvil


@pytest.fixture
def chain_dir(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A folder for the node's files; whatever node it records is stopped at the end."""
    require("anvil")
    if other_users():  # a shared test machine: these tests are about the node's
        # life cycle; the refusal there has its own tests below
        monkeypatch.setenv("HEALTHLAB_SHARED_HOST", "1")
    folder = tmp_path / "chain"
    yield folder
    record = folder / "anvil.pid"
    if record.is_file():
        pid = json.loads(record.read_text())["pid"]
        LocalChain(folder).down(timeout=5)
        assert not alive(pid), f"anvil {pid} survived the clean-up"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def chain(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli.app, ["chain", *args])
    assert result.exit_code == code, (
        f"healthlab chain {' '.join(args)}: {result.output}"
    )
    return result


def register(ledger: Ledger) -> int:
    return ledger.register_dataset(
        "https://hospital.example/cohort.csv",
        content_hash(),
        fee_wei=ETHER // 100,
        terms="HMB|NCU",
        sender=ledger.accounts[1],
    )


def test_up_starts_a_detached_node_deploys_once_and_is_reused(
    chain_dir: Path, home: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("healthlab")),
        "chain",
        "up",
        "--port",
        str(port),
        "--dir",
        str(chain_dir),
    ]

    # stdout is a pipe, as in make's url=$(healthlab chain up): run() returns only
    # once the pipe closes, so a node holding it would hang here until the timeout
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert (first.returncode, first.stdout) == (0, url + "\n"), first.stderr
    pid = json.loads((chain_dir / "anvil.pid").read_text())["pid"]
    assert f"anvil started at {url} (pid {pid})" in first.stderr
    assert alive(pid), "the node must outlive the command that started it"
    ledger = Ledger.connect(url, deploy=False)  # found through the record only
    assert f"registry {ledger.address} on chain 31337" in first.stderr
    assert os.getsid(pid) == pid, "the node runs in its own session (no Ctrl-C)"
    records = (home / "deployments.json").read_text()
    block = ledger.w3.eth.block_number

    again = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert (again.returncode, again.stdout) == (0, url + "\n"), again.stderr
    assert f"anvil already running at {url} (pid {pid})" in again.stderr
    assert f"registry {ledger.address} on chain 31337" in again.stderr
    assert (home / "deployments.json").read_text() == records, "deployed twice"
    assert ledger.w3.eth.block_number == block, "a reused node needs no transaction"


def test_a_dataset_and_a_grant_survive_down_and_up(chain_dir: Path) -> None:
    port = free_port()
    url = chain("up", "--port", str(port), "--dir", str(chain_dir)).stdout.strip()
    ledger = Ledger.connect(url)
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    ds = register(ledger)
    req = ledger.request_access(ds, "CVD risk", "HMB|NCU", sender=researcher)
    ledger.approve(req, sender=owner)
    dataset = ledger.dataset(ds)
    pid = json.loads((chain_dir / "anvil.pid").read_text())["pid"]

    down = chain("down", "--dir", str(chain_dir))

    state = chain_dir / "anvil-state.json"
    assert down.stdout == f"stopped anvil (pid {pid}); chain saved in {state}\n"
    assert not alive(pid) and not (chain_dir / "anvil.pid").exists()
    with pytest.raises(ChainUnreachable):
        ledger.has_access(ds, researcher)
    status = chain("status", "--port", str(port), "--dir", str(chain_dir), code=1)
    assert status.stdout.startswith(f"no node runs from {chain_dir} ")

    chain("up", "--port", str(port), "--dir", str(chain_dir))

    again = Ledger.connect(url, deploy=False)
    assert again.address == ledger.address
    assert again.dataset(ds) == dataset
    assert again.request(req).status is Status.APPROVED
    assert again.has_access(ds, researcher)
    assert list(again.events()["event"]) == [
        "DatasetRegistered",
        "AccessRequested",
        "AccessGranted",
        "FeePaid",
    ]
    new_pid = json.loads((chain_dir / "anvil.pid").read_text())["pid"]
    assert chain("status", "--port", str(port), "--dir", str(chain_dir)).stdout == (
        f"anvil running at {url} (pid {new_pid}); chain kept in {state}\n"
        f"registry {again.address} on chain 31337: block "
        f"{again.w3.eth.block_number}, 1 datasets, 1 requests\n"
    )


def test_a_node_it_did_not_start_is_used_and_never_stopped(
    chain_dir: Path, home: Path
) -> None:
    with AnvilNode() as other:
        up = chain("up", "--port", str(other.port), "--dir", str(chain_dir))

        assert up.stdout == other.url + "\n"
        assert f"a node already answers at {other.url}, not started" in up.stderr
        assert not (chain_dir / "anvil.pid").exists()
        assert Ledger.connect(other.url, deploy=False).w3.eth.block_number == 1

        down = chain("down", "--dir", str(chain_dir))

        assert down.stdout == f"no node started from {chain_dir} is running\n"
        assert other.process is not None and other.process.poll() is None
        assert other._answers()


def test_a_pid_file_naming_another_process_is_stale_and_that_process_is_spared(
    chain_dir: Path,
) -> None:
    bystander = subprocess.Popen(["sleep", "60"])  # what a recycled pid may name
    try:
        chain_dir.mkdir(parents=True)
        (chain_dir / "anvil.pid").write_text(
            json.dumps({"pid": bystander.pid, "url": "http://127.0.0.1:1", "state": ""})
        )

        down = chain("down", "--dir", str(chain_dir))

        assert down.stdout == f"no node started from {chain_dir} is running\n"
        assert bystander.poll() is None, "down must only ever stop an anvil"
        assert not (chain_dir / "anvil.pid").exists(), "a stale record is removed"

        (chain_dir / "anvil.pid").write_text(
            json.dumps({"pid": bystander.pid, "url": "http://127.0.0.1:1", "state": ""})
        )
        port = free_port()
        up = chain("up", "--port", str(port), "--dir", str(chain_dir))

        assert f"anvil started at http://127.0.0.1:{port}" in up.stderr
        assert bystander.poll() is None
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait(10)


def test_up_on_a_port_taken_by_something_else_says_so_and_leaves_nothing(
    chain_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # accepts connections, never answers JSON-RPC
        port = busy.getsockname()[1]
        monkeypatch.setattr(
            sys,
            "argv",
            ["healthlab", "chain", "up", "--port", str(port), "--dir", str(chain_dir)],
        )
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer replaces it
        started = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            cli.main()

    out, err = capsys.readouterr()
    assert (stop.value.code, out) == (1, "")
    assert err.startswith("error: anvil (pid "), err
    assert f"exited before answering at http://127.0.0.1:{port}; is port {port} " in err
    assert "Pick another with --port" in err
    assert time.monotonic() - started < 20, "a failed start must not wait it out"
    assert not (chain_dir / "anvil.pid").exists()


def test_up_on_another_port_while_the_node_runs_is_refused(chain_dir: Path) -> None:
    port = free_port()
    url = chain("up", "--port", str(port), "--dir", str(chain_dir)).stdout.strip()
    other = free_port()

    refused = CliRunner().invoke(
        cli.app, ["chain", "up", "--port", str(other), "--dir", str(chain_dir)]
    )

    assert refused.exit_code == 1
    assert str(refused.exception) == (
        f"the node of {chain_dir} already runs at {url} (pid "
        f"{json.loads((chain_dir / 'anvil.pid').read_text())['pid']}); use its port, "
        f"or stop it first with `healthlab chain down --dir {chain_dir}`"
    )


# ------------------------------------------------------ a machine others share
def fake_proc(root: Path, uids: dict[int, int]) -> Path:
    """A /proc with one process per pid, run by the given uid."""
    for pid, uid in uids.items():
        entry = root / str(pid)
        entry.mkdir(parents=True)
        entry.joinpath("status").write_text(
            f"Name:\tbash\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )
    (root / "self").mkdir(exist_ok=True)  # not a pid: ignored
    return root


def test_other_people_are_found_but_services_and_nobody_are_not(
    tmp_path: Path,
) -> None:
    me = os.getuid()
    proc = fake_proc(tmp_path / "proc", {1: 0, 2: 101, 3: 65534, 4: me})
    assert other_users(proc) == ({0} if me != 0 else set())
    proc = fake_proc(tmp_path / "proc2", {10: me, 11: 1000, 12: 1001, 13: 1001})
    assert other_users(proc) == {1000, 1001} - {me}


def test_the_lab_chain_refuses_a_shared_machine_without_the_flag(
    tmp_path: Path,
) -> None:
    proc = fake_proc(tmp_path / "proc", {7: os.getuid(), 8: 4242})
    with pytest.raises(ConfigurationError, match="--shared-host") as refused:
        check_single_user(False, proc)
    assert "1 other user account" in str(refused.value)
    assert "4242" not in str(refused.value)  # no account named
    check_single_user(True, proc)  # the explicit, loud opt-in
    check_single_user(False, fake_proc(tmp_path / "alone", {7: os.getuid()}))


def test_chain_up_on_a_shared_machine_starts_nothing_unless_asked(
    chain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import healthlab.ledger.node as node

    monkeypatch.delenv("HEALTHLAB_SHARED_HOST", raising=False)
    monkeypatch.setattr(node, "other_users", lambda proc="/proc": {4242})
    port = free_port()
    result = chain("up", "--port", str(port), "--dir", str(chain_dir), code=1)
    assert "--shared-host" in str(result.exception or result.output)
    assert not (chain_dir / "anvil.pid").exists()
    with pytest.raises(ConfigurationError):
        LocalChain(chain_dir, port).up()
    started = LocalChain(chain_dir, port, shared_host=True).up()
    assert started.started and started.pid is not None
    assert (chain_dir.stat().st_mode & 0o777) == 0o700
