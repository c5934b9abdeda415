"""User-facing errors: the CLIs print these as one line, without a traceback."""


class ProtoADError(Exception):
    """A problem the user can fix (bad file, flag, device); the message names the culprit."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, docker stop), raised where Ctrl-C would be, so a run ends the same clean way."""
