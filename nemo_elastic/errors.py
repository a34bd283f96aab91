"""Error types for problems in what the user gave us (a config, a file, a flag).

The CLI prints these as one line naming the field/path and the fix and exits with status 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the field, value (or path) and the fix."""


class DataError(UserError):
    """A data file or tokenizer cannot be used as given."""
