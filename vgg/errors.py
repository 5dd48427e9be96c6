"""The project's exceptions: each carries one actionable line for the user (what is wrong, where, the fix).

The command line prints `error: <message>` for any `VGGError` and exits with status 2; anything else is a bug.
"""


class VGGError(Exception):
    """Base of every error a user can cause and fix (bad input, bad config, missing files)."""


class ConfigError(VGGError):
    """An invalid, unknown or missing configuration key."""


class DataError(VGGError):
    """Raw archives, shards or statistics that are missing, corrupt or inconsistent."""


class CheckpointError(VGGError):
    """A checkpoint that is missing, truncated, not ours, or of the wrong configuration."""


class ModelError(VGGError):
    """An unknown configuration name or weights that do not fit a model."""


class DivergenceError(VGGError):
    """Training whose loss or weights stopped being finite (an lr too high for the init, say)."""


class Interrupted(BaseException):
    """The user stopped the command: Ctrl-C (SIGINT) or SIGTERM, raised in the main thread by `vgg`'s handlers.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` swallows it and every `finally` runs;
    not a KeyboardInterrupt, which the command-line framework turns into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class OutputError(DataError, OSError):
    """A write the operating system refused (disk full, quota, read-only or unwritable location): one line for the
    user, as every VGGError, and still an OSError with the errno and reason for code that handles failed writes."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        OSError.__init__(self, errno, strerror or message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # across processes (an ingest worker's write) with the same three fields
        return type(self), (self.message, self.errno, self.strerror)
