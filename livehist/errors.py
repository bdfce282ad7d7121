"""Errors meant for users: one line naming the cause and the fix."""


class LivehistError(Exception):
    """A user-facing failure; the CLI prints its message and exits 1."""
