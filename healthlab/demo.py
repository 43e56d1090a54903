"""The walkthrough ``make demo`` runs: the consent ledger end to end.

A curator names the hospital in an owner directory, the hospital registers a dataset,
a stranger registers a copy of it, and the researcher's catalogue tells the two apart
(the hospital's name, verified on chain; the copy ``unverified``). The researcher asks
for access and pays into escrow, the hospital approves and is paid the fee in that
transaction, a site checks the grant, and the hospital later revokes it. The event
log is printed as a table at the end.

Run ``python -m healthlab.demo`` (or ``--rpc-url URL`` to use a node instead).
"""

from __future__ import annotations

import argparse
import hashlib

import pandas as pd

from healthlab.ledger import Codes, Ledger
from healthlab.ledger.codes import describe
from healthlab.notebooks import ensure_directory

ETHER = 10**18
#: The hospital's name in the owner directory.
HOSPITAL = "St. Mary's Hospital (synthetic)"


def _step(text: str) -> None:
    print(f"\n== {text}")


def walkthrough(ledger: Ledger) -> pd.DataFrame:
    """Run the consent flow on ``ledger`` and return its event log."""
    hospital, researcher = ledger.accounts[1], ledger.accounts[2]
    stranger, curator = ledger.accounts[3], ledger.accounts[5]
    print(f"chain {ledger.chain_id}, registry {ledger.address}")
    print(f"hospital   {hospital}\nresearcher {researcher}")

    _step(
        "0. A curator (the consortium's office) names the hospital in an owner "
        "directory"
    )
    directory = ensure_directory(ledger, curator, {hospital: HOSPITAL})
    print(f"directory {directory}: {hospital} is {HOSPITAL!r}")

    _step(
        "1. The hospital registers a dataset: a pointer and a content hash, never rows"
    )
    content = b"synthetic cohort: age,sex,bmi,sbp,chol,event\n"
    pointer = "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    digest = "0x" + hashlib.sha256(content).hexdigest()
    terms = Codes.HMB | Codes.NCU | Codes.IRB
    ds = ledger.register_dataset(
        pointer,
        digest,
        fee_wei=ETHER // 100,
        grant_seconds=30 * 24 * 3600,
        terms=terms,
        sender=hospital,
    )
    d = ledger.dataset(ds)
    print(f"dataset {ds}: fee {d.fee_wei / ETHER} ETH, terms: {describe(d.terms)}")
    copy = ledger.register_dataset(pointer, digest, fee_wei=ETHER, sender=stranger)
    print(f"a stranger registers the same pointer and hash: dataset {copy}, its own")

    _step("The researcher's catalogue: whose data each is, verified on chain")
    for number in (ds, copy):
        owner = ledger.dataset(number).owner
        name = ledger.owner_name(directory, owner) or "unverified"
        print(f"dataset {number}: owner {owner[:10]}… {name}")

    _step(
        "2. The researcher requests access with purpose codes; the fee goes to escrow"
    )
    req = ledger.request_access(
        ds,
        purpose="Cardiovascular risk factors by sex, pooled across sites",
        codes=Codes.DS | Codes.NCU | Codes.IRB,
        sender=researcher,
    )
    r = ledger.request(req)
    print(f"request {req}: {r.status.name}, escrowed {r.amount_wei / ETHER} ETH")
    print(f"on chain: purpose hash {r.purpose_hash[:18]}… (the text stays off chain)")
    print(f"has access before approval? {ledger.has_access(ds, researcher)}")

    _step(
        "3. The hospital approves: a grant for the 30 days paid for, and the fee "
        "paid to the hospital in the same transaction"
    )
    r = ledger.approve(req, sender=hospital)
    assert r.expires_at is not None  # an approved request always has an expiry
    expires = pd.Timestamp(r.expires_at, unit="s", tz="UTC")
    print(f"request {req}: {r.status.name} until {expires:%Y-%m-%d %H:%M} UTC")
    paid = ledger.events().query("event == 'FeePaid'")["amount_wei"].sum()
    print(f"paid out {paid / ETHER} ETH to the hospital; nothing left in escrow")

    _step("4. A site checks the grant before computing")
    print(f"has access? {ledger.has_access(ds, researcher)}")

    _step("5. The hospital revokes the grant; sites stop at once")
    ledger.revoke(ds, researcher, sender=hospital)
    print(f"has access? {ledger.has_access(ds, researcher)}")
    print(f"request {req}: {ledger.request(req).status.name}")

    _step("The event log (anyone can read it)")
    log = ledger.events().drop(columns=["args", "tx"])
    log["account"] = log["account"].map(
        lambda a: a[:10] + "…" if isinstance(a, str) else a
    )
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(log.to_string(index=False))
    return log


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc-url", help="use this node instead of the embedded chain")
    args = parser.parse_args(argv)
    ledger = Ledger.connect(args.rpc_url) if args.rpc_url else Ledger.local()
    walkthrough(ledger)


if __name__ == "__main__":
    main()
