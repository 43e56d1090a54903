"""Schemas of HealthLab's tables, and validation that never reveals a value.

Each table (the clinical ``cohort``, and the smart-city ``patients``, ``wearables``
and ``city_sensors``) has a :mod:`pandera` schema: its columns in order, their
dtypes, whether they may be missing, their plausible ranges and their keys.
:func:`validate` coerces a frame to the schema and raises
:class:`DataValidationError` naming the source, the column, the rule and the first
offending rows' positions. Offending values are never put in the message (nor in
the exception's chain): a log of a refused file must not leak a patient's data.

The ranges are wider than the samples' (real data is messier) but reject what
cannot be: an adult cohort's age is 18–110 years, a BMI 10–80 kg/m², a systolic
pressure 60–260 mmHg, total cholesterol 1–20 mmol/L, fasting glucose 1.5–40
mmol/L, a resting heart rate 25–220 bpm, a relative humidity 0–100 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.errors
import pandera.pandas as pa

from healthlab.errors import InvalidInput

__all__ = [
    "SCHEMAS",
    "DataValidationError",
    "Problem",
    "failure",
    "schema_for",
    "validate",
]

#: How many offending row positions a message lists per problem.
SHOWN_ROWS = 5

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_BINARY = [0, 1]


@dataclass(frozen=True)
class Problem:
    """One broken rule: a column (or None for the table), the rule, the rows."""

    column: str | None
    rule: str
    rows: tuple[int, ...] = ()  # 0-based positions of the first offending rows
    count: int = 0  # how many rows break the rule in all


class DataValidationError(InvalidInput):
    """A table does not match its schema.

    The message names the source (file or table), each offending column, the rule it
    breaks and the positions of the first offending rows; never their values.

    Attributes
    ----------
    source:
        The file path or table the data came from.
    problems:
        Every broken rule, in schema order.
    """

    def __init__(
        self, source: str, problems: Sequence[Problem], *, header_lines: int | None
    ) -> None:
        self.source = source
        self.problems = list(problems)
        self.header_lines = header_lines
        lines = [f"{source} does not match its schema:"]
        lines += [f"  - {self._describe(p)}" for p in self.problems]
        lines.append(
            "Fix the data where named (values are not shown, to keep them private)."
        )
        super().__init__("\n".join(lines))

    @property
    def column(self) -> str | None:
        """The column of the first problem (None when it concerns the whole table)."""
        return self.problems[0].column if self.problems else None

    @property
    def rows(self) -> tuple[int, ...]:
        """The first offending row positions (0-based) of the first problem."""
        return self.problems[0].rows if self.problems else ()

    def _describe(self, problem: Problem) -> str:
        where = f"column '{problem.column}'" if problem.column else "table"
        text = f"{where}: {problem.rule}"
        if problem.rows:
            noun = "row" if problem.count == 1 else "rows"
            label = "position" if len(problem.rows) == 1 else "positions"
            text += f" at {problem.count} {noun}: {label} "
            text += ", ".join(str(r) for r in problem.rows)
            if problem.count > len(problem.rows):
                text += f" and {problem.count - len(problem.rows)} more"
            if self.header_lines is not None:
                lines = ", ".join(str(r + self.header_lines + 1) for r in problem.rows)
                text += f" (file {'line' if len(problem.rows) == 1 else 'lines'} "
                text += f"{lines})"
        return text


def failure(
    source: str,
    column: str | None,
    rule: str,
    mask: Sequence[bool] | pd.Series | np.ndarray,
    *,
    header_lines: int | None = None,
) -> DataValidationError:
    """The error for rows where ``mask`` is true (by position) breaking ``rule``."""
    positions = [int(i) for i in np.flatnonzero(np.asarray(mask, dtype=bool))]
    problem = Problem(column, rule, tuple(positions[:SHOWN_ROWS]), len(positions))
    return DataValidationError(source, [problem], header_lines=header_lines)


def _ids(unique: bool = False) -> pa.Column:
    return pa.Column(str, pa.Check.str_matches(_ID), unique=unique)


def _number(
    dtype: str, low: float, high: float, *, nullable: bool = False
) -> pa.Column:
    return pa.Column(dtype, pa.Check.in_range(low, high), nullable=nullable)


def _flag() -> pa.Column:
    return pa.Column("int64", pa.Check.isin(_BINARY))


def _schema(
    name: str, columns: dict[str, pa.Column], unique: list[str] | None = None
) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        columns, name=name, strict=True, ordered=True, coerce=True, unique=unique
    )


SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "cohort": _schema(
        "cohort",
        {
            "patient_id": _ids(unique=True),
            "site": _ids(),
            "age": _number("int64", 18, 110),
            "sex": pa.Column(str, pa.Check.isin(["F", "M"])),
            "bmi": _number("float64", 10, 80, nullable=True),
            "sbp": _number("int64", 60, 260),
            "cholesterol": _number("float64", 1, 20, nullable=True),
            "glucose": _number("float64", 1.5, 40, nullable=True),
            "smoker": _flag(),
            "diabetes": _flag(),
            "cvd_event_10y": _flag(),
            "followup_years": _number("float64", 0, 10),
        },
    ),
    "patients": _schema(
        "patients",
        {
            "user_id": _ids(unique=True),
            "site": _ids(),
            # the registry accepts https:// or ipfs:// pointers of at most 512 bytes
            "record_pointer": pa.Column(
                str,
                [
                    pa.Check.str_matches(r"^(https|ipfs)://\S+$"),
                    pa.Check.str_length(max_value=512),
                ],
            ),
            "content_hash": pa.Column(
                str, pa.Check.str_matches(r"^0x[0-9a-f]{64}$"), unique=True
            ),
        },
    ),
    "wearables": _schema(
        "wearables",
        {
            "user_id": _ids(),
            "date": pa.Column("datetime64[ns]"),
            "city_id": _ids(),
            "bmi": _number("float64", 10, 80, nullable=True),
            "calories_burned": _number("float64", 0, 10_000, nullable=True),
            "steps": _number("float64", 0, 100_000, nullable=True),
            "resting_hr": _number("float64", 25, 220, nullable=True),
        },
        unique=["user_id", "date"],
    ),
    "city_sensors": _schema(
        "city_sensors",
        {
            "city_id": _ids(),
            "date": pa.Column("datetime64[ns]"),
            "humidity": _number("float64", 0, 100, nullable=True),
            "temperature": _number("float64", -60, 60, nullable=True),
            "uv_index": _number("float64", 0, 20, nullable=True),
        },
        unique=["city_id", "date"],
    ),
}


def schema_for(name: str) -> pa.DataFrameSchema:
    """The schema called ``name`` (one of :data:`SCHEMAS`)."""
    try:
        return SCHEMAS[name]
    except KeyError:
        known = ", ".join(sorted(SCHEMAS))
        raise InvalidInput(f"unknown schema {name!r}: use one of {known}") from None


def validate(
    frame: pd.DataFrame,
    schema: str | pa.DataFrameSchema,
    *,
    source: str,
    header_lines: int | None = None,
) -> pd.DataFrame:
    """Coerce ``frame`` to ``schema`` and check it; raise :class:`DataValidationError`.

    Rows are reported by position (0-based, whatever the frame's index); with
    ``header_lines`` (a CSV's header rows) also by their line number in the file.
    The returned frame has a fresh ``RangeIndex``.

    Examples
    --------
    >>> validate(frame, "cohort", source="site_a.csv")  # doctest: +SKIP
    """
    checked = schema_for(schema) if isinstance(schema, str) else schema
    frame, problems, unparsed = _parse_dates(frame.reset_index(drop=True), checked)
    try:
        # rows with an unreadable date are reported already; the others keep their
        # labels, which are their positions
        validated = checked.validate(frame.drop(index=unparsed), lazy=True)
    except pandera.errors.SchemaErrors as exc:
        problems += _problems(exc.failure_cases, list(frame.columns), checked)
    else:
        if not problems:
            return validated
    order = {name: i for i, name in enumerate(checked.columns)}
    problems.sort(key=lambda p: -1 if p.column is None else order.get(p.column, 0))
    # raised outside the except block: pandera's own message shows the values
    raise DataValidationError(source, problems, header_lines=header_lines)


def _parse_dates(
    frame: pd.DataFrame, schema: pa.DataFrameSchema
) -> tuple[pd.DataFrame, list[Problem], list[int]]:
    """Parse text date columns up front (pandera's fallback is slow on a bad date).

    Returns the frame with parsed dates, a problem per column with unreadable dates,
    and those rows' positions.
    """
    problems = []
    unparsed: set[int] = set()
    for name, column in schema.columns.items():
        if name not in frame.columns or not str(column.dtype).startswith("datetime"):
            continue
        raw = frame[name]
        if pd.api.types.is_datetime64_any_dtype(raw):
            continue
        parsed = pd.to_datetime(raw, format="ISO8601", errors="coerce")
        bad = np.flatnonzero((parsed.isna() & raw.notna()).to_numpy())
        if len(bad):
            rows = tuple(int(i) for i in bad[:SHOWN_ROWS])
            problems.append(Problem(name, "not a date (YYYY-MM-DD)", rows, len(bad)))
            unparsed.update(int(i) for i in bad)
        frame[name] = parsed
    return frame, problems, sorted(unparsed)


def _problems(
    cases: pd.DataFrame, columns: list[str], schema: pa.DataFrameSchema
) -> list[Problem]:
    """Turn pandera's failure cases into problems, dropping every failing value."""
    problems: list[Problem] = []
    table = cases[cases["schema_context"] == "DataFrameSchema"]
    for check, group in table.groupby("check", sort=False):
        if check == "column_in_dataframe":
            # the failure case is a column name the schema declares: not data
            missing = ", ".join(f"'{c}'" for c in group["failure_case"])
            problems.append(Problem(None, f"missing column(s) {missing}"))
        elif check == "column_in_schema":
            # a stray header could be a data row: report positions, not names
            extra = {str(c) for c in group["failure_case"]}
            places = [str(i) for i, c in enumerate(columns) if str(c) in extra]
            problems.append(
                Problem(
                    None, f"unexpected column(s) at position(s) {', '.join(places)}"
                )
            )
        elif check == "column_ordered":
            order = ", ".join(schema.columns)
            problems.append(Problem(None, f"columns are not in the order {order}"))
        elif check == "multiple_fields_uniqueness":
            keys = ", ".join(schema.unique or [])
            problems.append(_rows_problem(None, f"duplicate key ({keys})", group))
        else:
            problems.append(Problem(None, f"fails {check}"))
    for column, group in cases[cases["schema_context"] == "Column"].groupby(
        "column", sort=False
    ):
        checks = group["check"].astype(str)
        coercion = checks[checks.str.startswith("coerce_dtype")]
        if len(coercion):
            # later checks on an uncoercible column only repeat this failure
            dtype = coercion.iloc[0].removeprefix("coerce_dtype")
            problems.append(
                _rows_problem(
                    str(column), f"empty or not readable as {dtype.strip('()')}", group
                )
            )
            continue
        for check, rows in group.groupby("check", sort=False):
            problems.append(_rows_problem(str(column), _rule(str(check)), rows))
    return problems


def _rule(check: str) -> str:
    if check == "not_nullable":
        return "missing value"
    if check == "field_uniqueness":
        return "duplicate value"
    if check.startswith("in_range(") and check.endswith(")"):
        return f"outside the range [{check.removeprefix('in_range(')[:-1]}]"
    if check.startswith("isin(") and check.endswith(")"):
        return f"not one of {check.removeprefix('isin(')[:-1]}"
    return f"fails {check}"


def _rows_problem(column: str | None, rule: str, group: pd.DataFrame) -> Problem:
    if column is not None and rule.startswith("empty or not readable"):
        group = group[group["check"].astype(str).str.startswith("coerce_dtype")]
    positions = sorted({int(i) for i in group["index"].dropna()})
    return Problem(column, rule, tuple(positions[:SHOWN_ROWS]), len(positions))
