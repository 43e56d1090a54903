"""Split one table into simulated sites, for teaching and tests.

``by_column`` keeps a natural split (e.g. the hospital a row came from); ``iid`` and
``dirichlet`` use flwr-datasets' partitioners (``IidPartitioner``,
``DirichletPartitioner``) on local pandas data, offline.
"""

from __future__ import annotations

import os

import pandas as pd

from healthlab.errors import InvalidInput

__all__ = ["by_column", "dirichlet", "iid"]

_ROW = "__healthlab_row__"


def by_column(frame: pd.DataFrame, column: str) -> dict[str, pd.DataFrame]:
    """One site per value of ``column`` (the column is kept)."""
    if column not in frame.columns:
        raise InvalidInput(f"no column {column!r} to split by")
    return {
        str(value): part.reset_index(drop=True)
        for value, part in frame.groupby(column, sort=True)
    }


def _partition(
    frame: pd.DataFrame, partitioner: object, n: int, prefix: str
) -> dict[str, pd.DataFrame]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    table = frame.reset_index(drop=True).assign(**{_ROW: range(len(frame))})
    partitioner.dataset = datasets.Dataset.from_pandas(table, preserve_index=False)  # type: ignore[attr-defined]
    sites = {}
    for i in range(n):
        part = partitioner.load_partition(i).to_pandas()  # type: ignore[attr-defined]
        rows = part[_ROW].to_numpy()
        sites[f"{prefix}{i}"] = frame.iloc[rows].reset_index(drop=True)
    return sites


def iid(
    frame: pd.DataFrame, n_sites: int, *, seed: int = 42, prefix: str = "site_"
) -> dict[str, pd.DataFrame]:
    """``n_sites`` random, equally sized sites (flwr-datasets ``IidPartitioner``).

    The partitioner takes contiguous shards, so the rows are shuffled (``seed``) first.
    """
    from flwr_datasets.partitioner import IidPartitioner

    if n_sites < 1:
        raise InvalidInput("n_sites must be at least 1")
    shuffled = frame.sample(frac=1.0, random_state=seed)
    return _partition(shuffled, IidPartitioner(num_partitions=n_sites), n_sites, prefix)


def dirichlet(
    frame: pd.DataFrame,
    n_sites: int,
    label: str,
    *,
    alpha: float = 0.5,
    seed: int = 42,
    min_rows: int = 10,
    prefix: str = "site_",
) -> dict[str, pd.DataFrame]:
    """Label-skewed sites: per label, site shares drawn from Dirichlet(``alpha``).

    Smaller ``alpha`` means more skew. flwr-datasets' ``DirichletPartitioner``
    redraws until every site holds at least ``min_rows`` rows.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    if label not in frame.columns:
        raise InvalidInput(f"no label column {label!r}")
    partitioner = DirichletPartitioner(
        num_partitions=n_sites,
        partition_by=label,
        alpha=alpha,
        seed=seed,
        min_partition_size=min_rows,
        self_balancing=False,
    )
    return _partition(frame, partitioner, n_sites, prefix)
