"""User-facing errors. The CLI prints these in one or two lines, without a traceback."""


class LmforgeError(Exception):
    """A mistake the user can fix: bad input, bad config, missing file."""

    exit_code = 1


class ConfigError(LmforgeError):
    """A recipe key or value is wrong."""


class DataError(LmforgeError):
    """A corpus, shard or tokenizer file is missing, empty, corrupt or mismatched."""


class CheckpointError(LmforgeError):
    """A path is not a usable checkpoint, or it does not match what was asked."""


class TrainingError(LmforgeError):
    """Training cannot go on (non-finite loss, nothing to resume, ...)."""


class Interrupted(LmforgeError):
    """Training stopped on a signal after saving a checkpoint."""

    exit_code = 130
