"""fastlb's one error hierarchy.

Owner: nobody else defines exception types. Every message says what was wrong, where, and what
is expected. ``ValueError``/``TypeError`` are mixed in so callers that catch the builtins keep
working.
"""


class FastLBError(Exception):
    """Base of every error fastlb raises on purpose. Anything else escaping is a bug."""


class CoreArgumentError(FastLBError, ValueError):
    """A value given to the Cython core is out of its domain (weights, slots, table size...)."""


class CoreTypeError(FastLBError, TypeError):
    """A value given to the Cython core has the wrong type (read-only buffer, non-int weight...)."""


class ConfigError(FastLBError, ValueError):
    """A config file (or a config-shaped admin request) is invalid.

    ``path`` is the key path (``service[1].backends[0].weight``), ``line`` the line in the file
    when known.
    """

    def __init__(self, path: str, message: str, *, source: str | None = None,
                 line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        self.line = line
        where = source or "config"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


class RegistryError(FastLBError):
    """A change that cannot be applied (admin request, reload). ``code`` is the admin
    protocol's error code (``invalid``, ``exists``, ``listen_failed``, ``busy``...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)
