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


class StateFileError(FastLBError):
    """The state file (``[global] state_file``) cannot be read or written.

    ``path`` is the state file; the message names it, the config key, what went wrong in words
    and what to do. Raised by fastlb.statefile: at start (fastlb refuses to start rather than
    discard acknowledged changes) and on a failed write (see StateWriteError).
    """

    def __init__(self, path: str, problem: str, remedy: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.remedy = remedy if remedy is not None else (
            "fix or move it away, or start with `fastlb run --ignore-state` to start from the "
            "config alone (the state file is then overwritten)")
        super().__init__(f"state file {path} ([global] state_file): {problem}; {self.remedy}")


class StateWriteError(StateFileError, OSError):
    """A write of the state file failed (missing directory, full disk, read-only...); nothing on
    disk changed. An OSError too, so callers that catch the builtin keep working: ``errno`` is
    the failed call's, ``strerror`` the whole message in words."""

    def __init__(self, path: str, problem: str, remedy: str, errno: int | None = None) -> None:
        StateFileError.__init__(self, path, problem, remedy)
        self.errno = errno
        self.strerror = self.message = Exception.__str__(self)

    def __str__(self) -> str:
        return self.message


class AdminProtocolError(FastLBError):
    """A request (or the stream) on the admin socket is invalid. ``code`` is the protocol's error
    code, ``id`` the request's id when known; ``fatal``: the stream's framing is lost and the
    connection must close."""

    def __init__(self, code: str, message: str, *, id: int | None = None, fatal: bool = False):
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal
        super().__init__(message)


class AdminError(FastLBError):
    """The admin server answered a request with an error (raised by the client)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class RegistryError(FastLBError):
    """A change that cannot be applied (admin request, reload). ``code`` is the admin
    protocol's error code (``invalid``, ``exists``, ``listen_failed``, ``busy``...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class StateUnusable(FastLBError):
    """The bytes of a state file (or of its previous generation) cannot be used: torn, corrupt,
    of an unknown version. The text says why; fastlb.statefile turns it into a StateFileError
    naming the file and the remedy, or falls back to the previous generation."""


class HTTPError(FastLBError):
    """A request to the metrics port answered with an error status, and the connection closed
    (fastlb.httpapi). ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
