"""``python -m kodarelay._isolate_child``: the helper ``kodarelay run --isolate`` starts in the namespace.

Internal: brings loopback up, forwards a loopback port to the proxy's UDS bridge, runs CMD
with the bouquet pointing at that port and exits with CMD's status. See ``kodarelay.isolate``.
"""

from __future__ import annotations

import os
import sys

from .isolate import child_main

if __name__ == "__main__":
    code = child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: the forwarder thread must not delay the exit
