#!/usr/bin/env python3
"""Generate HealthLab's synthetic sample data, byte for byte reproducibly.

Usage::

    python data_samples/generate.py            # (re)write the files beside this script
    python data_samples/generate.py --out DIR  # write them into DIR instead
    python data_samples/generate.py --check    # regenerate into a temp dir and fail
                                               # if any committed file differs

Every number comes from one ``numpy.random.default_rng(SEED)`` stream, drawn in a
fixed order (the cohort's follow-up times from one stream per hospital,
``default_rng([SEED, ord(prefix)])``, so the other columns keep their draws);
floats are written with one decimal and lines end in ``\\n``, so the output
depends only on this script and the numpy version (numpy does not promise the
same ``Generator`` streams across releases: ``--check`` catches a drift).

Nothing here describes a real person. See ``data_samples/README.md`` for the data
dictionary and for how each column is made.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20_240_517
HERE = Path(__file__).resolve().parent
FLOAT_FORMAT = "%.1f"

# ------------------------------------------------------------------ clinical cohort
COHORT_COLUMNS = [
    "patient_id",
    "site",
    "age",
    "sex",
    "bmi",
    "sbp",
    "cholesterol",
    "glucose",
    "smoker",
    "diabetes",
    "cvd_event_10y",
    "followup_years",
]


@dataclass(frozen=True)
class Hospital:
    """Case mix of one hospital site."""

    site: str
    prefix: str
    rows: int
    age_mean: float
    age_sd: float
    female: float
    smoker: float
    bmi_shift: float
    sbp_shift: float
    diabetes_shift: float  # added to the diabetes log-odds
    hazard_ratio: float  # residual sickness not explained by the risk factors
    missing: tuple[float, float, float]  # share missing: bmi, cholesterol, glucose


HOSPITALS = [
    # tertiary university hospital: referrals, older and sicker, the largest
    Hospital(
        site="site_a",
        prefix="A",
        rows=2400,
        age_mean=64.0,
        age_sd=11.0,
        female=0.44,
        smoker=0.21,
        bmi_shift=1.2,
        sbp_shift=6.0,
        diabetes_shift=0.5,
        hazard_ratio=1.2,
        missing=(0.02, 0.04, 0.03),
    ),
    # general city hospital
    Hospital(
        site="site_b",
        prefix="B",
        rows=1500,
        age_mean=56.0,
        age_sd=12.0,
        female=0.52,
        smoker=0.19,
        bmi_shift=0.3,
        sbp_shift=1.0,
        diabetes_shift=0.0,
        hazard_ratio=1.0,
        missing=(0.01, 0.03, 0.05),
    ),
    # community health centre: younger, healthier, more women
    Hospital(
        site="site_c",
        prefix="C",
        rows=900,
        age_mean=45.0,
        age_sd=10.0,
        female=0.58,
        smoker=0.16,
        bmi_shift=-0.8,
        sbp_shift=-3.0,
        diabetes_shift=-0.4,
        hazard_ratio=0.9,
        missing=(0.04, 0.07, 0.06),
    ),
    # rural district hospital: small, more smokers, patchier records
    Hospital(
        site="site_d",
        prefix="D",
        rows=450,
        age_mean=59.0,
        age_sd=12.0,
        female=0.49,
        smoker=0.29,
        bmi_shift=1.6,
        sbp_shift=4.0,
        diabetes_shift=0.3,
        hazard_ratio=1.1,
        missing=(0.06, 0.08, 0.09),
    ),
]

# D'Agostino et al. (2008) general cardiovascular risk profile, Circulation
# 117:743-753, Table 2: coefficients on ln(age), ln(total cholesterol mg/dL),
# ln(HDL mg/dL), ln(untreated SBP), smoker, diabetes; mean of the linear
# predictor; 10-year baseline survival.
FRAMINGHAM = {
    "F": (2.32888, 1.20904, -0.70833, 2.76157, 0.52873, 0.69154, 26.1931, 0.95012),
    "M": (3.06117, 1.12370, -0.93263, 1.93303, 0.65451, 0.57367, 23.9802, 0.88936),
}
MG_DL_PER_MMOL_L = 38.67  # cholesterol


def hospital_cohort(rng: np.random.Generator, h: Hospital) -> pd.DataFrame:
    """One site's patients: risk factors, a Framingham-like outcome, missing values."""
    n = h.rows
    age = np.clip(np.rint(rng.normal(h.age_mean, h.age_sd, n)), 30, 89).astype(int)
    female = rng.random(n) < h.female
    male = ~female
    bmi = np.clip(
        rng.normal(27.0 + h.bmi_shift + 0.04 * (age - 50) - 0.4 * female, 4.6),
        16.0,
        55.0,
    )
    smoker = rng.random(n) < h.smoker * np.where(male, 1.15, 0.85) * np.where(
        age > 65, 0.7, 1.0
    )
    logit_dm = -2.6 + 0.05 * (age - 55) + 0.13 * (bmi - 27) + h.diabetes_shift
    diabetes = rng.random(n) < 1 / (1 + np.exp(-logit_dm))
    sbp = np.clip(
        np.rint(
            rng.normal(
                122 + 0.55 * (age - 50) + 0.9 * (bmi - 27) + 4 * male + h.sbp_shift,
                15.0,
            )
        ),
        85,
        230,
    ).astype(int)
    cholesterol = np.clip(
        rng.normal(
            5.2 + 0.012 * (age - 50) + 0.03 * (bmi - 27) + 0.2 * female, 0.95, n
        ),
        2.6,
        10.5,
    )
    glucose_normal = np.clip(
        rng.normal(5.1 + 0.008 * (age - 50) + 0.04 * (bmi - 27), 0.45), 3.5, 6.9
    )
    glucose_dm = np.clip(rng.normal(8.3, 2.1, n), 5.5, 22.0)
    glucose = np.where(diabetes, glucose_dm, glucose_normal)
    hdl = np.clip(rng.normal(np.where(female, 58, 46) - 0.6 * (bmi - 27), 12), 20, 100)

    # 10-year risk from the Framingham equations (HDL is latent: it is not exported)
    risk = np.empty(n)
    for sex, rows in (("F", female), ("M", male)):
        b_age, b_tc, b_hdl, b_sbp, b_smk, b_dm, mean, s0 = FRAMINGHAM[sex]
        lp = (
            b_age * np.log(age[rows])
            + b_tc * np.log(cholesterol[rows] * MG_DL_PER_MMOL_L)
            + b_hdl * np.log(hdl[rows])
            + b_sbp * np.log(sbp[rows])
            + b_smk * smoker[rows]
            + b_dm * diabetes[rows]
        )
        risk[rows] = 1 - s0 ** (np.exp(lp - mean) * h.hazard_ratio)
    event = rng.random(n) < risk

    # follow-up, from a stream of its own (the columns above keep their draws): an
    # exponential time to the event with the same 10-year risk, 1 − e^(−10λ) =
    # risk, drawn within the 10 years for an event; without one, followed to 10
    # years, or lost to follow-up earlier (12 %)
    follow = np.random.default_rng([SEED, ord(h.prefix)])
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = -np.log1p(-risk) / 10
        event_time = -np.log1p(-follow.random(n) * risk) / rate
    lost = follow.random(n) < 0.12
    censored = np.where(lost, follow.uniform(0.5, 10.0, n), 10.0)
    followup = np.clip(np.where(event, event_time, censored), 0.1, 10.0)

    frame = pd.DataFrame(
        {
            "patient_id": [f"{h.prefix}{i:05d}" for i in range(1, n + 1)],
            "site": h.site,
            "age": age,
            "sex": np.where(female, "F", "M"),
            "bmi": np.round(bmi, 1),
            "sbp": sbp,
            "cholesterol": np.round(cholesterol, 1),
            "glucose": np.round(glucose, 1),
            "smoker": smoker.astype(int),
            "diabetes": diabetes.astype(int),
            "cvd_event_10y": event.astype(int),
            "followup_years": np.round(followup, 1),
        }
    )
    for column, share in zip(("bmi", "cholesterol", "glucose"), h.missing, strict=True):
        frame.loc[rng.random(n) < share, column] = np.nan
    return frame[COHORT_COLUMNS]


# --------------------------------------------------------------- smart-city tables
START = "2025-04-01"
DAYS = 90
USERS = 240


@dataclass(frozen=True)
class City:
    """Climate of one city: annual mean and amplitude, humidity, clear-sky UV peak."""

    city_id: str
    share: float  # of the programme's users
    temp_mean: float
    temp_amplitude: float
    humidity: float
    uv_peak: float
    sites: tuple[str, ...]  # hospitals holding its citizens' records


CITIES = [
    City("coastal", 0.40, 16.0, 6.0, 76.0, 9.0, ("site_a", "site_b")),
    City("inland", 0.35, 15.0, 11.0, 52.0, 10.5, ("site_c",)),
    City("northern", 0.25, 7.0, 9.0, 70.0, 6.0, ("site_d",)),
]
#: Sites that publish records on IPFS; the others serve them over HTTPS.
IPFS_SITES = {"site_a", "site_c"}
ICD10 = ["E11", "E66", "I10", "I25", "J45", "E78", "M54", "F32"]


def city_sensors(rng: np.random.Generator) -> pd.DataFrame:
    """Daily humidity, temperature and UV per city: a seasonal curve plus weather."""
    dates = pd.date_range(START, periods=DAYS, freq="D")
    doy = dates.day_of_year.to_numpy()
    season = np.sin(2 * np.pi * (doy - 105) / 365)  # peaks mid-July
    frames = []
    for city in CITIES:
        weather = np.empty(DAYS)  # AR(1) day-to-day anomaly, °C
        weather[0] = rng.normal(0, 2.5)
        for day in range(1, DAYS):
            weather[day] = 0.7 * weather[day - 1] + rng.normal(0, 1.8)
        temperature = city.temp_mean + city.temp_amplitude * season + weather
        cloud = rng.beta(1.6, 2.4, DAYS)
        humidity = np.clip(
            city.humidity - 1.3 * weather + 25 * (cloud - 0.4) + rng.normal(0, 5, DAYS),
            15,
            100,
        )
        clear_sky_uv = city.uv_peak * (0.55 + 0.45 * season)
        uv = np.clip(clear_sky_uv * (1 - 0.75 * cloud), 0, None)
        frames.append(
            pd.DataFrame(
                {
                    "city_id": city.city_id,
                    "date": dates.strftime("%Y-%m-%d"),
                    "humidity": np.round(humidity, 1),
                    "temperature": np.round(temperature, 1),
                    "uv_index": np.round(uv, 1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def record_bytes(record: dict[str, object]) -> bytes:
    """The canonical bytes of a synthetic health record (what the hash covers)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def cid_v1_raw(data: bytes) -> str:
    """IPFS CIDv1 (raw codec, sha2-256, base32) of a small file's bytes."""
    multihash = bytes([0x12, 0x20]) + hashlib.sha256(data).digest()
    encoded = base64.b32encode(bytes([0x01, 0x55]) + multihash).decode()
    return "b" + encoded.lower().rstrip("=")


def city_programme(
    rng: np.random.Generator, sensors: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, list[bytes]]:
    """Patients (with their records) and their daily wearable readings."""
    ids = [f"U{i:04d}" for i in range(1, USERS + 1)]
    city_of = rng.choice(len(CITIES), USERS, p=[c.share for c in CITIES])
    female = rng.random(USERS) < 0.52
    birth_year = rng.integers(1945, 2004, USERS)
    height = np.clip(rng.normal(np.where(female, 1.63, 1.77), 0.07), 1.45, 2.02)
    bmi0 = np.clip(rng.normal(26.3, 4.4, USERS), 17.0, 45.0)
    has_scale = rng.random(USERS) < 0.88
    steps0 = np.clip(rng.lognormal(np.log(6500), 0.45, USERS), 1500, 18000)
    hr0 = np.clip(
        rng.normal(71 - 0.0008 * (steps0 - 6500) + 0.35 * (bmi0 - 26), 6.0), 45, 98
    )
    wear = rng.random(USERS) * 0.08 + 0.90  # share of days the device is worn

    patients, records = [], []
    for i, uid in enumerate(ids):
        city = CITIES[city_of[i]]
        site = city.sites[rng.integers(len(city.sites))]
        n_conditions = min(int(rng.poisson(0.8)), 4)
        record = {
            "user_id": uid,
            "site": site,
            "birth_year": int(birth_year[i]),
            "sex": "F" if female[i] else "M",
            "height_cm": round(float(height[i]) * 100),
            "conditions": sorted(
                str(c) for c in rng.choice(ICD10, n_conditions, replace=False)
            ),
            "synthetic": True,
        }
        data = record_bytes(record)
        records.append(data)
        pointer = (
            f"ipfs://{cid_v1_raw(data)}"
            if site in IPFS_SITES
            else f"https://records.{site.replace('_', '-')}.example/fhir/Patient/{uid}"
        )
        patients.append(
            {
                "user_id": uid,
                "site": site,
                "record_pointer": pointer,
                "content_hash": "0x" + hashlib.sha256(data).hexdigest(),
            }
        )

    weather = sensors.set_index(["city_id", "date"])
    dates = sensors["date"].iloc[:DAYS].tolist()
    weekend = pd.to_datetime(pd.Series(dates)).dt.day_of_week.to_numpy() >= 5
    rows = []
    for i, uid in enumerate(ids):
        city = CITIES[city_of[i]].city_id
        day_weather = weather.loc[city].loc[dates]
        temp = day_weather["temperature"].to_numpy()
        humid = day_weather["humidity"].to_numpy()
        worn = rng.random(DAYS) < wear[i]
        bmi = np.round(bmi0[i] + np.cumsum(rng.normal(0, 0.02, DAYS)), 1)
        if not has_scale[i]:
            bmi = np.full(DAYS, np.nan)
        # people walk less on weekends, in heat above 27 °C, cold below 5 °C, and in
        # muggy weather
        mood = (
            np.where(weekend, 0.85, 1.0)
            * np.where(temp > 27, 1 - 0.04 * (temp - 27), 1.0)
            * np.where(temp < 5, 1 - 0.03 * (5 - temp), 1.0)
            * np.where(humid > 85, 0.9, 1.0)
        )
        steps = np.clip(
            np.rint(steps0[i] * mood * rng.lognormal(0, 0.3, DAYS)), 0, 40000
        )
        weight = bmi0[i] * height[i] ** 2
        calories = np.rint(
            steps * 0.00055 * weight + rng.gamma(2.0, 35.0, DAYS)
        )  # active kcal
        resting = np.rint(
            hr0[i] + 0.15 * np.clip(temp - 22, 0, None) + rng.normal(0, 2.2, DAYS)
        )
        synced = rng.random(DAYS) >= 0.006
        steps[~synced] = np.nan
        calories[~synced] = np.nan
        resting[rng.random(DAYS) < 0.03] = np.nan
        rows.append(
            pd.DataFrame(
                {
                    "user_id": uid,
                    "date": dates,
                    "city_id": city,
                    "bmi": bmi,
                    "calories_burned": calories,
                    "steps": steps,
                    "resting_hr": resting,
                }
            )[worn]
        )
    wearables = pd.concat(rows, ignore_index=True)
    for column in ("calories_burned", "steps", "resting_hr"):
        wearables[column] = wearables[column].astype("Int64")  # written as integers
    return pd.DataFrame(patients), wearables, records


# -------------------------------------------------------------------------- writing
def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write with fixed float format, ``\\n`` line ends and empty cells for missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def generate(out: Path) -> list[Path]:
    """Write every sample file under ``out``; return their paths."""
    rng = np.random.default_rng(SEED)
    written = []
    for hospital in HOSPITALS:
        path = out / "cohort" / f"{hospital.site}.csv"
        write_csv(hospital_cohort(rng, hospital), path)
        written.append(path)
    sensors = city_sensors(rng)
    patients, wearables, records = city_programme(rng, sensors)
    for name, frame in (
        ("patients", patients),
        ("wearables", wearables),
        ("city_sensors", sensors),
    ):
        path = out / "city" / f"{name}.csv"
        write_csv(frame, path)
        written.append(path)
    path = out / "city" / "records.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in records))
    written.append(path)
    return written


def check(committed: Path) -> list[str]:
    """Regenerate into a temp dir; the committed files that differ or are missing."""
    with tempfile.TemporaryDirectory(prefix="healthlab-samples-") as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for path in fresh:
            relative = path.relative_to(tmp)
            target = committed / relative
            if not target.is_file():
                problems.append(f"{relative}: missing")
            elif target.read_bytes() != path.read_bytes():
                problems.append(f"{relative}: differs from the generator's output")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for line in problems:
            print(f"data_samples: {line}", file=sys.stderr)
        if problems:
            print(
                "data_samples: run `python data_samples/generate.py` and commit",
                file=sys.stderr,
            )
            return 1
        print("data_samples: all files match the generator")
        return 0
    for path in generate(args.out):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
