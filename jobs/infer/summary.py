"""The end-of-run summary: counts, throughput, wall time; printed and saved as JSON.

The job fills a :class:`RunSummary` as it goes (``add_plan`` once the listing is
planned, ``add_shard`` with the counts of every shard it stages or finds already staged), then
calls ``finish()`` and ``write(output)`` before :meth:`protocol.Run.finish`, so the
summary sits at ``_runs/<run_id>/summary.json`` next to the run's manifest.

Counts are for this invocation. After a resume, images committed by the killed attempt
show up as ``skipped_done_in_run``, not as ok/error again; the manifest's ``rows`` is the
run's total. ``error_kinds`` counts error rows by their ``error_kind`` column,
``error_reasons`` by the start of their reason (the most common ones). ``planned_retry``
are images planned again because their latest row was a storage error; ``deferred`` the
images read again in a later pass of this run (``passes``) after a storage failure.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from jobs.infer.output import Output
from jobs.infer.plan.planner import PlanStats

TOP_ERRORS = 10


@dataclass
class RunSummary:
    run_id: str
    resumed: bool = False
    listed: int = 0
    duplicates: int = 0
    skipped_unchanged: int = 0
    skipped_done_in_run: int = 0
    planned: int = 0
    planned_new: int = 0  # incremental: not in the state table yet
    planned_changed: int = 0  # incremental: another etag, size or model than the latest row's
    planned_retry: int = 0
    ok: int = 0
    error: int = 0
    instances: int = 0
    shards_computed: int = 0
    shards_reused: int = 0
    passes: int = 1
    deferred: int = 0
    part_rows: int = 0  # rows the driver received from the workers: one per part file, no result rows
    wall_s: float = 0.0
    plan_s: float = 0.0  # of wall_s: folding a killed attempt's commits, listing and planning
    started_at: float = field(default_factory=time.time)
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)

    # -- filling in
    def add_plan(self, stats: PlanStats) -> None:
        self.listed = stats.listed
        self.duplicates = stats.duplicates
        self.skipped_unchanged = stats.unchanged
        self.skipped_done_in_run = stats.done_in_run
        self.planned = stats.planned
        self.planned_new, self.planned_changed = stats.new, stats.changed
        self.planned_retry = stats.retry

    def add_shard(self, counts: dict, *, reused: bool = False) -> None:
        """Count a shard's rows: ``counts`` as :func:`schema.shard_counts` gives them, of its table
        or read back from its staged file (:meth:`protocol.Run.staged_counts`)."""
        self.ok += counts["ok"]
        self.error += counts["rows"] - counts["ok"]
        self.instances += counts["instances"]
        self.error_reasons = dict(Counter(self.error_reasons) + Counter(counts["error_reasons"]))
        self.error_kinds = dict(Counter(self.error_kinds) + Counter(counts["error_kinds"]))
        if reused:
            self.shards_reused += 1
        else:
            self.shards_computed += 1

    def finish(self) -> "RunSummary":
        self.wall_s = time.time() - self.started_at
        return self

    # -- derived
    @property
    def processed(self) -> int:
        return self.ok + self.error

    @property
    def skipped(self) -> int:
        return self.skipped_unchanged + self.skipped_done_in_run + self.duplicates

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        top = sorted(self.error_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]
        d["error_reasons"] = dict(top)
        d.update(processed=self.processed, skipped=self.skipped, images_per_s=round(self.images_per_s, 3))
        return d

    def format(self) -> str:
        lines = [
            f"run {self.run_id}{' (resumed)' if self.resumed else ''}",
            f"  listed {self.listed}, planned {self.planned} (new {self.planned_new}, changed "
            f"{self.planned_changed}), skipped {self.skipped} "
            f"(unchanged {self.skipped_unchanged}, done before resume {self.skipped_done_in_run}, "
            f"duplicates {self.duplicates})",
            f"  ok {self.ok}, error {self.error}, instances {self.instances}",
            f"  shards computed {self.shards_computed}, reused {self.shards_reused}",
            f"  wall {self.wall_s:.1f} s (planning {self.plan_s:.1f} s), {self.images_per_s:.2f} images/s",
        ]
        if self.planned_retry:
            lines.insert(2, f"  planned again after a storage error: {self.planned_retry}")
        if self.passes > 1:
            lines.append(f"  passes {self.passes}: {self.deferred} reads retried after a storage failure")
        if self.error_kinds:
            lines.append("  error kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(self.error_kinds.items())))
        for reason, n in self.to_dict()["error_reasons"].items():
            lines.append(f"  error {n:>6} x {reason}")
        return "\n".join(lines)

    def write(self, output: Output | str) -> str:
        """Save as ``_runs/<run_id>/summary.json`` under the output root; returns the path."""
        output = Output.of(output)
        path = output.run_path(self.run_id, "summary.json")
        output.write_json(path, self.to_dict())
        return path


def read_summary(output: Output | str, run_id: str) -> dict:
    output = Output.of(output)
    return output.read_json(output.run_path(run_id, "summary.json"))
