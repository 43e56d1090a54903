"""`make demo`'s walkthrough runs end to end and prints the event log."""

from __future__ import annotations

import subprocess
import sys

from healthlab.demo import walkthrough
from healthlab.ledger import Ledger


def test_walkthrough_produces_the_whole_flow() -> None:
    log = walkthrough(Ledger.local())
    assert list(log["event"]) == [
        "DatasetRegistered",
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
    assert "has access? True" in out and "has access? False" in out
    assert "paid out 0.01 ETH" in out
    assert out.index("AccessGranted") < out.index("AccessRevoked")
