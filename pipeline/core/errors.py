"""The one exception type for *expected* failures (bad input, bad params, missing data).

Stages print its message as a single line and exit non-zero, without a traceback; anything
else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing error whose message names the file or parameter at fault."""
