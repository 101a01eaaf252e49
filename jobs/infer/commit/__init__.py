"""Commit: the commit protocol (runs, staging, the atomic publish of shards, the manifest and
``_SUCCESS``), the output's writer lease, and the run's summary."""
