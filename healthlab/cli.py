"""The ``healthlab`` command, for people who run a node.

Examples
--------
::

    healthlab chain up                    # the shared local node (detached), its URL
    healthlab chain status
    healthlab chain down                  # stop it; its chain stays in .healthlab/
    healthlab node --port 8545 --state .healthlab/anvil-state.json   # in the foreground
    healthlab deploy --rpc-url http://127.0.0.1:8545
    healthlab status --rpc-url http://127.0.0.1:8545
    healthlab datasets --rpc-url http://127.0.0.1:8545
    healthlab events --rpc-url http://127.0.0.1:8545
    healthlab superlink --port 9093                              # a study's SuperLink
    healthlab site-node --superlink 127.0.0.1:9093 --site site_a --data a.csv \\
        --dataset-id 1 --rpc-url http://127.0.0.1:8545           # one site's node
    healthlab study --superlink 127.0.0.1:9093 --target y --features a,b \\
        --rounds 5 --researcher 0x… --datasets 1,2               # launch a study
    healthlab report 06_study_report -p rounds=5 --out reports  # notebook -> HTML

The federated deployment (SuperLink, site nodes, studies) is documented with a worked
example in :mod:`healthlab.federated.deploy`.

``--rpc-url`` defaults to ``$HEALTHLAB_RPC_URL`` and ``--registry`` to
``$HEALTHLAB_REGISTRY`` or the address recorded for that chain. Keys come only from
``$HEALTHLAB_PRIVATE_KEY`` / ``$HEALTHLAB_KEY_FILE`` or the node's unlocked accounts.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import fields
from typing import Annotated, Any

import pandas as pd
import typer

from healthlab import __version__, errors
from healthlab._paths import home
from healthlab.federated.spec import StudySpec
from healthlab.ledger.client import DEFAULT_REQUEST_TIMEOUT, Ledger
from healthlab.ledger.node import AnvilNode, ChainProcess, LocalChain

#: A study's defaults, from the one place that holds them.
_STUDY: dict[str, Any] = {f.name: f.default for f in fields(StudySpec)}

app = typer.Typer(
    help="HealthLab: consent registry and studies on health data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a traceback must never print a key
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


def _request_total(ledger: Ledger) -> int:
    """Requests made on the registry: the sum of its datasets' request counters."""
    fns = ledger.contract.functions
    return sum(
        int(fns.requestCount(dataset_id).call())
        for dataset_id in range(1, int(fns.datasetCount().call()) + 1)
    )


@app.command()
def status(rpc_url: RpcUrl = None, registry: Registry = None) -> None:
    """Show the node, the registry and its counters."""
    ledger = _ledger(rpc_url, registry)
    fns = ledger.contract.functions
    typer.echo(f"node            {ledger.rpc_url} (chain {ledger.chain_id})")
    typer.echo(f"registry        {ledger.address}")
    typer.echo(f"latest block    {ledger.w3.eth.block_number}")
    typer.echo(f"datasets        {fns.datasetCount().call()}")
    typer.echo(f"requests        {_request_total(ledger)}")
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


chain_app = typer.Typer(
    help="The one local anvil node that notebooks, Voilà and reports share: "
    "detached, reused while it runs, its chain kept across restarts.",
    no_args_is_help=True,
)
app.add_typer(chain_app, name="chain")

ChainDir = Annotated[
    str,
    typer.Option(
        "--dir",
        envvar="HEALTHLAB_CHAIN_DIR",
        help="Folder of the node's state, pid and log files.",
    ),
]
ChainPort = Annotated[
    int,
    typer.Option(envvar="HEALTHLAB_CHAIN_PORT", help="Port on 127.0.0.1."),
]


def _describe(node: ChainProcess, running: str = "already running") -> str:
    if node.pid is None:
        return (
            f"a node already answers at {node.url}, not started by `healthlab chain "
            "up` from this folder: using it as it is (`chain down` leaves it alone)"
        )
    how = "started" if node.started else running
    return (
        f"anvil {how} at {node.url} (pid {node.pid}); chain kept in {node.state_file}"
    )


@chain_app.command("up")
def chain_up(
    port: ChainPort = 8545,
    directory: ChainDir = ".healthlab",
    deploy: Annotated[
        bool, typer.Option(help="Deploy the registry unless one is recorded.")
    ] = True,
    shared_host: Annotated[
        bool,
        typer.Option(
            "--shared-host",
            envvar="HEALTHLAB_SHARED_HOST",
            help="Start even where other users run processes: its port and dev "
            "accounts are open to them (a teaching chain with no real value only).",
        ),
    ] = False,
) -> None:
    """Start the shared node (or reuse it), deploy the registry once, print its URL.

    Messages go to stderr and only the URL to stdout, so a script can run
    ``export HEALTHLAB_RPC_URL=$(healthlab chain up)``. On a machine where other
    people run processes it refuses to start without ``--shared-host``: anvil's
    port on 127.0.0.1 is open to every local user, who could act as any account.
    """
    node = LocalChain(directory, port, shared_host=shared_host).up()
    typer.echo(_describe(node), err=True)
    if deploy:
        ledger = Ledger.connect(node.url)
        typer.echo(
            f"registry {ledger.address} on chain {ledger.chain_id} (recorded in "
            f"{home() / 'deployments.json'})",
            err=True,
        )
    typer.echo(
        f"export HEALTHLAB_RPC_URL={node.url}   # stop it with: healthlab chain down",
        err=True,
    )
    typer.echo(node.url)


@chain_app.command("status")
def chain_status(port: ChainPort = 8545, directory: ChainDir = ".healthlab") -> None:
    """Show the shared node and its registry; exit code 1 when none runs."""
    node = LocalChain(directory, port).status()
    if node is None:
        typer.echo(
            f"no node runs from {directory} or at 127.0.0.1:{port}; start one with "
            "`healthlab chain up`"
        )
        raise typer.Exit(1)
    typer.echo(_describe(node, "running"))
    try:
        ledger = Ledger.connect(node.url, deploy=False)
    except errors.ConfigurationError:
        typer.echo("registry: none recorded yet (`healthlab chain up` deploys one)")
        return
    fns = ledger.contract.functions
    typer.echo(
        f"registry {ledger.address} on chain {ledger.chain_id}: block "
        f"{ledger.w3.eth.block_number}, {fns.datasetCount().call()} datasets, "
        f"{_request_total(ledger)} requests"
    )


@chain_app.command("down")
def chain_down(directory: ChainDir = ".healthlab") -> None:
    """Stop the shared node by PID; anvil saves its chain to the state file."""
    node = LocalChain(directory).down()
    if node is None:
        typer.echo(f"no node started from {directory} is running")
        return
    typer.echo(f"stopped anvil (pid {node.pid}); chain saved in {node.state_file}")


@app.command()
def superlink(
    port: Annotated[
        int, typer.Option(help="Port on 127.0.0.1 (all Flower APIs).")
    ] = 9093,
    tls_dir: Annotated[
        str,
        typer.Option(
            help="The study's CA and the SuperLink's certificate (made if missing); "
            "give its ca.crt to every site."
        ),
    ] = "~/.healthlab/superlink/tls",
    host_name: Annotated[
        list[str] | None,
        typer.Option(help="Names/addresses sites dial (certificate SAN), repeatable."),
    ] = None,
    register: Annotated[
        list[str] | None,
        typer.Option(help="A site's node public key file to admit, repeatable."),
    ] = None,
    dataset: Annotated[
        list[int] | None,
        typer.Option(
            help="Admit the node bound on chain to this dataset, repeatable "
            "(needs --rpc-url and --registry)."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(help="DEVELOPMENT ONLY: no TLS and no node authentication."),
    ] = False,
    rpc_url: RpcUrl = None,
    registry: Registry = None,
) -> None:
    """Run a Flower SuperLink (TLS, node authentication) until Ctrl-C."""
    from pathlib import Path

    from healthlab.federated.deploy import SuperLink, make_study_pki

    tls = (
        None
        if insecure
        else make_study_pki(
            Path(tls_dir).expanduser(), tuple(host_name or ("localhost", "127.0.0.1"))
        )
    )
    link = SuperLink(port, tls=tls, insecure=insecure)
    link.start()
    for key in register or []:
        link.register_node(key)
        typer.echo(f"registered node key {key}")
    if dataset:
        for ds in link.register_datasets(_ledger(rpc_url, registry), dataset):
            typer.echo(f"registered the node bound to dataset {ds} on chain")
    if tls is not None:
        typer.echo(f"sites trust the study CA: --root-certificates {tls.ca_cert}")
    typer.echo(f"SuperLink on {link.address} (pid {link.pid}); Ctrl-C stops it")
    _follow(link)


@app.command("site-node")
def site_node(
    superlink: Annotated[
        str, typer.Option(help="The SuperLink's HOST:PORT.", show_default=False)
    ],
    site: Annotated[str, typer.Option(help="This site's public name.")],
    dataset_id: Annotated[
        int, typer.Option(help="The dataset id this data is registered under.")
    ],
    data: Annotated[
        str | None, typer.Option(help="The site's CSV or Parquet file.")
    ] = None,
    sql_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the site's database (default "
            "$HEALTHLAB_DATABASE_URL, read by the node: keeps passwords out of ps)."
        ),
    ] = None,
    table: Annotated[str | None, typer.Option(help="The table to read.")] = None,
    rpc_url: RpcUrl = None,
    registry: Registry = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="The site's X25519 key file (PEM, mode 600; created if missing). "
            "Default: <state-dir>/mask-key.pem."
        ),
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(help="The site's state (default ~/.healthlab/sites/<site>)."),
    ] = None,
    root_certificates: Annotated[
        str | None,
        typer.Option(help="The study CA's certificate (ca.crt from the SuperLink)."),
    ] = None,
    node_key: Annotated[
        str | None,
        typer.Option(
            help="The SuperNode's key (OpenSSH P-384; created if missing). "
            "Default: <state-dir>/node-key; register its .pub at the SuperLink."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(help="DEVELOPMENT ONLY: no TLS and no node key."),
    ] = False,
    port: Annotated[
        int | None, typer.Option(help="Port of the node's own API (default: free).")
    ] = None,
    verify_content: Annotated[
        bool,
        typer.Option(help="Refuse when the data differs from the registered hash."),
    ] = False,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the SuperLink.")
    ] = 120.0,
) -> None:
    """Run one site's Flower SuperNode (its data, its grant gate) until Ctrl-C."""
    from pathlib import Path

    from healthlab.federated.deploy import (
        SiteConfig,
        SiteNode,
        ensure_state_dir,
        load_site_key,
    )
    from healthlab.federated.deployed_client import load_site

    ledger = _ledger(rpc_url, registry)
    state = ensure_state_dir(
        state_dir or Path.home() / ".healthlab" / "sites" / site
    ).resolve()
    key_path = Path(key).expanduser().resolve() if key else state / "mask-key.pem"
    load_site_key(key_path)
    config = SiteConfig(
        name=site,
        dataset_id=dataset_id,
        rpc_url=str(ledger.rpc_url),
        registry=ledger.address,
        data=data,
        sql_url=sql_url,
        table=table,
        key_path=str(key_path),
        state_dir=str(state),
        verify_content=verify_content,
    ).resolved()
    loaded = load_site(config)  # fail now, not at the first round
    typer.echo(
        f"site {site}: {loaded.n_rows} rows, dataset {dataset_id} on chain "
        f"{ledger.chain_id} (registry {ledger.address})"
    )
    node = SiteNode(
        superlink,
        config,
        root_certificates=root_certificates,
        node_key=node_key,
        insecure=insecure,
        port=port,
    )
    if node.public_key_file is not None:
        typer.echo(f"site {site}: node public key {node.public_key_file}")
    node.start(timeout=connect_timeout)
    typer.echo(
        f"site {site}: SuperNode {node.node_id} connected to {superlink} "
        f"(pid {node.pid}); Ctrl-C stops it"
    )
    _follow(node)


@app.command("site-keys")
def site_keys(
    dataset_id: Annotated[
        int, typer.Option(help="The dataset this site's data is registered under.")
    ],
    state_dir: Annotated[
        str, typer.Option(help="The site's state (where its keys live).")
    ],
    bind: Annotated[
        bool,
        typer.Option(help="Bind the keys to the dataset on chain (as its owner)."),
    ] = False,
    owner: Annotated[
        str | None,
        typer.Option(
            envvar="HEALTHLAB_OWNER",
            help="The dataset owner's address (its key from HEALTHLAB_PRIVATE_KEY or "
            "HEALTHLAB_KEY_FILE, or the node's unlocked account).",
        ),
    ] = None,
    rpc_url: RpcUrl = None,
    registry: Registry = None,
) -> None:
    """Make a site's mask and node keys (once) and bind them to its dataset."""
    from pathlib import Path

    from healthlab.federated.deploy import (
        SiteConfig,
        bind_site_keys,
        ensure_state_dir,
        load_site_key,
        make_node_key,
    )

    ledger = _ledger(rpc_url, registry)
    state = ensure_state_dir(Path(state_dir)).resolve()
    load_site_key(state / "mask-key.pem")
    make_node_key(state / "node-key")
    config = SiteConfig(
        name="site",
        dataset_id=dataset_id,
        rpc_url=str(ledger.rpc_url),
        registry=ledger.address,
        data="unused",
        state_dir=str(state),
    )
    if bind:
        bound = bind_site_keys(ledger, config, sender=owner)
        typer.echo(
            f"dataset {dataset_id}: mask key {bound.mask_key.hex()[:16]}… and node "
            f"key {state / 'node-key.pub'} bound on chain"
        )
    current = ledger.site_keys(dataset_id)
    typer.echo(
        f"dataset {dataset_id}: "
        + ("no keys bound on chain" if current is None else "keys bound on chain")
        + f"; node public key for the SuperLink: {state / 'node-key.pub'}"
    )


@app.command()
def study(
    superlink: Annotated[
        str, typer.Option(help="The SuperLink's HOST:PORT.", show_default=False)
    ],
    target: Annotated[str, typer.Option(help="The outcome column.")],
    features: Annotated[str, typer.Option(help="Comma-separated feature columns.")],
    researcher: Annotated[
        str,
        typer.Option(
            envvar="HEALTHLAB_RESEARCHER", help="The researcher who signs the study."
        ),
    ],
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _STUDY["rounds"],
    model: Annotated[str, typer.Option(help="logistic | linear | mlp.")] = _STUDY[
        "model"
    ],
    strategy: Annotated[
        str, typer.Option(help="fedavg | fedprox | fedadam | trimmed | median.")
    ] = _STUDY["strategy"],
    datasets: Annotated[
        str, typer.Option(help="Comma-separated dataset ids taking part.")
    ] = "",
    sites: Annotated[
        int, typer.Option(help="Site nodes to wait for (default: --min-sites).")
    ] = 0,
    min_sites: Annotated[int, typer.Option(help="Fewest sites per round.")] = _STUDY[
        "min_sites"
    ],
    epochs: Annotated[
        int | None,
        typer.Option(help="Local epochs per round.  [default: the model's]"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Local learning rate.  [default: the model's]"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed (held-out split, init).")] = _STUDY[
        "seed"
    ],
    test_fraction: Annotated[float, typer.Option(help="Held-out share.")] = _STUDY[
        "test_fraction"
    ],
    standardize: Annotated[
        bool, typer.Option(help="Pooled standardization from masked sums.")
    ] = _STUDY["standardize"],
    dropna: Annotated[
        bool, typer.Option(help="Drop rows with missing values at the sites.")
    ] = _STUDY["dropna"],
    node_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the site nodes.")
    ] = _STUDY["node_timeout"],
    round_timeout: Annotated[float, typer.Option(help="Round deadline (s).")] = _STUDY[
        "round_timeout"
    ],
    result: Annotated[
        str | None,
        typer.Option(help="Write the result JSON here (a path on the SuperLink host)."),
    ] = None,
    root_certificates: Annotated[
        str | None,
        typer.Option(help="The study CA's certificate (the SuperLink's ca.crt)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="DEVELOPMENT ONLY: reach the SuperLink without TLS.")
    ] = False,
    rpc_url: RpcUrl = None,
    registry: Registry = None,
) -> None:
    """Sign a federated study and run it against a SuperLink (flwr run --stream)."""
    from pathlib import Path

    from healthlab.federated.deploy import launch_study

    ledger = _ledger(rpc_url, registry)
    config = StudySpec(
        target=target,
        features=tuple(c.strip() for c in features.split(",") if c.strip()),
        model=model,
        rounds=rounds,
        strategy=strategy,
        epochs=epochs,
        lr=lr,
        seed=seed,
        test_fraction=test_fraction,
        dropna=dropna,
        standardize=standardize,
        min_sites=min_sites,
        datasets=tuple(int(d) for d in datasets.split(",") if d.strip()),
        expected_sites=sites,
        node_timeout=node_timeout,
        round_timeout=round_timeout,
        result_path=str(Path(result).expanduser().resolve()) if result else "",
    ).sign(ledger, researcher)
    typer.echo(f"study {config.hash} signed by {config.researcher}")
    run = launch_study(
        superlink,
        config,
        ledger=ledger,
        root_certificates=root_certificates,
        insecure=insecure,
        echo=typer.echo,
    )
    history = run.history.drop(columns=["per_site", "rejected"], errors="ignore")
    _show(history)
    typer.echo(f"{len(history)} round(s) in {run.seconds:.1f} s")
    if result:
        typer.echo(f"result: {config.result_path}")


def _follow(process: Any) -> None:
    """Echo a Flower process's output until it exits or Ctrl-C/SIGTERM; stop it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    shown: dict[int, int] = {}
    try:
        while process.running:
            for i, text in enumerate(process.logs()):
                if len(text) > shown.get(i, 0):
                    typer.echo(text[shown.get(i, 0) :], nl=False)
                    shown[i] = len(text)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        process.close()


@app.command()
def report(
    notebook: Annotated[
        str, typer.Argument(help="Notebook name or number in notebooks/.")
    ] = "06_study_report",
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="NAME=VALUE, repeatable; JSON values (5, 0.5, '[\"age\"]') or text. "
            "Never keys: parameters are written into the report.",
        ),
    ] = None,
    out: Annotated[
        str, typer.Option(help="Folder for the executed notebook and its HTML.")
    ] = "reports",
    code: Annotated[
        bool, typer.Option("--code/--no-code", help="Show code cells in the HTML.")
    ] = False,
) -> None:
    """Run a notebook headless (papermill) and write it as a static HTML report."""
    from healthlab.notebooks import (
        export_html,
        parse_parameters,
        run_notebook,
        summary,
    )

    executed = run_notebook(notebook, parse_parameters(param or []), out)
    html = export_html(executed, no_input=not code)
    typer.echo(summary(executed))
    typer.echo(f"report: {html}\nexecuted notebook: {executed}")


@app.command()
def demo(
    out: Annotated[
        str, typer.Option(help="Folder for the executed notebooks and their HTML.")
    ] = "reports",
) -> None:
    """Run every notebook headless on the embedded chain; one line per notebook.

    ``HEALTHLAB_RPC_URL`` and ``HEALTHLAB_REGISTRY`` are ignored, so the results are
    the same on every machine (``make demo``). Exit code 1 if any notebook failed.
    """
    import os
    from pathlib import Path

    from healthlab.notebooks import NOTEBOOKS_DIR, export_html, run_notebook, summary

    for name in ("HEALTHLAB_RPC_URL", "HEALTHLAB_REGISTRY"):
        os.environ.pop(name, None)
    notebooks = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    if not notebooks:
        raise errors.ConfigurationError(f"no notebooks in {NOTEBOOKS_DIR}")
    lines, failed = [], 0
    started = time.monotonic()
    for path in notebooks:
        typer.echo(f"running {path.stem} …", err=True)
        try:
            html = export_html(run_notebook(path.stem, {}, out))
        except errors.HealthLabError as exc:
            failed += 1
            lines.append(f"  {path.stem}: FAILED — {exc}")
            continue
        lines.append(f"  {summary(html.with_suffix('.ipynb'))} -> {html.name}")
    typer.echo(f"\nreports in {Path(out).resolve()} (open the .html files):")
    typer.echo("\n".join(lines))
    typer.echo(
        f"{len(notebooks) - failed} of {len(notebooks)} notebooks ran in "
        f"{time.monotonic() - started:.0f} s"
    )
    if failed:
        raise typer.Exit(1)


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
