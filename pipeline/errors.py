"""The user-facing error type; defined once in `data_prep.errors` (the lower layer), re-exported here."""

from data_prep.errors import UserError

__all__ = ["UserError"]
