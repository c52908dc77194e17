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


class TrainingError(UserError):
    """Training that cannot go on (a loss or an updated row that is not finite): the message names the step, and
    nothing is saved after it."""


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after writing a checkpoint; the CLI exits with the signal's status."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint {checkpoint} written; "
                         "continue with --resume auto")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
