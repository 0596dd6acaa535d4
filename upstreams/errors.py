"""The one family of upstream errors: every wire format raises these, for every call.

Each carries the HTTP status it stands for and a message that says what happened without
the key, the IAM token or the upstream's body (some upstreams echo the key back).
"""


class UpstreamError(Exception):
    """An upstream could not do what was asked; the message says how, never with a secret."""

    status = 502

    def __init__(self, message, status=None, retry_after=None):
        super().__init__(message)
        self.status = status or self.status
        self.retry_after = retry_after


class UpstreamFailure(UpstreamError):
    """This provider could not serve the call (unreachable, key refused, 429, 5xx, a broken
    answer); the next provider of the model may."""


class UpstreamTimeout(UpstreamError):
    """The call's deadline passed: no provider is tried after it."""

    status = 504


class UpstreamRefusal(UpstreamError):
    """The upstream's own 4xx about the request (a bad parameter, context too long): passed
    on to the client with its status and the upstream's words, the key removed. `error` is
    {message, type, param, code}."""

    def __init__(self, status, error):
        super().__init__(error["message"], status)
        self.error = error


def unsupported(wire_format, call):
    """The refusal of a call the wire format cannot make (said in one place, for every format)."""
    message = f"{wire_format} upstreams do not serve {call} through the registry."
    return UpstreamRefusal(400, {"message": message, "type": "invalid_request_error", "param": "model", "code": None})
