"""A deployed site's answers to statistics queries (the SuperNode's side).

Every statistic of :mod:`healthlab.encrypted` reaches a deployed site as a few
``query.statistics`` messages, relayed by the study's ServerApp
(:mod:`~healthlab.federated.deploy.statistics`). Each carries one step of the secure
sum, and the site answers it with the same code a site in the researcher's process
runs — :class:`~healthlab.encrypted.protocol.SiteWork` and the computation the
installed package registers for the query's kind — on its own data, grant gate,
disclosure policy and auditor (kept in its ``state-dir`` across messages, runs and
restarts):

``hello``
    the site's public facts: name, dataset, disclosure policy, mask key;
``prepare``
    the researcher's signed query: signature, freshness, replay (a query hash is
    prepared once, whatever its signature's nonce, in any run and across restarts:
    ``state-dir``), live grant, the shared query log, the disclosure checks and the
    site's totals (kept here);
``announce``, ``count_holders``, ``contribute``, ``reveal``
    the steps of :meth:`~healthlab.encrypted.protocol.PreparedQuery.finish` (the
    grant checked on chain again before the contribution and the reveal: the
    server chooses when they come);
``levels``, ``vetoes``
    the two steps of :func:`healthlab.encrypted.levels`: the members are those the
    signed query names, and the vetoes answer only on the union of the members'
    offers, each tagged by its member for this site (a key from the mask keys
    bound on chain), never on levels of the server's choosing.

No code travels with a message: a step names a method of this fixed set and its
arguments are protocol objects read by :mod:`healthlab.encrypted.wire` (JSON, never
unpickled). The peers' mask keys a step names must be exactly the keys the owners of
the query's signed participants bound on chain, so a server cannot put a key of its
own among them. A refusal names the rule and the site, never a value; any other
error is logged at the site and answered without its message.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from healthlab.encrypted import wire
from healthlab.encrypted.keys import IntegrityError, PublicContext
from healthlab.encrypted.protocol import Query, SiteWork, computation_for
from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    SignatureInvalid,
)
from healthlab.federated.deploy.site import SiteConfig, ensure_state_dir
from healthlab.ledger.signing import SignedQuery
from healthlab.sites import Site

__all__ = ["STEPS", "answer", "forget", "public_policy"]

_logger = logging.getLogger("healthlab.federated.site")

#: What a statistics message may ask of a site.
STEPS = (
    "hello",
    "prepare",
    "announce",
    "count_holders",
    "contribute",
    "reveal",
    "levels",
    "vetoes",
)
#: Queries in progress: (run, site, query hash) -> the site's work (bounded).
_WORK: OrderedDict[tuple[int, str, str], Any] = OrderedDict()
_MAX_WORK = 256
#: Public CKKS contexts received, by fingerprint (deserialized once).
_PUBLIC: OrderedDict[str, PublicContext] = OrderedDict()
#: The queries a site without a state dir prepared (this process only).
_USED: dict[str, set[str]] = {}


def forget() -> None:
    """Drop what this process holds between messages (its site objects, queries in
    progress, public contexts), as a restart of the site runtime does; what the
    site keeps in its ``state-dir`` stays."""
    _WORK.clear()
    _SITES.clear()
    _PUBLIC.clear()


def public_policy(site: Site) -> dict[str, Any]:
    """The disclosure policy's public settings, as the researcher's side uses them."""
    policy = site.policy
    return {
        "min_rows": policy.min_rows,
        "max_param_ratio": policy.max_param_ratio,
        "min_sites": policy.min_sites,
        "min_difference": policy.min_difference,
        "max_query_age": policy.max_query_age,
        "grid_digits": policy.grid_digits,
        "min_contributors": policy.min_contributors,
        "grid": [[str(k), float(v)] for k, v in dict(policy.grid).items()],
    }


def answer(body: bytes, config: SiteConfig, run_id: int) -> bytes:
    """The site's reply (bytes) to one statistics message of run ``run_id``."""
    step = "?"
    try:
        request = wire.load(body)
        if not isinstance(request, Mapping) or request.get("step") not in STEPS:
            raise DataRefused(
                f"site {config.name} answers only the statistics steps {list(STEPS)}"
            )
        step = str(request["step"])
        args = request.get("args") or {}
        if not isinstance(args, Mapping):
            raise DataRefused("a statistics message's arguments are malformed")
        result = _STEP[step](config, run_id, args)
        return wire.dump({"ok": result})
    except HealthLabError as exc:
        _logger.info("site %s refused the %s step: %s", config.name, step, exc)
        return wire.dump({"refused": wire.error_to(exc)})
    except Exception:
        _logger.exception("site %s: the %s step failed", config.name, step)
        return wire.dump(
            {
                "refused": wire.error_to(
                    HealthLabError(
                        f"site {config.name} could not answer the {step} step; its "
                        "operator has the details in the site's log"
                    )
                )
            }
        )


def _site(config: SiteConfig) -> Site:
    """The site of ``config``, one object while its data is unchanged: what it
    remembers between messages (its auditor, a model fit's iterates) lasts across
    the steps of a statistic, and the auditor across runs and restarts too (in
    ``state-dir``)."""
    from healthlab.federated.deployed_client import load_site

    fresh = load_site(config, stateful=True)
    key = (config.name, config.dataset_id, config.state_dir)
    kept = _SITES.get(key)
    if kept is not None and kept.content_hash == fresh.content_hash:
        return kept
    _SITES[key] = fresh
    return fresh


#: One site object per (name, dataset, state dir) while its data is unchanged.
_SITES: dict[tuple[str, int | None, str | None], Site] = {}


def _hello(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    site = _site(config)
    return {
        "site": site.name,
        "dataset_id": int(site.dataset_id or 0),
        "policy": public_policy(site),
        "mask_key": site.mask_public_key,
        "content_hash": site.content_hash,
    }


def _keep(run_id: int, site: str, query_hash: str, work: Any) -> None:
    _WORK[(run_id, site, query_hash)] = work
    _WORK.move_to_end((run_id, site, query_hash))
    while len(_WORK) > _MAX_WORK:
        _WORK.popitem(last=False)


def _work(config: SiteConfig, run_id: int, args: Mapping[str, Any], kind: type) -> Any:
    key = (run_id, config.name, str(args.get("query_hash", "")))
    work = _WORK.get(key)
    if not isinstance(work, kind):
        raise DataRefused(
            "this site has no prepared query of that hash in this run; ask it with "
            "prepare first"
        )
    return work


def _first_use(config: SiteConfig, query: Query, signed: Any) -> Callable[[], None]:
    """Refuse a query this site answered before: the same signature (a replay) or
    the same query hash signed again (another nonce), in any run and across
    restarts (kept in ``state-dir``); return what records this one, called once the
    site accepted it (so that no stranger's signature takes room).

    A site's keys for a query come from its mask key and the query's hash alone,
    so a query prepared twice (two runs) opens a neighbour's sealed shares twice:
    told "dropped" in one run and "alive" in the other, the neighbours would give
    both of its seeds away, and with them its own totals."""
    if not isinstance(signed, SignedQuery):
        return lambda: None  # refused by Site.authorize
    marks = {
        f"query:{query.hash.lower()}",
        f"signature:{signed.researcher.lower()}:{int(signed.nonce)}",
    }
    file = (
        None
        if config.state_dir is None
        else ensure_state_dir(config.state_dir) / f"statistics-{config.name}.json"
    )

    def used() -> set[str]:
        if file is None:
            return _USED.setdefault(config.name, set())
        return set(json.loads(file.read_text())) if file.exists() else set()

    if marks & used():
        raise SignatureInvalid(
            f"site {config.name}: this query was already asked of this site (a "
            "replay, or the same query signed again); it answers a query once; "
            "sign a new one"
        )

    def record() -> None:
        known = used() | marks
        if file is None:
            _USED[config.name] = known
            return
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(known), indent=0))
        os.replace(tmp, file)

    return record


def _prepare(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    query = args["query"]
    if not isinstance(query, Query):
        raise DataRefused("a prepare message carries no query")
    site = _site(config)
    if site.ledger is None:
        raise DisclosureRefused(
            f"site {config.name} has no chain to check grants on; it answers no "
            "statistics"
        )
    accepted = _first_use(config, query, args.get("signed"))
    work = SiteWork(site, query, args.get("signed"), computation_for(query.kind))
    accepted()
    _keep(run_id, config.name, query.hash, work)
    out: dict[str, Any] = {
        "noise_sd": None if work.noise_sd is None else work.noise_sd.tolist()
    }
    if args.get("peers") is not None:  # the announcement, in the same message
        out["announced"] = work.announce(_bound_peers(work, args["peers"]))
    return out


#: The chain-bound mask keys of each query's participants, read at its first step.
_BOUND: weakref.WeakKeyDictionary[SiteWork, list[bytes]] = weakref.WeakKeyDictionary()


def _chain_keys(work: SiteWork) -> list[bytes]:
    ledger = work.site.ledger
    assert ledger is not None
    bound: list[bytes] = []
    for participant in work.query.participants:
        keys = ledger.site_keys(int(participant))
        if keys is None:
            raise DisclosureRefused(
                f"site {work.site.name}: dataset {participant} of the query has no "
                "site keys bound on chain; its owner binds them "
                "(Ledger.bind_site_keys) before a masked sum"
            )
        bound.append(bytes(keys.mask_key))
    return bound


def _bound_peers(work: SiteWork, peers: Any) -> dict[str, bytes]:
    """``peers`` (name -> mask key), checked against the chain: their keys are
    exactly those the owners of the query's signed participants bound, and this
    site's own is its own."""
    if not isinstance(peers, Mapping) or not all(
        isinstance(k, bytes) for k in peers.values()
    ):
        raise DataRefused("a step's peers are malformed")
    bound = _BOUND.get(work)
    if bound is None:  # read once per query: every step of it names the same keys
        bound = _chain_keys(work)
        _BOUND[work] = bound
    if sorted(peers.values()) != sorted(bound) or len(set(bound)) != len(bound):
        raise DisclosureRefused(
            f"site {work.site.name}: the peers' mask keys are not the keys bound on "
            "chain to the query's participants"
        )
    if peers.get(work.site.name) != work.site.mask_public_key:
        raise DisclosureRefused(
            f"site {work.site.name}: its mask key is not the one bound to dataset "
            f"{work.site.dataset_id} on chain"
        )
    return dict(peers)


def _live(site: Site, researcher: str | None) -> None:
    """The grant checked again before anything of an answer leaves the site: the
    server decides when a prepared query's steps come, and may hold one back until
    after the owner revoked the grant (or it expired)."""
    assert site.ledger is not None
    assert site.dataset_id is not None
    if researcher is None or not site.ledger.has_access(site.dataset_id, researcher):
        raise AccessDenied(
            f"site {site.name}: the grant on dataset {site.dataset_id} is no longer "
            "live (revoked or expired); this site answers nothing more of the query"
        )


def _announce(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    work = _work(config, run_id, args, SiteWork)
    return work.announce(_bound_peers(work, args["peers"]))


def _count_holders(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    work = _work(config, run_id, args, SiteWork)
    announced = args["announced"]
    if not isinstance(announced, list):
        raise DataRefused("a count message's announcements are malformed")
    holders = work.count_holders(_bound_peers(work, args["peers"]), announced)
    out: dict[str, Any] = {
        "holders": list(holders),
        "suppressed": list(work.suppressed),
        "missing_withheld": bool(work.missing_withheld),
    }
    ahead = args.get("contribute")
    if ahead is not None:  # the contribution, in the same message
        if not isinstance(ahead, Mapping):
            raise DataRefused("a count message's contribution request is malformed")
        out["contribution"] = _contribute(
            config, run_id, {**ahead, "query_hash": args["query_hash"]}
        )
    return out


def _contribute(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    work = _work(config, run_id, args, SiteWork)
    public = args.get("public")
    if isinstance(public, PublicContext):
        _PUBLIC[public.fingerprint] = public
        while len(_PUBLIC) > 8:
            _PUBLIC.popitem(last=False)
    else:
        public = _PUBLIC.get(str(args.get("fingerprint", "")))
        if public is None:
            raise DataRefused(
                "this site holds no public context of that fingerprint; send it"
            )
    peers = _bound_peers(work, args["peers"])
    _live(work.site, work.researcher)
    return work.contribute(peers, public)


def _reveal(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    work = _work(config, run_id, args, SiteWork)
    survivors = args["survivors"]
    confirms = args["confirms"]
    if not isinstance(survivors, list) or not isinstance(confirms, Mapping):
        raise DataRefused("a reveal message is malformed")
    _live(work.site, work.researcher)
    return work.reveal([str(s) for s in survivors], dict(confirms))


def _levels(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    from healthlab.encrypted.stats import SiteLevels

    query = args["query"]
    signed = args.get("signed")
    if not isinstance(query, Query) or query.kind != "levels":
        raise DataRefused("a levels message carries no levels query")
    column = str(query.spec.get("column"))
    if args.get("column") != column:
        raise DataRefused("a levels message names another column than its query")
    members = query.spec.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise DataRefused(
            "a levels query names its members (signed); ask through "
            "healthlab.encrypted.levels"
        )
    site = _site(config)
    if site.participant not in members or len(set(members)) != len(members):
        raise DataRefused(
            f"site {site.name} is not among this levels query's members, or a member "
            "is named twice"
        )
    accepted = _first_use(config, query, signed)
    researcher = site.authorize(signed, query_hash=query.hash)
    accepted()
    need = max(int(args.get("need") or 2), site.policy.min_sites, 2)
    site.check_owners(members, researcher, need)
    keys = _level_keys(site, query, members)
    held = SiteLevels(site, column, site.policy.min_rows)
    body = _offer_body(query.hash, site.participant, held.common)
    tags = {m: hmac.new(k, body, "sha256").hexdigest() for m, k in keys.items()}
    _keep(
        run_id,
        config.name,
        query.hash,
        _HeldLevels(held, site, researcher, query.hash, keys),
    )
    return {"common": held.common, "withholds": held.withholds, "tags": tags}


def _level_keys(site: Site, query: Query, members: list[str]) -> dict[str, bytes]:
    """Per other member (its dataset id), the key this site shares with it for this
    levels query: from the mask keys the members' owners bound on chain."""
    assert site.ledger is not None
    peers: dict[str, bytes] = {}
    for member in members:
        keys = site.ledger.site_keys(int(member))
        if keys is None:
            raise DisclosureRefused(
                f"site {site.name}: dataset {member} of the levels query has no site "
                "keys bound on chain; its owner binds them (Ledger.bind_site_keys)"
            )
        peers[member] = bytes(keys.mask_key)
    if peers[site.participant] != site.mask_public_key:
        raise DisclosureRefused(
            f"site {site.name}: its mask key is not the one bound to dataset "
            f"{site.dataset_id} on chain"
        )
    return site.pairwise_keys(
        peers,
        b"healthlab-levels",
        bytes.fromhex(query.hash[2:]),
        me=site.participant,
    )


def _offer_body(query_hash: str, member: str, common: frozenset[str]) -> bytes:
    return json.dumps([query_hash, member, sorted(str(c) for c in common)]).encode()


@dataclass
class _HeldLevels:
    """A site's levels of one ``levels`` query, whom it answers, and the keys it
    shares with the other members for it."""

    levels: Any  # healthlab.encrypted.stats.SiteLevels
    site: Site
    researcher: str | None
    query_hash: str
    keys: dict[str, bytes]


def _vetoes(config: SiteConfig, run_id: int, args: Mapping[str, Any]) -> Any:
    """The offered levels this site holds in too few rows. The candidates must be
    exactly the union of every member's offer, each offer carrying its member's tag
    for this site: a server cannot ask about a level no member offered (a site's
    answer would say that 1 to k - 1 of its rows hold it)."""
    held = _work(config, run_id, args, _HeldLevels)
    candidates = args["candidates"]
    offers = args.get("offers")
    if not isinstance(candidates, frozenset) or not isinstance(offers, Mapping):
        raise DataRefused("a vetoes message's candidates or offers are malformed")
    _WORK.pop((run_id, config.name, str(args["query_hash"])), None)  # asked once
    me = held.site.participant
    union = set(held.levels.common)
    for member, key in held.keys.items():
        offer = offers.get(member)
        if not isinstance(offer, Mapping) or not isinstance(offer.get("common"), list):
            raise IntegrityError(
                f"site {held.site.name}: the vetoes need every member's offer of "
                "levels; one is missing"
            )
        common = frozenset(str(c) for c in offer["common"])
        expected = hmac.new(
            key, _offer_body(held.query_hash, member, common), "sha256"
        ).hexdigest()
        if not hmac.compare_digest(expected, str(offer.get("tag", ""))):
            raise IntegrityError(
                f"site {held.site.name}: the offer of levels from dataset {member} "
                "does not carry its tag"
            )
        union |= common
    if frozenset(str(c) for c in candidates) != union:
        raise IntegrityError(
            f"site {held.site.name} (dataset {me}): the candidate levels are not the "
            "members' offers"
        )
    _live(held.site, held.researcher)
    return held.levels.vetoes(frozenset(union))


_STEP = {
    "hello": _hello,
    "prepare": _prepare,
    "announce": _announce,
    "count_holders": _count_holders,
    "contribute": _contribute,
    "reveal": _reveal,
    "levels": _levels,
    "vetoes": _vetoes,
}
