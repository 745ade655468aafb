"""User-facing errors: the CLI prints these as one line, without a traceback."""


class OfframpError(Exception):
    """Something the user can fix: a bad path, a wrong name, a corrupt file."""


class DataError(OfframpError):
    """A data spec, path or file that cannot be read."""


class CheckpointError(OfframpError):
    """A checkpoint directory that is missing, incomplete or tampered with."""
