"""Table statistics' results: the pandas table users know, with typed metadata.

:func:`~healthlab.encrypted.describe`, :func:`~healthlab.encrypted.histogram`,
:func:`~healthlab.encrypted.crosstab`, :func:`~healthlab.encrypted.counts`,
:func:`~healthlab.encrypted.missing`, :func:`~healthlab.encrypted.corr`,
:func:`~healthlab.encrypted.cov` and :func:`~healthlab.encrypted.quantiles`
return a :class:`ResultTable`: a :class:`pandas.DataFrame` (``table.loc["mean",
"age"]``, ``table["age"]``, ``print(table)``, ``pd.testing.assert_frame_equal(
table, expected)`` all work as on any frame) whose released metadata are
attributes — ``receipt`` (always), ``missing``, ``suppressed``, ``outside``,
``percentiles``, ``noise``, ``n``, ``receipts`` — not ``DataFrame.attrs``, which
pandas documents as experimental.

Why a subclass and not a wrapper holding a frame: notebooks, the README and
users index, slice, print and compare these tables as frames, and a wrapper would
make every one of those a ``.table`` away. pandas' documented way to add
attributes to its structures ("Subclassing pandas data structures") is
``_metadata`` with ``_constructor`` properties, which carries them through what
pandas finalizes from one object: ``.loc``/``.iloc`` slices that stay tables,
``.head()``, ``.round()``, ``.copy()``, ``.T``, ``.astype()``, ``.rename()``.
Operations that combine several objects (``pd.concat``, ``merge``) give no
metadata (the attributes are ``None``). A column or row (``table["age"]``) is a
plain :class:`pandas.Series`, deliberately: ``pd.testing.assert_frame_equal``
compares a frame column by column with ``check_series_type``, so a Series
subclass would make every comparison of a result with pandas' own fail.
A derived table is not the released one: its receipt still names what was
released, and ``verify(t.receipt, t)`` holds for the table as returned only.
:meth:`ResultTable.to_frame` is the plain :class:`pandas.DataFrame` without any
of it (``pd.testing`` with the plain frame as ``left`` needs it, or
``check_frame_type=False``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd

from healthlab.receipts import Receipt

__all__ = ["ResultTable"]

#: The metadata every result table carries (pandas propagates these).
METADATA = [
    "receipt",
    "missing",
    "suppressed",
    "outside",
    "percentiles",
    "noise",
    "n",
    "receipts",
]


class ResultTable(pd.DataFrame):
    """A released table: a :class:`pandas.DataFrame` with its receipt and what the
    sites' rules left out, as attributes.

    Attributes
    ----------
    receipt : Receipt
        What produced the table under which grants (``verify(t.receipt, t)``).
    missing : int or None
        Rows the query left out for missing values (``dropna=True``) or outside
        the declared ``population``; ``None`` when that count is withheld (too
        few sites leave rows out: it would be one site's count). 0 when nothing
        could be left out.
    suppressed : list
        What the sites withheld, by name: groups (``describe(by=)``), bins as
        ``(left, right)`` (``histogram``), cells as ``(row level, column level)``
        (``crosstab``), levels (``counts``), columns (``missing``). Empty when
        nothing was withheld.
    outside : int or None
        ``histogram``: rows outside the edges (``None`` when withheld, and for
        the other statistics).
    percentiles : dict of str to ResultTable, or None
        ``describe(percentiles=)``: each column's brackets (``quantiles``'
        table, with their receipts). With ``by=``, keyed ``(group, column)``.
    noise : dict or None
        The Gaussian noise the sites added under their privacy budgets
        (``sd_per_total`` per query and total; ``None`` without a DP budget).
    n : int or None
        ``quantiles``: the pooled rows in ``range`` the quantiles are of.
    receipts : list of Receipt
        ``quantiles``: the receipt of every bisection step (each a count query);
        otherwise ``[receipt]``.
    """

    _metadata: ClassVar[list[str]] = METADATA

    receipt: Receipt
    missing: int | None
    suppressed: list[Any]
    outside: int | None
    percentiles: dict[Any, ResultTable] | None
    noise: dict[str, Any] | None
    n: int | None
    receipts: list[Receipt]

    @property
    def _constructor(self) -> type[ResultTable]:
        return ResultTable

    @classmethod
    def released(
        cls,
        table: pd.DataFrame,
        receipt: Receipt,
        *,
        missing: int | None = 0,
        suppressed: list[Any] | None = None,
        outside: int | None = None,
        percentiles: dict[Any, ResultTable] | None = None,
        noise: dict[str, Any] | None = None,
        n: int | None = None,
        receipts: list[Receipt] | None = None,
    ) -> ResultTable:
        """``table`` as released, with its receipt and metadata."""
        result = cls(table)
        values: dict[str, Any] = {
            "receipt": receipt,
            "missing": missing,
            "suppressed": list(suppressed or []),
            "outside": outside,
            "percentiles": percentiles,
            "noise": noise,
            "n": n,
            "receipts": list(receipts) if receipts is not None else [receipt],
        }
        for name, value in values.items():
            object.__setattr__(result, name, value)
        return result

    def to_frame(self) -> pd.DataFrame:
        """The table as a plain :class:`pandas.DataFrame` (no metadata)."""
        return pd.DataFrame(self, copy=True)
