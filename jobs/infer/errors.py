"""The job's error contract: a :class:`JobError` means "stop, exit 2, say why in one line";
``python -m jobs.infer`` catches these and nothing else, so a bug keeps its traceback (exit 1).

Each also derives from the builtin it used to be (ValueError, RuntimeError), so callers that
catch those keep working.
"""


class JobError(Exception):
    """The job cannot go on for a reason its message states in one line (exit status 2)."""


class UsageError(JobError, ValueError):
    """A flag or setting the job cannot run with."""


class InfraError(JobError, RuntimeError):
    """A failure of the job's environment (storage, weights, model actors), not of one image."""


class StorageOutage(InfraError):
    """Most reads are failing in the store itself: the run stops instead of writing error rows."""


class LockedError(JobError, RuntimeError):
    """Another live run holds the output's writer lease."""


class RunMismatchError(JobError, ValueError):
    """``--run-id`` names a run made with other parameters, or one that has finished."""


class DuplicateRowsError(JobError, RuntimeError):
    """A run's committed files hold an image twice: the commit protocol was broken."""
