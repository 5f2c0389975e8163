"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input from the user: a message that names the file, field or flag and says what to do."""
