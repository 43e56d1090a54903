"""Load the sample tables from ``data_samples/``, validated, with their keys checked.

The folder is taken from the ``root`` argument, else ``$HEALTHLAB_SAMPLES``, else the
repository's ``data_samples/``. Its layout (see ``data_samples/README.md``)::

    cohort/<site>.csv         one clinical cohort file per hospital site
    city/patients.csv         smart-city programme: who, where the record lives
    city/wearables.csv        one row per user per day worn
    city/city_sensors.csv     one row per city per day
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from healthlab.data.schemas import failure, schema_for, validate
from healthlab.datafiles import read_csv_file
from healthlab.errors import ConfigurationError, InvalidInput

__all__ = [
    "CityTables",
    "city_days",
    "cohort_sites",
    "load_city_tables",
    "load_cohort",
    "load_cohort_sites",
    "read_csv",
    "samples_dir",
]

_REPO_SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


class CityTables(NamedTuple):
    """The three linked tables of the smart-city health programme."""

    patients: pd.DataFrame
    wearables: pd.DataFrame
    city_sensors: pd.DataFrame


def samples_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The sample folder: ``root``, else ``$HEALTHLAB_SAMPLES``, else the repo's."""
    chosen = root or os.environ.get("HEALTHLAB_SAMPLES") or _REPO_SAMPLES
    path = Path(chosen)
    if not path.is_dir():
        raise ConfigurationError(
            f"no sample folder at {path}: pass root=, set HEALTHLAB_SAMPLES, or run "
            "`python data_samples/generate.py --out DIR`"
        )
    return path


def read_csv(path: str | os.PathLike[str], schema: str) -> pd.DataFrame:
    """Read a CSV file and validate it against ``schema`` (see :mod:`.schemas`).

    Every cell is read as text and coerced by the schema, so a bad cell is reported
    by its column and row, never by its value. Empty cells are missing values. A file
    that is empty, holds only its header, is binary or not UTF-8, or has a row with
    another number of fields than its header is refused with
    :class:`~healthlab.errors.UnreadableFile` (file, line and column where known).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(
            f"{path} does not exist: run `python data_samples/generate.py` to make "
            "the samples, or check the path"
        )
    checked = schema_for(schema)
    frame = read_csv_file(
        path,
        columns=list(checked.columns),
        dtype=str,
        keep_default_na=False,
        na_values=[""],
    )
    return validate(frame, checked, source=str(path), header_lines=1)


def cohort_sites(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The hospital sites that hold a cohort file, sorted."""
    return sorted(p.stem for p in (samples_dir(root) / "cohort").glob("*.csv"))


def load_cohort_sites(
    root: str | os.PathLike[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Every site's cohort, validated, as ``{site: frame}`` (ready for a study).

    Raises :class:`DataValidationError` when a file breaks its schema, holds rows of
    another site, or repeats a patient id another site already uses.
    """
    folder = samples_dir(root) / "cohort"
    sites = cohort_sites(root)
    if not sites:
        raise ConfigurationError(f"no cohort files (*.csv) in {folder}")
    frames: dict[str, pd.DataFrame] = {}
    seen: set[str] = set()
    for site in sites:
        path = folder / f"{site}.csv"
        frame = read_csv(path, "cohort")
        wrong_site = frame["site"] != site
        if wrong_site.any():
            raise failure(
                str(path),
                "site",
                f"differs from the file's site '{site}'",
                wrong_site,
                header_lines=1,
            )
        reused = frame["patient_id"].isin(seen)
        if reused.any():
            raise failure(
                str(path),
                "patient_id",
                "already used by another site's file",
                reused,
                header_lines=1,
            )
        seen.update(frame["patient_id"])
        frames[site] = frame
    return frames


def load_cohort(
    site: str | None = None, *, root: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """The clinical cohort, validated: one site's rows, or all sites' stacked.

    Parameters
    ----------
    site:
        A site name (``"site_a"`` … ``"site_d"`` in the samples); all sites when None.
    root:
        The sample folder (default: ``$HEALTHLAB_SAMPLES`` or the repo's).

    Examples
    --------
    >>> cohort = load_cohort()
    >>> cohort.groupby("site")["cvd_event_10y"].mean().round(2).to_dict()
    {'site_a': 0.29, 'site_b': 0.13, 'site_c': 0.06, 'site_d': 0.21}
    """
    if site is not None:
        known = cohort_sites(root)
        if site not in known:
            raise InvalidInput(f"unknown site {site!r}: use one of {', '.join(known)}")
        frames = {site: load_cohort_sites(root)[site]}
    else:
        frames = load_cohort_sites(root)
    return pd.concat(frames.values(), ignore_index=True)


def load_city_tables(root: str | os.PathLike[str] | None = None) -> CityTables:
    """The smart-city tables, validated, with their keys checked.

    Every wearable reading's user is a registered patient, and every (city, day) of
    a reading has a city sensor row.
    """
    folder = samples_dir(root) / "city"
    patients = read_csv(folder / "patients.csv", "patients")
    wearables = read_csv(folder / "wearables.csv", "wearables")
    sensors = read_csv(folder / "city_sensors.csv", "city_sensors")
    source = str(folder / "wearables.csv")
    unknown = ~wearables["user_id"].isin(patients["user_id"])
    if unknown.any():
        raise failure(
            source,
            "user_id",
            "not a user_id of patients.csv",
            unknown,
            header_lines=1,
        )
    keys = pd.MultiIndex.from_frame(sensors[["city_id", "date"]])
    unmatched = ~pd.MultiIndex.from_frame(wearables[["city_id", "date"]]).isin(keys)
    if unmatched.any():
        raise failure(
            source,
            "city_id",
            "no city_sensors.csv row for this (city_id, date)",
            unmatched,
            header_lines=1,
        )
    return CityTables(patients, wearables, sensors)


def city_days(tables: CityTables | None = None) -> pd.DataFrame:
    """Wearable readings joined with their city's sensors of the same day.

    One row per user per day worn: ``user_id, date, city_id, bmi, calories_burned,
    steps, resting_hr, humidity, temperature, uv_index`` — the input of
    :func:`healthlab.score.health_score`.
    """
    if tables is None:
        tables = load_city_tables()
    return tables.wearables.merge(
        tables.city_sensors, on=["city_id", "date"], how="left", validate="m:1"
    )
