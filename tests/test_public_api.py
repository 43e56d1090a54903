"""The public names notebooks and users rely on exist and say what they are."""

from __future__ import annotations

import inspect

import pytest

import healthlab
from healthlab import Ledger

LEDGER_METHODS = [
    "local",
    "connect",
    "register_dataset",
    "update_dataset",
    "set_active",
    "request_access",
    "approve",
    "decline",
    "cancel",
    "revoke",
    "has_access",
    "withdraw",
    "record_result",
    "events",
    "dataset",
    "datasets",
    "request",
    "requests",
    "credit",
    "bind_site_keys",
    "site_keys",
]


def test_top_level_exports_are_declared() -> None:
    assert set(healthlab.__all__) == {
        "Codes",
        "DisclosurePolicy",
        "Site",
        "Ledger",
        "Status",
        "__version__",
        "errors",
        "sha256_of",
    }
    for name in healthlab.__all__:
        assert hasattr(healthlab, name), name


@pytest.mark.parametrize("name", LEDGER_METHODS)
def test_ledger_methods_are_documented(name: str) -> None:
    method = getattr(Ledger, name)
    assert inspect.getdoc(method), f"Ledger.{name} needs a docstring"


@pytest.mark.parametrize(
    "name",
    [
        "register_dataset",
        "request_access",
        "approve",
        "revoke",
        "withdraw",
        "bind_site_keys",
    ],
)
def test_state_changes_take_sender_as_keyword(name: str) -> None:
    parameter = inspect.signature(getattr(Ledger, name)).parameters["sender"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


def test_every_contract_error_has_its_own_exception() -> None:
    from healthlab import errors
    from healthlab.ledger.artifacts import load_artifact

    names = [i["name"] for i in load_artifact()["abi"] if i["type"] == "error"]
    for name in names:
        cls = getattr(errors, name, None)
        assert cls is not None and issubclass(cls, errors.ContractError), name
        assert cls.hint != errors.ContractError.hint or name == "FeeChanged", name
