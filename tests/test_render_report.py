"""jobs.render and jobs.report against a small output written with jobs.infer.schema.

The dataset: run r1 with four ok images (noise PNG, an EXIF-rotated JPEG, an image with no
instances, and a PNG on a moto S3 bucket) and two error rows; an older run r0 holds a
different row for one image, so "latest per image" and "this run only" are both exercised.
Masks are pycocotools encodings of known shapes; renders are compared pixel by pixel with
the source decoded by jobs.infer.execute.decode.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import render, report
from jobs.infer import schema
from jobs.infer.summary import RunSummary
from jobs.infer.execute.decode import decode_image

NAMES = {1: "cat", 2: "dog", 3: "bird"}
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
T1 = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)


def _noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _result(masks_labels_scores):
    """A Predictor-style result from (mask, label, score) triples."""
    masks, boxes = [], []
    for m, _, _ in masks_labels_scores:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        masks.append(rle)
        x, y, bw, bh = mask_utils.toBbox(rle)
        boxes.append([x, y, x + bw, y + bh])
    return {
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.array([lab for _, lab, _ in masks_labels_scores], np.int64),
        "scores": np.array([s for _, _, s in masks_labels_scores], np.float32),
        "label_names": [NAMES[lab] for _, lab, _ in masks_labels_scores],
        "areas": np.array([int(m.sum()) for m, _, _ in masks_labels_scores], np.int64),
        "masks": masks,
    }


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rotated_jpeg(arr):
    # Stored landscape with EXIF orientation 6: viewers (and decode_image) show it portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path, s3_bucket):
    """Writes the output dataset; returns (out_dir, {uri: (source pixels, [(mask, label, score)])})."""
    import s3fs

    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "out"
    images = {}

    a_uri = f"file://{src}/a.png"
    a = _noise(160, 240, 0)
    (src / "a.png").write_bytes(_png(a))
    a_inst = [(_disk(160, 240, 80, 50, 35), 1, 0.95), (_rect(160, 240, 100, 20, 160, 140), 2, 0.8),
              (_rect(160, 240, 175, 100, 235, 150), 3, 0.5)]
    images[a_uri] = (decode_image((src / "a.png").read_bytes()), a_inst)

    b_uri = f"file://{src}/b.jpg"
    (src / "b.jpg").write_bytes(_rotated_jpeg(_noise(96, 128, 1)))
    b_pix = decode_image((src / "b.jpg").read_bytes())
    assert b_pix.shape == (128, 96, 3)  # EXIF applied: the stored JPEG is 128 wide, 96 high
    b_inst = [(_disk(128, 96, 45, 48, 30), 1, 0.7), (_rect(128, 96, 20, 105, 40, 120), 3, 0.3)]
    images[b_uri] = (b_pix, b_inst)

    d_uri = f"file://{src}/d.png"
    (src / "d.png").write_bytes(_png(_noise(64, 80, 3)))
    images[d_uri] = (decode_image((src / "d.png").read_bytes()), [])

    c_uri = f"s3://{s3_bucket}/src/c.png"
    s3fs.S3FileSystem().pipe_file(c_uri, _png(_noise(90, 120, 2)))
    c_inst = [(_rect(90, 120, 5, 20, 55, 80), 2, 0.9), (_rect(90, 120, 62, 20, 115, 80), 2, 0.6)]
    images[c_uri] = (decode_image(_png(_noise(90, 120, 2))), c_inst)

    common = dict(model_name="maskrcnn_resnet50_fpn", checkpoint_sha256="ab" * 32, source_etag="e", source_size=1)
    rows = []
    for uri, (pix, inst) in images.items():
        h, w = pix.shape[:2]
        rows.append(schema.ok_row(_result(inst), image_uri=uri, width=w, height=h, run_id="r1",
                                  processed_at=T1, **common))
    rows.append(schema.error_row(image_uri=f"file://{src}/e1.jpg", run_id="r1", processed_at=T1,
                                 reason="corrupt or truncated JPEG data: <script>alert(1)</script>", kind="decode", **common))
    rows.append(schema.error_row(image_uri=f"file://{src}/missing.jpg", run_id="r1", processed_at=T1,
                                 reason=f"source not found: file://{src}/missing.jpg", kind="not_found", **common))
    table = schema.rows_to_table(rows)
    schema.validate_table(table)
    (out / "run_id=r1").mkdir(parents=True)
    pq.write_table(table, out / "run_id=r1" / "part-0.parquet", **schema.PARQUET_WRITE_OPTIONS)

    # An older run's row for a.png (a high-scoring bird in the top-left corner): superseded.
    old = schema.ok_row(_result([(_rect(160, 240, 0, 0, 60, 30), 3, 0.99)]), image_uri=a_uri, width=240,
                        height=160, run_id="r0", processed_at=T0, **common)
    (out / "run_id=r0").mkdir()
    pq.write_table(schema.rows_to_table([old]), out / "run_id=r0" / "part-0.parquet", **schema.PARQUET_WRITE_OPTIONS)
    # Staged, uncommitted rows must never be read.
    (out / "_staging" / "r2").mkdir(parents=True)
    staged = schema.ok_row(_result([(_rect(64, 80, 0, 0, 80, 64), 3, 0.99)]), image_uri=d_uri, width=80, height=64,
                           run_id="r2", processed_at=T1 + dt.timedelta(days=1), **common)
    pq.write_table(schema.rows_to_table([staged]), out / "_staging" / "r2" / "part-0.parquet",
                   **schema.PARQUET_WRITE_OPTIONS)

    summary = RunSummary("r1")
    summary.add_shard(schema.shard_counts(table))
    summary.listed, summary.planned, summary.skipped_unchanged = 7, 6, 1
    summary.wall_s = 2.0
    summary.write(str(out))
    return out, images


def _expected_regions(pix, inst, min_score=render.DEFAULT_MIN_SCORE):
    """(drawn masks, mask of every pixel a drawing may touch: drawn masks and filled boxes)."""
    h, w = pix.shape[:2]
    touched = np.zeros((h, w), bool)
    drawn = [(m, lab, s) for m, lab, s in inst if s >= min_score]
    for m, _, _ in drawn:
        touched |= m
        ys, xs = np.nonzero(m)
        # Box outline (1 px here) on [x0, x0 + bw], tag inside its top-left corner.
        touched[max(ys.min() - 1, 0): ys.max() + 3, max(xs.min() - 1, 0): xs.max() + 3] = True
    return drawn, touched


def _load(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).copy()


def test_render_one_png_per_ok_image_with_tinted_masks(dataset, tmp_path):
    out, images = dataset
    paths = render.render_results(str(out), str(tmp_path / "png"))
    assert len(paths) == 4  # 4 ok images; 2 error rows not rendered
    assert sorted(os.listdir(tmp_path / "png")) == sorted(os.path.basename(p) for p in paths)
    uris = sorted(images)  # PNGs come in image_uri order
    compared_outside = compared_inside = 0
    for path, uri in zip(paths, uris):
        pix, inst = images[uri]
        got = _load(path)
        assert got.shape == pix.shape  # PNG size = stored width x height (EXIF-rotated for b.jpg)
        drawn, touched = _expected_regions(pix, inst)
        # Outside every drawn mask and box: exactly the source (the superseded r0 row, the
        # staged r2 row and the 0.3-score instance drew nothing).
        assert np.array_equal(got[~touched], pix[~touched]), uri
        compared_outside += int((~touched).sum())
        for m, lab, _ in drawn:
            colour = np.array(render.label_color(lab), np.float64)
            ys, xs = np.nonzero(m)
            interior = m.copy()
            interior[: ys.min() + 20] = False  # below the tag
            for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
                interior &= np.roll(m, shift, axis=axis)  # away from the contour
            interior[:, [xs.min(), xs.max()]] = False  # and the box outline
            interior[ys.max()] = False
            assert interior.sum() > 100
            want = pix[interior] * (1 - render.FILL_ALPHA) + colour * render.FILL_ALPHA
            assert np.abs(got[interior].astype(np.float64) - want).max() <= 1.0, (uri, lab)
            compared_inside += int(interior.sum())
            # The contour below the tag is the label colour itself.
            edge = m & ~np.roll(m, 1, axis=1)
            edge[: ys.min() + 20] = False
            assert (got[edge] == render.label_color(lab)).all()
    assert compared_outside > 35_000 and compared_inside > 12_000
    # An image without instances is its source unchanged.
    (d_path,) = [p for p, u in zip(paths, uris) if u.endswith("/d.png")]
    (d_uri,) = [u for u in uris if u.endswith("/d.png")]
    assert np.array_equal(_load(d_path), images[d_uri][0])


def test_render_limit_run_filter_and_deterministic_colours(dataset, tmp_path):
    out, images = dataset
    limited = render.render_results(str(out), str(tmp_path / "lim"), limit=2)
    assert len(limited) == 2 and len(os.listdir(tmp_path / "lim")) == 2
    again = render.render_results(str(out), str(tmp_path / "again"), limit=2)
    for p, q in zip(limited, again):
        assert open(p, "rb").read() == open(q, "rb").read()
    # Run r0 alone: its one row for a.png, with its own (bird) instance drawn.
    (r0,) = render.render_results(str(out), str(tmp_path / "r0"), run_id="r0")
    a_pix = images[sorted(images)[0]][0]
    got = _load(r0)
    assert not np.array_equal(got[5:25, 5:55], a_pix[5:25, 5:55])
    assert np.array_equal(got[40:120, 20:80], a_pix[40:120, 20:80])  # r1's cat is not in r0
    assert len({render.label_color(i) for i in range(1, 91)}) == 90
    assert render.label_color(7) == render.label_color(7)
    with pytest.raises(ValueError, match="run 'nope' has no committed rows"):
        render.read_latest(str(out), run_id="nope")


def test_render_reports_images_that_changed(dataset, tmp_path):
    out, images = dataset
    a_path = sorted(images)[0][len("file://"):]
    Image.fromarray(_noise(10, 12, 9)).save(a_path)  # the source was replaced after the run
    table = render.read_latest(str(out))
    result, _ = render.render_table(table, str(tmp_path / "png"))
    assert len(result.paths) == 3
    assert result.failures == [(f"file://{a_path}", "source is 12x10 now but the row says 240x160 (changed since the run?)")]
    assert len(result.error_rows) == 2


def test_render_cli(dataset, tmp_path, capsys):
    out, _ = dataset
    assert render.main(["--results", str(out), "--out", str(tmp_path / "cli"), "--limit", "1", "--min-score", "0.9"]) == 0
    assert len(os.listdir(tmp_path / "cli")) == 1
    assert render.main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no committed results" in capsys.readouterr().err


class _Tables(HTMLParser):
    """Rows of every <table id=...>, the histogram bars and the summary figures."""

    def __init__(self):
        super().__init__()
        self.tables, self.bars, self.kpis, self.images = {}, [], {}, 0
        self._table = self._row = self._cell = self._kpi = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "id" in a:
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "rect" and a.get("class") == "bar":
            self.bars.append((float(a["data-lo"]), int(a["data-count"])))
        elif tag == "div" and a.get("class") == "kpi":
            self._kpi = a["data-key"]
        elif tag == "b" and self._kpi:
            self._cell = ""
        elif tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "b" and self._kpi:
            self.kpis[self._kpi] = self._cell
            self._cell = self._kpi = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def test_report_contents(dataset):
    out, images = dataset
    uri = report.write_report(str(out))  # newest run: r1 (no run.json here: from the rows)
    assert uri == os.path.join(str(out), "_runs", "r1", "report.html")
    text = open(uri, encoding="utf-8").read()
    page = _Tables()
    page.feed(text)
    # Summary from summary.json.
    assert page.kpis == {"ok": "4", "error": "2", "skipped": "1", "instances": "7",
                         "images/s": "3.00", "wall time": "2.0 s"}
    # score > 0.5 in run r1 only: cats 0.95, 0.7; dogs 0.8, 0.9, 0.6; bird 0.5 (not > 0.5),
    # bird 0.3, and r0's bird 0.99 (another run) not counted.
    assert page.tables["classes"][1:] == [["dog", "2", "3"], ["cat", "1", "2"]]
    # Histogram: the 7 scores of r1, one per bin.
    bars = dict(page.bars)
    assert len(bars) == 20 and sum(bars.values()) == 7
    assert {lo for lo, n in bars.items() if n} == {0.95, 0.8, 0.5, 0.7, 0.3, 0.9, 0.6}
    assert all(n == 1 for n in bars.values() if n)
    # Errors: both reasons, escaped.
    errors = page.tables["errors"][1:]
    assert [r[0].rsplit("/", 1)[1] for r in errors] == ["e1.jpg", "missing.jpg"]
    assert [r[1] for r in errors] == ["decode", "not_found"]
    assert errors[0][2] == "corrupt or truncated JPEG data: <script>alert(1)</script>"
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "source not found: file://" in errors[1][2]
    # One embedded overlay per ok image, none for errors; self-contained.
    assert page.images == 4
    assert "<link" not in text and "src=\"http" not in text


def test_report_on_s3_output(dataset, s3_bucket, tmp_path):
    import s3fs

    out, _ = dataset
    fs = s3fs.S3FileSystem()
    root = f"s3://{s3_bucket}/out"
    for d, _, files in os.walk(out):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), out)
            fs.put_file(os.path.join(d, f), f"{root}/{rel}")
    uri = report.write_report(root, run_id="r1", max_overlays=1)
    assert uri == f"{root}/_runs/r1/report.html"
    page = _Tables()
    page.feed(fs.cat_file(uri).decode())
    assert page.tables["classes"][1:] == [["dog", "2", "3"], ["cat", "1", "2"]]
    assert page.images == 1
    paths = render.render_results(root, f"s3://{s3_bucket}/png", limit=3)
    assert len(paths) == 3 and all(fs.exists(p) for p in paths)
    assert json.loads(fs.cat_file(f"{root}/_runs/r1/summary.json"))["ok"] == 4


def test_report_cli_other_run_and_bad_run(dataset, tmp_path, capsys):
    out, _ = dataset
    dest = tmp_path / "r0.html"
    assert report.main(["--results", str(out), "--run-id", "r0", "--out", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    page = _Tables()
    page.feed(dest.read_text(encoding="utf-8"))
    assert page.tables["classes"][1:] == [["bird", "3", "1"]]  # r0's own row only
    assert "errors" not in page.tables and page.images == 1
    assert "No summary.json" in dest.read_text(encoding="utf-8")  # r0 has none
    assert report.main(["--results", str(out), "--run-id", "nope"]) == 2
    assert "run 'nope' has no committed rows" in capsys.readouterr().err


def test_report_of_a_run_that_committed_nothing(dataset):
    # An incremental run with nothing new commits no rows but is a real run: its report shows
    # the summary and empty sections instead of failing (the demo's second run is one).
    out, _ = dataset
    summary = RunSummary("r3")
    summary.listed, summary.skipped_unchanged, summary.wall_s = 7, 7, 0.1
    summary.write(str(out))
    text = report.build_report(str(out), "r3")
    assert "<h1>Run r3</h1>" in text
    assert "0 committed rows (0 ok, 0 error)" in text
    assert "Errors (0)" in text and "Score histogram (0 instances)" in text


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium here (apt-get install -y chromium); the screenshot script needs one")
def test_report_renders_in_a_real_browser(dataset, tmp_path):
    # What a reader sees: scripts/screenshot_report.sh draws the page in headless Chromium at a
    # laptop's width. The overlays' masks must be on the screen, not only in the HTML: pixels of
    # label 1's exact colour (its contours) outnumber those of the same page without overlays
    # (where only the class table's colour swatch has it).
    out, _ = dataset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def screenshot(name, **kwargs):
        uri = report.write_report(str(out), out_uri=str(tmp_path / f"{name}.html"), **kwargs)
        png = tmp_path / f"{name}.png"
        res = subprocess.run(["bash", os.path.join(root, "scripts", "screenshot_report.sh"), uri, str(png), "1366"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
        assert shot.shape[1] == 1366 and 400 < shot.shape[0] < 6000  # the blank bottom was cut
        return int((np.abs(shot - np.array(render.label_color(1))).sum(axis=2) <= 12).sum())

    with_overlays, without = screenshot("with"), screenshot("without", max_overlays=0)
    print(f"label-1 colour pixels: {with_overlays} with overlays, {without} without")
    assert without > 0 and with_overlays > without + 150
