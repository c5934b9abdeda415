"""User-facing errors: the CLIs print these as one line, without a traceback."""


class ProtoADError(Exception):
    """A problem the user can fix (bad file, flag, device); the message names the culprit."""
