"""Build the compiled relay ``kodarelay._relay``.

``KODARELAY_DEBUG_BUILD=1`` builds it without optimisation, with debug symbols and Cython
line tracing, for contributors chasing a crash or profiling the engine.

``KODARELAY_SANITIZE=1`` (or ``address``) builds it with AddressSanitizer and
UndefinedBehaviorSanitizer, ``KODARELAY_SANITIZE=thread`` with ThreadSanitizer: load the
runtime first (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``); ``scripts/sanitize.sh``
does it all in a venv of its own.
"""

import os
from pathlib import Path

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

SANITIZE = os.environ.get("KODARELAY_SANITIZE", "").strip().lower()
ldflags: list[str] = []
if SANITIZE in {"1", "true", "yes", "on", "address"}:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cflags = [*san, "-O1", "-g"]
    ldflags = list(san)
elif SANITIZE == "thread":
    cflags = ["-fsanitize=thread", "-fno-omit-frame-pointer", "-O1", "-g"]
    ldflags = ["-fsanitize=thread"]


def _openssl() -> bool:
    """Whether OpenSSL's headers and libraries are here (``libssl-dev``; scripts/test.sh
    installs it): without them the engine is built without inspected tunnels, which then
    run on the asyncio path. ``KODARELAY_NO_TLS_ENGINE=1`` builds without them on purpose."""
    if os.environ.get("KODARELAY_NO_TLS_ENGINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    import shutil
    import subprocess
    import tempfile

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "t.c")
        src.write_text("#include <openssl/ssl.h>\nint main(void) { return SSL_CTX_new(TLS_method()) == 0; }\n")
        r = subprocess.run([*cc.split(), str(src), "-o", str(Path(tmp, "t")), "-lssl", "-lcrypto"],
                           capture_output=True)
        return r.returncode == 0


TLS = _openssl()
if TLS:
    macros.append(("KR_HAVE_TLS", "1"))

extensions = [
    Extension(
        "kodarelay._relay",
        ["kodarelay/_relay.pyx", "kodarelay/_inspect.c"],
        depends=sorted(str(p) for p in Path("kodarelay").glob("*.pxi"))
        + ["kodarelay/_relay.pxd", "kodarelay/_engine.h", "kodarelay/_inspect.h"],
        libraries=["ssl", "crypto"] if TLS else [],
        include_dirs=["kodarelay"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
