"""Run one function over many argument tuples: in Ray tasks when Ray is running, else in order here.

Planning and the state table (``plan/planner.py``, ``commit/state.py``) split their work into independent
pieces (a listing part, a hash bucket, a group of committed files); each piece's result is a
small summary (paths and counts), so the driver gathers the results and never the rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

TASK_RETRIES = 3  # a lost worker's piece runs again: every piece writes deterministic names
MAX_IN_FLIGHT = 64  # tasks submitted ahead of the results gathered
# Rows a task is given at least, when the caller says how many rows its pieces hold: a Ray task
# costs a scheduling round trip and a worker (tens of ms, a second when the worker must start),
# so the 64 hash buckets of a run of a few thousand images are planned faster in one process.
ROWS_PER_TASK = 200_000


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _pieces(fn: Callable[..., Any], args: Sequence[Sequence[Any]], kwargs: dict) -> list[Any]:
    return [fn(*a, **kwargs) for a in args]


def task_groups(pieces: int, rows: int | None) -> list[range]:
    """The pieces each task runs: one each, or with ``rows`` known, neighbours together in tasks
    of at least ``ROWS_PER_TASK`` rows (one group: run here)."""
    tasks = pieces if rows is None else max(1, min(pieces, rows // ROWS_PER_TASK))
    return [range(i * pieces // tasks, (i + 1) * pieces // tasks) for i in range(tasks)] if pieces else []


def run_tasks(fn: Callable[..., Any], args: Iterable[Sequence[Any]], kwargs: dict | None = None, *,
              num_cpus: float = 1, rows: int | None = None) -> list[Any]:
    """``[fn(*a, **kwargs) for a in args]``, in Ray tasks when Ray is running (results in the order
    of ``args``). ``rows``: about how many rows the pieces hold in all, when the caller knows: the
    pieces then go to tasks of at least ``ROWS_PER_TASK`` rows, neighbours together, and work of
    fewer rows than two tasks' runs here, one piece at a time (so this process never holds more
    than one piece's rows)."""
    args, kwargs = list(args), kwargs or {}
    groups = [[args[i] for i in g] for g in task_groups(len(args), rows)]
    if not ray_running() or rows is not None and len(groups) <= 1 or not args:
        return _pieces(fn, args, kwargs)
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=TASK_RETRIES)(_pieces).options(name=fn.__name__)
    results: list[list[Any]] = [[] for _ in groups]
    pending: dict[Any, int] = {}
    nxt = 0
    while nxt < len(groups) or pending:
        while nxt < len(groups) and len(pending) < MAX_IN_FLIGHT:
            pending[remote.remote(fn, groups[nxt], kwargs)] = nxt
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
    return [r for group in results for r in group]
