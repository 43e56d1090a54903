"""Sites read their rows from SQL stores and answer exactly as from the CSV files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.data import (
    PostgresServer,
    SQLStore,
    cohort_sites,
    load_cohort,
    samples_dir,
)
from healthlab.encrypted import KeyHolder
from tests.test_data import require_postgres

COLUMNS = ["age", "bmi", "sbp", "cholesterol"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on its own port and data dir, stopped by PID."""
    require_postgres()
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


def _csv_sites() -> list[Site]:
    """Sites reading the committed CSV files (content hash: the file's sha256)."""
    folder = samples_dir() / "cohort"
    return [Site(name, folder / f"{name}.csv") for name in cohort_sites()]


def _load(url: str) -> None:
    with SQLStore(url) as store:
        for name in cohort_sites():
            store.write_table(name, load_cohort(name), if_exists="replace")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sql_backed_sites_give_the_csv_result(
    backend: str, tmp_path: Path, keys: KeyHolder, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").url
    else:
        url = f"sqlite:///{tmp_path / 'sites.db'}"
    _load(url)
    sql_sites = [Site.from_sql(name, url, name) for name in cohort_sites()]
    from_csv = encrypted.describe(_csv_sites(), COLUMNS, keys=keys, dropna=True)
    from_sql = encrypted.describe(sql_sites, COLUMNS, keys=keys, dropna=True)
    pd.testing.assert_frame_equal(from_sql, from_csv, check_exact=True)
    pooled = pd.concat([load_cohort(n) for n in cohort_sites()])[COLUMNS].dropna()
    np.testing.assert_allclose(
        from_sql.loc["mean"].to_numpy(), pooled.mean().to_numpy(), rtol=1e-12
    )
    assert from_sql.loc["count", "age"] == len(pooled)


def test_sql_site_content_hash_is_the_frame_hash(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sites.db'}"
    frame = load_cohort("site_c")
    with SQLStore(url) as store:
        store.write_table("site_c", frame)
    from_sql = Site.from_sql("site_c", url, "site_c")
    assert from_sql.content_hash == Site("site_c", frame).content_hash
    assert from_sql.n_rows == len(frame)
