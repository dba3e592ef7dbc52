"""Errors that users see.

Every error raised for bad input derives from :class:`SftError`; the CLI prints its message (no traceback)
and exits with status 2. A message names the problem *and* the fix, e.g.
``data.path: /x/y is not a Deep Lake dataset (no dataset_meta.json). Create one with `sft ingest FILE --out /x/y`.``
"""


class SftError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(SftError):
    """A config key or value is wrong (unknown key, wrong type, out of range)."""


class DataError(SftError):
    """A dataset is missing, has the wrong schema, or holds a bad row."""


class IngestError(DataError):
    """A source file cannot be ingested; the message names file, row and field."""


class ModelError(SftError):
    """A model cannot be resolved or loaded (missing file, no network for a hub id, ...)."""


class MergeError(SftError):
    """An adapter cannot be merged (mismatched base, logits check failed, ...)."""


class TrainingError(SftError):
    """Training cannot go on meaningfully (e.g. the first optimizer step's loss or gradient norm is not finite)."""


#: Exit status of ``sft train`` stopped by a scheduler's signal after a complete checkpoint (EX_TEMPFAIL: "try
#: again"); Slurm sites may list it in ``RequeueExit`` so that such a job requeues by itself.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 (sft.trainer.preemption) after writing ``checkpoint``; rerun with
    ``training.resume=auto`` to continue. Not an :class:`SftError`: nothing was wrong with the input."""

    def __init__(self, message: str, checkpoint: str | None = None, step: int | None = None):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step
