"""The S3 store the object-storage tests run against, reached the way a user reaches any S3 endpoint."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from contracts.fs import exists, parquet_files, read_bytes, resolve, write_bytes

pytestmark = pytest.mark.heavy


def test_pyarrow_round_trip_through_the_aws_variables(s3_store):
    """Only AWS_ENDPOINT_URL and the keys point pyarrow at the store: a small file, a multipart upload, Parquet."""
    filesystem, path = resolve(s3_store.uri("roundtrip", "small.bin"))
    assert isinstance(filesystem, pafs.S3FileSystem)
    write_bytes(s3_store.uri("roundtrip", "small.bin"), b"hello")
    assert read_bytes(s3_store.uri("roundtrip", "small.bin")) == b"hello"

    big = os.urandom(12 * 1024 * 1024)  # over pyarrow's part size: a multipart upload (UploadPart)
    write_bytes(s3_store.uri("roundtrip", "big.bin"), big)
    assert read_bytes(s3_store.uri("roundtrip", "big.bin")) == big

    table = pa.table({"x": np.arange(10_000), "y": [f"row-{i}" for i in range(10_000)]})
    filesystem, path = resolve(s3_store.uri("roundtrip", "table", "part-0.parquet"))
    pq.write_table(table, path, filesystem=filesystem)
    assert parquet_files(s3_store.uri("roundtrip", "table")) == [s3_store.uri("roundtrip", "table", "part-0.parquet")]
    assert pq.read_table(path, filesystem=filesystem).equals(table)
    assert not exists(s3_store.uri("roundtrip", "missing"))


def test_ray_workers_reach_the_store(s3_store, ray_session):
    """A Ray task writes and reads through the same variables: they reached the workers."""

    @ray_session.remote
    def round_trip(uri: str) -> bytes:
        write_bytes(uri, b"from a worker")
        return read_bytes(uri)

    uri = s3_store.uri("roundtrip", "worker.bin")
    assert ray_session.get(round_trip.remote(uri)) == b"from a worker"
    assert read_bytes(uri) == b"from a worker"


def test_a_restarted_store_keeps_its_objects(s3_store):
    """Stopped and started on the same ports and data dir, the store answers again with what it held."""
    uri = s3_store.uri("roundtrip", "kept.bin")
    write_bytes(uri, b"kept")
    s3_store.stop()
    with pytest.raises(OSError):
        read_bytes(uri)
    s3_store.start()
    assert read_bytes(uri) == b"kept"


def test_every_new_bucket_takes_writes(s3_store):
    """Each bucket is a collection of its own in SeaweedFS: a handful of them must all take uploads."""
    filesystem = s3_store.filesystem(create_buckets=True)
    for index in range(4):
        bucket = f"extra-{index}"
        filesystem.create_dir(bucket)
        with filesystem.open_output_stream(f"{bucket}/x.bin") as stream:
            stream.write(b"x" * 1000)
        with filesystem.open_input_stream(f"{bucket}/x.bin") as stream:
            assert stream.read() == b"x" * 1000
