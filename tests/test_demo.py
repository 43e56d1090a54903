"""`make demo`'s walkthrough runs end to end and prints the event log."""

from __future__ import annotations

import subprocess
import sys

from healthlab.demo import HOSPITAL, walkthrough
from healthlab.ledger import Ledger


def test_walkthrough_produces_the_whole_flow() -> None:
    log = walkthrough(Ledger.local())
    assert list(log["event"]) == [
        "CollaborationCreated",
        "MemberSet",
        "MemberNamed",
        "DatasetRegistered",
        "DatasetRegistered",  # the stranger's copy: a dataset of its own
        "AccessRequested",
        "AccessGranted",
        "FeePaid",
        "AccessRevoked",
    ]


def test_demo_command_prints_each_step_and_the_log() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "healthlab.demo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out = done.stdout
    hospital_line = next(
        ln for ln in out.splitlines() if ln.startswith("dataset 1: owner")
    )
    copy_line = next(ln for ln in out.splitlines() if ln.startswith("dataset 2: owner"))
    assert hospital_line.endswith(HOSPITAL), "the hospital shows its verified name"
    assert copy_line.endswith("unverified"), "the stranger's copy is marked"
    assert "has access? True" in out and "has access? False" in out
    assert "paid out 0.01 ETH" in out
    assert out.index("AccessGranted") < out.index("AccessRevoked")
