"""The one error type the data loaders raise for a missing or unreadable file."""


class DataError(ValueError):
    """A data file is missing, unreadable or not in the expected format.

    The message always names the file (or folder) at fault."""
