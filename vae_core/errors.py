"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2)."""


class VaegenError(Exception):
    """Bad input or an impossible request: the message says what is wrong and, where it can, the fix."""
