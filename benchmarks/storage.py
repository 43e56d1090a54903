"""Encrypted storage of a dataset file against a plain copy: time, bytes, memory.

Run as ``.venv/bin/python benchmarks/storage.py`` (``--mb`` to change the size). It is
a measurement, not a test: it always exits 0. On ``--mb`` MB (10**6 bytes) of random,
incompressible bytes in a file (written once, not timed), best of ``--repeat`` runs:

* the baseline: copy the file into a folder and compute its sha256 in the same pass
  (what storing it in clear with its content hash costs);
* ``healthlab.storage.put`` of the file into a ``LocalStore``: read, sha256 of the
  plaintext, AES-256-GCM in 1 MiB segments, IPFS CID of the blob, atomic write;
  and, alone, the parts it is made of (encrypt, CID);
* ``fetch_file`` (fetch, check the CID, decrypt, check the content hash, write) and
  ``fetch`` into memory, against reading the plain copy back with its sha256;
* the bytes the blob adds (header and one tag per segment) and the peak Python heap
  of ``put`` and ``fetch_file`` (tracemalloc, a separate untimed run): the memory
  stays bounded by a few segments, whatever the file's size.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab.storage import LocalStore, cid_of_file, fetch, fetch_file, put
from healthlab.storage.encryption import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    encrypt_stream,
)

T = TypeVar("T")
PIECE = 1 << 20


def best_of(repeat: int, action: Callable[[], T], reset: Callable[[], None]) -> float:
    """Least wall time of ``repeat`` runs of ``action`` (``reset`` after each)."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        gc.collect()
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
        reset()
    return best


def peak_heap(action: Callable[[], T]) -> tuple[int, T]:
    """Peak bytes of Python allocations while ``action`` runs, and its result."""
    gc.collect()
    tracemalloc.start()
    try:
        result = action()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def copy_with_sha256(source: Path, target: Path) -> bytes:
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        while piece := reader.read(PIECE):
            digest.update(piece)
            writer.write(piece)
    return digest.digest()


def read_with_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while piece := reader.read(PIECE):
            digest.update(piece)
    return digest.digest()


def encrypt_only(source: Path, key: bytes) -> int:
    with source.open("rb") as reader:
        return sum(len(p) for p in encrypt_stream(reader.read, key))


def empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def row(label: str, seconds: float, size: int, baseline: float | None = None) -> None:
    rate = size / seconds / 1e6 if seconds > 0 else float("inf")
    ratio = f"{seconds / baseline:6.2f}x baseline" if baseline else ""
    print(f"{label:<52}{seconds:8.3f} s {rate:9.1f} MB/s  {ratio}")


def machine_info() -> list[str]:
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("cryptography", "numpy")
    )
    return [
        f"machine    {cpu_model()}, {os.cpu_count()} cores; {platform.platform()}",
        f"python     {platform.python_version()}; {versions}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="file size, MB (100)")
    parser.add_argument("--repeat", type=int, default=3, help="best of R runs (3)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (0)")
    args = parser.parse_args(argv)
    size = int(args.mb * 1e6)
    started = time.perf_counter()
    print("HealthLab encrypted storage benchmark")
    print("command    " + shlex.join([sys.executable, *sys.argv]))
    for line in machine_info():
        print(line)

    with tempfile.TemporaryDirectory(prefix="bench-storage-") as temp:
        root = Path(temp)
        source = root / "dataset.bin"
        source.write_bytes(np.random.default_rng(args.seed).bytes(size))
        print(
            f"data       {size:,} random bytes in a file ({size / 1e6:g} MB); "
            f"best of {args.repeat}; the files sit in {root.parent} (page cache warm)"
        )
        plain_dir, store = root / "plain", LocalStore(root / "blobs")
        plain_dir.mkdir()
        out = root / "out"
        out.mkdir()

        print(f"\n== Store: put vs copy + sha256 ({size / 1e6:g} MB) ==")
        copy = plain_dir / "dataset.bin"
        baseline = best_of(
            args.repeat, lambda: copy_with_sha256(source, copy), lambda: None
        )
        row("baseline: copy + sha256 (one pass)", baseline, size)
        row(
            "  copy alone (shutil.copyfile)",
            best_of(args.repeat, lambda: shutil.copyfile(source, copy), lambda: None),
            size,
            baseline,
        )
        key = os.urandom(32)
        row(
            "  AES-256-GCM alone (1 MiB segments, discarded)",
            best_of(args.repeat, lambda: encrypt_only(source, key), lambda: None),
            size,
            baseline,
        )
        put_time = best_of(
            args.repeat, lambda: put(source, store), lambda: empty(store.root)
        )
        stored = put(source, store)  # the blob the fetch figures use
        blob = store.path(stored.cid)
        row(
            "  IPFS CID alone (of the blob, from the file)",
            best_of(args.repeat, lambda: cid_of_file(blob), lambda: None),
            size,
            baseline,
        )
        row("put: sha256 + encrypt + CID + atomic write", put_time, size, baseline)
        print(
            f"put costs {put_time - baseline:+.3f} s over the baseline "
            f"({put_time / baseline:.2f}x); {stored.cid}"
        )

        print("\n== Fetch: fetch (check CID, decrypt, check hash) vs read + sha256 ==")
        read_base = best_of(args.repeat, lambda: read_with_sha256(copy), lambda: None)
        row("baseline: read the plain copy + sha256", read_base, size)
        target = out / "dataset.bin"
        fetched_file = best_of(
            args.repeat,
            lambda: fetch_file(
                stored.uri,
                stored.key,
                target,
                content_hash=stored.content_hash,
                store=store,
            ),
            lambda: target.unlink(),
        )
        row(
            "fetch_file: into a file, renamed once checked",
            fetched_file,
            size,
            read_base,
        )
        fetched = best_of(
            args.repeat,
            lambda: fetch(
                stored.uri, stored.key, content_hash=stored.content_hash, store=store
            ),
            lambda: None,
        )
        row("fetch: into memory (bytes)", fetched, size, read_base)
        same = (
            fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)
            == source.read_bytes()
        )
        print(f"round trip equal to the original: {same}")

        print("\n== Size ==")
        segments = -(-size // SEGMENT_SIZE)
        overhead = stored.encrypted_size - stored.size
        print(
            f"plaintext {stored.size:,} B; blob {stored.encrypted_size:,} B; overhead "
            f"{overhead:,} B = header {HEADER_SIZE} + {segments} segments x "
            f"{TAG_SIZE}-byte tag ({overhead / stored.size:.4%})"
        )

        print("\n== Memory (peak Python heap, tracemalloc, untimed runs) ==")
        empty(store.root)
        put_peak, again = peak_heap(lambda: put(source, store))
        fetch_peak, _ = peak_heap(
            lambda: fetch_file(
                again.uri,
                again.key,
                target,
                content_hash=again.content_hash,
                store=store,
            )
        )
        print(
            f"put {put_peak / 2**20:.1f} MiB, fetch_file {fetch_peak / 2**20:.1f} MiB "
            f"for a {size / 2**20:.0f} MiB file (segments of {SEGMENT_SIZE // 2**20} "
            "MiB); fetch() into memory holds the whole plaintext by design"
        )

    print(f"\nruntime    {time.perf_counter() - started:.1f} s")
    print(
        f"SUMMARY: put {size / put_time / 1e6:.0f} MB/s ({put_time / baseline:.2f}x "
        f"copy+sha256), fetch_file {size / fetched_file / 1e6:.0f} MB/s "
        f"({fetched_file / read_base:.2f}x read+sha256), +{overhead:,} B "
        f"({overhead / size:.3%}), peak heap put {put_peak / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
