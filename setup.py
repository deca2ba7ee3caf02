"""Build of fastlb's one extension module, ``fastlb._core``.

Switches (environment variables, so they pass through ``pip install``):
  FASTLB_ANNOTATE=1   also write fastlb/_core.html (``cython -a``: yellow = Python overhead)
  FASTLB_DEBUG=1      -O0 -g, bounds and overflow checks on, Cython line tracing, C asserts, and
                      FASTLB_DEBUG_COUNTS: the engine counts its sessions, buffers and fds, and
                      Engine.close() checks they are back to zero (fastlb/_debug.h)
"""
import os
import sys

from setuptools import Extension, setup

CYTHON_MIN = (3, 0, 10)
CYTHON_BELOW = (3, 4)


def _check_cython():
    try:
        import Cython
    except ImportError:
        sys.exit("fastlb: building needs Cython >= 3.0.10, < 3.4 (pip installs it from pyproject.toml)")
    version = tuple(int(p) for p in Cython.__version__.split(".")[:3] if p.isdigit())
    if not (CYTHON_MIN <= version < CYTHON_BELOW):
        sys.exit(
            f"fastlb: Cython {Cython.__version__} is outside the tested range >= 3.0.10, < 3.4"
        )


def _extensions():
    _check_cython()
    from Cython.Build import cythonize

    debug = os.environ.get("FASTLB_DEBUG") == "1"
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": not debug,
        "initializedcheck": debug,
        "embedsignature": True,
    }
    macros = []
    if debug:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
        macros.append(("FASTLB_DEBUG_COUNTS", "1"))
        cflags = ["-O0", "-g3", "-UNDEBUG"]
    else:
        cflags = ["-O2"]
    ext = Extension(
        "fastlb._core",
        ["fastlb/_core.pyx"],
        include_dirs=["fastlb"],
        extra_compile_args=cflags,
        define_macros=macros,
        libraries=["ssl", "crypto"],        # [tls] OpenSSL (Debian/Ubuntu: libssl-dev to build)
        depends=["fastlb/_atomic.h", "fastlb/_xxh64.h", "fastlb/_debug.h", "fastlb/_tls.h",
                 "fastlb/_tls_orig.h"]
        + [os.path.join("fastlb/core", f) for f in sorted(os.listdir("fastlb/core"))],
    )
    return cythonize(
        [ext],
        compiler_directives=directives,
        annotate=os.environ.get("FASTLB_ANNOTATE") == "1",
        force=os.environ.get("FASTLB_FORCE") == "1",
    )


setup(ext_modules=_extensions())
