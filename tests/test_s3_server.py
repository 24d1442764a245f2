"""The local S3 server works for every client the lake uses: delta-rs (storage_options) and s3fs."""
from __future__ import annotations

import pyarrow as pa


def test_delta_rs_round_trip_and_s3fs_listing(s3_server):
    import fsspec
    from deltalake import DeltaTable, write_deltalake

    bucket = s3_server.make_bucket("laion-s3-smoke")
    assert bucket == "s3://laion-s3-smoke"
    uri = f"{bucket}/t"
    data = pa.table({"uid": ["a", "b", "c"], "n": [1, 2, 3]})
    write_deltalake(uri, data, storage_options=s3_server.storage_options)
    write_deltalake(uri, data.slice(0, 1), mode="append", storage_options=s3_server.storage_options)
    table = DeltaTable(uri, storage_options=s3_server.storage_options)
    assert table.version() == 1
    got = table.to_pyarrow_table().sort_by("n")
    assert got.column("uid").to_pylist() == ["a", "a", "b", "c"]

    fs = fsspec.filesystem("s3", **s3_server.fsspec_options)
    listed = fs.ls("laion-s3-smoke/t")
    assert "laion-s3-smoke/t/_delta_log" in listed
    assert sum(p.endswith(".parquet") for p in listed) == 2
    commits = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("laion-s3-smoke/t/_delta_log"))
    assert commits[:2] == ["00000000000000000000.json", "00000000000000000001.json"]


def test_conditional_put_refuses_an_existing_key(s3_server):
    """delta-rs relies on If-None-Match: * for safe concurrent commits; the server must honour it,
    or the concurrency tests on this server would prove nothing."""
    import boto3
    import botocore.exceptions
    import pytest

    s3_server.make_bucket("laion-s3-cond")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint,
                          aws_access_key_id=s3_server.fsspec_options["key"],
                          aws_secret_access_key=s3_server.fsspec_options["secret"], region_name="us-east-1")
    client.put_object(Bucket="laion-s3-cond", Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.put_object(Bucket="laion-s3-cond", Key="k", Body=b"2", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] in {"PreconditionFailed", "ConditionalRequestConflict"}
    assert client.get_object(Bucket="laion-s3-cond", Key="k")["Body"].read() == b"1"
