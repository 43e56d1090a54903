"""Site data stores: pandas tables in SQLite (the default) or PostgreSQL.

A :class:`SQLStore` writes and reads whole tables through SQLAlchemy. Next to the
tables it keeps one small catalogue table, ``healthlab_columns``, with each written
column's pandas dtype, so that :meth:`SQLStore.read_table` gives back the dtypes
that were written (SQLite has no date or boolean type; both databases lose
pandas' distinction between ``str`` and ``object``, ``int64`` and ``Int64``), and
a hidden column ``healthlab_row`` that numbers the rows, so that reads return them
in the order they were written (SQL promises no order otherwise). Tables written by
other tools are read as they are, in the database's order.

Missing values in an ``object`` column come back as ``NaN`` (whether they were
``None`` or ``NaN``); datetimes keep microseconds (PostgreSQL's precision).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pandas as pd
import sqlalchemy as sa

from healthlab._paths import home
from healthlab.data.schemas import failure, validate
from healthlab.errors import ConfigurationError, InvalidInput

__all__ = ["CATALOGUE", "ROW", "SQLStore", "UnknownTable", "default_url"]

#: The table holding each stored column's pandas dtype.
CATALOGUE = "healthlab_columns"
#: A hidden column numbering the rows, so that reads return the written order.
ROW = "healthlab_row"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class UnknownTable(InvalidInput, LookupError):
    """The store has no table of that name."""


def default_url() -> str:
    """``$HEALTHLAB_DATABASE_URL``, else SQLite in ``$HEALTHLAB_HOME/sites.db``."""
    return os.environ.get("HEALTHLAB_DATABASE_URL") or (
        f"sqlite:///{home() / 'sites.db'}"
    )


def _sql_type(dtype: Any, column: str) -> Any:
    """The SQL column type that stores ``dtype`` without loss."""
    kind = getattr(dtype, "kind", "O")
    if isinstance(dtype, pd.DatetimeTZDtype):
        raise InvalidInput(
            f"column {column!r}: time-zone aware datetimes are not supported; "
            "convert to UTC and drop the zone (`.dt.tz_convert(None)`)"
        )
    if str(dtype) == "uint64":
        raise InvalidInput(f"column {column!r}: uint64 does not fit SQL's BIGINT")
    if kind == "b":
        return sa.Boolean()
    if kind in "iu":
        return sa.BigInteger()
    if kind == "f":
        return sa.Double()
    if kind == "M":
        return sa.DateTime()
    if isinstance(dtype, pd.StringDtype) or str(dtype) in ("object", "str"):
        return sa.Text()
    raise InvalidInput(
        f"column {column!r}: dtype {dtype} cannot be stored; use numbers, booleans, "
        "strings or naive datetimes"
    )


class SQLStore:
    """Tables of one site in a SQL database, read and written as DataFrames.

    Parameters
    ----------
    url:
        A SQLAlchemy URL: ``sqlite:///path/to/site.db`` or
        ``postgresql://user:password@host:port/database`` (driver: psycopg 3).
        Default: ``$HEALTHLAB_DATABASE_URL``, else ``sqlite:///$HEALTHLAB_HOME/sites.db``.

    Examples
    --------
    >>> store = SQLStore("sqlite:///site_a.db")
    >>> store.write_table("cohort", load_cohort("site_a"))
    >>> store.read_table("cohort", columns=["age", "sbp"]).shape
    (2400, 2)
    """

    def __init__(self, url: str | None = None) -> None:
        url = url or default_url()
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise InvalidInput(
                "not a database URL: use sqlite:///PATH or postgresql://USER@HOST/DB"
            ) from None
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            # hide_parameters: a failed INSERT must not print rows into a log
            self.engine = sa.create_engine(parsed, hide_parameters=True)
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                f"no database driver for {parsed.drivername}: install it "
                f"({exc.name}); PostgreSQL uses psycopg (`pip install psycopg[binary]`)"
            ) from None
        if parsed.get_backend_name() == "sqlite":
            _transactional_ddl(self.engine)
        self._catalogue = sa.Table(
            CATALOGUE,
            sa.MetaData(),
            sa.Column("table_name", sa.String(63), primary_key=True),
            sa.Column("position", sa.Integer, primary_key=True),
            sa.Column("column_name", sa.Text, nullable=False),
            sa.Column("dtype", sa.Text, nullable=False),
        )

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"SQLStore({self.url!r})"

    def tables(self) -> list[str]:
        """The data tables in the store (not the catalogue), sorted."""
        names = sa.inspect(self.engine).get_table_names()
        return sorted(n for n in names if n != CATALOGUE)

    def write_table(
        self,
        name: str,
        frame: pd.DataFrame,
        *,
        if_exists: Literal["replace", "fail", "append"] = "replace",
    ) -> None:
        """Store ``frame`` (without its index) as table ``name``, atomically.

        ``if_exists`` is ``"replace"`` (default), ``"fail"`` or ``"append"``; an
        appended frame must have the stored table's columns and dtypes.
        """
        _check_name(name)
        columns = list(frame.columns)
        if not all(isinstance(c, str) for c in columns):
            raise InvalidInput(f"table {name!r}: column names must be strings")
        if ROW in columns:
            raise InvalidInput(f"table {name!r}: the column name {ROW!r} is reserved")
        if len({c.lower() for c in columns}) != len(columns):
            raise InvalidInput(
                f"table {name!r}: column names must be unique, ignoring case "
                "(SQL does not tell `Age` from `age`)"
            )
        for column in columns:
            values = frame[column]
            if values.dtype == object and pd.api.types.infer_dtype(
                values, skipna=True
            ) not in ("string", "empty"):
                raise InvalidInput(
                    f"column {column!r}: an object column can be stored only when it "
                    "holds strings; convert it first"
                )
        dtypes = {c: _sql_type(frame[c].dtype, c) for c in frame.columns}
        rows = [
            {"table_name": name, "position": i, "column_name": c, "dtype": str(t)}
            for i, (c, t) in enumerate(frame.dtypes.items())
        ]
        with self.engine.begin() as conn:
            if if_exists == "fail" and sa.inspect(conn).has_table(name):
                raise InvalidInput(
                    f"table {name!r} already exists: write with if_exists='replace' "
                    "or 'append'"
                )
            self._catalogue.create(conn, checkfirst=True)
            stored = self._stored_dtypes(conn, name)
            if (
                if_exists == "append"
                and stored is not None
                and stored != {r["column_name"]: r["dtype"] for r in rows}
            ):
                raise InvalidInput(
                    f"table {name!r}: appended columns or dtypes differ from the "
                    "stored table's; read it, combine, and write with replace"
                )
            start = 0
            if if_exists == "append" and sa.inspect(conn).has_table(name):
                start = self._next_row(conn, name)
            numbered = frame.set_axis(pd.RangeIndex(start, start + len(frame)))
            numbered.to_sql(
                name,
                conn,
                index=True,
                index_label=ROW,
                if_exists=if_exists,
                dtype={**dtypes, ROW: sa.BigInteger()},
            )
            cat = self._catalogue
            conn.execute(sa.delete(cat).where(cat.c.table_name == name))
            conn.execute(sa.insert(cat), rows)

    def read_table(
        self,
        name: str,
        columns: list[str] | None = None,
        *,
        schema: str | None = None,
    ) -> pd.DataFrame:
        """Table ``name`` as a DataFrame with the dtypes it was written with.

        Parameters
        ----------
        columns:
            Read only these columns, in this order (default: all).
        schema:
            Validate the result against this schema (``"cohort"``, ``"wearables"``
            …), raising :class:`~healthlab.data.DataValidationError` on a mismatch.
        """
        _check_name(name)
        with self.engine.connect() as conn:
            try:
                table = sa.Table(name, sa.MetaData(), autoload_with=conn)
            except sa.exc.NoSuchTableError:
                known = ", ".join(self.tables()) or "none"
                raise UnknownTable(
                    f"no table {name!r} in {self.url} (tables: {known})"
                ) from None
            names = [c.name for c in table.columns if c.name != ROW]
            chosen = columns if columns is not None else names
            missing = [c for c in chosen if c not in names]
            if missing:
                raise InvalidInput(
                    f"table {name!r} has no column(s) {', '.join(map(repr, missing))}"
                )
            query = sa.select(*(table.c[c] for c in chosen))
            if ROW in table.columns:  # SQL returns rows in any order unless told
                query = query.order_by(table.c[ROW])
            frame = pd.read_sql_query(query, conn)
            stored = self._stored_dtypes(conn, name)
        frame = _restore(frame, stored or {}, f"table {name} in {self.url}")
        if schema is not None:
            frame = validate(frame, schema, source=f"table {name} in {self.url}")
        return frame

    def drop_table(self, name: str) -> None:
        """Remove table ``name`` (and its catalogue rows) if it exists."""
        _check_name(name)
        with self.engine.begin() as conn:
            sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
            if sa.inspect(conn).has_table(CATALOGUE):
                cat = self._catalogue
                conn.execute(sa.delete(cat).where(cat.c.table_name == name))

    def _next_row(self, conn: sa.Connection, name: str) -> int:
        table = sa.Table(name, sa.MetaData(), autoload_with=conn)
        if ROW not in table.columns:
            return 0
        last = conn.execute(sa.select(sa.func.max(table.c[ROW]))).scalar()
        return 0 if last is None else int(last) + 1

    def _stored_dtypes(self, conn: sa.Connection, name: str) -> dict[str, str] | None:
        if not sa.inspect(conn).has_table(CATALOGUE):
            return None
        cat = self._catalogue
        query = (
            sa.select(cat.c.column_name, cat.c.dtype)
            .where(cat.c.table_name == name)
            .order_by(cat.c.position)
        )
        rows = conn.execute(query).all()
        return {column: dtype for column, dtype in rows} or None

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> SQLStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _transactional_ddl(engine: sa.Engine) -> None:
    """Make SQLite run CREATE/DROP inside our transactions (SQLAlchemy's recipe).

    Python's sqlite3 module commits before DDL on its own; handing transaction
    control to SQLAlchemy makes a replaced table and its catalogue rows change
    together or not at all.
    """

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name == CATALOGUE:
        raise InvalidInput(
            f"table name {name!r}: use letters, digits and underscores (at most 63), "
            f"starting with a letter or underscore, and not {CATALOGUE!r}"
        )


def _restore(frame: pd.DataFrame, dtypes: dict[str, str], source: str) -> pd.DataFrame:
    """Cast columns read from SQL back to the dtypes they were written with.

    A cell another tool wrote into a stored column that does not convert back (text
    in a number column, say) is refused by its column and row, never by its value.
    """
    for column, dtype in dtypes.items():
        if column not in frame.columns:
            continue
        values = frame[column]
        converted = None
        try:
            if dtype.startswith("datetime64"):
                values = pd.to_datetime(values)
            converted = values.astype(pd.api.types.pandas_dtype(dtype))
        except (TypeError, ValueError, OverflowError):
            pass  # the error quotes the cell: reported below without it
        if converted is None:
            raise failure(
                source,
                column,
                f"not readable back as {dtype} (a value written to the table outside "
                "HealthLab?); fix those rows or write the table again with "
                "SQLStore.write_table",
                _unconvertible(frame[column], dtype),
            )
        frame[column] = converted
    return frame


def _unconvertible(values: pd.Series, dtype: str) -> np.ndarray:
    """Which cells of ``values`` do not convert to ``dtype`` (by position)."""
    target = pd.api.types.pandas_dtype(dtype)
    bad = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values.tolist()):
        try:
            single = pd.Series([value], dtype=object)
            if dtype.startswith("datetime64"):
                single = pd.to_datetime(single)
            single.astype(target)
        except (TypeError, ValueError, OverflowError):
            bad[i] = True
    return bad
