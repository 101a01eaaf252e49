"""Run one function over many argument tuples: in Ray tasks when Ray is running, else in order here.

Planning and the state table (``plan/planner.py``, ``commit/state.py``) split their work into independent
pieces (a listing part, a hash bucket, a group of committed files); each piece's result is a
small summary (paths and counts), so the driver gathers the results and never the rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

TASK_RETRIES = 3  # a lost worker's piece runs again: every piece writes deterministic names
MAX_IN_FLIGHT = 64  # pieces submitted ahead of the results gathered


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def run_tasks(fn: Callable[..., Any], args: Iterable[Sequence[Any]], kwargs: dict | None = None, *,
              num_cpus: float = 1) -> list[Any]:
    """``[fn(*a, **kwargs) for a in args]``, as Ray tasks when Ray is running (results in the order
    of ``args``)."""
    args, kwargs = list(args), kwargs or {}
    if not ray_running() or not args:
        return [fn(*a, **kwargs) for a in args]
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=TASK_RETRIES)(fn)
    results: list[Any] = [None] * len(args)
    pending: dict[Any, int] = {}
    nxt = 0
    while nxt < len(args) or pending:
        while nxt < len(args) and len(pending) < MAX_IN_FLIGHT:
            pending[remote.remote(*args[nxt], **kwargs)] = nxt
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
    return results
