"""jobs.storage on local files and on a moto S3 server reached through AWS_ENDPOINT_URL."""

import gzip
import hashlib
import itertools
import os
import types

import pytest

from jobs import storage
from jobs.infer.plan.listing import list_inputs
from jobs.infer.plan import sources
from jobs.infer.schema import SourceObject
from jobs.storage import ReadError


def make_tree(root):
    files = {
        "a.jpg": b"a" * 10,
        "B.PNG": b"b" * 11,
        "notes.json": b"{}",
        "sub/c.webp": b"c" * 12,
        "sub/deeper/d.tiff": b"d" * 13,
        "sub/deeper/e.txt": b"e",
        "sub2/f.bmp": b"f" * 14,
        "phone/IMG_0001.HEIC": b"g" * 15,
        "phone/h.avif": b"h" * 16,
        "web/i.gif": b"i" * 17,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


# ------------------------------------------------------------------ local

def test_local_listing_uris_sizes_etags(tmp_path):
    files = make_tree(tmp_path)
    got = list(sources.list_prefix(str(tmp_path)))
    assert len(got) == len(files)
    by_uri = {o.image_uri: o for o in got}
    for rel, data in files.items():
        uri = f"file://{tmp_path}/{rel}"
        o = by_uri[uri]
        st = os.stat(tmp_path / rel)
        assert o.source_size == len(data)
        assert o.source_etag == f"{st.st_mtime_ns}-{st.st_size}"
        assert o.error is None


def test_local_etag_changes_when_file_is_rewritten(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"1234")
    before = next(sources.list_prefix(str(tmp_path)))
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    p.write_bytes(b"5678")  # same size, new mtime
    after = next(sources.list_prefix(str(tmp_path)))
    assert before.image_uri == after.image_uri and before.source_size == after.source_size == 4
    assert before.source_etag != after.source_etag


def test_list_inputs_filters_image_extensions_case_insensitively(tmp_path):
    make_tree(tmp_path)
    names = sorted(o.image_uri.rsplit("/", 1)[1] for o in list_inputs(str(tmp_path)))
    assert names == ["B.PNG", "IMG_0001.HEIC", "a.jpg", "c.webp", "d.tiff", "f.bmp", "h.avif", "i.gif"]


def test_local_listing_is_lazy(tmp_path, monkeypatch):
    for i in range(40):
        (tmp_path / f"d{i:02d}").mkdir()
        (tmp_path / f"d{i:02d}" / "x.jpg").write_bytes(b"x")
    calls = []
    real = os.scandir

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    gen = sources.list_prefix(str(tmp_path))
    assert isinstance(gen, types.GeneratorType)
    assert calls == []  # nothing listed before the first item is asked for
    first = next(gen)
    assert first.image_uri.endswith("/x.jpg")
    assert len(calls) == 2  # the root and one subdirectory, not all 41 directories
    assert len(list(gen)) == 39
    assert len(calls) == 41


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input directory not found"):
        list(sources.list_prefix(str(tmp_path / "nope")))


def test_list_file_streams_uris_and_stats_them_in_order(tmp_path):
    make_tree(tmp_path)
    lines = [
        "# comment",
        str(tmp_path / "sub/c.webp"),
        "",
        f"file://{tmp_path}/a.jpg",
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "notes.json"),  # explicit list: any extension is an input
        str(tmp_path / "sub"),  # a directory is not a file
    ]
    for name, opener in (("inputs.txt", open), ("inputs.txt.gz", gzip.open)):
        with opener(tmp_path / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
        uris = sources.iter_list_file(str(tmp_path / name))
        assert isinstance(uris, types.GeneratorType)
        assert list(uris) == [l for l in lines if l and not l.startswith("#")]
        got = list(list_inputs(str(tmp_path / name)))
        assert [o.image_uri for o in got] == [
            f"file://{tmp_path}/sub/c.webp",
            f"file://{tmp_path}/a.jpg",
            f"file://{tmp_path}/missing.jpg",
            f"file://{tmp_path}/notes.json",
            f"file://{tmp_path}/sub",
        ]
        assert [o.source_size for o in got] == [12, 10, None, 2, None]
        assert got[0].error is None and got[1].error is None and got[3].error is None
        assert got[2].error.startswith("source not found")
        assert got[4].error.startswith("not a file")
        assert [o.error_kind for o in got] == [None, None, "not_found", None, "not_found"]


def test_stat_uris_is_lazy_over_an_endless_input(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"x")
    endless = (str(tmp_path / "x.jpg") for _ in itertools.count())
    first = list(itertools.islice(sources.stat_uris(endless, concurrency=4), 5))
    assert [o.source_size for o in first] == [1] * 5


def test_read_object_limits_and_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"0123456789")
    assert storage.read_object(str(tmp_path / "x.jpg"), max_bytes=10) == b"0123456789"
    with pytest.raises(ReadError, match="file too large") as e:
        storage.read_object(str(tmp_path / "x.jpg"), max_bytes=9)
    assert e.value.kind == "limit"
    with pytest.raises(ReadError, match="source not found") as e:
        storage.read_object(str(tmp_path / "nope.jpg"))
    assert e.value.kind == "not_found"


def test_normalize_etag():
    assert sources.normalize_etag('"abc"') == "abc"
    assert sources.normalize_etag('W/"abc-3"') == "abc-3"
    assert sources.normalize_etag("") is None
    assert sources.normalize_etag(None) is None


# ------------------------------------------------------------------ S3 (moto)

def put_objects(bucket, objects):
    import s3fs

    fs = s3fs.S3FileSystem()
    for key, data in objects.items():
        fs.pipe_file(f"{bucket}/{key}", data)


def test_resolve_uses_aws_endpoint_url(s3_bucket, moto_server):
    fs, path = storage.resolve(f"s3://{s3_bucket}/x")
    assert path == f"{s3_bucket}/x"
    assert fs.endpoint_url == moto_server
    assert storage.storage_options("gs://b/x") == {}


def test_s3_listing_streams_pages_with_etags_and_sizes(s3_bucket, monkeypatch):
    objects = {f"imgs/{i:03d}.jpg": bytes([i]) * (i + 1) for i in range(25)}
    objects["imgs/sub/"] = b""  # a "directory marker" object
    objects["imgs2/other.jpg"] = b"not under imgs/"
    put_objects(s3_bucket, objects)

    fs, _ = storage.resolve(f"s3://{s3_bucket}/imgs")
    pages = []
    real = fs.call_s3

    def counting(method, **kw):
        pages.append(kw.get("ContinuationToken"))
        return real(method, **kw)

    monkeypatch.setattr(fs, "call_s3", counting)
    gen = sources.list_prefix(f"s3://{s3_bucket}/imgs", page_size=10)
    assert isinstance(gen, types.GeneratorType)
    first = next(gen)
    assert len(pages) == 1  # first item after one request, before the listing finishes
    rest = list(gen)
    assert len(pages) == 3  # 25 keys in pages of 10
    got = [first] + rest
    assert len(got) == 25
    for i, o in enumerate(got):
        data = objects[f"imgs/{i:03d}.jpg"]
        assert o == SourceObject(f"s3://{s3_bucket}/imgs/{i:03d}.jpg", hashlib.md5(data).hexdigest(), len(data))


def test_s3_list_file_and_read(s3_bucket):
    put_objects(s3_bucket, {"a/x.png": b"12345", "a/y.jpg": b"1", "a/empty.jpg": b""})
    listing = f"s3://{s3_bucket}/a/x.png\ns3://{s3_bucket}/a/gone.jpg\ns3a://{s3_bucket}/a/y.jpg\n"
    put_objects(s3_bucket, {"lists/in.txt": listing.encode()})
    got = list(list_inputs(f"s3://{s3_bucket}/lists/in.txt"))
    assert [o.image_uri for o in got] == [
        f"s3://{s3_bucket}/a/x.png",
        f"s3://{s3_bucket}/a/gone.jpg",
        f"s3://{s3_bucket}/a/y.jpg",  # s3a:// spelled canonically
    ]
    assert got[0].source_etag == hashlib.md5(b"12345").hexdigest() and got[0].source_size == 5
    assert got[1].error.startswith("source not found")
    assert storage.read_object(got[0].image_uri) == b"12345"
    assert storage.read_object(f"s3://{s3_bucket}/a/empty.jpg") == b""  # S3 gives 416 for its range
    with pytest.raises(ReadError, match="file too large"):
        storage.read_object(got[0].image_uri, max_bytes=4)
    with pytest.raises(ReadError, match="source not found") as e:
        storage.read_object(got[1].image_uri)
    assert e.value.kind == "not_found" and got[1].error_kind == "not_found"


def test_other_fsspec_filesystems_use_walk(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/t-{tmp_path.name}"
    fs.pipe_file(f"{root}/a/x.jpg", b"12")
    fs.pipe_file(f"{root}/a/b/y.PNG", b"123")
    fs.pipe_file(f"{root}/a/readme.md", b"1")
    got = list(list_inputs(f"memory://{root}/a"))
    assert sorted(o.image_uri for o in got) == [f"memory://{root}/a/b/y.PNG", f"memory://{root}/a/x.jpg"]
    assert sorted(o.source_size for o in got) == [2, 3]
    assert all(o.source_etag and o.source_etag.startswith("mtime-") for o in got)  # no ETag: creation time + size
    assert storage.read_object(f"memory://{root}/a/x.jpg") == b"12"


# ------------------------------------------------------------------ failures and retries

def _client_error(code, status):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _as_s3fs_raises(error):
    """The exception s3fs raises for a botocore error (translated, the ClientError as cause)."""
    from s3fs.errors import translate_boto_error

    try:
        raise translate_boto_error(error)
    except Exception as e:  # noqa: BLE001
        return e


def test_classify_storage_error_by_store_answer_then_type():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    cases = {
        "unavailable": [_client_error("SlowDown", 503), _client_error("ServiceUnavailable", 503),
                        _client_error("InternalError", 500), _client_error("Whatever", 502),
                        _client_error("ExpiredToken", 400), _client_error("RequestTimeout", 400),
                        _as_s3fs_raises(_client_error("SlowDown", 503)),
                        _as_s3fs_raises(_client_error("ExpiredToken", 400)),
                        OSError(16, "Please reduce your request rate"),  # s3fs's SlowDown without a cause
                        ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"),
                        EndpointConnectionError(endpoint_url="http://x"), ConnectionClosedError(endpoint_url="http://x"),
                        ReadTimeoutError(endpoint_url="http://x"), aiohttp.ServerDisconnectedError()],
        "access": [_client_error("AccessDenied", 403), _as_s3fs_raises(_client_error("AccessDenied", 403)),
                   _client_error("InvalidAccessKeyId", 403), PermissionError("denied")],
        "not_found": [_client_error("NoSuchKey", 404), _as_s3fs_raises(_client_error("NoSuchKey", 404)),
                      FileNotFoundError("gone")],
        "read": [ValueError("odd"), OSError(22, "The specified bucket is not valid."),
                 _client_error("InvalidArgument", 400)],
    }
    for kind, errors in cases.items():
        for e in errors:
            assert storage.classify_storage_error(e) == kind, (kind, repr(e))
    assert sum(map(len, cases.values())) == 25


def test_call_with_retries_retries_only_unavailable_and_stops_at_attempts():
    sleeps = []
    calls = iter([_client_error("SlowDown", 503), _client_error("SlowDown", 503), "ok"])

    def flaky():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    policy = storage.RetryPolicy(attempts=3, base_s=0.5, cap_s=0.75)
    assert storage.call_with_retries(flaky, policy, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 0.75  # capped backoff

    n = []
    def always(e):
        def f():
            n.append(1)
            raise e
        return f
    with pytest.raises(Exception) as ei:
        storage.call_with_retries(always(_client_error("SlowDown", 503)), policy, sleep=lambda s: None)
    assert len(n) == 3 and ei.value.retry_attempts == 3
    n.clear()
    with pytest.raises(PermissionError):
        storage.call_with_retries(always(PermissionError("denied")), policy, sleep=lambda s: None)
    assert len(n) == 1  # not a transient failure: no retry
    with pytest.raises(ValueError):
        storage.RetryPolicy(attempts=0)


def test_read_object_rides_out_throttling_through_a_faulty_proxy(faulty_s3):
    bucket, proxy = faulty_s3
    put_objects(bucket, {"a/x.png": b"12345"})
    uri = f"s3://{bucket}/a/x.png"
    # s3fs retries SlowDown 5 times per call: 12 failures need the job's third attempt
    proxy.fail_first_gets = 12
    assert storage.read_object(uri, retry=storage.RetryPolicy(attempts=4, base_s=0.01)) == b"12345"
    assert proxy.injected["slowdown"] == 12
    proxy._per_key.clear()
    with pytest.raises(ReadError) as e:  # the same faults with fewer attempts than they need
        storage.read_object(uri, retry=storage.RetryPolicy(attempts=2, base_s=0.01))
    assert e.value.kind == "unavailable" and "after 2 attempts" in e.value.reason
    proxy.reset()
    proxy.reset_every = 1  # every GET's connection reset
    with pytest.raises(ReadError) as e:
        storage.read_object(uri, retry=storage.RetryPolicy(attempts=2, base_s=0.01))
    assert e.value.kind == "unavailable"
    proxy.reset()
    proxy.down = True  # listing pages fail as unavailable too, after their retries
    with pytest.raises(OSError) as e:
        list(sources.list_prefix(f"s3://{bucket}/a", retry=storage.RetryPolicy(attempts=2, base_s=0.01)))
    assert storage.classify_storage_error(e.value) == "unavailable"
    proxy.reset()
    assert [o.image_uri for o in sources.list_prefix(f"s3://{bucket}/a")] == [uri]
