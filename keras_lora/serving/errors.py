"""Errors of the serving layer; the HTTP server maps them to 4xx answers."""


class ServingError(Exception):
    """Base class of the errors below."""


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
