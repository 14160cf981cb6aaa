"""ExternalProxy supervising a real proxy: Debian's tinyproxy, configured from KODA_PROXY_PORT."""

from __future__ import annotations

import asyncio
import os

from kodarelay import BuiltInProxy, ExternalProxy, Filter, UpstreamConfig

from peers import http_connect, port_is_closed, recv_exact, require_tool, status_of

# The child writes its config from the port kodarelay hands it, then execs tinyproxy in the
# foreground; kodarelay waits for the bind, and shutdown must leave no process behind.
LAUNCH = """
conf="$1/tinyproxy.conf"
printf 'Port %s\\nListen 127.0.0.1\\nAllow 127.0.0.1\\nLogLevel Critical\\nLogFile "%s/log"\\n%s' \
    "$KODA_PROXY_PORT" "$1" "$2" > "$conf"
exec tinyproxy -d -c "$conf"
"""


def _pids_of(exe: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe") == exe:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


async def test_external_tinyproxy_carries_a_tunnel_and_stops_cleanly(tmp_path, echo):
    exe = os.path.realpath(require_tool("tinyproxy"))
    os.chmod(tmp_path, 0o777)
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    before = _pids_of(exe)
    handle = await ExternalProxy(["sh", "-c", LAUNCH, "launch", str(tmp_path), user]).spawn()
    try:
        assert handle.kind == "external" and handle.ca_bundle is None and handle.uds_path is None
        mine = _pids_of(exe) - before
        assert mine, "tinyproxy is not running"
        # Chain kodarelay's own proxy through it, as a user behind a corporate proxy would.
        cfg = UpstreamConfig.http_proxy("127.0.0.1", handle.port)
        async with await BuiltInProxy(Filter(["localhost"]), upstream=cfg).spawn() as builtin:
            s, head = await asyncio.to_thread(http_connect, builtin.port, f"localhost:{echo.port}")
            assert status_of(head) == 200
            await asyncio.to_thread(s.sendall, b"through tinyproxy")
            assert await asyncio.to_thread(recv_exact, s, 17) == b"through tinyproxy"
            s.close()
    finally:
        handle.shutdown()
    assert port_is_closed(handle.port)
    assert not (_pids_of(exe) & mine), "tinyproxy outlived shutdown()"
