"""Build the compiled relay ``kodarelay._relay``.

``KODARELAY_DEBUG_BUILD=1`` builds it without optimisation, with debug symbols and Cython
line tracing, for contributors chasing a crash or profiling the engine.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KODARELAY_DEBUG_BUILD", "").strip().lower() in {"1", "true", "yes", "on"}

if DEBUG:
    cflags = ["-O0", "-g3", "-UNDEBUG"]
    macros = [("CYTHON_TRACE_NOGIL", "1")]
    directives = {"linetrace": True, "language_level": "3"}
else:
    cflags = ["-O2"]
    macros = []
    directives = {"language_level": "3", "boundscheck": False, "wraparound": False}

extensions = [
    Extension(
        "kodarelay._relay",
        ["kodarelay/_relay.pyx"],
        depends=["kodarelay/_engine.pxi", "kodarelay/_http1.pxi"],
        extra_compile_args=cflags,
        define_macros=macros,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
