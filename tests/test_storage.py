"""Encrypted, content-addressed storage: round trips, every tampering refused, CIDs
equal to IPFS's (published vectors and the JS importer), key envelopes, keyring,
and the HTTP and IPFS-API stores against servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys import keys as eth_keys

from healthlab import storage
from healthlab.errors import ConfigurationError, HealthLabError, InvalidInput
from healthlab.storage import (
    HTTPStore,
    IPFSStore,
    Keyring,
    LocalStore,
    cid_of,
    fetch,
    fetch_file,
    fetch_frame,
    open_key,
    public_key_of,
    put,
    seal_key,
)
from healthlab.storage.cid import UnixFSHasher, cid_of_file, parse_cid
from healthlab.storage.encryption import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    decrypt,
    encrypt,
    encrypted_size,
)
from healthlab.storage.errors import (
    BlobCorrupted,
    BlobNotFound,
    BlobRejected,
    CidMismatch,
    ContentHashMismatch,
    EnvelopeNotForYou,
    EnvelopeRejected,
    InvalidCid,
    InvalidKey,
    KeyNotInKeyring,
    KeyringError,
    MissingDependency,
    ReadOnlyStore,
    StoreRefused,
    StoreUnreachable,
    WrongKey,
)

MiB = 1 << 20
REFERENCE = Path(__file__).parent / "ipfs_reference"


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_secret_free(exc: BaseException, *secrets: bytes) -> None:
    """No message in the chain of ``exc`` shows a secret, in hex or as bytes."""
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{seen} {seen!r}"
        for secret in secrets:
            assert secret.hex() not in text, f"a secret leaked into: {text}"
            assert repr(secret)[2:-1] not in text, f"a secret leaked into: {text}"
        seen = seen.__cause__ or seen.__context__


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "blobs")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("HEALTHLAB_HOME", str(path))
    return path


def files_in(folder: Path) -> list[str]:
    """Every entry of a folder, hidden (temporary) files included."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 2 * SEGMENT_SIZE + 12345],
)
def test_bytes_round_trip(store: LocalStore, size: int) -> None:
    data = random_bytes(size, seed=size)
    stored = put(data, store)
    segments = max(1, -(-size // SEGMENT_SIZE))
    assert stored.size == size
    assert stored.encrypted_size == HEADER_SIZE + size + TAG_SIZE * segments
    assert stored.encrypted_size == encrypted_size(size)
    assert stored.content_hash == hashlib.sha256(data).digest()
    assert stored.content_hash_hex == "0x" + hashlib.sha256(data).hexdigest()
    assert stored.media_type == "application/octet-stream"
    assert stored.uri == f"ipfs://{stored.cid}"
    assert len(stored.key) == 32
    blob = store.path(stored.cid).read_bytes()
    assert len(blob) == stored.encrypted_size
    assert cid_of(blob) == stored.cid
    assert files_in(store.root) == [stored.cid], "a temporary file was left behind"
    if size >= 32:
        assert data[:32] not in blob, "plaintext visible in the blob"
    got = fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)
    assert got == data
    hexed = stored.content_hash_hex
    assert fetch(stored.cid, stored.key, content_hash=hexed, store=store) == data


def test_put_uses_the_default_store_in_healthlab_home(home: Path) -> None:
    stored = put(b"cohort rows")
    assert (home / "blobs" / stored.cid).is_file()
    assert storage.default_store().root == home / "blobs"
    assert fetch(stored.uri, stored.key, content_hash=stored.content_hash) == (
        b"cohort rows"
    )


def test_every_put_gets_a_fresh_key_and_blob(store: LocalStore) -> None:
    first, second = put(b"same rows", store), put(b"same rows", store)
    assert first.key != second.key
    assert first.cid != second.cid
    assert first.content_hash == second.content_hash
    assert sorted(store.cids()) == sorted([first.cid, second.cid])


def test_file_round_trip_reads_and_writes_files(
    store: LocalStore, tmp_path: Path
) -> None:
    data = random_bytes(3 * MiB + 7, seed=3)
    source = tmp_path / "cohort.csv"
    source.write_bytes(data)
    stored = put(source, store)
    assert stored.size == len(data)
    assert stored.content_hash == hashlib.sha256(data).digest()
    assert stored.media_type == "application/octet-stream"
    target = tmp_path / "out" / "cohort.csv"
    written = fetch_file(
        stored.uri, stored.key, target, content_hash=stored.content_hash, store=store
    )
    assert written == target
    assert target.read_bytes() == data
    assert files_in(target.parent) == ["cohort.csv"]


def test_parquet_file_is_labelled_parquet(store: LocalStore, tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(path)
    assert put(path, store).media_type == "application/vnd.apache.parquet"


def test_fetch_file_leaves_nothing_when_a_check_fails(
    store: LocalStore, tmp_path: Path
) -> None:
    stored = put(random_bytes(MiB + 3), store)
    target = tmp_path / "out" / "data.bin"
    with pytest.raises(ContentHashMismatch):
        fetch_file(stored.uri, stored.key, target, content_hash=bytes(32), store=store)
    assert files_in(target.parent) == []


def cohort() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient": pd.Series(["p1", "p2", "p3", None], dtype="string"),
            "age": [54, 61, 47, 70],
            "sbp": [132.0, float("nan"), 118.5, 150.25],
            "smoker": [True, False, False, True],
            "visit": pd.to_datetime(
                ["2024-01-03", "2024-02-11", "2024-03-05", "2024-04-20"]
            ),
        },
        index=pd.Index([10, 11, 12, 13], name="row"),
    )


def test_dataframe_round_trip_as_parquet(store: LocalStore) -> None:
    frame = cohort()
    stored = put(frame, store)
    assert stored.media_type == "application/vnd.apache.parquet"
    raw = fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)
    assert raw[:4] == b"PAR1" and raw[-4:] == b"PAR1"
    got = fetch_frame(
        stored.uri, stored.key, content_hash=stored.content_hash, store=store
    )
    pd.testing.assert_frame_equal(got, frame)


def test_fetch_frame_refuses_bytes_that_are_not_parquet(store: LocalStore) -> None:
    stored = put(b"id,age\n1,54\n", store)
    with pytest.raises(InvalidInput, match="not a Parquet table"):
        fetch_frame(
            stored.uri, stored.key, content_hash=stored.content_hash, store=store
        )


def test_dataframes_need_pyarrow_and_say_so(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = put(cohort(), store)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow fails
    with pytest.raises(MissingDependency, match="pip install pyarrow"):
        put(cohort(), store)
    with pytest.raises(MissingDependency, match="pyarrow"):
        fetch_frame(
            stored.uri, stored.key, content_hash=stored.content_hash, store=store
        )
    assert store.cids() == [stored.cid], "the failed put stored something"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("cohort.csv", "str is ambiguous"),
        (12, "not int"),
        (Path("/nonexistent/cohort.csv"), "is not a file"),
    ],
)
def test_put_refuses_what_it_cannot_store(
    store: LocalStore, data: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        put(data, store)
    assert files_in(store.root) == []


def test_failed_put_leaves_no_file(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = storage.blobs.encrypt_stream

    def failing(read: Callable[[int], bytes], key: bytes) -> Iterator[bytes]:
        pieces = real(read, key)
        yield next(pieces)
        yield next(pieces)
        raise OSError("disk full")

    monkeypatch.setattr(storage.blobs, "encrypt_stream", failing)
    with pytest.raises(OSError, match="disk full"):
        put(random_bytes(3 * MiB), store)
    assert files_in(store.root) == []


def test_local_store_adds_idempotently(store: LocalStore, tmp_path: Path) -> None:
    stored = put(random_bytes(MiB), store)
    blob = store.path(stored.cid).read_bytes()
    copy = tmp_path / "copy"
    copy.write_bytes(blob)
    store.add_file(copy, stored.cid)
    other = LocalStore(tmp_path / "other")
    other.add_file(copy, stored.cid)  # from another folder: copied atomically
    for each in (store, other):
        assert files_in(each.root) == [stored.cid]
        assert each.path(stored.cid).read_bytes() == blob
        assert stat.S_IMODE(each.path(stored.cid).stat().st_mode) == 0o644
        assert stored.cid in each
    assert copy.read_bytes() == blob


def test_stored_never_shows_its_key(store: LocalStore) -> None:
    stored = put(b"rows", store)
    for text in (repr(stored), str(stored), f"{stored}"):
        assert stored.cid in text
        assert stored.key.hex() not in text
        assert repr(stored.key) not in text
        assert "key=" not in text


# ------------------------------------------------------------------ tampering
def segment(blob: bytes, index: int) -> bytes:
    start = HEADER_SIZE + index * (SEGMENT_SIZE + TAG_SIZE)
    return blob[start : start + SEGMENT_SIZE + TAG_SIZE]


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


SEG = SEGMENT_SIZE + TAG_SIZE
OTHER = encrypt(random_bytes(int(2.5 * MiB), seed=99), bytes(range(32)))

# a 2.5 MiB plaintext: three segments (1 MiB, 1 MiB, 0.5 MiB)
TAMPERINGS: dict[str, tuple[Callable[[bytes], bytes], type[BlobRejected]]] = {
    "header magic": (lambda b: flip(b, 0), BlobCorrupted),
    "header version": (lambda b: flip(b, 4), BlobCorrupted),
    "header segment size": (lambda b: flip(b, 5), BlobCorrupted),
    "header salt": (lambda b: flip(b, 10), WrongKey),
    "header nonce prefix": (lambda b: flip(b, 25), BlobCorrupted),
    "header key commitment": (lambda b: flip(b, 40), WrongKey),
    "first segment": (lambda b: flip(b, HEADER_SIZE + 100), BlobCorrupted),
    "middle segment": (lambda b: flip(b, HEADER_SIZE + SEG + 500_000), BlobCorrupted),
    "first segment's tag": (lambda b: flip(b, HEADER_SIZE + SEG - 1), BlobCorrupted),
    "last segment's tag": (lambda b: flip(b, len(b) - 1), BlobCorrupted),
    "cut at a segment boundary": (lambda b: b[: HEADER_SIZE + 2 * SEG], BlobCorrupted),
    "cut inside a segment": (lambda b: b[:-100], BlobCorrupted),
    "cut inside the last tag": (lambda b: b[:-1], BlobCorrupted),
    "header only": (lambda b: b[:HEADER_SIZE], BlobCorrupted),
    "cut inside the header": (lambda b: b[:30], BlobCorrupted),
    "empty": (lambda b: b"", BlobCorrupted),
    "one byte appended": (lambda b: b + b"\0", BlobCorrupted),
    "last segment repeated": (lambda b: b + b[HEADER_SIZE + 2 * SEG :], BlobCorrupted),
    "first two segments swapped": (
        lambda b: (
            b[:HEADER_SIZE] + segment(b, 1) + segment(b, 0) + b[HEADER_SIZE + 2 * SEG :]
        ),
        BlobCorrupted,
    ),
    "middle segment dropped": (
        lambda b: b[: HEADER_SIZE + SEG] + b[HEADER_SIZE + 2 * SEG :],
        BlobCorrupted,
    ),
    "segment from another blob": (
        lambda b: (
            b[: HEADER_SIZE + SEG] + segment(OTHER, 1) + b[HEADER_SIZE + 2 * SEG :]
        ),
        BlobCorrupted,
    ),
}


@pytest.fixture(scope="module")
def original() -> tuple[bytes, bytes, bytes]:
    """(plaintext, key, blob) of three segments."""
    data = random_bytes(int(2.5 * MiB), seed=7)
    key = os.urandom(32)
    return data, key, encrypt(data, key)


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_tampered_blob_is_rejected(
    case: str, original: tuple[bytes, bytes, bytes], store: LocalStore
) -> None:
    data, key, blob = original
    alter, error = TAMPERINGS[case]
    tampered = alter(blob)
    assert tampered != blob
    content_hash = hashlib.sha256(data).digest()
    cid = cid_of(blob)
    # the store serves altered bytes for the registered CID: refused where they
    # first fail to open (nothing after that is read, so not by the CID check)
    store.root.mkdir(parents=True, exist_ok=True)
    store.path(cid).write_bytes(tampered)
    with pytest.raises(error) as swapped:
        fetch(cid, key, content_hash=content_hash, store=store)
    assert_secret_free(swapped.value, key, data[:64])
    # the pointer was altered too (its CID is the altered blob's): decryption refuses
    store.path(cid_of(tampered)).write_bytes(tampered)
    with pytest.raises(error) as refused:
        fetch(cid_of(tampered), key, content_hash=content_hash, store=store)
    assert_secret_free(refused.value, key, data[:64])
    with pytest.raises(error):
        decrypt(tampered, key)


def test_the_untampered_blob_decrypts(original: tuple[bytes, bytes, bytes]) -> None:
    data, key, blob = original
    assert len(blob) == encrypted_size(len(data))
    assert decrypt(blob, key) == data


def test_one_flipped_byte_anywhere_is_rejected() -> None:
    key = os.urandom(32)
    blob = encrypt(b"a short dataset of sixty bytes or so, in one segment....", key)
    for at in range(len(blob)):
        with pytest.raises((BlobCorrupted, WrongKey)):
            decrypt(flip(blob, at), key)


# ---------------------------------------------------- wrong CID, key and hash
def test_wrong_key_is_refused_without_showing_it(store: LocalStore) -> None:
    stored = put(b"rows of one dataset", store)
    other = put(b"rows of another dataset", store)
    for key in (other.key, os.urandom(32)):
        with pytest.raises(WrongKey, match="does not open this blob") as caught:
            fetch(stored.uri, key, content_hash=stored.content_hash, store=store)
        assert_secret_free(caught.value, key, stored.key)


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "00" * 32, 7])
def test_malformed_key_is_refused_without_showing_it(
    store: LocalStore, key: Any
) -> None:
    stored = put(b"rows", store)
    with pytest.raises(InvalidKey, match="32 bytes") as caught:
        fetch(stored.uri, key, content_hash=stored.content_hash, store=store)
    if isinstance(key, bytes) and key:
        assert_secret_free(caught.value, key)


def test_wrong_content_hash_is_refused(store: LocalStore) -> None:
    stored = put(b"version 2 of the rows", store)
    registered = hashlib.sha256(b"version 1 of the rows").digest()
    with pytest.raises(ContentHashMismatch, match=registered.hex()) as caught:
        fetch(stored.uri, stored.key, content_hash=registered, store=store)
    assert_secret_free(caught.value, stored.key)
    with pytest.raises(InvalidInput, match="content_hash"):
        fetch(stored.uri, stored.key, content_hash="0x1234", store=store)


def test_unknown_cid_is_not_found(store: LocalStore) -> None:
    absent = cid_of(b"never stored")
    with pytest.raises(BlobNotFound, match=absent):
        fetch(f"ipfs://{absent}", os.urandom(32), content_hash=bytes(32), store=store)


def test_another_blobs_cid_is_refused(store: LocalStore) -> None:
    """The pointer names a blob the key does not open: refused, never decrypted."""
    stored = put(b"dataset A", store)
    other = put(b"dataset B", store)
    with pytest.raises(WrongKey):
        fetch(other.uri, stored.key, content_hash=stored.content_hash, store=store)


@pytest.mark.parametrize(
    "pointer",
    [
        "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN",
        "ipfs://not-a-cid",
        "../../etc/passwd",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk",  # truncated
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku/..",
        "https://example.org/cohort.csv",
        "",
    ],
)
def test_invalid_pointer_is_refused(store: LocalStore, pointer: str) -> None:
    with pytest.raises(InvalidCid):
        fetch(pointer, os.urandom(32), content_hash=bytes(32), store=store)


def test_pointer_forms_are_accepted() -> None:
    cid = cid_of(b"hello\n")
    for pointer in (cid, f"ipfs://{cid}", f"/ipfs/{cid}", f" ipfs://{cid}/ "):
        assert parse_cid(pointer) == cid


# ------------------------------------------------------------------- CIDs
def deterministic(size: int, seed: str) -> Iterator[bytes]:
    """kubo's test/cli/testutils DeterministicRandomReader: the ChaCha20 keystream
    under key sha256(seed) with a zero nonce (also in js-ipfs-unixfs's tests)."""
    key = hashlib.sha256(seed.encode()).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()
    zeros = bytes(MiB)
    while size:
        n = min(size, MiB)
        yield stream.update(zeros[:n])
        size -= n


KIB = 1024
V0 = {"raw_leaves": False, "cid_version": 0}  # kubo's legacy-cid-v0 / unixfs-v0-2015
V1 = {"chunk_size": MiB}  # kubo's test-cid-v1: CIDv1, raw leaves, 1 MiB, 174 links
V1_2025 = {"chunk_size": MiB, "max_links": 1024}  # unixfs-v1-2025
ADD_TEST = "kubo test/cli/add_test.go"
PROFILES = "kubo test/cli/cid_profiles_test.go"
JS_PROFILES = "js-ipfs-unixfs ipfs-unixfs-importer/test/ipip-499-profiles.spec.ts"
VECTORS = [
    # (content, settings, CID, source); content is bytes or (size, seed)
    (
        b"hello world",
        {},
        "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e",
        ADD_TEST,
    ),
    (b"hello world", V0, "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD", ADD_TEST),
    (
        b"hello world",
        {"raw_leaves": False},
        "bafybeihykld7uyxzogax6vgyvag42y7464eywpf55gxi5qpoisibh3c5wa",
        ADD_TEST,
    ),
    (
        b"hello\n",
        {},
        "bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am",
        "kubo test/sharness/t0114-gateway-subdomains/README.md",
    ),
    (
        b"hello\n",
        V0,
        "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN",
        "kubo test/sharness/t0114-gateway-subdomains/README.md",
    ),
    (
        (174 * MiB, "v1-seed"),
        V1,
        "bafybeigwduxcf2aawppv3isnfeshnimkyplvw3hthxjhr2bdeje4tdaicu",
        ADD_TEST,
    ),
    (
        (175 * MiB, "v1-seed"),
        V1,
        "bafybeidhd7lo2n2v7lta5yamob3xwhbxcczmmtmhquwhjesi35jntf7mpu",
        ADD_TEST,
    ),
    (
        (44544 * KIB, "v0-seed"),
        V0,
        "QmUbBALi174SnogsUzLpYbD4xPiBSFANF4iztWCsHbMKh2",
        PROFILES,
    ),
    (
        (44800 * KIB, "v0-seed"),
        V0,
        "QmepeWtdmS1hHXx1oZXsPUv6bMrfRRKfZcoPPU4eEfjnbf",
        PROFILES,
    ),
    (
        (174 * 262_144 + 1, "v0-seed"),
        V0,
        "QmV81WL765sC8DXsRhE5fJv2rwhS4icHRaf3J9Zk5FdRnW",
        JS_PROFILES,
    ),
    (
        (262_144, "chunk-v0-seed"),
        V0,
        "QmWmRj3dFDZdb6ABvbmKhEL6TmPbAfBZ1t5BxsEyJrcZhE",
        JS_PROFILES,
    ),
    (
        (262_145, "chunk-v0-seed"),
        V0,
        "QmYyLxtzZyW22zpoVAtKANLRHpDjZtNeDjQdJrcQNWoRkJ",
        JS_PROFILES,
    ),
    (
        (MiB, "chunk-v1-seed"),
        V1_2025,
        "bafkreiacndfy443ter6qr2tmbbdhadvxxheowwf75s6zehscklu6ezxmta",
        JS_PROFILES,
    ),
    (
        (MiB + 1, "chunk-v1-seed"),
        V1_2025,
        "bafybeigmix7t42i6jacydtquhet7srwvgpizfg7gjbq7627d35mjomtu64",
        JS_PROFILES,
    ),
    (
        (256 * MiB, "hello world"),
        {**V0, "max_links": 1024},
        "QmbBftNHWmjSWKLC49dMVrfnY8pjrJYntiAXirFJ7oJrNk",
        ADD_TEST,
    ),
]


@pytest.mark.parametrize(
    ("content", "settings", "cid", "source"),
    VECTORS,
    ids=[f"{i}-{v[2][:12]}" for i, v in enumerate(VECTORS)],
)
def test_cid_equals_published_vector(
    content: bytes | tuple[int, str], settings: dict[str, Any], cid: str, source: str
) -> None:
    hasher = UnixFSHasher(**settings)
    pieces = [content] if isinstance(content, bytes) else deterministic(*content)
    for piece in pieces:
        hasher.update(piece)
    assert hasher.cid() == cid, f"vector from {source}"
    if not settings and isinstance(content, bytes):
        assert cid_of(content) == cid


def test_cid_does_not_depend_on_how_bytes_are_fed() -> None:
    data = random_bytes(175 * 262_144 + 5, seed=11)
    whole = cid_of(data)
    for step in (1000, 100_003, 262_144, 262_145, 3 * MiB):
        hasher = UnixFSHasher()
        for start in range(0, len(data), step):
            hasher.update(data[start : start + step])
        assert hasher.cid() == whole, f"pieces of {step} bytes"
    assert whole.startswith("bafybei")  # a dag-pb root over raw leaves


def require_js_reference() -> str:
    """node, with the JS importer installed; skip locally / fail under CI."""
    node = shutil.which("node")
    if (
        node is None
        or not (REFERENCE / "node_modules" / "ipfs-unixfs-importer").is_dir()
    ):
        message = (
            "the JS IPFS importer is not installed: run `make setup` (npm ci in "
            "tests/ipfs_reference)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return node


def test_cid_equals_the_js_importers(tmp_path: Path, store: LocalStore) -> None:
    """The same CIDs as ipfs-unixfs-importer (Helia's) with kubo's CIDv1 settings,
    for sizes around one chunk and around 174 chunks (a second level)."""
    node = require_js_reference()
    sizes = [0, 1, 262_143, 262_144, 262_145, 174 * 262_144, 174 * 262_144 + 1]
    sizes.append(2 * 174 * 262_144 + 3)
    paths = []
    for size in sizes:
        path = tmp_path / f"random-{size}"
        path.write_bytes(random_bytes(size, seed=size))
        paths.append(path)
    stored = put(random_bytes(2 * MiB, seed=5), store)  # a real encrypted blob
    paths.append(store.path(stored.cid))
    result = subprocess.run(
        [node, str(REFERENCE / "cids.mjs"), *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REFERENCE,
    )
    theirs = json.loads(result.stdout)
    ours = {str(path): cid_of_file(path) for path in paths}
    assert ours == theirs
    assert theirs[str(store.path(stored.cid))] == stored.cid


# -------------------------------------------------------------- key envelopes
CONTEXT = b"chain 31337 | registry 0xabc | dataset 7 | researcher 0xdef | hash 0x12"


def test_envelope_opens_for_the_researcher_only() -> None:
    researcher, stranger = Account.create(), Account.create()
    data_key = os.urandom(32)
    envelope = seal_key(data_key, public_key_of(researcher.key), context=CONTEXT)
    assert len(envelope) == storage.ENVELOPE_SIZE == 102
    assert open_key(envelope, researcher.key, context=CONTEXT) == data_key
    again = seal_key(data_key, public_key_of(researcher.key), context=CONTEXT)
    assert again != envelope  # a fresh ephemeral key each time
    assert open_key(again, researcher.key, context=CONTEXT) == data_key
    with pytest.raises(EnvelopeNotForYou, match=researcher.address) as caught:
        open_key(envelope, stranger.key, context=CONTEXT)
    assert stranger.address in str(caught.value)
    assert_secret_free(caught.value, data_key, bytes(stranger.key))


def test_public_key_is_the_one_the_address_comes_from() -> None:
    account = Account.create()
    public = public_key_of(account.key)
    assert len(public) == 64
    assert storage.address_of(public) == account.address
    assert storage.address_of(b"\x04" + public) == account.address
    assert public == eth_keys.PrivateKey(bytes(account.key)).public_key.to_bytes()


def test_envelope_to_a_key_recovered_from_a_signature() -> None:
    """The owner needs nothing from the researcher but a signature (or a
    transaction)."""
    researcher = Account.create()
    signed = Account.sign_message(encode_defunct(text="request 7"), researcher.key)
    signature = eth_keys.Signature(
        vrs=(signed.v - 27, signed.r, signed.s)  # type: ignore[arg-type]
    )
    recovered = signature.recover_public_key_from_msg_hash(signed.message_hash)
    assert recovered.to_checksum_address() == researcher.address
    data_key = os.urandom(32)
    envelope = seal_key(data_key, recovered.to_bytes(), context=CONTEXT)
    assert open_key(envelope, researcher.key, context=CONTEXT) == data_key


@pytest.mark.parametrize(
    "context",
    [b"", CONTEXT[:-1], CONTEXT + b"\0", CONTEXT.replace(b"dataset 7", b"dataset 8")],
)
def test_envelope_does_not_open_in_another_context(context: bytes) -> None:
    researcher = Account.create()
    data_key = os.urandom(32)
    envelope = seal_key(data_key, public_key_of(researcher.key), context=CONTEXT)
    with pytest.raises(EnvelopeRejected, match="another context") as caught:
        open_key(envelope, researcher.key, context=context)
    assert not isinstance(caught.value, EnvelopeNotForYou)
    assert_secret_free(caught.value, data_key, bytes(researcher.key))


def test_every_altered_byte_of_an_envelope_is_rejected() -> None:
    researcher = Account.create()
    data_key = os.urandom(32)
    envelope = seal_key(data_key, public_key_of(researcher.key), context=CONTEXT)
    for at in range(len(envelope)):
        with pytest.raises(EnvelopeRejected) as caught:
            open_key(flip(envelope, at), researcher.key, context=CONTEXT)
        assert_secret_free(caught.value, data_key, bytes(researcher.key))
    for cut in (envelope[:-1], envelope + b"\0", b"", envelope[1:]):
        with pytest.raises(EnvelopeRejected, match="102"):
            open_key(cut, researcher.key, context=CONTEXT)


@pytest.mark.parametrize(
    ("public", "message"),
    [
        (bytes(63), "64 bytes"),
        (b"\x02" + bytes(64), "64 bytes"),
        (bytes(64), "not a point"),
        (b"\x04" + b"\x01" * 64, "not a point"),
        ("0x" + "00" * 64, "got str"),
    ],
)
def test_bad_public_key_is_refused(public: Any, message: str) -> None:
    with pytest.raises(InvalidKey, match=message):
        seal_key(os.urandom(32), public, context=CONTEXT)


@pytest.mark.parametrize(
    "private",
    [bytes(32), b"\xff" * 32, bytes(31), "0x" + "11" * 32],
)
def test_bad_private_key_is_refused_without_showing_it(private: Any) -> None:
    envelope = seal_key(os.urandom(32), public_key_of(b"\x11" * 32), context=CONTEXT)
    with pytest.raises(InvalidKey) as caught:
        open_key(envelope, private, context=CONTEXT)
    if isinstance(private, bytes) and any(private):
        assert_secret_free(caught.value, private)
    with pytest.raises(InvalidKey):
        public_key_of(private)


def test_context_must_be_bytes() -> None:
    with pytest.raises(InvalidInput, match="context must be bytes"):
        seal_key(os.urandom(32), public_key_of(b"\x11" * 32), context="dataset 7")  # type: ignore[arg-type]


# ------------------------------------------------------------------- keyring
def test_keyring_keeps_keys_in_a_private_file(home: Path, store: LocalStore) -> None:
    ring = Keyring()
    assert ring.path == home / "keyring.json"
    stored = put(b"rows", store, keyring=ring)
    assert stat.S_IMODE(ring.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert ring.key(stored.cid) == stored.key
    assert ring.key(stored.uri) == stored.key
    assert stored.cid in ring and len(ring) == 1 and ring.cids() == [stored.cid]
    entry = json.loads(ring.path.read_text())["keys"][stored.cid]
    assert entry["content_hash"] == stored.content_hash_hex
    assert entry["size"] == 4
    assert stored.key.hex() not in repr(ring)
    second = put(b"more rows", store, keyring=Keyring(ring.path))
    assert Keyring().key(second.cid) == second.key
    assert Keyring().key(stored.cid) == stored.key
    assert [p.name for p in home.iterdir() if p.name.startswith(".keyring-")] == []


def test_keyring_readable_by_others_is_refused(
    tmp_path: Path, store: LocalStore
) -> None:
    ring = Keyring(tmp_path / "ring.json")
    stored = put(b"rows", store, keyring=ring)
    for mode in (0o640, 0o604, 0o644):
        ring.path.chmod(mode)
        with pytest.raises(KeyringError, match=f"chmod 600 {ring.path}") as caught:
            ring.key(stored.cid)
        assert isinstance(caught.value, ConfigurationError)
        assert_secret_free(caught.value, stored.key)
        with pytest.raises(KeyringError, match="readable by other users"):
            ring.add(stored)
    ring.path.chmod(0o600)
    assert ring.key(stored.cid) == stored.key


def test_keyring_says_which_key_is_missing(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "ring.json")
    cid = cid_of(b"put elsewhere")
    with pytest.raises(KeyNotInKeyring, match=cid) as caught:
        ring.key(f"ipfs://{cid}")
    assert isinstance(caught.value, LookupError)
    assert str(ring.path) in str(caught.value)


def test_damaged_keyring_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(KeyringError, match="not a healthlab keyring"):
        Keyring(path).key(cid_of(b"x"))


# ---------------------------------------------------------------- HTTP store
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (the timeout test): nothing to report
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(
    handler: Callable[..., http.server.BaseHTTPRequestHandler],
) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 and a free port; its base URL."""
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def static(folder: Path) -> Callable[..., http.server.BaseHTTPRequestHandler]:
    def handler(*args: Any) -> http.server.BaseHTTPRequestHandler:
        return _Quiet(*args, directory=str(folder))

    return handler


def test_http_store_fetches_a_published_folder(store: LocalStore) -> None:
    stored = put(random_bytes(2 * MiB + 5, seed=21), store)
    with serving(static(store.root)) as base:
        remote = HTTPStore(base)
        got = fetch(
            stored.uri, stored.key, content_hash=stored.content_hash, store=remote
        )
        assert got == random_bytes(2 * MiB + 5, seed=21)
        absent = cid_of(b"not published")
        with pytest.raises(BlobNotFound, match=f"{base}/{absent} answered 404"):
            fetch(absent, stored.key, content_hash=stored.content_hash, store=remote)


def test_http_store_reads_the_gateway_form(store: LocalStore, tmp_path: Path) -> None:
    stored = put(b"rows behind a gateway", store)
    (tmp_path / "site" / "ipfs").mkdir(parents=True)
    shutil.copy(store.path(stored.cid), tmp_path / "site" / "ipfs" / stored.cid)
    with serving(static(tmp_path / "site")) as base:
        got = fetch(
            stored.uri,
            stored.key,
            content_hash=stored.content_hash,
            store=HTTPStore(f"{base}/ipfs/"),
        )
    assert got == b"rows behind a gateway"


def test_http_store_rejects_a_swapped_blob(store: LocalStore, tmp_path: Path) -> None:
    stored = put(b"the real rows", store)
    decoy = put(b"other rows", store)
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(store.path(decoy.cid), site / stored.cid)  # the host swaps the file
    with (
        serving(static(site)) as base,
        pytest.raises(WrongKey, match="the store served another blob"),
    ):
        fetch(
            stored.uri,
            stored.key,
            content_hash=stored.content_hash,
            store=HTTPStore(base),
        )


def test_http_store_reports_errors_clearly(store: LocalStore) -> None:
    stored = put(b"rows", store)

    class Failing(_Quiet):
        def do_GET(self) -> None:
            if self.path.startswith("/slow/"):
                time.sleep(1.0)
            self.send_error(503, "maintenance")

    with serving(Failing) as base:
        with pytest.raises(StoreRefused, match="HTTP 503"):
            fetch(
                stored.uri,
                stored.key,
                content_hash=stored.content_hash,
                store=HTTPStore(base),
            )
        slow = HTTPStore(f"{base}/slow", timeout=0.2)
        with pytest.raises(StoreUnreachable, match="timed out"):
            fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=slow)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(StoreUnreachable, match="could not connect"):
        fetch(
            stored.uri,
            stored.key,
            content_hash=stored.content_hash,
            store=HTTPStore(f"http://127.0.0.1:{closed}", timeout=2),
        )
    with pytest.raises(InvalidInput, match="http"):
        HTTPStore("ftp://example.org/blobs")


def test_http_store_is_read_only(store: LocalStore) -> None:
    with pytest.raises(ReadOnlyStore, match="LocalStore"):
        put(b"rows", HTTPStore("http://127.0.0.1:9"))


# --------------------------------------------------- IPFS API (a stand-in node)
class StandInNode:
    """A stand-in for kubo's RPC API (``/api/v0/add``, ``cat`` and ``block/get``).

    It is NOT an IPFS node: it computes the CID with healthlab's own hasher under
    the settings the request asks for, or, with ``legacy=True``, the CIDv0 a node
    that ignores them would give. The CID's correctness is what the vector and JS
    tests above check; this checks the API use.
    """

    def __init__(self, *, legacy: bool = False) -> None:
        self.legacy = legacy
        self.blobs: dict[str, bytes] = {}
        self.calls: list[tuple[str, dict[str, str]]] = []

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        node = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def reply(self, status: int, body: dict[str, Any]) -> None:
                data = (json.dumps(body) + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.reply(
                    405, {"Message": "405 - Method Not Allowed", "Type": "error"}
                )

            def do_POST(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                node.calls.append((url.path, params))
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if url.path == "/api/v0/add":
                    self.add(params, body)
                elif url.path == "/api/v0/block/get":
                    blob = node.blobs.get(params.get("arg", ""))
                    if blob is None:
                        self.reply(500, {"Message": "block not found", "Type": "error"})
                        return
                    hasher = UnixFSHasher()
                    hasher.update(blob)
                    hasher.cid()
                    block = hasher.root_block() or blob  # one raw block: itself
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(block)))
                    self.end_headers()
                    self.wfile.write(block)
                elif url.path == "/api/v0/cat":
                    blob = node.blobs.get(params.get("arg", ""))
                    if blob is None:
                        self.reply(500, {
                            "Message": "block was not found locally (offline): ipld: "
                            "could not find " + params.get("arg", ""),
                            "Code": 0,
                            "Type": "error",
                        })  # fmt: skip
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(blob)))
                    self.end_headers()
                    self.wfile.write(blob)
                else:
                    self.reply(404, {"Message": "unknown command", "Type": "error"})

            def add(self, params: dict[str, str], body: bytes) -> None:
                boundary = self.headers["Content-Type"].split("boundary=")[1]
                part = body.split(b"--" + boundary.encode())[1]
                blob = part.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")]
                if node.legacy:
                    hasher = UnixFSHasher(raw_leaves=False, cid_version=0)
                else:
                    hasher = UnixFSHasher(
                        chunk_size=int(params["chunker"].removeprefix("size-")),
                        raw_leaves=params["raw-leaves"] == "true",
                        cid_version=int(params["cid-version"]),
                    )
                hasher.update(blob)
                cid = hasher.cid()
                node.blobs[cid] = blob
                self.reply(200, {"Name": cid, "Hash": cid, "Size": str(len(blob))})

        return Handler


def test_ipfs_store_adds_pinned_and_cats(store: LocalStore) -> None:
    node = StandInNode()
    data = random_bytes(3 * MiB + 1, seed=31)
    with serving(node.handler()) as api:
        ipfs = IPFSStore(api)
        stored = put(data, ipfs)
        assert list(node.blobs) == [stored.cid]
        assert cid_of(node.blobs[stored.cid]) == stored.cid
        assert node.calls[0] == (
            "/api/v0/add",
            {
                "cid-version": "1",
                "raw-leaves": "true",
                "chunker": "size-262144",
                "hash": "sha2-256",
                "pin": "true",
                "progress": "false",
            },
        )
        got = fetch(
            stored.uri, stored.key, content_hash=stored.content_hash, store=ipfs
        )
        assert got == data
        assert node.calls[-2:] == [  # the root block (the size), then the blob
            ("/api/v0/block/get", {"arg": stored.cid}),
            ("/api/v0/cat", {"arg": stored.cid}),
        ]
        absent = cid_of(b"never added")
        with pytest.raises(BlobNotFound, match="could not find"):
            fetch(absent, stored.key, content_hash=stored.content_hash, store=ipfs)
    assert files_in(store.root) == []


def test_ipfs_store_refuses_a_node_that_computes_another_cid() -> None:
    node = StandInNode(legacy=True)
    with (
        serving(node.handler()) as api,
        pytest.raises(CidMismatch, match="computed Qm"),
    ):
        put(b"rows", IPFSStore(api))


def test_ipfs_store_unreachable_is_clear() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{port}"):
        put(b"rows", IPFSStore(f"http://127.0.0.1:{port}", timeout=2))


def test_storage_errors_belong_to_the_healthlab_families() -> None:
    assert issubclass(CidMismatch, HealthLabError)
    assert issubclass(WrongKey, BlobRejected)
    assert issubclass(InvalidCid, InvalidInput) and issubclass(InvalidKey, InvalidInput)
    assert issubclass(KeyringError, ConfigurationError)
    assert issubclass(MissingDependency, ImportError)
    assert issubclass(StoreUnreachable, ConnectionError)
    assert issubclass(EnvelopeRejected, PermissionError)
