"""The error type that reaches the user as one clear message (the CLI prints it without a traceback).

It lives in data_prep, the lowest layer, so that data preparation never imports the training package;
`pipeline.errors` re-exports it (docs/design.md §7).
"""


class UserError(Exception):
    """Bad input from the user: a message that names the file, field or flag and says what to do."""
