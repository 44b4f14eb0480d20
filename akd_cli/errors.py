"""The one exception type the CLI turns into a one-line error message (no traceback)."""


class UserError(Exception):
    """Bad input or environment: a missing file, an unknown preset, an out-of-range option."""
