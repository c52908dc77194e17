"""User mistakes: the CLI prints each as one line `astra-ds: error: ...` and exits with status 2."""


class UserError(ValueError):
    """Base of the errors a user can fix (a config, a data file, a checkpoint); never a traceback."""


class ConfigError(UserError):
    """A config file or override that is invalid, or a run the config cannot describe."""


class DataError(UserError):
    """Malformed or missing input data; the message names the file and line."""


class TableError(UserError):
    """A stored classifier table that does not fit the run (another shape)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, unreadable, or of another run."""
