"""jobs.infer.storage on local files and on a moto S3 server reached through AWS_ENDPOINT_URL."""

import gzip
import hashlib
import itertools
import os
import types

import pytest

from jobs.infer import storage
from jobs.infer.storage import ReadError, SourceObject


def make_tree(root):
    files = {
        "a.jpg": b"a" * 10,
        "B.PNG": b"b" * 11,
        "notes.json": b"{}",
        "sub/c.webp": b"c" * 12,
        "sub/deeper/d.tiff": b"d" * 13,
        "sub/deeper/e.txt": b"e",
        "sub2/f.bmp": b"f" * 14,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


# ------------------------------------------------------------------ local

def test_local_listing_uris_sizes_etags(tmp_path):
    files = make_tree(tmp_path)
    got = list(storage.list_prefix(str(tmp_path)))
    assert len(got) == len(files)
    by_uri = {o.uri: o for o in got}
    for rel, data in files.items():
        uri = f"file://{tmp_path}/{rel}"
        o = by_uri[uri]
        st = os.stat(tmp_path / rel)
        assert o.size == len(data)
        assert o.etag == f"{st.st_mtime_ns}-{st.st_size}"
        assert o.error is None


def test_local_etag_changes_when_file_is_rewritten(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"1234")
    before = next(storage.list_prefix(str(tmp_path)))
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    p.write_bytes(b"5678")  # same size, new mtime
    after = next(storage.list_prefix(str(tmp_path)))
    assert before.uri == after.uri and before.size == after.size == 4
    assert before.etag != after.etag


def test_list_inputs_filters_image_extensions_case_insensitively(tmp_path):
    make_tree(tmp_path)
    names = sorted(o.uri.rsplit("/", 1)[1] for o in storage.list_inputs(str(tmp_path)))
    assert names == ["B.PNG", "a.jpg", "c.webp", "d.tiff", "f.bmp"]


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
    gen = storage.list_prefix(str(tmp_path))
    assert isinstance(gen, types.GeneratorType)
    assert calls == []  # nothing listed before the first item is asked for
    first = next(gen)
    assert first.uri.endswith("/x.jpg")
    assert len(calls) == 2  # the root and one subdirectory, not all 41 directories
    assert len(list(gen)) == 39
    assert len(calls) == 41


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input directory not found"):
        list(storage.list_prefix(str(tmp_path / "nope")))


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
        uris = storage.iter_list_file(str(tmp_path / name))
        assert isinstance(uris, types.GeneratorType)
        assert list(uris) == [l for l in lines if l and not l.startswith("#")]
        got = list(storage.list_inputs(str(tmp_path / name)))
        assert [o.uri for o in got] == [
            f"file://{tmp_path}/sub/c.webp",
            f"file://{tmp_path}/a.jpg",
            f"file://{tmp_path}/missing.jpg",
            f"file://{tmp_path}/notes.json",
            f"file://{tmp_path}/sub",
        ]
        assert [o.size for o in got] == [12, 10, None, 2, None]
        assert got[0].error is None and got[1].error is None and got[3].error is None
        assert got[2].error.startswith("source not found")
        assert got[4].error.startswith("not a file")


def test_stat_uris_is_lazy_over_an_endless_input(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"x")
    endless = (str(tmp_path / "x.jpg") for _ in itertools.count())
    first = list(itertools.islice(storage.stat_uris(endless, concurrency=4), 5))
    assert [o.size for o in first] == [1] * 5


def test_read_object_limits_and_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"0123456789")
    assert storage.read_object(str(tmp_path / "x.jpg"), max_bytes=10) == b"0123456789"
    with pytest.raises(ReadError, match="file too large"):
        storage.read_object(str(tmp_path / "x.jpg"), max_bytes=9)
    with pytest.raises(ReadError, match="source not found"):
        storage.read_object(str(tmp_path / "nope.jpg"))


def test_normalize_etag():
    assert storage.normalize_etag('"abc"') == "abc"
    assert storage.normalize_etag('W/"abc-3"') == "abc-3"
    assert storage.normalize_etag("") is None
    assert storage.normalize_etag(None) is None


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
    gen = storage.list_prefix(f"s3://{s3_bucket}/imgs", page_size=10)
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
    got = list(storage.list_inputs(f"s3://{s3_bucket}/lists/in.txt"))
    assert [o.uri for o in got] == [
        f"s3://{s3_bucket}/a/x.png",
        f"s3://{s3_bucket}/a/gone.jpg",
        f"s3://{s3_bucket}/a/y.jpg",  # s3a:// spelled canonically
    ]
    assert got[0].etag == hashlib.md5(b"12345").hexdigest() and got[0].size == 5
    assert got[1].error.startswith("source not found")
    assert storage.read_object(got[0].uri) == b"12345"
    assert storage.read_object(f"s3://{s3_bucket}/a/empty.jpg") == b""  # S3 gives 416 for its range
    with pytest.raises(ReadError, match="file too large"):
        storage.read_object(got[0].uri, max_bytes=4)
    with pytest.raises(ReadError, match="source not found"):
        storage.read_object(got[1].uri)


def test_other_fsspec_filesystems_use_walk(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/t-{tmp_path.name}"
    fs.pipe_file(f"{root}/a/x.jpg", b"12")
    fs.pipe_file(f"{root}/a/b/y.PNG", b"123")
    fs.pipe_file(f"{root}/a/readme.md", b"1")
    got = list(storage.list_inputs(f"memory://{root}/a"))
    assert sorted(o.uri for o in got) == [f"memory://{root}/a/b/y.PNG", f"memory://{root}/a/x.jpg"]
    assert sorted(o.size for o in got) == [2, 3]
    assert all(o.etag and o.etag.startswith("mtime-") for o in got)  # no ETag: creation time + size
    assert storage.read_object(f"memory://{root}/a/x.jpg") == b"12"
