"""Sample data, validating loaders and SQL stores (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import pandas as hpd
from pandas.testing import assert_frame_equal

from healthlab.data import (
    SCHEMAS,
    DataValidationError,
    PostgresServer,
    SQLStore,
    UnknownTable,
    city_days,
    cohort_sites,
    load_city_tables,
    load_cohort,
    load_cohort_sites,
    samples_dir,
)
from healthlab.data.postgres import find_pg_bin
from healthlab.data.stores import CATALOGUE
from healthlab.errors import ConfigurationError, InvalidInput, UnreadableFile

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"
GENERATED = sorted(
    p.relative_to(SAMPLES)
    for p in SAMPLES.rglob("*")
    if p.is_file() and p.suffix in (".csv", ".jsonl")
)
SITE_ROWS = {"site_a": 2400, "site_b": 1500, "site_c": 900, "site_d": 450}


def require_postgres() -> None:
    """Skip locally / fail under CI when PostgreSQL's server binaries are missing."""
    folder = find_pg_bin()
    if folder is None or not (folder / "initdb").is_file():
        message = "PostgreSQL is not installed: run `apt-get install -y postgresql`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def generator() -> ModuleType:
    """data_samples/generate.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "healthlab_generate", SAMPLES / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of the sample folder, safe to break."""
    copy = tmp_path / "samples"
    shutil.copytree(SAMPLES, copy, ignore=shutil.ignore_patterns("*.py", "*.md"))
    return copy


def edit_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell of a CSV file (row: 0-based data row) as raw text."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[row + 1].split(",")
    fields[header.index(column)] = value
    lines[row + 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def full_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------------------- generator
def test_generator_check_passes_on_the_committed_files() -> None:
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generator_rewrites_every_committed_file_byte_for_byte(
    tmp_path: Path,
) -> None:
    written = generator().generate(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in written) == GENERATED
    for relative in GENERATED:
        fresh, committed = tmp_path / relative, SAMPLES / relative
        assert fresh.read_bytes() == committed.read_bytes(), f"{relative} differs"


def test_generator_check_names_a_changed_file_and_fails(
    samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = samples / "cohort" / "site_c.csv"
    target.write_bytes(target.read_bytes().replace(b"\n", b"\r\n", 1))
    (samples / "city" / "records.jsonl").unlink()
    assert generator().main(["--check", "--out", str(samples)]) == 1
    err = capsys.readouterr().err
    assert "cohort/site_c.csv: differs" in err
    assert "city/records.jsonl: missing" in err
    assert "site_a.csv" not in err


def test_samples_fit_in_a_few_megabytes() -> None:
    total = sum((SAMPLES / p).stat().st_size for p in GENERATED)
    assert 500_000 < total < 3_000_000, f"{total:,} bytes"


# ------------------------------------------------------------ the sample tables
def test_cohort_loads_every_site_with_the_schema_dtypes() -> None:
    cohort = load_cohort()
    assert cohort_sites() == list(SITE_ROWS)
    assert cohort["site"].value_counts().to_dict() == SITE_ROWS
    assert list(cohort.columns) == list(SCHEMAS["cohort"].columns)
    dtypes = {c: str(t) for c, t in cohort.dtypes.items()}
    assert dtypes == {
        "patient_id": "str",
        "site": "str",
        "age": "int64",
        "sex": "str",
        "bmi": "float64",
        "sbp": "int64",
        "cholesterol": "float64",
        "glucose": "float64",
        "smoker": "int64",
        "diabetes": "int64",
        "cvd_event_10y": "int64",
        "followup_years": "float64",
    }
    assert cohort["patient_id"].is_unique


@pytest.mark.parametrize("site", list(SITE_ROWS))
def test_one_site_loads_only_its_own_rows(site: str) -> None:
    frame = load_cohort(site)
    assert len(frame) == SITE_ROWS[site]
    assert set(frame["site"]) == {site}
    assert_frame_equal(frame, load_cohort_sites()[site])


def test_unknown_site_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="site_a, site_b, site_c, site_d"):
        load_cohort("site_z")


def test_sites_differ_in_size_and_case_mix() -> None:
    sites = load_cohort_sites()
    age = {s: f["age"].mean() for s, f in sites.items()}
    events = {s: f["cvd_event_10y"].mean() for s, f in sites.items()}
    assert age["site_a"] > age["site_b"] + 5 > age["site_c"] + 10, age
    assert events["site_a"] > 2 * events["site_b"] > 4 * events["site_c"], events
    assert sites["site_d"]["smoker"].mean() > sites["site_c"]["smoker"].mean() + 0.08
    missing = {
        s: f[["bmi", "cholesterol", "glucose"]].isna().mean() for s, f in sites.items()
    }
    for site, share in missing.items():
        assert ((share > 0.005) & (share < 0.11)).all(), (site, share.to_dict())
    assert missing["site_d"]["cholesterol"] > 2 * missing["site_a"]["cholesterol"]
    for column in ("age", "sex", "sbp", "smoker", "diabetes", "cvd_event_10y"):
        assert all(f[column].notna().all() for f in sites.values()), column


@pytest.mark.parametrize(
    ("factor", "mask"),
    [
        ("age >= 65", lambda f: f["age"] >= 65),
        ("smoker", lambda f: f["smoker"] == 1),
        ("diabetes", lambda f: f["diabetes"] == 1),
        ("sbp >= 160", lambda f: f["sbp"] >= 160),
    ],
)
def test_outcome_is_more_frequent_with_each_framingham_risk_factor(
    factor: str, mask: Callable[[pd.DataFrame], pd.Series]
) -> None:
    cohort = load_cohort()
    exposed = mask(cohort)
    with_factor = cohort.loc[exposed, "cvd_event_10y"].mean()
    without = cohort.loc[~exposed, "cvd_event_10y"].mean()
    assert with_factor > 1.3 * without, (factor, with_factor, without)


def test_diabetes_shows_in_fasting_glucose() -> None:
    cohort = load_cohort()
    by_status = cohort.groupby("diabetes")["glucose"].median()
    assert by_status[0] < 6.1 < 7.0 <= by_status[1], by_status.to_dict()


def test_city_tables_join_on_their_keys() -> None:
    tables = load_city_tables()
    patients, wearables, sensors = tables
    assert len(patients) == 240 and patients["user_id"].is_unique
    assert set(wearables["user_id"]) == set(patients["user_id"])
    assert len(sensors) == 3 * 90
    assert sorted(sensors["city_id"].unique()) == ["coastal", "inland", "northern"]
    assert str(wearables["date"].dtype) == "datetime64[ns]"
    days = city_days(tables)
    assert len(days) == len(wearables)
    assert days[["humidity", "temperature", "uv_index"]].notna().all().all()
    # a city's hospitals: coastal citizens are treated at site_a or site_b, …
    sites = wearables.drop_duplicates("user_id").merge(patients, on="user_id")
    assert sites.groupby("city_id")["site"].unique().map(sorted).to_dict() == {
        "coastal": ["site_a", "site_b"],
        "inland": ["site_c"],
        "northern": ["site_d"],
    }


def test_city_sensors_follow_the_season_and_the_climates() -> None:
    sensors = load_city_tables().city_sensors
    month = sensors["date"].dt.month
    by_month = sensors.groupby([sensors["city_id"], month])[
        ["temperature", "uv_index"]
    ].mean()
    for city in ("coastal", "inland", "northern"):
        april, june = by_month.loc[(city, 4)], by_month.loc[(city, 6)]
        assert (june > april + 1).all(), (city, april.to_dict(), june.to_dict())
    means = sensors.groupby("city_id")[["humidity", "temperature", "uv_index"]].mean()
    assert means["humidity"].idxmax() == "coastal"
    assert means["temperature"].idxmin() == "northern"
    assert means["uv_index"].idxmin() == "northern"


def test_records_match_their_content_hashes_and_ipfs_pointers() -> None:
    patients = load_city_tables().patients
    lines = (SAMPLES / "city" / "records.jsonl").read_bytes().splitlines()
    assert len(lines) == len(patients)
    for line, row in zip(lines, patients.itertuples(), strict=True):
        record = json.loads(line)
        assert record["user_id"] == row.user_id and record["synthetic"] is True
        assert row.content_hash == "0x" + hashlib.sha256(line).hexdigest()
        if row.record_pointer.startswith("ipfs://"):
            cid = row.record_pointer.removeprefix("ipfs://")
            raw = cid[1:].upper() + "=" * (-len(cid[1:]) % 8)
            decoded = base64.b32decode(raw)
            # CIDv1, raw codec, sha2-256 multihash of the record's bytes
            assert decoded == b"\x01\x55\x12\x20" + hashlib.sha256(line).digest()
        else:
            assert row.record_pointer.endswith(f"/fhir/Patient/{row.user_id}")
    kinds = patients.groupby("site")["record_pointer"].agg(lambda s: set(s.str[:5]))
    assert kinds.to_dict() == {
        "site_a": {"ipfs:"},
        "site_b": {"https"},
        "site_c": {"ipfs:"},
        "site_d": {"https"},
    }


# ------------------------------------------------------------ refusing bad data
BAD_CELLS = [
    # file, row, column, value written, rule named in the message
    ("cohort/site_b.csv", 7, "age", "987654", "outside the range [18, 110]"),
    ("cohort/site_b.csv", 12, "sex", "QZX", "not one of ['F', 'M']"),
    ("cohort/site_a.csv", 3, "bmi", "abc123xyz", "not readable as 'float64'"),
    ("cohort/site_a.csv", 40, "sbp", "", "empty or not readable as 'int64'"),
    ("cohort/site_d.csv", 0, "diabetes", "42424", "not one of [0, 1]"),
    ("cohort/site_c.csv", 5, "site", "site_zz9", "differs from the file's site"),
    ("city/wearables.csv", 100, "steps", "-4242", "outside the range [0, 100000]"),
    ("city/wearables.csv", 9, "date", "2025-02-30", "not a date (YYYY-MM-DD)"),
    ("city/wearables.csv", 33, "user_id", "U9876", "not a user_id of patients.csv"),
    ("city/wearables.csv", 50, "city_id", "atlantis", "no city_sensors.csv row"),
    ("city/city_sensors.csv", 17, "humidity", "123.4", "outside the range [0, 100]"),
    ("city/patients.csv", 2, "content_hash", "0x" + "Zq" * 32, "fails str_matches"),
    ("city/patients.csv", 8, "record_pointer", "ftp://hidden.host/r", "str_matches"),
]


def _load(relative: str, root: Path) -> object:
    if relative.startswith("cohort/"):
        return load_cohort(root=root)
    return load_city_tables(root=root)


@pytest.mark.parametrize(("relative", "row", "column", "value", "rule"), BAD_CELLS)
def test_a_bad_cell_is_named_by_file_column_and_row_never_by_value(
    samples: Path, relative: str, row: int, column: str, value: str, rule: str
) -> None:
    edit_cell(samples / relative, row, column, value)
    with pytest.raises(DataValidationError) as caught:
        _load(relative, samples)
    exc = caught.value
    message = str(exc)
    assert exc.source == str(samples / relative)
    assert (exc.column, exc.rows) == (column, (row,)), message
    assert message.startswith(str(samples / relative)), message
    assert f"column '{column}'" in message and rule in message, message
    assert f"position {row} (file line {row + 2})" in message, message
    if value:
        assert value not in full_text(exc), "the offending value leaked"
    assert exc.__cause__ is None and exc.__context__ is None
    assert isinstance(exc, InvalidInput)


def test_many_bad_rows_are_counted_and_the_first_ones_listed(samples: Path) -> None:
    path = samples / "cohort" / "site_c.csv"
    bad = [2, 3, 5, 8, 13, 21, 34]
    for row in bad:
        edit_cell(path, row, "cholesterol", "55.5")
    with pytest.raises(DataValidationError) as caught:
        load_cohort(root=samples)
    message = str(caught.value)
    assert caught.value.problems[0].count == 7
    assert "at 7 rows: positions 2, 3, 5, 8, 13 and 2 more" in message, message
    assert "(file lines 4, 5, 7, 10, 15)" in message, message
    assert "55.5" not in message


def test_every_broken_rule_of_a_file_is_reported_in_column_order(
    samples: Path,
) -> None:
    path = samples / "cohort" / "site_b.csv"
    edit_cell(path, 4, "glucose", "999")
    edit_cell(path, 2, "age", "5")
    first_id = path.read_text().splitlines()[1].split(",")[0]
    edit_cell(path, 9, "patient_id", first_id)
    with pytest.raises(DataValidationError) as caught:
        load_cohort(root=samples)
    problems = [(p.column, p.rows) for p in caught.value.problems]
    assert problems == [("patient_id", (0, 9)), ("age", (2,)), ("glucose", (4,))]
    assert first_id not in str(caught.value)


def test_duplicate_wearable_day_is_a_duplicate_key(samples: Path) -> None:
    path = samples / "city" / "wearables.csv"
    lines = path.read_text().splitlines()
    lines[11] = lines[10]  # data row 10 becomes a copy of row 9: same (user, date)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as caught:
        load_city_tables(root=samples)
    problem = caught.value.problems[0]
    assert (problem.column, problem.rows) == (None, (9, 10))
    assert "duplicate key (user_id, date)" in str(caught.value)


def test_patient_id_reused_by_another_site_is_refused(samples: Path) -> None:
    taken = load_cohort("site_a")["patient_id"].iloc[0]
    edit_cell(samples / "cohort" / "site_b.csv", 6, "patient_id", taken)
    with pytest.raises(DataValidationError, match="already used") as caught:
        load_cohort(root=samples)
    assert caught.value.source.endswith("site_b.csv")
    assert (caught.value.column, caught.value.rows) == ("patient_id", (6,))
    assert taken not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: f.drop(columns="sbp"), "missing column(s) 'sbp'"),
        (lambda f: f.assign(ssn="1"), "unexpected column(s) at position(s) 12"),
        (lambda f: f[["site", *f.columns.drop("site")]], "not in the order"),
    ],
)
def test_missing_extra_or_reordered_columns_are_refused(
    samples: Path, change: Callable[[pd.DataFrame], pd.DataFrame], expected: str
) -> None:
    path = samples / "cohort" / "site_d.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame).to_csv(path, index=False)
    with pytest.raises(DataValidationError) as caught:
        load_cohort(root=samples)
    assert caught.value.column is None
    assert expected in str(caught.value), str(caught.value)


def test_a_header_made_of_data_is_not_echoed(samples: Path) -> None:
    path = samples / "cohort" / "site_d.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")  # header lost: a row takes its place
    with pytest.raises(DataValidationError) as caught:
        load_cohort(root=samples)
    assert lines[1].split(",")[0] not in str(caught.value)


def test_malformed_csv_is_refused_without_its_content(samples: Path) -> None:
    path = samples / "city" / "city_sensors.csv"
    lines = path.read_text().splitlines()
    lines[5] += ",secret-extra-field"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UnreadableFile, match="has 6 fields where the header") as caught:
        load_city_tables(root=samples)
    assert (caught.value.path, caught.value.line) == (str(path), 6)
    assert str(caught.value).startswith(f"{path}, line 6: ")
    assert "secret-extra-field" not in full_text(caught.value)


def test_sample_folder_comes_from_argument_then_environment(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_cell(samples / "cohort" / "site_a.csv", 0, "age", "200")
    monkeypatch.setenv("HEALTHLAB_SAMPLES", str(samples))
    assert samples_dir() == samples
    with pytest.raises(DataValidationError):
        load_cohort()
    assert len(load_cohort(root=SAMPLES)) == sum(SITE_ROWS.values())
    monkeypatch.setenv("HEALTHLAB_SAMPLES", str(samples / "nowhere"))
    with pytest.raises(ConfigurationError, match="HEALTHLAB_SAMPLES"):
        load_cohort()


# ------------------------------------------------------------------ SQL stores
def mixed_frame() -> pd.DataFrame:
    """One column of every dtype a store supports, with missing values."""
    return pd.DataFrame(
        {
            "i64": np.array([1, -(2**62), 3], dtype="int64"),
            "i32": np.array([1, 2, -3], dtype="int32"),
            "f64": [1.5, np.nan, -2.25e300],
            "f32": np.array([1.5, np.nan, 2.25], dtype="float32"),
            "flag": [True, False, True],
            "maybe": pd.array([True, None, False], dtype="boolean"),
            "count": pd.array([1, None, 3], dtype="Int64"),
            "text": pd.array(["a", None, "ünïcødé ✓"], dtype="str"),
            "obj": pd.Series(["x", "y", "z"], dtype=object),
            "when": pd.Series(
                [
                    pd.Timestamp("2025-01-01"),
                    pd.NaT,
                    pd.Timestamp("2025-03-01 12:34:56.5"),
                ]
            ).astype("datetime64[ns]"),
            "empty": [np.nan] * 3,
        }
    )


FRAMES: dict[str, Callable[[], pd.DataFrame]] = {
    "cohort": lambda: load_cohort("site_d"),
    "wearables": lambda: load_city_tables().wearables.iloc[:3000],
    "mixed": mixed_frame,
    "no_rows": lambda: mixed_frame().iloc[:0],
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on its own port and data dir, for this module."""
    require_postgres()
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    """An empty store: SQLite in a temp file, or the test PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'site.db'}"
    else:
        url = request.getfixturevalue("postgres").url
    with SQLStore(url) as opened:
        yield opened
        meta = sa.MetaData()
        meta.reflect(opened.engine)
        meta.drop_all(opened.engine)


@pytest.mark.parametrize("name", list(FRAMES))
def test_tables_round_trip_with_their_values_dtypes_and_order(
    store: SQLStore, name: str
) -> None:
    frame = FRAMES[name]()
    store.write_table(name, frame)
    back = store.read_table(name)
    assert_frame_equal(back, frame.reset_index(drop=True))
    assert store.tables() == [name]


def test_sample_tables_read_back_valid_against_their_schema(store: SQLStore) -> None:
    cohort = load_cohort("site_c")
    store.write_table("site_c", cohort)
    assert_frame_equal(store.read_table("site_c", schema="cohort"), cohort)


def test_chosen_columns_are_read_in_the_order_asked(store: SQLStore) -> None:
    cohort = load_cohort("site_d")
    store.write_table("cohort", cohort)
    back = store.read_table("cohort", columns=["sbp", "age", "patient_id"])
    assert_frame_equal(back, cohort[["sbp", "age", "patient_id"]])
    with pytest.raises(InvalidInput, match="no column"):
        store.read_table("cohort", columns=["age", "password"])


def test_append_continues_the_table_in_order(store: SQLStore) -> None:
    cohort = load_cohort("site_d")
    store.write_table("cohort", cohort.iloc[:200])
    store.write_table("cohort", cohort.iloc[200:], if_exists="append")
    assert_frame_equal(store.read_table("cohort"), cohort)
    changed = cohort.iloc[:5].astype({"age": "float64"})
    with pytest.raises(InvalidInput, match="dtypes differ"):
        store.write_table("cohort", changed, if_exists="append")
    assert_frame_equal(store.read_table("cohort"), cohort)


def test_replace_overwrites_and_fail_refuses(store: SQLStore) -> None:
    store.write_table("t", mixed_frame())
    store.write_table("t", load_cohort("site_d"))
    assert_frame_equal(store.read_table("t"), load_cohort("site_d"))
    with pytest.raises(InvalidInput, match="already exists"):
        store.write_table("t", mixed_frame(), if_exists="fail")
    assert_frame_equal(store.read_table("t"), load_cohort("site_d"))


def test_a_table_stored_validly_but_broken_later_fails_its_schema(
    store: SQLStore,
) -> None:
    cohort = load_cohort("site_d")
    store.write_table(
        "cohort", cohort.assign(age=cohort["age"].where(cohort.index != 3, 4))
    )
    with pytest.raises(DataValidationError) as caught:
        store.read_table("cohort", schema="cohort")
    assert caught.value.source.startswith("table cohort in ")
    assert (caught.value.column, caught.value.rows) == ("age", (3,))


def test_unknown_table_is_refused_with_the_known_ones(store: SQLStore) -> None:
    store.write_table("cohort", load_cohort("site_d"))
    with pytest.raises(UnknownTable, match=r"tables: cohort\)"):
        store.read_table("cohrt")


@pytest.mark.parametrize(
    "name", ["", "1abc", "x; DROP TABLE cohort", "a-b", "x" * 64, CATALOGUE]
)
def test_unsafe_or_reserved_table_names_are_refused(store: SQLStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="table name"):
        store.write_table(name, mixed_frame())
    with pytest.raises(InvalidInput, match="table name"):
        store.read_table(name)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pd.DataFrame({"c": pd.Categorical(["a", "b"])}), "cannot be stored"),
        (pd.DataFrame({"t": pd.date_range("2025", periods=2, tz="UTC")}), "zone"),
        (pd.DataFrame({"o": [{"a": 1}, None]}), "holds strings"),
        (pd.DataFrame({"u": np.array([1, 2], dtype="uint64")}), "BIGINT"),
        (pd.DataFrame({"Age": [1], "age": [2]}), "ignoring case"),
        (pd.DataFrame({"healthlab_row": [1]}), "reserved"),
        (pd.DataFrame({0: [1]}), "must be strings"),
    ],
)
def test_frames_a_store_cannot_round_trip_are_refused(
    store: SQLStore, frame: pd.DataFrame, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        store.write_table("t", frame)
    assert store.tables() == []


def test_a_failed_replace_leaves_the_old_table_intact(store: SQLStore) -> None:
    cohort = load_cohort("site_d")
    store.write_table("cohort", cohort)
    broken = cohort.astype({"patient_id": object})
    broken.loc[300, "patient_id"] = "bad\ud800text"  # a lone surrogate: not UTF-8
    with pytest.raises(UnicodeEncodeError) as caught:  # raised mid-insert
        store.write_table("cohort", broken)
    assert "bad" not in full_text(caught.value), "the failed row leaked"
    assert_frame_equal(store.read_table("cohort"), cohort)
    assert store.tables() == ["cohort"]


def test_store_url_hides_the_password() -> None:
    store = SQLStore("postgresql://site:s3cr3t-pw@127.0.0.1:1/site_a")
    assert "s3cr3t-pw" not in store.url and "s3cr3t-pw" not in repr(store)
    assert store.url == "postgresql://site:***@127.0.0.1:1/site_a"


def test_default_store_is_sqlite_in_healthlab_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEALTHLAB_DATABASE_URL", raising=False)
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path / "home"))
    with SQLStore() as store:
        store.write_table("t", mixed_frame())
    assert (tmp_path / "home" / "sites.db").is_file()
    monkeypatch.setenv("HEALTHLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    with SQLStore() as store:
        assert store.tables() == []
        assert store.url.endswith("env.db")


def test_not_a_url_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not a database URL"):
        SQLStore("site_a.db")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hpd.data_frames(
        [
            hpd.column("i", dtype="int64"),
            hpd.column("f", elements=st.floats(allow_nan=True, allow_infinity=True)),
            hpd.column("b", dtype=bool),
            hpd.column(
                "s",
                elements=st.text(st.characters(codec="utf-8", exclude_characters="\0")),
            ),
            hpd.column(
                "d",
                elements=st.datetimes(
                    min_value=pd.Timestamp("1900-01-01").to_pydatetime(),
                    max_value=pd.Timestamp("2200-01-01").to_pydatetime(),
                ),
            ),
        ],
        index=hpd.range_indexes(max_size=20),
    )
)
def test_any_frame_of_supported_dtypes_round_trips_through_sqlite(
    tmp_path_factory: pytest.TempPathFactory, frame: pd.DataFrame
) -> None:
    frame = frame.astype({"s": "str", "d": "datetime64[us]"})
    path = tmp_path_factory.mktemp("hyp") / "site.db"
    with SQLStore(f"sqlite:///{path}") as store:
        store.write_table("t", frame)
        assert_frame_equal(store.read_table("t"), frame)


# ------------------------------------------------------------------ PostgreSQL
def test_postgres_server_runs_unprivileged_on_loopback(
    postgres: PostgresServer,
) -> None:
    assert postgres.process is not None
    status = Path(f"/proc/{postgres.process.pid}/status").read_text()
    uid = next(
        line.split()[1] for line in status.splitlines() if line.startswith("Uid:")
    )
    assert int(uid) != 0, "postgres must not run as root"
    assert int(uid) == os.geteuid() or os.geteuid() == 0
    engine = sa.create_engine(postgres.url)
    with engine.connect() as conn:
        listen = conn.exec_driver_sql("SHOW listen_addresses").scalar()
        port = conn.exec_driver_sql("SHOW port").scalar()
        fsync = conn.exec_driver_sql("SHOW fsync").scalar()
    engine.dispose()
    assert (listen, int(port or 0), fsync) == ("127.0.0.1", postgres.port, "off")


def test_postgres_refuses_a_wrong_password(postgres: PostgresServer) -> None:
    wrong = sa.make_url(postgres.url).set(password="not-the-password")
    engine = sa.create_engine(wrong)
    with pytest.raises(sa.exc.OperationalError, match="password authentication"):
        engine.connect()
    engine.dispose()


def test_postgres_server_stops_by_pid_and_removes_its_data() -> None:
    require_postgres()
    server = PostgresServer().start()
    assert server.process is not None
    pid, data = server.process.pid, server.data_dir
    assert (data / "PG_VERSION").is_file()
    server.close()
    assert server.process is None and not data.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(sa.exc.OperationalError):
        sa.create_engine(server.url).connect()
