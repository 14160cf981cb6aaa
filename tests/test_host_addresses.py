"""The host's own addresses are guarded (issue 17 item 10): with ``--learn`` or
``--allow 0.0.0.0/0`` a service on the host's public address answered a sandboxed client.

The address is made in a network namespace of the test's own (an address from a public
range on its loopback interface, and a local "AnyIP" range, with servers on them), so no
packet leaves the machine; the proxy runs inside that namespace and sees them as its host's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from peers import DEADLINE

SCRIPT = textwrap.dedent('''
    import socket, subprocess, sys, threading
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "1.2.3.4/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "route", "add", "local", "5.6.7.0/24", "dev", "lo"], check=True)   # AnyIP
    ports = {}
    for address in ("1.2.3.4", "5.6.7.9"):
        srv = socket.create_server((address, 0))
        ports[address] = srv.getsockname()[1]
        threading.Thread(target=lambda srv=srv: [c.sendall(b"host service") for c, _ in iter(srv.accept, None)],
                         daemon=True).start()

    def connect_via(rules, address="1.2.3.4"):
        with BuiltInProxy(Filter(rules), upstream=UpstreamConfig.direct()).start() as h:
            c = socket.create_connection(("127.0.0.1", h.port), timeout=10)
            c.sendall(f"CONNECT {address}:{ports[address]} HTTP/1.1\\r\\n\\r\\n".encode())
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                data = c.recv(4096)
                if not data:
                    break
                head += data
            return head.split(b"\\r\\n", 1)[0].decode(), [v.reason for v in h.violations()]

    print(connect_via(["0.0.0.0/0"]))
    print(connect_via(["1.2.3.4"]))
    print(connect_via(["0.0.0.0/0"], "5.6.7.9"))
    print(connect_via(["5.6.7.0/24"], "5.6.7.9"))
''')


def test_the_hosts_own_address_is_refused_unless_an_ip_rule_names_it():
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespace here: {probe.stderr.decode().strip()}")
    out = subprocess.run([unshare, "--user", "--map-root-user", "--net", sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, timeout=DEADLINE * 3, env={**os.environ})
    assert out.returncode == 0, out.stderr
    wide, named, anyip_wide, anyip_named = out.stdout.splitlines()
    assert "403" in wide and "resolved_address" in wide, wide
    assert "200" in named, named
    # an address of a local range wider than one address (AnyIP) is the host's too
    assert "403" in anyip_wide and "resolved_address" in anyip_wide, anyip_wide
    assert "200" in anyip_named, anyip_named
