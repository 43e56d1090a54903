"""The ``healthlab`` command, for people who run a node.

Examples
--------
::

    healthlab node --port 8545 --state .healthlab/anvil-state.json   # a local dev chain
    healthlab deploy --rpc-url http://127.0.0.1:8545
    healthlab status --rpc-url http://127.0.0.1:8545
    healthlab datasets --rpc-url http://127.0.0.1:8545
    healthlab events --rpc-url http://127.0.0.1:8545

``--rpc-url`` defaults to ``$HEALTHLAB_RPC_URL`` and ``--registry`` to
``$HEALTHLAB_REGISTRY`` or the address recorded for that chain. Keys come only from
``$HEALTHLAB_PRIVATE_KEY`` / ``$HEALTHLAB_KEY_FILE`` or the node's unlocked accounts.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Annotated

import pandas as pd
import typer

from healthlab import __version__, errors
from healthlab.ledger.client import DEFAULT_REQUEST_TIMEOUT, Ledger
from healthlab.ledger.node import AnvilNode

app = typer.Typer(
    help="HealthLab: consent registry and studies on health data.",
    no_args_is_help=True,
    add_completion=False,
)

RpcUrl = Annotated[
    str | None,
    typer.Option(
        "--rpc-url", envvar="HEALTHLAB_RPC_URL", help="JSON-RPC URL of the node."
    ),
]
Registry = Annotated[
    str | None,
    typer.Option("--registry", envvar="HEALTHLAB_REGISTRY", help="Registry address."),
]


def _ledger(
    rpc_url: str | None, registry: str | None, *, deploy: bool = False
) -> Ledger:
    return Ledger.connect(rpc_url, registry, deploy=deploy)


def _show(frame: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        typer.echo(frame.to_string() if len(frame) else "(none)")


@app.command()
def deploy(
    rpc_url: RpcUrl = None,
    request_timeout: Annotated[
        int, typer.Option(help="Seconds before an unanswered request can be cancelled.")
    ] = DEFAULT_REQUEST_TIMEOUT,
) -> None:
    """Deploy a new registry and record its address for this chain."""
    ledger = Ledger.connect(
        rpc_url, None, request_timeout=request_timeout, deploy=True, new=True
    )
    typer.echo(f"registry at {ledger.address} on chain {ledger.chain_id}")


@app.command()
def status(rpc_url: RpcUrl = None, registry: Registry = None) -> None:
    """Show the node, the registry and its counters."""
    ledger = _ledger(rpc_url, registry)
    fns = ledger.contract.functions
    typer.echo(f"node            {ledger.rpc_url} (chain {ledger.chain_id})")
    typer.echo(f"registry        {ledger.address}")
    typer.echo(f"latest block    {ledger.w3.eth.block_number}")
    typer.echo(f"datasets        {fns.datasetCount().call()}")
    typer.echo(f"requests        {fns.requestCount().call()}")
    typer.echo(f"request timeout {fns.requestTimeout().call()} s")
    typer.echo(f"escrow + credit {ledger.balance(ledger.address)} wei")


@app.command()
def datasets(rpc_url: RpcUrl = None, registry: Registry = None) -> None:
    """List the registered datasets (the catalogue)."""
    _show(_ledger(rpc_url, registry).datasets())


@app.command()
def events(
    rpc_url: RpcUrl = None,
    registry: Registry = None,
    from_block: Annotated[int | None, typer.Option(help="First block.")] = None,
) -> None:
    """Print the registry's event log as a table."""
    frame = _ledger(rpc_url, registry).events(from_block=from_block)
    _show(frame.drop(columns=["args"]))


@app.command()
def node(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8545,
    state: Annotated[
        str | None, typer.Option(help="Keep the chain in this file across restarts.")
    ] = None,
) -> None:
    """Run a local anvil node until Ctrl-C (state kept in --state)."""
    anvil = AnvilNode(port, state_file=state).start()
    typer.echo(f"anvil listening on {anvil.url}; export HEALTHLAB_RPC_URL={anvil.url}")
    typer.echo(
        "Ctrl-C stops it" + (f" and saves the chain to {state}" if state else "")
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while anvil.process is not None and anvil.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        anvil.close()


@app.command()
def version() -> None:
    """Print HealthLab's version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point: run the app and turn HealthLab errors into one clear line."""
    try:
        app()
    except errors.HealthLabError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
