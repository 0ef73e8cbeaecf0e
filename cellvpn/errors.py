"""Errors that end a service's start with one clear line instead of a traceback."""


class StartupError(Exception):
    """The service cannot start; the message says why and what to change."""
