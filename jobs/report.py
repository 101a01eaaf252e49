"""A static HTML report of one run of the batch job: summary, classes, scores, errors, pictures.

``python -m jobs.report --results OUT [--run-id ID] [--out URI]`` writes one self-contained
HTML file (inline CSS, inline SVG, overlays embedded as base64 PNG thumbnails; no
JavaScript, nothing fetched) to ``OUT/_runs/<run_id>/report.html`` by default: next to
the run's summary and manifest, and under ``_runs`` so dataset readers skip it.

Contents, for the run's committed rows (``run_id=<id>/part-*.parquet``):

* the run summary from ``_runs/<id>/summary.json`` (ok / error / skipped, instances,
  images/s, wall time), or a note when the run has none (killed before it was written);
* instances per class with score > 0.5 (the README's query);
* a histogram of all instance scores (20 bins of 0.05, inline SVG bars);
* every error row (image_uri and reason), and images that could not be drawn now;
* overlays (``jobs.render``) of the first ``max_overlays`` ok images in image_uri order.

The default run is the newest recorded in ``_runs`` (``protocol.list_runs``), else the
newest run_id among the committed rows. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import sys
from collections import Counter
from typing import Any, Sequence

import pyarrow.compute as pc

from jobs import render
from jobs.infer.commit import protocol
from jobs.infer.output import RUNS_DIR, Output
from jobs.infer.summary import read_summary
from jobs.infer.schema import SCHEMA
from jobs.storage import join, resolve, write_atomic

CLASS_SCORE_THRESHOLD = 0.5  # counts per class: instances with score > this (strict, as in the README)
HIST_BINS = 20
DEFAULT_MAX_OVERLAYS = 24  # embedded PNGs: ~100-300 KB each for photos at 400 px
THUMB_MAX_SIDE = 400
THUMB_MIN_SIDE = 300  # smaller overlays are shown enlarged by a whole factor (pixels kept sharp)

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#777} table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.kpi{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.kpi b{display:block;font-size:20px} .kpi span{color:#666;font-size:12px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.grid{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
figure img{display:block;max-width:100%;height:auto;image-rendering:pixelated} figcaption{font-size:12px;color:#555;word-break:break-all;max-width:480px}
td.uri{word-break:break-all;max-width:520px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def default_run_id(results_uri: str) -> str:
    runs = protocol.list_runs(results_uri)
    if runs:
        return runs[-1].run_id
    files = Output(results_uri).committed_files()
    if not files:
        raise FileNotFoundError(f"no runs under {results_uri} (no _runs/*/run.json, no committed rows)")
    fs, _ = resolve(results_uri)
    import pyarrow.dataset as pads

    ids = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["run_id"]).column("run_id")
    return pc.max(ids).as_py()


def _summary_html(summary: dict | None, run_id: str) -> str:
    if summary is None:
        return f'<p class="muted">No summary.json in _runs/{_e(run_id)}/ (the run did not finish writing it).</p>'
    items = [
        ("ok", summary.get("ok")),
        ("error", summary.get("error")),
        ("skipped", summary.get("skipped")),
        ("instances", summary.get("instances")),
        ("images/s", f"{float(summary.get('images_per_s') or 0):.2f}"),
        ("wall time", f"{float(summary.get('wall_s') or 0):.1f} s"),
    ]
    kpis = "".join(
        f'<div class="kpi" data-key="{_e(k)}"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in items
    )
    extra = (
        f'<p class="muted">listed {_e(summary.get("listed"))}, planned {_e(summary.get("planned"))}, '
        f'skipped unchanged {_e(summary.get("skipped_unchanged"))}, done before resume '
        f'{_e(summary.get("skipped_done_in_run"))}, duplicates {_e(summary.get("duplicates"))}; '
        f'shards computed {_e(summary.get("shards_computed"))}, reused {_e(summary.get("shards_reused"))}'
        f'{", resumed" if summary.get("resumed") else ""}.</p>'
    )
    return f'<div class="kpis">{kpis}</div>{extra}'


def class_counts(rows: list[dict]) -> list[tuple[int, str, int]]:
    """(label, label_name, instances with score > 0.5), most frequent first."""
    counts: Counter = Counter()
    for row in rows:
        for inst in row["instances"] or []:
            if inst["score"] is not None and inst["score"] > CLASS_SCORE_THRESHOLD:
                counts[(inst["label"], inst["label_name"])] += 1
    return [(lab, name, n) for (lab, name), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0]))]


def score_histogram(rows: list[dict], bins: int = HIST_BINS) -> list[int]:
    """Counts of instance scores in ``bins`` equal bins over [0, 1] (1.0 goes in the last)."""
    hist = [0] * bins
    for row in rows:
        for inst in row["instances"] or []:
            s = inst["score"]
            if s is not None:
                # Scores are float32: 0.95 is stored as 0.9499999881, which must still land
                # in the 0.95-1.00 bin; the epsilon is above float32's error at 1.0.
                hist[min(max(int(s * bins + 1e-5), 0), bins - 1)] += 1
    return hist


def _classes_html(counts: list[tuple[int, str, int]]) -> str:
    if not counts:
        return f'<p class="muted">No instance scored above {CLASS_SCORE_THRESHOLD}.</p>'
    body = "".join(
        f'<tr data-label="{lab}"><td><span class="swatch" style="background:rgb{render.label_color(lab)}"></span>'
        f'{_e(name)}</td><td class="n">{lab}</td><td class="n">{n}</td></tr>'
        for lab, name, n in counts
    )
    return (
        '<table id="classes"><thead><tr><th>class</th><th class="n">label</th>'
        f'<th class="n">instances</th></tr></thead><tbody>{body}</tbody></table>'
    )


def _histogram_svg(hist: list[int]) -> str:
    width, height, pad_l, pad_b, pad_t = 640, 200, 40, 22, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    top = max(hist) or 1
    bw = plot_w / len(hist)
    parts = [
        f'<svg id="score-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="instance score histogram">',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#888"/>',
        f'<text x="{pad_l - 6}" y="{pad_t + 4}" font-size="11" text-anchor="end" fill="#555">{top}</text>',
        f'<text x="{pad_l - 6}" y="{pad_t + plot_h}" font-size="11" text-anchor="end" fill="#555">0</text>',
    ]
    for i, n in enumerate(hist):
        lo, hi = i / len(hist), (i + 1) / len(hist)
        bh = plot_h * n / top
        x = pad_l + i * bw
        fill = "#4c78a8" if lo >= CLASS_SCORE_THRESHOLD else "#a9c1dc"
        parts.append(
            f'<rect class="bar" data-lo="{lo:.2f}" data-hi="{hi:.2f}" data-count="{n}" x="{x + 1:.1f}" '
            f'y="{pad_t + plot_h - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="{fill}">'
            f"<title>score {lo:.2f}-{hi:.2f}: {n}</title></rect>"
        )
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad_l + t * plot_w
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#555">{t:g}</text>')
    x = pad_l + CLASS_SCORE_THRESHOLD * plot_w
    parts.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" stroke="#d62728" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _errors_html(error_rows: list[tuple[str, str, str]], failures: list[tuple[str, str]]) -> str:
    out = []
    if error_rows:
        body = "".join(f'<tr><td class="uri">{_e(u)}</td><td>{_e(k)}</td><td>{_e(r)}</td></tr>' for u, k, r in error_rows)
        out.append('<table id="errors"><thead><tr><th>image_uri</th><th>kind</th><th>reason</th></tr></thead>'
                   f'<tbody>{body}</tbody></table>')
    else:
        out.append('<p class="muted">No error rows.</p>')
    if failures:
        body = "".join(f'<tr><td class="uri">{_e(u)}</td><td>{_e(r)}</td></tr>' for u, r in failures)
        out.append(
            "<h3>Not drawn (ok rows whose image could not be re-read now)</h3>"
            f'<table id="render-failures"><thead><tr><th>image_uri</th><th>reason</th></tr></thead><tbody>{body}</tbody></table>'
        )
    return "".join(out)


def _overlays_html(uris: list[str], images: list, rows_by_uri: dict, total_ok: int) -> str:
    if not images:
        return '<p class="muted">No overlays.</p>'
    figs = []
    for uri, im in zip(uris, images):
        thumb = im.copy()
        thumb.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        zoom = max(1, round(THUMB_MIN_SIDE / max(thumb.width, thumb.height)))  # 128-160 px: all x2
        row = rows_by_uri[uri]
        n = len(row["instances"] or [])
        figs.append(
            f'<figure><img class="overlay" src="data:image/png;base64,{b64}" width="{thumb.width * zoom}" '
            f'height="{thumb.height * zoom}" alt="{_e(uri)}"><figcaption>{_e(uri)}<br>{row["width"]}x{row["height"]}, '
            f"{n} instance{'s' if n != 1 else ''}</figcaption></figure>"
        )
    note = f'<p class="muted">{len(images)} of {total_ok} ok images, instances with score &ge; ' \
           f"{render.DEFAULT_MIN_SCORE} drawn.</p>"
    return note + f'<div class="grid">{"".join(figs)}</div>'


def build_report(
    results_uri: str,
    run_id: str,
    *,
    max_overlays: int = DEFAULT_MAX_OVERLAYS,
    min_score: float = render.DEFAULT_MIN_SCORE,
) -> str:
    """The report's HTML text for run ``run_id`` of the output at ``results_uri``."""
    try:
        summary = read_summary(results_uri, run_id)
    except FileNotFoundError:
        summary = None
    try:
        table = render.read_latest(results_uri, run_id=run_id)
    except ValueError:
        if summary is None:
            raise  # no such run
        # The run exists but committed nothing (e.g. an incremental run with nothing new).
        table = SCHEMA.empty_table()
    rows = table.to_pylist()
    ok_rows = [r for r in rows if r["status"] == "ok"]
    result, images = render.render_table(table, None, limit=max_overlays, min_score=min_score, keep_images=True)
    rows_by_uri = {r["image_uri"]: r for r in ok_rows}
    counts = class_counts(ok_rows)
    hist = score_histogram(ok_rows)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    models = sorted({(r["model_name"], (r["checkpoint_sha256"] or "")[:12]) for r in rows}, key=str)
    model_txt = "; ".join(f"{_e(m)} (checkpoint {_e(c)})" for m, c in models)
    return "".join(
        [
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
            f"<title>Run {_e(run_id)}</title><style>{_CSS}</style></head><body>",
            f"<h1>Run {_e(run_id)}</h1>",
            f'<p class="muted">{_e(results_uri)} &middot; {len(rows)} committed rows ({len(ok_rows)} ok, '
            f"{len(rows) - len(ok_rows)} error) &middot; {model_txt} &middot; generated {generated}</p>",
            "<h2>Summary</h2>",
            _summary_html(summary, run_id),
            f"<h2>Instances per class (score &gt; {CLASS_SCORE_THRESHOLD})</h2>",
            _classes_html(counts),
            f"<h2>Score histogram ({sum(hist)} instances)</h2>",
            _histogram_svg(hist),
            f"<h2>Errors ({len(result.error_rows)})</h2>",
            _errors_html(result.error_rows, result.failures),
            "<h2>Overlays</h2>",
            _overlays_html(result.uris, images, rows_by_uri, len(ok_rows)),
            "</body></html>\n",
        ]
    )


def write_report(
    results_uri: str,
    run_id: str | None = None,
    out_uri: str | None = None,
    *,
    max_overlays: int = DEFAULT_MAX_OVERLAYS,
) -> str:
    """Write the report of ``run_id`` (default: newest run) and return where it went.

    Default location: ``<results_uri>/_runs/<run_id>/report.html``.
    """
    run_id = run_id or default_run_id(results_uri)
    text = build_report(results_uri, run_id, max_overlays=max_overlays)
    if out_uri is None:
        out_uri = join(results_uri, RUNS_DIR, run_id, "report.html")
    fs, path = resolve(out_uri)
    write_atomic(fs, path, text.encode("utf-8"))
    return out_uri


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="output root of jobs.infer (s3://... or local)")
    p.add_argument("--run-id", default=None, help="run to report (default: the newest)")
    p.add_argument("--out", default=None, help="where to write (default: RESULTS/_runs/<run_id>/report.html)")
    p.add_argument("--max-overlays", type=int, default=DEFAULT_MAX_OVERLAYS, help="overlays embedded")
    a = p.parse_args(argv)
    if a.max_overlays < 0:
        p.error("--max-overlays must be >= 0")
    try:
        uri = write_report(a.results, a.run_id, a.out, max_overlays=a.max_overlays)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(f"jobs.report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
