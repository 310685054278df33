"""Errors the user can fix. The CLI prints their message, without a traceback, and exits 2."""


class UserError(Exception):
    """Bad input or environment: the message says what was wrong and what to do."""
