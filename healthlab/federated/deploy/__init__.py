"""Federated studies on Flower's deployment runtime: a SuperLink, a SuperNode per site.

The simulation (:func:`healthlab.federated.train`) runs every site in one process. In a
deployment each hospital runs its own **SuperNode** next to its data; the researcher
runs a **SuperLink** and launches the study against it with ``flwr run``. The apps are
the same: :mod:`healthlab.federated.deployed_client` wraps the site logic of
:mod:`~healthlab.federated.client_app` (grant gate, local training, held-out metrics)
and :mod:`healthlab.federated.deployed_server` runs the round loop of
:mod:`~healthlab.federated.server_app` (screening, minimum of sites, deadline, DP).

What each side holds
--------------------
* **A site** (its SuperNode's ``--node-config``): its name, its data (a CSV/Parquet
  file, or a table of a SQL database through a SQLAlchemy URL), the dataset id it is
  registered under, the chain (``rpc-url``, ``registry``) it reads grants from, and its
  key material: an X25519 key file for the pairwise masks that hide its totals in the
  pooled statistics. Nothing else leaves it: no rows, no per-site totals.
* **The study** (the app's run config): target, features, model, rounds, strategy,
  local training settings, the dataset ids taking part, and the researcher's EIP-712
  signature of the study's hash (:attr:`StudySpec.hash`). Every site checks the
  signature, the chain and registry it was made for, its freshness and the
  researcher's live grant on its dataset at its first message of a run, and the
  grant again before every round; it refuses (and sends nothing) otherwise.
* **Standardization** is federated: before the first round the sites exchange X25519
  public keys through the server and send their ``n``, ``Σx`` and ``Σxxᵀ`` as exact
  fixed-point digits plus pairwise masks that cancel in the sum, so the server learns
  only the pooled mean and (co)variance, from which it builds the public transform
  every site applies (standardization; whitening for ``linear``).

Worked example (loopback; one terminal per long-running command)
-----------------------------------------------------------------
::

    # 0. a chain with the registry
    healthlab node --port 8545
    export HEALTHLAB_RPC_URL=http://127.0.0.1:8545
    healthlab deploy                  # prints the registry address: 0xREGISTRY

Each site registers its data (the content hash is the file's sha256, or the hash of
the table as read) and the researcher obtains grants; e.g. from Python::

    from healthlab import Ledger, Site, sha256_of
    from healthlab.data import SQLStore, load_cohort

    SQLStore("sqlite:///site_b.db").write_table("cohort", load_cohort("site_b"))
    table = SQLStore("sqlite:///site_b.db").read_table("cohort")
    ledger = Ledger.connect()  # $HEALTHLAB_RPC_URL, the recorded registry
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    hashes = {
        "site_a": sha256_of("data_samples/cohort/site_a.csv"),
        "site_b": Site("site_b", table).content_hash,
    }
    for name, content in hashes.items():
        ds = ledger.register_dataset(
            f"https://{name}.example/cohort", content,
            terms="HMB", auto_approve=True, sender=owner,
        )  # dataset ids 1 and 2 on a fresh registry
        ledger.request_access(ds, "10-year CVD risk", "HMB", sender=researcher)

Then::

    # 1. the researcher's SuperLink (one port: Fleet, Control and Runtime APIs), with
    #    TLS (a study CA made in --tls-dir; sites get its ca.crt) and node
    #    authentication: each site's node-key.pub is registered
    healthlab superlink --port 9093 --tls-dir ~/.healthlab/superlink/tls \\
        --register ~/.healthlab/sites/site_a/node-key.pub \\
        --register ~/.healthlab/sites/site_b/node-key.pub

    # 2. one SuperNode per site, each with its own data, port and key material
    healthlab site-node --superlink 127.0.0.1:9093 --site site_a \\
        --root-certificates ~/.healthlab/superlink/tls/ca.crt \\
        --data data_samples/cohort/site_a.csv --dataset-id 1 \\
        --registry 0xREGISTRY --state-dir ~/.healthlab/sites/site_a \\
        --port 9101 --verify-content
    healthlab site-node --superlink 127.0.0.1:9093 --site site_b \\
        --root-certificates ~/.healthlab/superlink/tls/ca.crt \\
        --sql-url sqlite:///site_b.db --table cohort --dataset-id 2 \\
        --registry 0xREGISTRY --state-dir ~/.healthlab/sites/site_b \\
        --port 9102 --verify-content
    #    (the node writes a database URL to <state-dir>/database-url, mode 600: it
    #    never shows in a process list or environment; HEALTHLAB_DATABASE_URL of the
    #    starting shell works too)

    # 3. the study: signed by the researcher (HEALTHLAB_PRIVATE_KEY, or the node's
    #    unlocked account on a dev chain), written into a Flower App and run with
    #    `flwr run <app> healthlab --stream` (connection in $FLWR_HOME/config.toml)
    healthlab study --superlink 127.0.0.1:9093 --registry 0xREGISTRY \\
        --root-certificates ~/.healthlab/superlink/tls/ca.crt \\
        --researcher 0xRESEARCHER --datasets 1,2 --sites 2 \\
        --target cvd_event_10y --features age,sbp,smoker,diabetes \\
        --rounds 10 --result study.json

Each site's keys (``<state-dir>/mask-key.pem`` for the masks, ``<state-dir>/node-key``
and ``node-key.pub`` for node authentication; mode 600) are created on first start
(start the node once, or call :func:`make_node_key`, to get the public key to
register); ``--key PATH`` uses an existing mask key. The site runs only the
HealthLab ClientApp installed beside it (:mod:`~healthlab.federated.deploy.runtime`).
The SuperNode of a site that is not part of the signed study, whose researcher has
no live grant, or whose data differs from what was registered (``--verify-content``)
refuses, and the history shows it.

``healthlab study`` prints the history (round, sites, refusals, pooled held-out
loss/accuracy/AUC) and writes the result JSON; :func:`load_result` turns it into a
:class:`~healthlab.federated.FederatedResult` (``predict_proba``, ``history``,
``coefficients``, ``receipt``). From Python the same steps are :class:`SuperLink`,
:class:`SiteNode`, :meth:`StudySpec.sign` and :func:`launch_study`.

The processes run on loopback with their own ports, ``FLWR_HOME`` and temp dirs, and
are stopped by PID (SIGTERM, then their process group: Flower's SuperExec and app
processes). Stop the SuperNodes before the SuperLink.
"""

from healthlab.federated.deploy.launch import (
    APP_DIR,
    CONNECTION,
    DeployedStudy,
    build_app,
    launch_study,
    write_app,
    write_connection,
    write_run_config,
)
from healthlab.federated.deploy.pki import (
    TLSFiles,
    make_node_key,
    make_study_pki,
    node_public_point,
)
from healthlab.federated.deploy.processes import (
    SiteNode,
    SuperLink,
    find_flower,
    flower_env,
    require_flower,
)
from healthlab.federated.deploy.results import load_result
from healthlab.federated.deploy.site import (
    SiteConfig,
    bind_site_keys,
    ensure_state_dir,
    load_site_key,
)
from healthlab.federated.deploy.statistics import DeployedSites, InProcessNodes
from healthlab.federated.spec import MODEL_DEFAULTS, StudySpec

__all__ = [
    "APP_DIR",
    "CONNECTION",
    "MODEL_DEFAULTS",
    "DeployedSites",
    "DeployedStudy",
    "InProcessNodes",
    "SiteConfig",
    "SiteNode",
    "StudySpec",
    "SuperLink",
    "TLSFiles",
    "bind_site_keys",
    "build_app",
    "ensure_state_dir",
    "find_flower",
    "flower_env",
    "launch_study",
    "load_result",
    "load_site_key",
    "make_node_key",
    "make_study_pki",
    "node_public_point",
    "require_flower",
    "write_app",
    "write_connection",
    "write_run_config",
]
