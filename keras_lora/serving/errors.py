"""Errors of the serving layer; the HTTP server maps them to 4xx answers.

Each carries `param`: the request field it is about (`"prompt"`,
`"top_k"`, `"path"`, ...), or None when it is about the request as a
whole. The server reports it as the error's `param`.
"""


class ServingError(Exception):
    """Base class of the errors below."""

    def __init__(self, message="", param=None):
        super().__init__(message)
        self.param = param


class AdapterLoadError(ServingError, ValueError):
    """An adapter directory is missing, corrupt, does not fit the model, or
    its name is taken. The message names the file and the fix."""


class UnknownAdapterError(ServingError, KeyError):
    """No adapter is registered under the requested name."""

    def __str__(self):
        # KeyError's str() would quote the whole message.
        return str(self.args[0]) if self.args else ""


class RequestError(ServingError, ValueError):
    """A completion request is malformed (types, ranges, lengths)."""
