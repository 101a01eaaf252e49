"""Listing in Ray tasks (jobs/infer/plan/listing.py) on the moto S3 endpoint: a prefix split on its
common prefixes, and an inventory's data files, give the serial listing's objects in its order."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.infer.commit import protocol
from jobs.infer.commit import state
from jobs.infer.plan import listing, planner
from jobs.infer.plan.inventory import iter_inventory
from jobs.infer.plan.listing import list_inputs
from jobs.infer.plan.sources import list_prefix
from test_infer_inventory import _listed, _rows, _s3, write_inventory

# Keys chosen so that a common prefix sorts between objects of its own level ("a.jpg" < "a/" <
# "a0.jpg", "a-b/" < "a.jpg"), with spaces, unicode, "directory" markers, empty and deep
# prefixes; and neighbours of the root ("arch.jpg", "arch2/") that are not under it.
TREE = ["a.jpg", "a/1.jpg", "a/2/x.png", "a/2/y.png", "a-b/c.jpg", "a0.jpg", "a b/ñandú.jpg", "b/", "b/c/d/e/f.jpg",
        "b/c/d/g.jpg", "b/c/h.jpg", "b/i.jpg", "ü/x.jpg", "z.jpg", "zz/", "zz/0.jpg", "zz/1.jpg", "zz/2.jpg",
        "zz/3/4.jpg"]
OUTSIDE = ["arch.jpg", "arch2/x.jpg", "archive/y.jpg"]


@pytest.fixture(scope="module")
def ray_workers(moto_server):
    import ray

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server}  # the tasks reach the moto server too
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _put(bucket, keys):
    s3 = _s3()
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else os.urandom(10 + i))


def _flat(parts):
    out = []
    for p in parts:
        out += list(p.objects) if p.prefix is None else list(list_prefix(p.prefix))
    return out


@pytest.mark.parametrize("target_parts,max_depth,prefix_parts", [(1, 1, 6), (6, 2, 6), (64, 3, 1), (1000, 9, 0)])
def test_a_split_prefix_is_the_serial_listing_in_its_order(s3_bucket, monkeypatch, target_parts, max_depth,
                                                           prefix_parts):
    _put(s3_bucket, [f"arch/{k}" for k in TREE] + OUTSIDE)
    monkeypatch.setattr(listing, "CHUNK", 3)  # several pages a level
    serial = list(list_prefix(f"s3://{s3_bucket}/arch"))
    assert len(serial) == 17 and not any(o.image_uri.endswith("/") or "arch2" in o.image_uri for o in serial)
    parts = listing.split_prefix(f"s3://{s3_bucket}/arch/", target_parts=target_parts, max_depth=max_depth)
    assert sum(p.prefix is not None for p in parts) == prefix_parts
    assert _flat(parts) == serial  # the same objects, etags, sizes, in the same order


def _in_tasks(parts):
    """Each part listed by a Ray task, as the planner's listing tasks list them; in part order."""
    import ray

    task = ray.remote(lambda part: list(listing.part_objects(part)))
    return [o for objects in ray.get([task.remote(p) for p in parts]) for o in objects]


def test_listing_in_tasks_gives_the_serial_listing(s3_bucket, ray_workers, monkeypatch):
    _put(s3_bucket, [f"arch/{k}" for k in TREE] + OUTSIDE)
    uri = f"s3://{s3_bucket}/arch"
    serial = list(list_inputs(uri))
    splits = []
    real_split = listing.split_prefix
    monkeypatch.setattr(listing, "split_prefix", lambda *a, **k: splits.append(real_split(*a, **k)) or splits[-1])
    for list_tasks in (1, 4, 64):
        assert _in_tasks(listing.input_parts(uri, list_tasks=list_tasks)) == serial
    assert len(serial) == 17
    # split as asked, each prefix part listed by a task: one level (6 prefixes), then three
    assert [sum(p.prefix is not None for p in parts) for parts in splits] == [6, 6, 1]


def test_levels_too_flat_to_split_are_listed_whole(s3_bucket, monkeypatch):
    _put(s3_bucket, [f"arch/{k}" for k in TREE])
    uri = f"s3://{s3_bucket}/arch"
    serial = list(list_prefix(uri))
    monkeypatch.setattr(listing, "MAX_SPLIT_OBJECTS", 2)  # the root level holds 3 objects
    assert listing.split_prefix(uri) == [listing.Part(prefix=f"s3://{s3_bucket}/arch/")]
    monkeypatch.setattr(listing, "MAX_SPLIT_OBJECTS", 6)  # room for the root and some of level 2
    parts = listing.split_prefix(uri, target_parts=64, max_depth=3)
    assert sum(len(p.objects) for p in parts) <= 6 and _flat(parts) == serial


def test_a_flat_prefix_is_listed_by_the_split_alone(s3_bucket, ray_workers, monkeypatch):
    keys = [f"flat/{i:03d}.jpg" for i in range(25)]
    _put(s3_bucket, keys)
    monkeypatch.setattr(listing, "CHUNK", 4)
    parts = listing.split_prefix(f"s3://{s3_bucket}/flat")
    assert [p.prefix for p in parts] == [None] and len(parts[0].objects) == 25
    assert _in_tasks(listing.input_parts(f"s3://{s3_bucket}/flat", list_tasks=8)) == list(list_prefix(f"s3://{s3_bucket}/flat"))


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_data_files_read_in_tasks_give_the_serial_read(s3_bucket, ray_workers, fmt):
    _put(s3_bucket, [f"arch/{k}" for k in TREE])
    dest = f"{s3_bucket}-inv"
    _s3().create_bucket(Bucket=dest)
    manifest = write_inventory(dest, s3_bucket, fmt, _rows(s3_bucket, _listed(s3_bucket)), n_files=3)
    serial = list(iter_inventory(manifest))
    assert len(serial) == 17
    parts = listing.input_parts(manifest, list_tasks=4)
    assert [p.inventory[1].uri for p in parts] == [f.uri for f in parts[0].inventory[0].files] and len(parts) == 3
    assert _in_tasks(parts) == serial == list(list_inputs(manifest))


def test_planning_in_tasks_gives_the_same_shards_whatever_the_listing(s3_bucket, ray_workers, tmp_path):
    """make_plan lists in tasks (a split prefix, an inventory's data files, or one serial part) and
    plans by bucket in tasks: the same shards and counts from every way of listing the same objects."""
    _put(s3_bucket, [f"arch/{k}" for k in TREE])
    dest = f"{s3_bucket}-inv"
    _s3().create_bucket(Bucket=dest)
    manifest = write_inventory(dest, s3_bucket, "Parquet", _rows(s3_bucket, _listed(s3_bucket)), n_files=3)
    out = str(tmp_path / "out")
    run = protocol.begin_run(out, {})
    plans = [planner.make_plan(run, uri, state.current(out), checkpoint_sha256="c" * 64, full=False, target_size=3,
                            list_tasks=tasks)
             for uri, tasks in [(f"s3://{s3_bucket}/arch", 4), (f"s3://{s3_bucket}/arch", 0), (manifest, 4)]]
    assert sum(plans[0].expected.values()) == plans[0].stats.planned == plans[0].stats.new == 17
    assert len(plans[0].expected) >= 3 and len(plans[0].files) >= 1
    for p in plans[1:]:
        assert p.expected == plans[0].expected and p.stats == plans[0].stats
    rows = pa.concat_tables([pq.read_table(f) for f in plans[0].files])
    assert sorted(rows.column("image_uri").to_pylist()) == sorted(o.image_uri for o in list_prefix(f"s3://{s3_bucket}/arch"))
