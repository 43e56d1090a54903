"""Sample loading and validation, and site data stores (SQLite, PostgreSQL).

Examples
--------
>>> from healthlab.data import load_cohort, SQLStore
>>> cohort = load_cohort()  # every site's rows, validated
>>> store = SQLStore("sqlite:///site_a.db")
>>> store.write_table("cohort", load_cohort("site_a"))
"""

from __future__ import annotations

from healthlab.data.load import (
    CityTables,
    city_days,
    cohort_sites,
    load_city_tables,
    load_cohort,
    load_cohort_sites,
    read_csv,
    samples_dir,
)
from healthlab.data.postgres import PostgresServer
from healthlab.data.schemas import SCHEMAS, DataValidationError, Problem, validate
from healthlab.data.stores import SQLStore, UnknownTable

__all__ = [
    "SCHEMAS",
    "CityTables",
    "DataValidationError",
    "PostgresServer",
    "Problem",
    "SQLStore",
    "UnknownTable",
    "city_days",
    "cohort_sites",
    "load_city_tables",
    "load_cohort",
    "load_cohort_sites",
    "read_csv",
    "samples_dir",
    "validate",
]
