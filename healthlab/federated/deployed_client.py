"""The site's ClientApp on Flower's deployment runtime (``app``, one SuperNode a site).

The site reads who it is from its SuperNode's node config (see
:class:`~healthlab.federated.deploy.SiteConfig`: ``site-name``, ``data-path`` or
``sql-url`` + ``table``, ``dataset-id``, ``rpc-url``, ``registry``, ``key-path``,
``state-dir``) and the study from the run config
(:class:`~healthlab.federated.spec.StudySpec`). It runs inside the site runtime
(:mod:`healthlab.federated.deploy.runtime`), which answers every message of the
site's SuperNode with this app and refuses any other app bundle; what must last
across the messages of a run lives in the run's ``context.state``.

The messages of a masked study (``secure="masked"``, the default) are answered by
:mod:`healthlab.federated.masked_site`, the same handlers the simulation runs; this
module is the deployment's :class:`DeployedSide`:

* the researcher's signature of the study is checked once a run (its chain,
  registry, freshness, that the nonce was not used in another run: ``state-dir``
  remembers them), the live grant on the site's dataset at every message;
* the members of a masked sum are exactly the signed study's datasets, with the mask
  keys their owners bound on chain (:func:`study_peers`); nothing of them comes from
  the server;
* a site started with ``require-secure`` (the default) refuses ``secure="none"``.

With ``secure="none"`` (operator's opt-in) ``train`` and ``evaluate`` are
:func:`healthlab.federated.client_app.make_client_app`'s in-clear handlers, on
features transformed with the public pooled preprocessing sent with the message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    SignatureInvalid,
)
from healthlab.federated.client_app import make_client_app
from healthlab.federated.deploy import (
    SiteConfig,
    ensure_state_dir,
    load_site_key,
)
from healthlab.federated.masked_site import (
    local_study,
    make_site_app,
    peer_id,
    refusal,
    state,
)
from healthlab.federated.spec import StudySpec
from healthlab.federated.study import Preprocessing, check_live_grant
from healthlab.ledger.client import sha256_of
from healthlab.site_data import at_site
from healthlab.sites import Site, read_table

__all__ = [
    "PREPROCESSING",
    "STATISTICS",
    "DeployedSide",
    "app",
    "load_site",
    "peer_id",
    "preprocessing_record",
    "statistics",
    "study_peers",
]

#: Content key of the public pooled preprocessing the server attaches to messages.
PREPROCESSING = "preprocessing"
#: Content key of a statistics message's request (and of the site's reply).
STATISTICS = "statistics"
_logger = logging.getLogger("healthlab.federated.site")


def preprocessing_record(prep: Preprocessing) -> ConfigRecord:
    """The public transform as a message record (``center``, row-major ``matrix``)."""
    matrix = np.asarray(prep.matrix, dtype=np.float64)
    return ConfigRecord(
        {
            "center": [float(c) for c in prep.center],
            "matrix": [float(v) for v in matrix.ravel()],
            "p": len(prep.center),
        }
    )


def _preprocessing(msg: Message, study: StudySpec) -> Preprocessing:
    content: Any = msg.content
    p = len(study.features)
    if PREPROCESSING not in content:
        if study.standardize:
            raise DataRefused(
                "the study standardizes features but the message carries no pooled "
                "preprocessing"
            )
        return Preprocessing.identity(p)
    record = content[PREPROCESSING]
    center = [float(c) for c in record["center"]]
    flat = np.asarray([float(v) for v in record["matrix"]], dtype=np.float64)
    if len(center) != p or flat.size != p * p or not np.isfinite(flat).all():
        raise DataRefused("the preprocessing sent with the message is malformed")
    rows = flat.reshape(p, p).tolist()
    return Preprocessing(tuple(center), tuple(tuple(r) for r in rows))


def load_site(config: SiteConfig, *, stateful: bool = False) -> Site:
    """The site's data, dataset, chain and key material, from its node config.

    ``stateful``: the site keeps what it answered (its auditor's memory) in
    ``state-dir``, as it does for statistics queries.

    A file is read again whenever it changes (size or modification time), a SQL
    table for every message; replay protection across messages and runs lives in
    ``state-dir``, not in memory.
    """
    ledger = _ledger(config.rpc_url, config.registry)
    data: Any
    key_path = config.key_path or (
        str(Path(config.state_dir) / "mask-key.pem") if config.state_dir else None
    )
    if config.data is not None:
        path = Path(config.data).expanduser()
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, key_path)
        if key not in _FILES:
            mask_key = load_site_key(key_path) if key_path is not None else None
            _FILES.clear()  # one site a runtime: keep only the current file
            _FILES[key] = (read_table(path), sha256_of(path), mask_key)
        frame, content_hash, mask_key = _FILES[key]
        # a new Site for every message (no state of one message leaks into the
        # next), on the file read once while it is unchanged
        site = Site(
            config.name,
            frame,
            dataset_id=config.dataset_id,
            ledger=ledger,
            content_hash=content_hash,
            mask_key=mask_key,
            state_dir=config.state_dir if stateful else None,
        )
        _verify_content(config, site)
        return site
    else:
        from healthlab.data.stores import SQLStore

        assert config.table is not None
        store = SQLStore(config.database_url())
        try:
            data = at_site(
                config.name,
                f"reading table {config.table!r}",
                (),
                store.read_table,
                config.table,
            )
        finally:
            store.close()
    site = _site(config, data, ledger, key_path, stateful)
    _verify_content(config, site)
    return site


#: A site's file as read (frame, content hash, mask key), kept while the file is
#: unchanged (size and modification time): the site runtime is one process.
_FILES: dict[tuple[str, int, int, str | None], tuple[Any, str, Any]] = {}
#: One chain connection per (node, registry) in the site runtime's process.
_LEDGERS: dict[tuple[str | None, str | None], Any] = {}


def _ledger(rpc_url: str | None, registry: str | None) -> Any:
    from healthlab.ledger import Ledger

    key = (rpc_url, registry)
    if key not in _LEDGERS:
        _LEDGERS[key] = Ledger.connect(rpc_url, registry, deploy=False)
    return _LEDGERS[key]


def _site(
    config: SiteConfig,
    data: Any,
    ledger: Any,
    key_path: str | None,
    stateful: bool = False,
) -> Site:
    # the site keeps one mask key (its own, bound on chain) across messages and runs
    return Site(
        config.name,
        data,
        dataset_id=config.dataset_id,
        ledger=ledger,
        mask_key=load_site_key(key_path) if key_path is not None else None,
        state_dir=config.state_dir if stateful else None,
    )


def _verify_content(config: SiteConfig, site: Site) -> None:
    if not config.verify_content:
        return
    assert site.ledger is not None
    registered = site.ledger.dataset(config.dataset_id).content_hash
    if registered.lower() != site.content_hash.lower():
        raise DataRefused(
            f"site {config.name}: the data loaded does not match the content hash "
            f"registered for dataset {config.dataset_id}"
        )


def _site_and_study(context: Context) -> tuple[SiteConfig, Site, StudySpec]:
    site_config = SiteConfig.from_node_config(context.node_config)
    study = StudySpec.from_run_config(context.run_config)
    return site_config, load_site(site_config), study


def _authorize(
    site: Site, site_config: SiteConfig, study: StudySpec, context: Context
) -> bool:
    """The researcher's signature, once per run (remembered in ``context.state``);
    returns whether this message was the first (the grant was checked with it)."""
    record = state(context)
    if record.get("study-hash") == study.hash:
        return False
    signed = study.signed_query()
    if signed is None:
        raise SignatureInvalid(
            f"site {site.name} only takes part in studies signed by a researcher"
        )
    if signed.query_hash.lower() != study.hash.lower():
        raise SignatureInvalid(
            f"site {site.name}: the study's settings differ from what the researcher "
            "signed"
        )
    if study.datasets and site.dataset_id not in study.datasets:
        raise AccessDenied(
            f"site {site.name}: dataset {site.dataset_id} is not part of the signed "
            f"study (datasets {list(study.datasets)})"
        )
    _check_nonce(site_config, signed.researcher, signed.nonce, context.run_id)
    site.authorize(signed, query_hash=study.hash)
    _record_nonce(site_config, signed.researcher, signed.nonce, context.run_id)
    record["study-hash"] = study.hash
    _logger.info("site %s: study %s authorized", site.name, study.hash[:10])
    return True


def _nonce_file(site_config: SiteConfig) -> Path | None:
    if site_config.state_dir is None:
        return None
    return ensure_state_dir(site_config.state_dir) / "signatures.json"


def _check_nonce(
    site_config: SiteConfig, researcher: str, nonce: int, run: int
) -> None:
    file = _nonce_file(site_config)
    if file is None or not file.exists():
        return
    used = json.loads(file.read_text())
    earlier = used.get(f"{researcher.lower()}:{nonce}")
    if earlier is not None and earlier != run:
        raise SignatureInvalid(
            f"site {site_config.name}: this signed study was already used in run "
            f"{earlier} (replay); the researcher must sign it again"
        )


def _record_nonce(
    site_config: SiteConfig, researcher: str, nonce: int, run: int
) -> None:
    file = _nonce_file(site_config)
    if file is None:
        return
    used = json.loads(file.read_text()) if file.exists() else {}
    used[f"{researcher.lower()}:{nonce}"] = run
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(used, indent=1))
    os.replace(tmp, file)


def _check_grant(site: Site, study: StudySpec) -> None:
    check_live_grant(site, study.researcher)


def study_peers(site: Site, study: StudySpec) -> dict[str, bytes]:
    """The members of a masked sum and their X25519 keys: exactly the datasets of
    the signed study, with the keys their owners bound on chain.

    Nothing comes from the server: a server cannot add a member whose key it holds,
    drop one, or substitute a key, so one site's masked totals stay closed to it.
    """
    assert site.ledger is not None
    if not study.datasets:
        raise DisclosureRefused(
            f"site {site.name}: a masked sum needs the study's datasets, signed by "
            "the researcher (StudySpec datasets=...)"
        )
    if site.dataset_id not in study.datasets:
        raise AccessDenied(
            f"site {site.name}: dataset {site.dataset_id} is not part of the signed "
            "study"
        )
    if len(study.datasets) < site.policy.min_sites:
        raise DisclosureRefused(
            f"site {site.name}: a pooled result needs at least "
            f"{site.policy.min_sites} sites; the study names {len(study.datasets)}"
        )
    peers: dict[str, bytes] = {}
    for dataset in study.datasets:
        bound = site.ledger.site_keys(dataset)
        if bound is None:
            raise DisclosureRefused(
                f"site {site.name}: dataset {dataset} of the study has no site keys "
                "bound on chain; its owner binds them (Ledger.bind_site_keys) before "
                "a masked sum"
            )
        peers[peer_id(dataset)] = bound.mask_key
    if peers[peer_id(int(site.dataset_id or 0))] != site.mask_public_key:
        raise DisclosureRefused(
            f"site {site.name}: its mask key is not the one bound to dataset "
            f"{site.dataset_id} on chain; bind this node's key (Ledger.bind_site_keys) "
            "or start the node with the bound key"
        )
    if len(set(peers.values())) != len(peers):
        raise DisclosureRefused(
            f"site {site.name}: two datasets of the study are bound to the same mask "
            "key; each site needs its own"
        )
    return peers


def _site_name(context: Context) -> str:
    return str(context.node_config.get("site-name", f"node {context.node_id}"))


def _check_secure(site_config: SiteConfig, study: StudySpec) -> None:
    if study.secure == "none" and site_config.require_secure:
        raise DisclosureRefused(
            f"site {site_config.name} sends nothing per site in clear: it takes part "
            'only in studies with secure="masked" (its operator may allow '
            "secure=none with require-secure=false)"
        )


class DeployedSide:
    """A deployed site: its node config, the signed run config, keys on chain."""

    def name(self, context: Context) -> str:
        return _site_name(context)

    def open(self, context: Context) -> tuple[Site, StudySpec]:
        _, site, study = _site_and_study(context)
        return site, study

    def join(self, site: Site, study: StudySpec, context: Context) -> None:
        config = SiteConfig.from_node_config(context.node_config)
        _check_secure(config, study)
        needs_key = study.standardize or study.secure != "none"
        if needs_key and config.key_path is None and config.state_dir is None:
            raise DisclosureRefused(
                f"site {site.name} has no key material for masked sums: start its "
                "node with key-path or state-dir"
            )

    def authorize(self, site: Site, study: StudySpec, context: Context) -> bool:
        config = SiteConfig.from_node_config(context.node_config)
        return _authorize(site, config, study, context)

    def check_grant(self, site: Site, study: StudySpec) -> None:
        _check_grant(site, study)

    def member(self, site: Site) -> str:
        return peer_id(int(site.dataset_id or 0))

    def peers(
        self, site: Site, study: StudySpec, proposed: Sequence[str] | None
    ) -> dict[str, bytes]:
        peers = study_peers(site, study)
        if proposed is not None and sorted(proposed) != sorted(peers):
            raise DisclosureRefused(
                f"site {site.name}: the server's members {sorted(proposed)} are not "
                f"the signed study's datasets {sorted(peers)}"
            )
        return peers


def _delegate(msg: Message, context: Context) -> Message:
    """secure="none": the simulation's in-clear ClientApp handler on this site."""
    try:
        site_config, site, study = _site_and_study(context)
        _check_secure(site_config, study)
        _authorize(site, site_config, study, context)
        prep = _preprocessing(msg, study)
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    # The signature was checked above against the deployment's study hash; Study.gate
    # checks the grant again before the round, as in the simulation.
    inner = make_client_app(local_study(site, study, prep))
    scoped = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={"partition-id": 0},
        state=context.state,
        run_config=context.run_config,
    )
    return inner(msg, scoped)


_REFUSED = (HealthLabError, OSError)

app = make_site_app(DeployedSide(), in_clear=_delegate)


@app.query("statistics")
def statistics(msg: Message, context: Context) -> Message:
    """One step of a statistics query (:mod:`healthlab.federated.deploy.answers`)."""
    from healthlab.federated.deploy.answers import answer

    config = SiteConfig.from_node_config(context.node_config)
    content: Any = msg.content
    try:
        body = bytes(content[STATISTICS]["body"])
    except (KeyError, TypeError):
        return refusal(msg, config.name, "a statistics message carries no request")
    reply = answer(body, config, int(context.run_id))
    return Message(
        RecordDict({STATISTICS: ConfigRecord({"body": reply})}), reply_to=msg
    )
