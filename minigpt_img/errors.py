"""The errors a user can cause, each ending as one line and a non-zero exit (cli.run).

Not a paper section. The bottom layer: every module raises these, and the scripts' error handler
catches them without importing the modules that raise them. Each message names the problem and the
fix.
"""


class ConfigError(Exception):
    """A run configuration that cannot work; the message names the flag and the fix."""


class DataError(Exception):
    """Data that cannot be used; the message names the file and the fix."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class WriteError(Exception):
    """A file could not be written (full disk, read-only folder ...); what was there is intact."""


class FolderBusy(Exception):
    """Another live process holds the folder's lock."""


class TrainingDiverged(Exception):
    """The loss, the gradients or the weights became NaN or infinite (exit code 1)."""


class Interrupted(Exception):
    """A second Ctrl-C stopped a run at once (exit code 130); the last checkpoint is intact."""


class MPIMissing(Exception):
    """Started by mpiexec, but mpi4py cannot be imported."""
