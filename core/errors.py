"""Errors whose message is meant for the user, as a reply."""


class UserError(Exception):
    """Something the user can fix; `str(exc)` is the reply (Korean first, English after)."""


class BusyError(UserError):
    """The engine's queue is full; the request was refused rather than queued forever."""


class RequestTimeout(UserError):
    """The request did not finish within the configured time."""


class ShuttingDown(UserError):
    """The bot is restarting: the request was refused, or not finished within the shutdown grace."""


class RateLimited(UserError):
    """The user asked again too soon. `quiet`: they were already told in this window, so say nothing."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class NotAllowed(UserError):
    """Outside the allowlists. `quiet`: the operator chose to ignore such requests rather than answer."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class ModelLoadError(Exception):
    """The model or checkpoint cannot be loaded; the message is one sentence saying why and what to do."""


class EngineUnavailable(UserError):
    """The remote generation server could not be reached or answered with an error, after the retries."""


class StoreError(UserError):
    """The per-chat settings store cannot be used (read-only, full disk, corrupt, a directory). Not the user's doing,
    but the reply says what failed rather than a generic apology about generation."""


class QuotaExceeded(UserError):
    """The user's daily request quota is used up; the message says when it resets."""


class ClientLeft(Exception):
    """The reader of a reply went away (a web client closed its stream): normal, and there is nobody left to tell."""
