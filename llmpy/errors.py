"""llmpy's own error type.

Everything a user can get wrong (a missing file, a corrupt shard, an impossible
config) is raised as LlmpyError with one line that names the file and the fix.
The CLI prints that line and exits with code 2; `--debug` shows the traceback.
"""


class LlmpyError(Exception):
    """A user-facing error: the message is one line naming what and how to fix."""
