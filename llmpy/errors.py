"""llmpy's own error type.

Everything a user can get wrong (a missing file, a corrupt shard, an impossible
config) is raised as LlmpyError with one line that names the file and the fix.
The CLI prints that line and exits with code 2; `--debug` shows the traceback.
"""


class LlmpyError(Exception):
    """A user-facing error: the message is one line naming what and how to fix."""


class Interrupted(Exception):
    """A run stopped by a signal after writing its checkpoint: the message is
    one line for the user; the CLI exits with exit_code (128 + the signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
