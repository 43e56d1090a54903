"""The committed artifacts match the sources, and the Slither gate can fail."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from healthlab.ledger.artifacts import load_artifact
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / "contracts"
PYTHON = ROOT / ".venv" / "bin" / "python"


def _solc_available() -> None:
    require("node")
    if not (CONTRACTS / "node_modules" / "solc").is_dir():
        require("solc-js (contracts/node_modules/solc)")


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("HealthLabRegistry", "src/HealthLabRegistry.sol"),
        ("test/ReentrantPayee", "test/ReentrantPayee.sol"),
        ("test/RevertingPayee", "test/ReentrantPayee.sol"),
        ("test/Multicall", "test/Multicall.sol"),
    ],
)
def test_artifact_records_its_source_and_compiler(name: str, source: str) -> None:
    artifact = load_artifact(name)
    text = (CONTRACTS / source).read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(text).hexdigest(), (
        f"{name} is stale: run `make contracts`"
    )
    assert artifact["compiler"]["version"].startswith("0.8.37+")
    assert artifact["settings"]["evmVersion"] == "prague"
    assert artifact["_generated"].startswith("GENERATED")
    assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 100


def test_artifacts_match_a_fresh_compile() -> None:
    _solc_available()
    done = subprocess.run(
        [str(PYTHON), str(CONTRACTS / "compile.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_registry_fits_the_contract_size_limit() -> None:
    runtime = bytes.fromhex(load_artifact()["deployedBytecode"][2:])
    assert len(runtime) <= 24_576, f"{len(runtime)} bytes exceeds EIP-170"


def _slither(root: Path) -> subprocess.CompletedProcess[str]:
    if not (ROOT / ".tools" / "slither" / "bin" / "slither").is_file():
        require("slither (.tools/slither)")
    _solc_available()
    return subprocess.run(
        [str(ROOT / "scripts" / "slither.sh"), str(root)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


def test_slither_gate_fails_on_a_seeded_reentrancy(tmp_path: Path) -> None:
    source = (CONTRACTS / "src" / "HealthLabRegistry.sol").read_text()
    safe = """        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);"""
    unsafe = """        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);
        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);"""
    assert safe in source, "the withdraw body changed: update this seeded bug"
    seeded = source.replace(safe, unsafe).replace(
        "internal nonReentrant returns", "internal returns"
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "HealthLabRegistry.sol").write_text(seeded)
    done = _slither(tmp_path)
    assert done.returncode != 0, "Slither must fail on a reentrant withdraw"
    assert "reentrancy-eth" in done.stdout + done.stderr


def test_slither_passes_the_registry() -> None:
    done = _slither(CONTRACTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 High/Medium findings" in done.stdout


def test_abi_exposes_no_function_taking_purpose_text() -> None:
    abi = load_artifact()["abi"]
    strings = [
        (item["name"], arg["name"])
        for item in abi
        if item["type"] in ("function", "event")
        for arg in item["inputs"]
        if arg["type"] == "string"
    ]
    # the only text on chain: pointers, a collaboration's public name and the
    # public names its curator gives members (an owner directory)
    assert sorted(strings) == [
        ("CollaborationCreated", "name"),
        ("DatasetRegistered", "pointer"),
        ("MemberNamed", "name"),
        ("createCollaboration", "name"),
        ("nameMember", "name"),
        ("registerDataset", "pointer"),
    ]
    assert json.dumps(abi).count("purposeHash") >= 2
    # the purpose travels only sealed (bytes), never as text
    (request,) = (i for i in abi if i.get("name") == "requestAccess")
    assert [a["type"] for a in request["inputs"]][-2:] == ["bytes32", "bytes"]
