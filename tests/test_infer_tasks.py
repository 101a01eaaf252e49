"""jobs/infer/tasks.py: how planning and the state table split their pieces into Ray tasks."""

from jobs.infer import tasks


def test_pieces_go_to_tasks_of_at_least_rows_per_task_neighbours_together():
    per = tasks.ROWS_PER_TASK
    assert [list(g) for g in tasks.task_groups(3, None)] == [[0], [1], [2]]  # rows unknown: a task each
    assert tasks.task_groups(0, None) == [] and tasks.task_groups(0, 10 * per) == []
    # a small run's 64 buckets: one group, which run_tasks runs in this process
    assert [list(g) for g in tasks.task_groups(64, 2400)] == [list(range(64))]
    assert len(tasks.task_groups(64, 2 * per - 1)) == 1
    for rows, want in ((2 * per, 2), (10 * per + 5, 10), (10_000_000, 50), (10**9, 64)):
        groups = tasks.task_groups(64, rows)
        assert len(groups) == want, (rows, len(groups))
        assert [i for g in groups for i in g] == list(range(64))  # each piece once, in order
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1 and rows / len(groups) >= per


def test_run_tasks_without_ray_runs_every_piece_here_in_order():
    assert not tasks.ray_running()
    got = tasks.run_tasks(lambda a, b, k=0: a * b + k, [(i, 2) for i in range(7)], {"k": 1}, rows=10**9)
    assert got == [2 * i + 1 for i in range(7)]
