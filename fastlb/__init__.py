"""fastlb: a high-throughput TCP (layer 4) load balancer on uvloop with a Cython core."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fastlb")
except PackageNotFoundError:  # running from a source tree that was built in place
    __version__ = "0.0.0+local"
