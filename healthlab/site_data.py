"""At the site: conversions of a site's rows whose errors never quote a value.

A researcher reads every error message. A raw pandas or numpy error quotes the cell
it failed on (``could not convert string to float: 'C00449'`` — a patient's
identifier), so every conversion a site makes of its rows for a query goes through
this module. A failure becomes a :class:`~healthlab.errors.DataRefused` that names
the site, the column, the rule and what to do — never a value, never a count. It is
raised outside the ``except`` block that caught the original and ``from None``, so
neither ``__cause__`` nor ``__context__`` of the error (nor
:func:`traceback.format_exception`) carries the original. The original goes to the
site's own log (the ``healthlab.site`` logger, at INFO level: not shown unless the
site's operator configures logging), which the operator may read and the researcher
does not.

Examples
--------
>>> numeric("hospital_a", kept, ["age", "bmi"])  # doctest: +SKIP
array([[52. , 35.6], ...])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from pandas.api import types

from healthlab.errors import DataRefused, HealthLabError

__all__ = ["at_site", "clean", "numeric", "numeric_column"]

#: The site operator's log: the original errors (which may quote values) go here.
site_log = logging.getLogger("healthlab.site")

T = TypeVar("T")

_NOT_NUMERIC = (
    "use levels() or crosstab() for a category, or have the site's operator recode "
    "it as a number"
)


def clean(error: HealthLabError) -> HealthLabError:
    """``error`` with no chained exception (``__cause__``/``__context__`` cleared)."""
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error


def at_site(
    site: str,
    what: str,
    columns: Sequence[str],
    compute: Callable[..., T],
    /,
    *args: Any,
    **kwargs: Any,
) -> T:
    """``compute(*args, **kwargs)`` at ``site``; any failure becomes a value-free error.

    A :class:`~healthlab.errors.HealthLabError` (a refusal the site's code raised on
    purpose) passes through with its chain cleared; any other exception (pandas,
    numpy, a driver) becomes :class:`~healthlab.errors.DataRefused` naming the site,
    ``what`` was computed, the ``columns`` and the exception's class only.
    """
    failure = ""
    own: HealthLabError | None = None
    try:
        return compute(*args, **kwargs)
    except HealthLabError as exc:
        own = exc
    except Exception as exc:  # every other error is turned into a clean one
        failure = type(exc).__name__
        site_log.info("site %s: %s failed", site, what, exc_info=True)
    # raised here, outside the except blocks: nothing is chained to the new error
    if own is not None:
        raise clean(own) from None
    shown = ", ".join(repr(c) for c in columns) or "the asked columns"
    raise DataRefused(
        f"site {site}: {what} over {shown} failed at the site ({failure}); check "
        "that every column is of the kind the statistic needs (numbers for moments "
        "and bins, categories for groups and tables) at every site; the site's "
        "operator finds the details in its own log (logger healthlab.site)"
    ) from None


def numeric(site: str, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """``frame[columns]`` as a float64 matrix (rows × columns), refused cleanly.

    Numbers and booleans (0/1) are taken as they are; text holding only numbers
    (``"37.25"``) is converted; text, dates, times and complex numbers are refused
    with :class:`~healthlab.errors.DataRefused` naming the site and the column.
    """
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        out[:, j] = numeric_column(site, frame[column], column)
    return out


def numeric_column(site: str, series: pd.Series, column: str) -> np.ndarray:
    """One column of a site's kept rows as float64 (see :func:`numeric`)."""
    dtype = series.dtype
    rule = ""
    values: np.ndarray | None = None
    if (
        types.is_datetime64_any_dtype(dtype)
        or types.is_timedelta64_dtype(dtype)
        or isinstance(dtype, pd.PeriodDtype)
    ):
        rule = (
            "holds dates or times, not numbers; have the site's operator convert it "
            "to a number (e.g. age in years, days since an event)"
        )
    elif types.is_complex_dtype(dtype):
        rule = "holds complex numbers; only real numbers can be summarized"
    elif types.is_bool_dtype(dtype) or types.is_numeric_dtype(dtype):
        values = at_site(site, "converting to numbers", [column], _as_float, series)
    else:  # text, mixed objects, categories: numbers written as text are accepted
        converted = at_site(site, "converting to numbers", [column], _parse, series)
        if converted is None:
            rule = f"holds text (or text mixed with numbers); {_NOT_NUMERIC}"
        else:
            values = converted
    if values is None:
        raise DataRefused(f"site {site}: column {column!r} {rule}") from None
    if not np.isfinite(values).all():
        raise DataRefused(
            f"site {site}: column {column!r} holds values that are not finite "
            "numbers; have the site's operator recode it as a number"
        ) from None
    return values


def _as_float(series: pd.Series) -> np.ndarray:
    return np.asarray(series.to_numpy(dtype=np.float64, na_value=np.nan))


def _parse(series: pd.Series) -> np.ndarray | None:
    """Numbers written as text, or None when any value is not a number."""
    try:
        parsed = pd.to_numeric(series, errors="coerce")
    except (TypeError, ValueError):
        return None
    if bool((pd.isna(parsed) & pd.notna(series)).any()):
        return None
    return _as_float(pd.Series(parsed))
