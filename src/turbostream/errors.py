"""Every exception turbostream shows a user: one message each, no traceback. Imports nothing of ours.

The command line prints any of these as `turbostream: error: <message>` and exits with status 2; the server turns the
input errors into `{"type": "error", ...}` messages and keeps serving.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: printed as one message, exit status 2, no traceback."""


class ModelLoadError(UserError, RuntimeError):
    """Weights could not be had; the message names what was tried and what to do next."""


class CodecError(UserError, ValueError):
    """Input that is not an acceptable image; the message says why, for the user."""


class SourceError(UserError, ValueError):
    """A source that cannot be used; the message says which and why, for the user."""


class SinkError(UserError, ValueError):
    """An output that cannot be used or written; the message says which and why, for the user."""


def path_stat(path, name: str, error: type[UserError] = UserError):
    """The os.stat_result of a path the user named, or None when nothing is there; `error` naming `name` for a path
    that cannot even be looked at (a name too long, a folder the user may not search), which pathlib's exists() and
    is_dir() raise as OSError instead of answering."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise error(f"cannot use {name}: {exc.strerror or exc}") from None
