"""Typed errors of the data plane; the HTTP status each maps to is decided here and only here."""

from __future__ import annotations


class RuntimeServerError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RuntimeServerError):
    status = 400


class NotFound(RuntimeServerError):
    status = 404


class MethodNotAllowed(RuntimeServerError):
    status = 405


class UnsupportedMediaType(RuntimeServerError):
    status = 415


class PayloadTooLarge(RuntimeServerError):
    status = 413


class TooManyRequests(RuntimeServerError):
    """The queue is full: the caller should retry after `retry_after` seconds."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(RuntimeServerError):
    status = 503


class DeadlineExceeded(RuntimeServerError):
    status = 504


class ModelLoadError(Exception):
    """The model could not be fetched, verified or loaded; the server refuses to start."""
