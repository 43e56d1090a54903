"""Reading the data files a user supplies (CSV or Parquet), never quoting their content.

A raw parser error quotes what it failed on: pandas' ``UnicodeDecodeError`` shows the
byte, a tokenizer error may show the line, pyarrow's errors show parts of the file.
Every data file HealthLab reads (a site's data file, the sample tables) goes through
this module, which refuses a bad file with :class:`~healthlab.errors.UnreadableFile`:
the file, the line and column where known, what is wrong and what to do; never a
value or a byte. The error is raised outside the ``except`` block that caught the
original, so its chain does not carry the original either.

A CSV file must be UTF-8 text (a byte-order mark is allowed) whose every row has as
many fields as its header, with at least one row under the header. A row with fewer
fields is refused too: pandas would fill it with missing values without a word.

Examples
--------
>>> read_data_file("site_a.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from healthlab.errors import UnreadableFile

__all__ = ["PARQUET_SUFFIXES", "check_csv", "read_csv_file", "read_data_file"]

#: Suffixes read as Parquet; every other file is read as CSV.
PARQUET_SUFFIXES = (".parquet", ".pq")

_AS_CSV = "export it as CSV (UTF-8), or as Parquet named *.parquet"
_UTF8 = "save it as UTF-8 text (e.g. 'CSV UTF-8' in a spreadsheet) and load it again"
_RECTANGULAR = (
    "give every row as many fields as the header (quote a field that holds a comma "
    "or a line break, and close every quote) and load it again"
)
_NO_ROWS = "load a file holding the header and at least one row"
_SNIFF = 8192
_BINARY = "holds NUL bytes: a binary file, not CSV text"


@dataclass
class _Scan:
    """Internal: how far a scan got (the line its last record ended on, the header)."""

    record_end: int = 0
    header: list[str] | None = None


class _Refusal(Exception):
    """Internal: where and why a scan stopped (turned into UnreadableFile)."""

    def __init__(
        self, problem: str, fix: str, line: int | None, field: int | None = None
    ) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.line, self.field = problem, fix, line, field


def read_data_file(
    path: str | os.PathLike[str], *, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """A data file as a frame: Parquet by its suffix (``.parquet``, ``.pq``), else CSV.

    ``columns``, when given, are the names a schema declares in order: a refusal then
    names a column by name rather than by position.
    """
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return read_csv_file(path, columns=columns)


def read_csv_file(
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    **options: Any,
) -> pd.DataFrame:
    """A CSV file as a frame (``options`` go to :func:`pandas.read_csv`), checked.

    Raises :class:`~healthlab.errors.UnreadableFile` when the file is empty, binary,
    not UTF-8, ragged, or holds no row under its header.
    """
    path = Path(path)
    check_csv(path, columns=columns)
    failure = ""
    line: int | None = None
    try:
        frame: pd.DataFrame = pd.read_csv(path, encoding="utf-8", **options)
    except pd.errors.EmptyDataError:
        failure = "empty"
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        # only the line number is taken from pandas' message, never its text
        found = re.search(r"\b(?:line|row) (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        failure = type(exc).__name__
    else:
        if frame.empty and len(frame.columns):
            raise UnreadableFile(str(path), "holds a header but no rows", _NO_ROWS)
        return frame
    # raised outside the except blocks: nothing of the parser's message is chained
    if failure == "empty":
        raise UnreadableFile(str(path), "is empty", _NO_ROWS)
    raise UnreadableFile(
        str(path), f"is not a readable CSV file ({failure})", _AS_CSV, line=line
    )


def check_csv(path: Path, *, columns: Sequence[str] | None = None) -> None:
    """Refuse a CSV file that is empty, binary, not UTF-8 or ragged (one pass)."""
    scan = _Scan()
    try:
        _scan(path, scan)
    except _Refusal as refusal:
        problem, fix, line, field = (
            refusal.problem,
            refusal.fix,
            refusal.line,
            refusal.field,
        )
    else:
        return
    column = None
    header = scan.header or []
    if field is not None and columns is not None and 0 < field <= len(header):
        # named only by a name the schema declares: a lost header's row is data
        column = header[field - 1] if header[field - 1] in columns else None
    raise UnreadableFile(str(path), problem, fix, line=line, field=field, column=column)


def _scan(path: Path, scan: _Scan) -> None:
    """Read ``path`` once as CSV records; raise :class:`_Refusal` at the first fault."""
    with path.open("rb") as handle:
        head = handle.read(_SNIFF)
        if not head:
            raise _Refusal("is empty", _NO_ROWS, None)
        if head.startswith(b"PAR1"):
            raise _Refusal(
                "is a Parquet file, not CSV",
                "give it the suffix .parquet, or export it as CSV (UTF-8)",
                None,
            )
        if b"\x00" in head:  # binary: refused before reading it line by line
            nul = head.index(b"\x00")
            raise _Refusal(_BINARY, _AS_CSV, head[:nul].count(b"\n") + 1)
        handle.seek(0)
        reader = csv.reader(_decoded_lines(handle, scan))
        try:
            header = next(reader, None)
            if header is None:
                raise _Refusal("is empty", _NO_ROWS, None)
            scan.record_end, scan.header = reader.line_num, header
            width = len(header)
            for record in reader:
                if record and len(record) != width:
                    first, last = scan.record_end + 1, reader.line_num
                    span = f" (lines {first} to {last})" if last > first else ""
                    raise _Refusal(
                        f"a row{span} has {_fields(len(record))} where the header has "
                        f"{_fields(width)}",
                        _RECTANGULAR,
                        first,
                    )
                scan.record_end = reader.line_num
        except csv.Error:
            # a field beyond the csv module's size limit: pandas reads it, and its
            # own errors are refused by read_csv_file
            return


def _decoded_lines(handle: Any, scan: _Scan) -> Iterator[str]:
    """The file's lines as text; a binary or non-UTF-8 line raises :class:`_Refusal`.

    A field's position is given only on a line where a record begins.
    """
    for number, raw in enumerate(handle, 1):
        starts_record = scan.record_end == number - 1
        if b"\x00" in raw:
            raise _Refusal(
                _BINARY,
                _AS_CSV,
                number,
                _field(raw, raw.index(b"\x00")) if starts_record else None,
            )
        bom = 3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            yield raw[bom:].decode("utf-8")
        except UnicodeDecodeError as exc:
            field = _field(raw[bom:], exc.start) if starts_record else None
            error = _Refusal("is not UTF-8 text", _UTF8, number, field)
        else:
            continue
        raise error  # outside the except block: the decoding error is not chained


def _fields(count: int) -> str:
    return f"{count} field" if count == 1 else f"{count} fields"


def _field(raw: bytes, offset: int) -> int:
    """The 1-based field of a CSV line in which byte ``offset`` lies."""
    prefix = raw[:offset].decode("utf-8", errors="replace")
    try:
        return max(1, len(next(csv.reader([prefix + "x"]))))
    except (csv.Error, StopIteration):  # pragma: no cover - a prefix always parses
        return 1


def _read_parquet(path: Path) -> pd.DataFrame:
    failure = ""
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors show parts of the file: never chained
        failure = type(exc).__name__
    else:
        if frame.empty and len(frame.columns):
            raise UnreadableFile(str(path), "holds no rows", _NO_ROWS)
        return frame
    raise UnreadableFile(
        str(path),
        f"is not a readable Parquet file ({failure})",
        "write it with pandas' to_parquet or pyarrow, or load it as CSV (UTF-8) "
        "named *.csv",
    )
