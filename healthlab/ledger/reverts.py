"""What every client of a HealthLab contract shares: reading a revert's custom error
and its arguments, the ABI's error table, and turning a lost node into one named
error. The registry client (:class:`~healthlab.ledger.Ledger`) and the city score
oracle's (:class:`~healthlab.oracle.OracleClient`) both use these."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from eth_utils.abi import function_abi_to_4byte_selector
from web3.exceptions import ProviderConnectionError, Web3RPCError

from healthlab import errors

__all__ = [
    "CONNECTION_ERRORS",
    "ErrorTable",
    "error_table",
    "revert_data",
    "rpc_errors",
]

#: A contract's custom errors by 4-byte selector (hex): name, types, argument names.
ErrorTable = dict[str, tuple[str, list[str], list[str]]]

#: What a lost node raises through web3.
CONNECTION_ERRORS = (requests.exceptions.ConnectionError, ProviderConnectionError)


@contextmanager
def rpc_errors(url: str | None) -> Iterator[None]:
    """Turn a lost connection into :class:`~healthlab.errors.ChainUnreachable`."""
    try:
        yield
    except (*CONNECTION_ERRORS, requests.exceptions.Timeout) as exc:
        raise errors.ChainUnreachable(
            f"lost the Ethereum node at {url} ({type(exc).__name__}); is it still "
            "running? Start one with `make node` or check HEALTHLAB_RPC_URL"
        ) from exc
    except Web3RPCError as exc:
        if "insufficient funds" not in str(exc):
            raise
        raise errors.InvalidInput(
            "the sender cannot pay for this transaction (fee plus gas); fund the "
            "account first"
        ) from exc


def revert_data(exc: BaseException) -> str | None:
    """The revert payload as hex, from web3's error or eth-tester's raw bytes."""
    seen: BaseException | None = exc
    while seen is not None:
        data = getattr(seen, "data", None)
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            return data
        for arg in getattr(seen, "args", ()):
            if isinstance(arg, bytes):
                return "0x" + arg.hex()
            quote = next(
                (q for q in ("b'", 'b"') if isinstance(arg, str) and q in arg), ""
            )
            if quote:  # eth-tester: the repr of the bytes, b'…' or b"…"
                try:
                    raw = ast.literal_eval(arg[arg.index(quote) :])
                except (ValueError, SyntaxError):
                    continue
                if isinstance(raw, bytes):
                    return "0x" + raw.hex()
        seen = seen.__cause__ or seen.__context__
    return None


def error_table(abi: list[dict[str, Any]]) -> ErrorTable:
    """The custom errors of ``abi`` by selector."""
    table = {}
    for item in abi:
        if item["type"] == "error":
            selector = function_abi_to_4byte_selector(item).hex()  # type: ignore[arg-type]
            types = [i["type"] for i in item["inputs"]]
            table[selector] = (item["name"], types, [i["name"] for i in item["inputs"]])
    return table
