"""fastlb: a high-throughput TCP (layer 4) load balancer on uvloop with a Cython core."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fastlb")
except PackageNotFoundError:  # running from a source tree that was built in place
    __version__ = "0.0.0+local"


def __getattr__(name: str) -> object:
    """``fastlb.Registration`` (fastlb/register.py), imported on first use: ``import fastlb``
    stays light (no admin client, no msgpack) for those who do not register."""
    if name == "Registration":
        from fastlb.register import Registration
        return Registration
    raise AttributeError(f"module 'fastlb' has no attribute {name!r}")
