"""Bad inputs get named errors: data files a user supplies, and private keys.

Each attack plants a sentinel (a value or bytes that must never be shown) and checks
the error's class, that its message names the file, line and column where known, and
that neither the message nor anything a traceback prints (the chain included) holds
the sentinel. Controls show that valid inputs still load.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from eth_account import Account
from pandas.testing import assert_frame_equal
from typer.testing import CliRunner

from healthlab import Site, cli
from healthlab.data import DataValidationError, SQLStore, read_csv
from healthlab.datafiles import read_data_file
from healthlab.encrypted import KeyHolder, describe
from healthlab.errors import (
    ConfigurationError,
    DataRefused,
    InvalidInput,
    InvalidPrivateKey,
    UnreadableFile,
)
from healthlab.ledger.client import _signers_from_env
from healthlab.ledger.keys import account_from_key, parse_private_key
from healthlab.ledger.node import AnvilNode
from healthlab.receipts import Receipt
from healthlab.sites import read_table

ROOT = Path(__file__).resolve().parents[1]
COHORT = ROOT / "data_samples" / "cohort" / "site_a.csv"
LINES = COHORT.read_text().splitlines()
HEADER = LINES[0].split(",")
SENTINEL = "Zq7SECRETcell"
ROWS = 8  # data rows kept in each test file


def full_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` prints, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def write_rows(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([LINES[0], *rows]) + "\n")
    return path


def edited(row: int, column: str, value: str) -> list[str]:
    """The first ROWS data rows with one cell (row: 0-based) set to ``value``."""
    rows = LINES[1 : ROWS + 1]
    fields = rows[row].split(",")
    fields[HEADER.index(column)] = value
    rows[row] = ",".join(fields)
    return rows


# every loader of a user's data file: (name, read, names columns by schema name)
LOADERS: list[tuple[str, Callable[[Path], Any], bool]] = [
    ("read_csv", lambda p: read_csv(p, "cohort"), True),
    ("site read_table", read_table, False),
    ("Site(path)", lambda p: Site("site_a", p), False),
]
LOADER_IDS = [name for name, _, _ in LOADERS]


def refused(read: Callable[[Path], Any], path: Path) -> UnreadableFile:
    with pytest.raises(UnreadableFile) as caught:
        read(path)
    exc = caught.value
    assert isinstance(exc, InvalidInput)
    assert exc.path == str(path)
    assert str(exc).startswith(str(path)), str(exc)
    assert exc.__cause__ is None and exc.__context__ is None
    return exc


# ------------------------------------------------------------------ CSV files
@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_a_row_with_an_extra_field_is_named_by_line_not_by_content(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool
) -> None:
    rows = LINES[1 : ROWS + 1]
    rows[2] += "," + SENTINEL  # data row 2 is file line 4
    path = write_rows(tmp_path / "ragged.csv", rows)
    exc = refused(read, path)
    assert exc.line == 4
    assert f"{path}, line 4: a row has 13 fields where the header has 12" in str(exc)
    assert "give every row as many fields as the header" in str(exc)
    assert SENTINEL not in full_text(exc)


@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_a_row_with_too_few_fields_is_refused_not_filled_with_missing_values(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool
) -> None:
    rows = LINES[1 : ROWS + 1]
    rows[5] = ",".join([SENTINEL, *rows[5].split(",")[1:5]])  # file line 7
    path = write_rows(tmp_path / "short.csv", rows)
    exc = refused(read, path)
    assert exc.line == 7
    assert "line 7: a row has 5 fields where the header has 12" in str(exc)
    assert SENTINEL not in full_text(exc)


def test_an_unclosed_quote_names_the_line_where_the_row_starts(
    tmp_path: Path,
) -> None:
    rows = LINES[1 : ROWS + 1]
    rows[3] = '"' + SENTINEL + rows[3]  # file line 5, never closed
    path = write_rows(tmp_path / "quote.csv", rows)
    exc = refused(read_table, path)
    assert exc.line == 5
    assert "(lines 5 to 9) has 1 field" in str(exc) and "close every quote" in str(exc)
    assert SENTINEL not in full_text(exc)


@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_a_binary_file_is_refused_without_quoting_a_byte(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool
) -> None:
    path = tmp_path / "binary.csv"
    secret = SENTINEL.encode()
    path.write_bytes(
        LINES[0].encode() + b"\n" + b"\xff\xfe\x00\x9c" + secret + b"\x00\x81" * 50
    )
    exc = refused(read, path)
    assert exc.line == 2
    assert "line 2: holds NUL bytes: a binary file, not CSV text" in str(exc)
    assert "export it as CSV (UTF-8)" in str(exc)
    text = full_text(exc)
    assert SENTINEL not in text
    for shown in ("0xff", "\\xff", "0x9c", "\\x9c", "0x81", "\\x81", "\\x00"):
        assert shown not in text, shown


@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_a_non_utf8_cell_is_named_by_line_and_column_not_by_its_bytes(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool
) -> None:
    rows = edited(3, "sex", SENTINEL + "\u00e9")  # file line 5, field 4
    path = tmp_path / "latin1.csv"
    path.write_bytes(("\n".join([LINES[0], *rows]) + "\n").encode("latin-1"))
    exc = refused(read, path)
    assert (exc.line, exc.field) == (5, 4)
    where = "column 'sex'" if by_name else "column 4"
    assert exc.column == ("sex" if by_name else None)
    assert f"{path}, line 5, {where}: is not UTF-8 text" in str(exc), str(exc)
    assert "save it as UTF-8" in str(exc)
    text = full_text(exc)
    assert SENTINEL not in text
    assert "0xe9" not in text and "\\xe9" not in text


def test_a_column_is_named_by_the_file_header_only_when_the_schema_declares_it(
    tmp_path: Path,
) -> None:
    rows = edited(3, "sex", SENTINEL + "\u00e9")  # field 4
    swapped = HEADER.copy()
    swapped[2], swapped[3] = swapped[3], swapped[2]  # the file's field 4 is "age"
    path = tmp_path / "swapped.csv"
    path.write_bytes(("\n".join([",".join(swapped), *rows]) + "\n").encode("latin-1"))
    assert refused(lambda p: read_csv(p, "cohort"), path).column == "age"
    # header lost: the first row stands in its place, and is data, so not quoted
    lost = tmp_path / "lost.csv"
    lost.write_bytes(("\n".join([rows[0], *rows[1:]]) + "\n").encode("latin-1"))
    exc = refused(lambda p: read_csv(p, "cohort"), lost)
    assert (exc.line, exc.field, exc.column) == (4, 4, None)
    assert ", line 4, column 4: is not UTF-8 text" in str(exc)
    assert rows[0].split(",")[0] not in str(exc) and SENTINEL not in full_text(exc)


def test_a_utf8_byte_order_mark_is_read_and_a_bad_byte_after_it_is_placed(
    tmp_path: Path,
) -> None:
    good = tmp_path / "bom.csv"
    good.write_bytes(b"\xef\xbb\xbf" + ("\n".join(LINES[: ROWS + 1]) + "\n").encode())
    assert list(read_csv(good, "cohort").columns) == HEADER  # control
    bad = tmp_path / "bom-bad.csv"
    bad.write_bytes(b"\xef\xbb\xbfpatient_id,\xe9" + LINES[0].encode()[11:] + b"\n")
    exc = refused(read_table, bad)
    assert (exc.line, exc.field) == (1, 2)


@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_an_empty_file_is_refused(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool
) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    exc = refused(read, path)
    assert str(exc) == (
        f"{path}: is empty; load a file holding the header and at least one row"
    )


@pytest.mark.parametrize("blank", ["", "\n\n"])
@pytest.mark.parametrize(("name", "read", "by_name"), LOADERS, ids=LOADER_IDS)
def test_a_header_only_file_is_refused(
    tmp_path: Path, name: str, read: Callable[[Path], Any], by_name: bool, blank: str
) -> None:
    path = tmp_path / "header.csv"
    path.write_text(LINES[0] + "\n" + blank)
    exc = refused(read, path)
    assert f"{path}: holds a header but no rows" in str(exc)


def test_text_in_a_schema_number_column_is_named_by_column_and_line(
    tmp_path: Path,
) -> None:
    path = write_rows(tmp_path / "text.csv", edited(4, "age", SENTINEL))
    with pytest.raises(DataValidationError) as caught:
        read_csv(path, "cohort")
    exc = caught.value
    assert (exc.column, exc.rows) == ("age", (4,))
    assert "column 'age': empty or not readable as 'int64'" in str(exc)
    assert "(file line 6)" in str(exc)
    assert SENTINEL not in full_text(exc)
    assert exc.__cause__ is None and exc.__context__ is None


def test_text_in_a_site_file_number_column_is_refused_by_column_at_query_time(
    tmp_path: Path,
) -> None:
    # an untyped site file declares no types: the column is refused when a
    # statistic needs numbers, by site and column, never by value
    a = Site("site_a", write_rows(tmp_path / "a.csv", edited(4, "age", SENTINEL)))
    b = Site("site_b", write_rows(tmp_path / "b.csv", LINES[1 : ROWS + 1]))
    with pytest.raises(DataRefused) as caught:
        describe([a, b], ["age"], keys=KeyHolder())
    assert "site site_a: column 'age' holds text" in str(caught.value)
    assert SENTINEL not in full_text(caught.value)


def test_valid_csv_files_still_load(tmp_path: Path) -> None:
    frame = read_csv(COHORT, "cohort")
    assert len(frame) == len(LINES) - 1
    assert_frame_equal(read_table(COHORT), pd.read_csv(COHORT))
    assert Site("site_a", COHORT).n_rows == len(LINES) - 1
    # a quoted field may hold commas and line breaks: one row over two lines
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('note,age\n"one, two\nthree",52\nplain,60\n\n')
    loaded = read_table(quoted)
    assert loaded["note"].tolist() == ["one, two\nthree", "plain"]
    assert loaded["age"].tolist() == [52, 60]


# -------------------------------------------------------------- Parquet files
def test_a_file_that_is_not_parquet_is_refused_without_its_content(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fake.parquet"
    path.write_bytes(SENTINEL.encode() * 20)
    exc = refused(read_table, path)
    assert "is not a readable Parquet file" in str(exc)
    assert SENTINEL not in full_text(exc)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert "is not a readable Parquet file" in str(refused(read_table, empty))


def test_parquet_without_rows_or_under_a_csv_name_is_refused(tmp_path: Path) -> None:
    frame = pd.read_csv(COHORT).head(ROWS)
    none = tmp_path / "none.parquet"
    frame.head(0).to_parquet(none)
    assert f"{none}: holds no rows" in str(refused(read_table, none))
    misnamed = tmp_path / "site.csv"
    frame.to_parquet(misnamed)
    exc = refused(read_table, misnamed)
    assert "is a Parquet file, not CSV; give it the suffix .parquet" in str(exc)
    control = tmp_path / "site.parquet"
    frame.to_parquet(control)
    assert_frame_equal(read_data_file(control), frame)
    assert Site("site_a", control).n_rows == ROWS


# ----------------------------------------------------------------- SQL tables
def test_a_stored_column_holding_text_is_named_not_quoted(tmp_path: Path) -> None:
    cohort = read_csv(COHORT, "cohort").head(ROWS)
    with SQLStore(f"sqlite:///{tmp_path / 'site.db'}") as store:
        store.write_table("cohort", cohort)
        assert_frame_equal(store.read_table("cohort"), cohort)  # control
        with store.engine.begin() as conn:  # another tool writes text into age
            conn.execute(
                sa.text("UPDATE cohort SET age = :v WHERE healthlab_row = 3"),
                {"v": SENTINEL},
            )
        with pytest.raises(DataValidationError) as caught:
            store.read_table("cohort")
    exc = caught.value
    assert (exc.column, exc.rows) == ("age", (3,))
    assert str(exc).startswith("table cohort in sqlite:///"), str(exc)
    assert "column 'age': not readable back as int64" in str(exc)
    assert SENTINEL not in full_text(exc)
    assert exc.__cause__ is None and exc.__context__ is None


def test_a_schema_column_of_the_wrong_type_is_named_not_quoted(
    tmp_path: Path,
) -> None:
    cohort = read_csv(COHORT, "cohort").head(ROWS)
    wrong = cohort.assign(sbp=cohort["sbp"].astype(str))
    wrong.loc[6, "sbp"] = SENTINEL
    with SQLStore(f"sqlite:///{tmp_path / 'site.db'}") as store:
        store.write_table("cohort", wrong)
        with pytest.raises(DataValidationError) as caught:
            store.read_table("cohort", schema="cohort")
        store.write_table("cohort", cohort)
        assert_frame_equal(store.read_table("cohort", schema="cohort"), cohort)
    assert (caught.value.column, caught.value.rows) == ("sbp", (6,))
    assert "column 'sbp': empty or not readable as 'int64'" in str(caught.value)
    assert SENTINEL not in full_text(caught.value)


# ------------------------------------------------------------------ receipts
def test_a_receipt_that_is_not_json_is_named_by_line_not_quoted() -> None:
    with pytest.raises(InvalidInput) as caught:
        Receipt.from_json('{\n "a": 1,\n ' + SENTINEL + "\n}")
    assert "not a receipt" in str(caught.value)
    assert "(line 3, column 2)" in str(caught.value)
    assert SENTINEL not in full_text(caught.value)
    with pytest.raises(InvalidInput, match="not a receipt"):
        Receipt.from_json(json.dumps([SENTINEL]))
    assert Receipt.from_json(json.dumps({"a": 1}))["a"] == 1  # control


# ---------------------------------------------------------------- private keys
KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ACCOUNT = Account.from_key(bytes.fromhex(KEY))
BAD_KEYS = {
    "63 hex digits": KEY[:-1],
    "63 hex digits, 0x": "0x" + KEY[1:],
    "65 hex digits": KEY + "7",
    "non-hex digit": KEY[:20] + "g" + KEY[21:],
    "space inside": KEY[:32] + " " + KEY[32:],
    "tab inside": KEY[:32] + "\t" + KEY[32:],
    "leading space": " " + KEY,
    "trailing newline": KEY + "\n",
    "quoted": f'"{KEY}"',
    "unicode digits": KEY[:-1] + "\u0663",
    "0x only": "0x",
    "empty": "",
    "32 bytes as text": "a" * 32,
    "31 bytes": bytes.fromhex(KEY)[:31],
}


def assert_key_free(exc: BaseException, key: str | bytes) -> None:
    text = full_text(exc)
    raw = key.hex() if isinstance(key, bytes) else key.strip().removeprefix("0x")
    assert raw not in text, "the key leaked"
    for start in range(0, len(raw) - 8, 4):  # nor any 8 digits of it
        assert raw[start : start + 8] not in text, "part of the key leaked"


def test_eth_account_alone_takes_63_digits_as_another_account() -> None:
    # the hazard this guards against: no error, and not the account meant
    assert Account.from_key(KEY[:-1]).address != ACCOUNT.address


@pytest.mark.parametrize("key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_a_key_that_is_not_64_hex_digits_is_refused_without_echoing_it(
    key: str | bytes,
) -> None:
    with pytest.raises(InvalidPrivateKey) as caught:
        parse_private_key(key, source="HEALTHLAB_PRIVATE_KEY")
    exc = caught.value
    assert isinstance(exc, ConfigurationError) and isinstance(exc, InvalidInput)
    assert "the private key from HEALTHLAB_PRIVATE_KEY" in str(exc)
    assert "64 hex digits" in str(exc)
    assert exc.__cause__ is None and exc.__context__ is None
    if len(key) > 8:
        assert_key_free(exc, key)


@pytest.mark.parametrize("scalar", [0, 2**256 - 1])
def test_a_key_outside_the_curve_is_refused(scalar: int) -> None:
    key = "0x" + scalar.to_bytes(32, "big").hex()
    with pytest.raises(InvalidPrivateKey, match="not a valid secp256k1 key") as caught:
        account_from_key(key, source="HEALTHLAB_PRIVATE_KEY")
    if scalar:
        assert_key_free(caught.value, key)


@pytest.mark.parametrize("form", [KEY, "0x" + KEY, "0X" + KEY.upper()])
def test_valid_keys_give_the_right_account(form: str) -> None:
    assert parse_private_key(form, source="test") == bytes.fromhex(KEY)
    assert account_from_key(form, source="test").address == ACCOUNT.address
    assert account_from_key(bytes.fromhex(KEY), source="t").address == ACCOUNT.address


@pytest.fixture
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("HEALTHLAB_PRIVATE_KEY", raising=False)
    monkeypatch.delenv("HEALTHLAB_KEY_FILE", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "bad",
    [KEY[:-1], KEY + "7", KEY[:30] + " " + KEY[30:]],
    ids=["63 digits", "65 digits", "space inside"],
)
def test_a_bad_key_in_the_environment_names_its_place_not_the_key(
    no_key_env: pytest.MonkeyPatch, bad: str
) -> None:
    other = Account.create().key.hex()
    no_key_env.setenv("HEALTHLAB_PRIVATE_KEY", f"{other}, {bad}")
    with pytest.raises(InvalidPrivateKey) as caught:
        _signers_from_env()
    assert "from HEALTHLAB_PRIVATE_KEY (key 2) is not 32 bytes" in str(caught.value)
    assert_key_free(caught.value, bad)
    assert_key_free(caught.value, other)
    # control: blanks around the keys of the list are dropped, as documented
    no_key_env.setenv("HEALTHLAB_PRIVATE_KEY", f" {other} ,0x{KEY}\n")
    found = [a.address for a in _signers_from_env()]
    assert found == [Account.from_key(other).address, ACCOUNT.address]


def test_a_bad_key_in_a_key_file_names_the_file_and_line(
    no_key_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# the owner\n{KEY}\n\n{KEY[:-1]}\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    no_key_env.setenv("HEALTHLAB_KEY_FILE", str(path))
    with pytest.raises(InvalidPrivateKey) as caught:
        _signers_from_env()
    assert f"from HEALTHLAB_KEY_FILE {path}, line 4 is not 32 bytes" in str(
        caught.value
    )
    assert_key_free(caught.value, KEY[:-1])
    path.write_bytes(b"\xff" + KEY.encode() + b"\n")
    with pytest.raises(InvalidPrivateKey, match="is not UTF-8 text") as caught:
        _signers_from_env()
    assert_key_free(caught.value, KEY[1:])
    path.write_text(f"# the owner\n  {KEY}  \n")  # control
    assert [a.address for a in _signers_from_env()] == [ACCOUNT.address]


# -------------------------------------------------------------------- the CLI
def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["healthlab", *argv])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer replaces it
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return int(stop.value.code or 0)


@pytest.mark.anvil
def test_the_cli_refuses_a_bad_key_and_a_bad_data_file_in_one_line(
    anvil: AnvilNode,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    deployed = CliRunner().invoke(cli.app, ["deploy", "--rpc-url", anvil.url])
    assert deployed.exit_code == 0, deployed.output
    monkeypatch.setenv("HEALTHLAB_PRIVATE_KEY", "0x" + KEY[:-1])
    assert run_main(["status", "--rpc-url", anvil.url], monkeypatch) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: the private key from HEALTHLAB_PRIVATE_KEY is not")
    assert err.count("\n") == 1 and KEY[:-1] not in out + err

    monkeypatch.delenv("HEALTHLAB_PRIVATE_KEY")
    rows = LINES[1 : ROWS + 1]
    rows[1] += "," + SENTINEL
    data = write_rows(tmp_path / "site_a.csv", rows)
    argv = ["site-node", "--superlink", "127.0.0.1:9", "--site", "site_a"]
    argv += ["--dataset-id", "1", "--data", str(data), "--rpc-url", anvil.url]
    argv += ["--state-dir", str(tmp_path / "state"), "--insecure"]
    assert run_main(argv, monkeypatch) == 1
    out, err = capsys.readouterr()
    assert err == (
        f"error: {data}, line 3: a row has 13 fields where the header has 12 fields; "
        "give every row as many fields as the header (quote a field that holds a "
        "comma or a line break, and close every quote) and load it again\n"
    )
    assert SENTINEL not in out + err
