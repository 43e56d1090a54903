"""One error hierarchy for every refusal a HealthLab user can meet.

Each class carries a message that says what happened and what to do. Contract reverts
are decoded into the class named like the contract's custom error (for example the
contract's ``FeeChanged`` becomes :class:`FeeChanged`), so callers can catch either a
precise class or one of the families below.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "AccessAlreadyGranted",
    "AccessDenied",
    "AppBundleRefused",
    "ChainUnreachable",
    "ConfigurationError",
    "ContractError",
    "DataRefused",
    "DatasetInactive",
    "DisclosureRefused",
    "DownloadNotPermitted",
    "DownloadNotSettled",
    "DownloadsOutstanding",
    "DuplicateDataset",
    "EmptyPointer",
    "FeeChanged",
    "FeeTooLarge",
    "GrantDurationChanged",
    "HealthLabError",
    "HeldByTooFewSites",
    "InvalidEnvelope",
    "InvalidGrantDuration",
    "InvalidInput",
    "InvalidMaxPending",
    "InvalidPointer",
    "InvalidPrivateKey",
    "InvalidRequest",
    "InvalidSiteKeys",
    "KeyNotReleased",
    "NoActiveGrant",
    "NoPurpose",
    "NotADownloadGrant",
    "NotAuthorized",
    "NotAwaitingKey",
    "NotDatasetOwner",
    "NotFound",
    "NotPending",
    "NotRequester",
    "NothingToWithdraw",
    "PaymentFailed",
    "PurposeNotPermitted",
    "PurposeUnverified",
    "Reentrancy",
    "RefundAlreadyRequested",
    "RefundNotRequested",
    "ReleaseTooLate",
    "RequestAlreadyOpen",
    "ResultAlreadyRecorded",
    "SignatureInvalid",
    "SiteKeysUnverified",
    "StateConflict",
    "TooEarlyToCancel",
    "TooEarlyToRefund",
    "TooFewRows",
    "TooFewSites",
    "TooManyDropouts",
    "TooManyPending",
    "TransactionFailed",
    "UnknownCodes",
    "UnknownDataset",
    "UnknownRequest",
    "UnreadableFile",
    "WrongPayment",
    "ZeroAddress",
    "ZeroContentHash",
    "ZeroPurposeHash",
    "ZeroResultHash",
    "contract_error",
]


class HealthLabError(Exception):
    """Base class of every error HealthLab raises on purpose."""


class ConfigurationError(HealthLabError):
    """Something in the set-up (environment, key files, artifacts) is wrong."""


class ChainUnreachable(HealthLabError, ConnectionError):
    """The Ethereum node could not be reached."""


class InvalidInput(HealthLabError, ValueError):
    """An argument was rejected before anything was sent."""


class UnreadableFile(InvalidInput):
    """A data file the user supplied cannot be read as a table.

    It is empty or holds no rows, is binary or not UTF-8 text, has a row with more or
    fewer fields than its header, or is not a Parquet file. The message names the
    file, and the line and column where they are known, and says what to do; it never
    quotes the file's content (nor does the exception's chain).

    Attributes
    ----------
    path:
        The file.
    line:
        The 1-based line of the file where reading failed, if known.
    field:
        The 1-based position of the field on that line, if known.
    column:
        That field's column name, when a schema declares it (a file's own header is
        not quoted: a lost header's first row would be data).
    """

    def __init__(
        self,
        path: str,
        problem: str,
        fix: str,
        *,
        line: int | None = None,
        field: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.column = column
        where = f", line {line}" if line is not None else ""
        if column is not None:
            where += f", column '{column}'"
        elif field is not None:
            where += f", column {field}"
        super().__init__(f"{path}{where}: {problem}; {fix}")


class InvalidPrivateKey(ConfigurationError, InvalidInput):
    """A private key is not exactly 32 bytes written as 64 hex digits (``0x`` optional).

    The message says where the key came from (which environment variable or line of a
    key file), never the key or any part of it.
    """


class TransactionFailed(HealthLabError):
    """A transaction was mined but failed for a reason the node did not report."""


class SiteKeysUnverified(HealthLabError):
    """A site's node key read from the chain's logs does not match the stored hash.

    The node's logs are incomplete or altered (or the client reads logs from after the
    binding): no key is returned, since an unverified key is what a substitution
    attack would serve.
    """


class AccessDenied(HealthLabError, PermissionError):
    """A site refused to compute: no live grant, a bad signature, a replayed query."""


class SignatureInvalid(AccessDenied):
    """A query was not signed by the researcher it names (or was replayed/stale)."""


class KeyNotReleased(AccessDenied):
    """A download grant is live but its owner has not published the data key yet."""


class AppBundleRefused(AccessDenied):
    """A site was sent an app bundle other than the HealthLab app it runs."""


class DisclosureRefused(HealthLabError):
    """A site's disclosure policy refused the query (too few rows, differencing, …).

    Messages name columns, groups and counts of cells, never row-level values.
    """


class TooFewRows(DisclosureRefused):
    """A query, alone or with what a site answered before, would summarize fewer
    than the site's minimum of rows (the cell rule, differencing)."""


class TooFewSites(DisclosureRefused):
    """Fewer sites than the policy's minimum would take part in a pooled result."""


class HeldByTooFewSites(TooFewSites):
    """Together with earlier answers over the same sites, an answer would let a
    difference of pooled results be fewer sites' own (:mod:`healthlab.holders`)."""


class TooManyDropouts(TooFewSites):
    """Too many sites dropped out of a masked sum for it to be recovered, or for its
    groups to stay pooled over enough sites: nothing was released; ask again."""


class DataRefused(InvalidInput):
    """A site's data cannot be used as asked (missing values, infinities, ranges)."""


class ContractError(HealthLabError):
    """The registry contract refused the call (a revert with a named custom error).

    Attributes
    ----------
    error_name:
        The Solidity custom error's name.
    values:
        Its decoded arguments, by parameter name.
    """

    hint = "see the registry's NatSpec for this error"
    #: Who refused, as the message names it.
    contract = "the registry"

    def __init__(
        self, error_name: str, values: dict[str, Any], message: str | None = None
    ):
        self.error_name = error_name
        self.values = values
        super().__init__(message or self._default_message())

    def _default_message(self) -> str:
        shown = ", ".join(f"{k}={_show(v)}" for k, v in self.values.items())
        return (
            f"{self.contract} refused the call: {self.error_name}({shown}); {self.hint}"
        )


class NotAuthorized(ContractError, PermissionError):
    """The caller may not perform this operation."""


class NotFound(ContractError, LookupError):
    """A dataset or request id does not exist (or does not belong to this caller)."""


class InvalidRequest(ContractError, ValueError):
    """Arguments the contract rejected (bad pointer, zero hash, unknown codes, …)."""


class StateConflict(ContractError):
    """The operation does not fit the current state of the dataset or request."""


# ---------------------------------------------------------------- precise errors
class UnknownDataset(NotFound):
    hint = "list datasets with `Ledger.datasets()` and use one of their ids"


class UnknownRequest(NotFound):
    hint = (
        "list requests with `Ledger.requests()`; the id may belong to another dataset"
    )


class NotDatasetOwner(NotAuthorized):
    hint = "only the dataset's owner may do this: send from the owner's account"


class NotRequester(NotAuthorized):
    hint = "only the researcher who made this request may do this, from that account"


class EmptyPointer(InvalidRequest):
    hint = "give the dataset's location as `https://…` or `ipfs://…`"


class InvalidPointer(InvalidRequest):
    hint = "a pointer must start with `https://` or `ipfs://` and be at most 512 bytes"


class ZeroContentHash(InvalidRequest):
    hint = "pass the sha256 of the dataset's content (see `healthlab.ledger.sha256_of`)"


class ZeroPurposeHash(InvalidRequest):
    hint = "state a purpose: its salted hash goes on chain, never the text"


class ZeroResultHash(InvalidRequest):
    hint = "anchor the hash of a real result"


class DuplicateDataset(InvalidRequest):
    hint = "you registered this content already; use your existing dataset id"


class InvalidGrantDuration(InvalidRequest):
    hint = "grant_seconds must be at least 1 (and below 2**32)"


class FeeTooLarge(InvalidRequest):
    hint = "fees are limited to 2**88-1 wei"


class UnknownCodes(InvalidRequest):
    hint = "use only the codes in `healthlab.Codes`"


class NoPurpose(InvalidRequest):
    hint = "terms must permit at least one purpose (e.g. Codes.GRU or Codes.HMB)"


class PurposeNotPermitted(InvalidRequest):
    hint = (
        "the dataset's use terms do not allow this purpose: state a permitted"
        " purpose and attest every requirement (NCU, IRB, PUB) the terms set;"
        " nothing was paid"
    )


class DownloadNotPermitted(NotAuthorized):
    hint = (
        "this dataset is compute-only (its terms lack Codes.DL): run your study at the"
        " sites instead of downloading; nothing was paid"
    )


class NotADownloadGrant(StateConflict):
    hint = (
        "this grant is for computing at the sites only; to download, request again with"
        " download=True once it ends (the dataset's terms must include Codes.DL)"
    )


class InvalidEnvelope(InvalidRequest):
    hint = "a key envelope is 1 to 512 bytes: wrap the key with healthlab.storage"


class InvalidSiteKeys(InvalidRequest):
    hint = (
        "bind the site's X25519 public key (32 bytes, not zero) and its SuperNode's"
        " P-384 public key as the 97-byte uncompressed point 0x04 || X || Y"
        " (see `Ledger.bind_site_keys`)"
    )


class DatasetInactive(StateConflict):
    hint = (
        "the owner has closed this dataset; pending requests can be cancelled at once"
    )


class FeeChanged(StateConflict):
    """The owner changed the fee after you saw it; nothing was paid."""

    def _default_message(self) -> str:
        return (
            f"the dataset's fee changed from {self.values['agreedFee']} to "
            f"{self.values['currentFee']} wei before your request was mined; nothing "
            f"was paid. Request again with fee_wei={self.values['currentFee']} if you "
            "accept."
        )


class GrantDurationChanged(StateConflict):
    """The owner changed the grant duration after you saw it; nothing was paid."""

    hint = "request again with the dataset's current grant duration if you accept it"

    def _default_message(self) -> str:
        return (
            f"the dataset's grant duration changed from {self.values['agreedSeconds']}"
            f" to {self.values['currentSeconds']} s before your request was mined; "
            "nothing was paid. Request again with grant_seconds="
            f"{self.values['currentSeconds']} if you accept."
        )


class PurposeUnverified(HealthLabError):
    """A request's sealed purpose is not the text its on-chain hash commits to."""


class WrongPayment(StateConflict):
    hint = "send exactly the dataset's fee"


class RequestAlreadyOpen(StateConflict):
    hint = "you already have a pending request on this dataset: wait or cancel it"


class AccessAlreadyGranted(StateConflict):
    hint = (
        "you already hold a live grant on this dataset; request again once it expires"
    )


class NotPending(StateConflict):
    hint = "only a pending request can be approved, declined or cancelled"


class TooEarlyToCancel(StateConflict):
    hint = "an unanswered request can be cancelled once the timeout has passed"


class NoActiveGrant(StateConflict, PermissionError):
    hint = "there is no approved, unexpired, unrevoked grant for this researcher"


class NothingToWithdraw(StateConflict):
    hint = "there is no balance credited to this account"


class PaymentFailed(StateConflict):
    hint = "the receiving address rejected the ether; use `withdraw(to=…)` instead"


class ZeroAddress(InvalidRequest):
    hint = "give a real address to withdraw to"


class Reentrancy(StateConflict):
    hint = "withdraw cannot be re-entered"


class ResultAlreadyRecorded(StateConflict):
    hint = "this result hash is anchored already; verify it instead of recording it"


class EmptyQuery(InvalidRequest):
    hint = "log a query by its (non-zero) hash and the datasets it pools"


class TooManyDatasets(InvalidRequest):
    hint = "a logged query pools at most 1,000 datasets"


class UnknownCollaboration(NotFound):
    hint = "create the collaboration first (`Ledger.create_collaboration`)"


class NotCurator(NotAuthorized):
    hint = "only the collaboration's curator adds or removes its members"


class EmptyName(InvalidRequest):
    hint = "give the collaboration a public name of 1 to 200 bytes"


class InvalidPrivacyBudget(InvalidRequest):
    hint = (
        "give epsilon > 0, delta = 10^-k with 1 <= k <= 30 and a noise multiplier "
        "> 0 (or all zero to remove the budget)"
    )


class SpendDecreased(StateConflict):
    hint = "a grant's recorded privacy spend only grows"


class TooManyPending(StateConflict):
    hint = (
        "this dataset has as many requests waiting for a decision as its owner "
        "allows; try again later (nothing was paid)"
    )


class InvalidMaxPending(InvalidRequest):
    hint = "allow at least 1 pending request (close the dataset to stop requests)"


class DownloadsOutstanding(StateConflict):
    hint = (
        "download requests or grants waiting for their key are open: release the "
        "keys, decline the requests or refund the grants (Ledger.refund_download) "
        "before removing Codes.DL from the terms"
    )


class NotAwaitingKey(StateConflict):
    hint = "only a live download grant whose key was not released can be refunded"


class TooEarlyToRefund(StateConflict):
    hint = (
        "the owner may still release the key: a download grant's fee can be taken "
        "back once the request timeout has passed since the approval"
    )


class RefundNotRequested(StateConflict):
    hint = (
        "ask for the refund first (Ledger.request_download_refund): the owner then "
        "has a grace period to release the key"
    )


class RefundAlreadyRequested(StateConflict):
    hint = "the refund is asked for already: complete it once its time has come"


class DownloadNotSettled(StateConflict):
    hint = (
        "your earlier download grant on this dataset still holds its fee (the key "
        "never came): ask for the refund and complete it before requesting again"
    )


class ReleaseTooLate(HealthLabError):
    """A key release could land after the researcher's refund: not sent."""


_BY_NAME: dict[str, type[ContractError]] = {
    cls.__name__: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, ContractError)
}


def contract_error(name: str, values: dict[str, Any]) -> ContractError:
    """Build the exception for the contract's custom error ``name``."""
    return _BY_NAME.get(name, ContractError)(name, values)


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
