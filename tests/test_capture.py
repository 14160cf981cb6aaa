"""Capture inside the fence (issue 20): clients that ignore the proxy variables work for
allowed hosts and are refused, and listed, for the rest.

Real processes only: ``python -m kodarelay run`` with curl ``--noproxy '*'``, a raw Python
socket and Node's ``fetch`` inside the fence. Names come from the fence's own DNS (a
synthetic address), capture brings the connection to the proxy, and the proxy resolves the
real name on the host: the machine's own hostname where it resolves to 127.0.0.1 (with an
``--allow NAME,127.0.0.1:PORT`` rule, as the guard asks), or ``localhost`` (a literal
127.0.0.1 in the fence). Ports 80 and 443 need sites on them: those tests run kodarelay in a
network namespace of their own (``capture_netns.py``). Every connection CMD makes stays in
the fence's namespace or reaches a loopback site.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import WebServer, require_tool

KR = [sys.executable, "-m", "kodarelay"]
RUN_TIMEOUT = 60
HERE = Path(__file__).resolve().parent


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def kr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KR, *args], env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fence() -> None:
    exe = shutil.which("unshare")
    if not sys.platform.startswith("linux") or exe is None:
        pytest.skip("the fence needs Linux and unshare")
    out = subprocess.run([exe, "--user", "--map-root-user", "--net", "--", "true"], capture_output=True, text=True,
                         timeout=10)
    if out.returncode != 0:
        pytest.skip(f"user namespaces are not permitted here: {out.stderr.strip()}")


@pytest.fixture(scope="module")
def name() -> str:
    """A name the host resolves to 127.0.0.1 and the fence does not know (its hosts file is
    localhost alone): the machine's hostname."""
    host = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, 80, socket.AF_INET)}
    except OSError:
        addrs = set()
    if addrs != {"127.0.0.1"} or host.lower() in ("localhost", "localhost.localdomain"):
        pytest.skip(f"the hostname {host!r} does not resolve to 127.0.0.1 alone here")
    return host


@pytest.fixture
def site() -> Iterator[WebServer]:
    s = WebServer()
    yield s
    s.close()


def allow(name: str, port: int) -> list[str]:
    """The rule the guard asks for: the name, and the loopback address it resolves to."""
    return ["--allow", f"{name},127.0.0.1:{port}"]


# ── clients that ignore the proxy variables ─────────────────────────────────


def test_curl_noproxy_reaches_an_allowed_name_and_is_refused_elsewhere(fence, name, site, tmp_path):
    curl = require_tool("curl")
    ev = tmp_path / "events.jsonl"
    script = f"""
        {curl} -s --noproxy '*' --max-time 10 http://{name}:{site.port}/allowed
        {curl} -s --noproxy '*' --max-time 10 http://refused.test:{site.port}/no; echo "refused rc=$?"
    """
    out = kr("run", "--upstream", "direct", *allow(name, site.port), "--events", str(ev), "--",
             "sh", "-c", textwrap.dedent(script))
    assert "hello from /allowed" in out.stdout, out.stderr
    assert "refused rc=52" in out.stdout          # closed with no byte: the port is neither 80 nor 443
    assert f"refused.test:{site.port}  not_allowed" in out.stderr
    got = [(e["kind"], e["protocol"], e["host"]) for e in events(ev)]
    assert ("allow", "capture", name) in got
    assert ("refuse", "capture", "refused.test") in got


def test_a_raw_socket_is_captured_too(fence, name, site):
    code = f"""
        import socket
        with socket.create_connection(({name!r}, {site.port}), timeout=10) as s:
            print("peer", s.getpeername()[0])
            s.sendall(b"GET /raw HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            print(data.decode().splitlines()[-1])
        with socket.create_connection(("refused.test", {site.port}), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n")
            print("refused got", s.recv(100))
    """
    out = kr("run", "--upstream", "direct", *allow(name, site.port), "--", *py(code))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("peer 198.1")            # the synthetic address
    assert lines[1:] == ["hello from /raw", "refused got b''"]
    assert f"refused.test:{site.port}  not_allowed" in out.stderr


def test_localhost_is_captured_as_the_literal_127_0_0_1(fence, site):
    curl = require_tool("curl")
    script = f"{curl} -s --noproxy '*' --max-time 10 http://localhost:{site.port}/lit"
    out = kr("run", "--upstream", "direct", "--capture-port", str(site.port), "--", "sh", "-c", script)
    assert out.returncode != 0                    # captured (a --capture-port), judged: no rule names it
    assert f"127.0.0.1:{site.port}  not_allowed" in out.stderr
    out = kr("run", "--upstream", "direct", "--allow", f"127.0.0.1:{site.port}", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from /lit\n"


def test_node_fetch_is_captured(fence, name, site):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    js = f"""
        const go = async (url) => {{
          try {{ const r = await fetch(url); console.log(r.status, (await r.text()).trim()); }}
          catch (e) {{ console.log("failed", e.cause ? e.cause.code || e.cause.message : e.message); }}
        }};
        (async () => {{ await go("http://{name}:{site.port}/node"); await go("http://refused.test:{site.port}/"); }})();
    """
    out = kr("run", "--upstream", "direct", *allow(name, site.port), "--", node, "-e", textwrap.dedent(js))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "200 hello from /node"
    assert lines[1].startswith("failed")
    assert f"refused.test:{site.port}  not_allowed" in out.stderr


# ── the fence's DNS, asked from inside ──────────────────────────────────────


def test_the_fences_dns_from_inside(fence, name):
    code = f"""
        import socket, struct
        print(open("/etc/hosts").read().split())
        print(socket.getaddrinfo({name!r}, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
        print(socket.getaddrinfo("pypi.org", 443, 0, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)[0][4][0])
        try:
            socket.getaddrinfo("pypi.org", 443, socket.AF_INET6)
            print("v6 answered")
        except socket.gaierror:
            print("no v6")
        server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
        def ask(qtype, raw=None):
            q = raw or struct.pack("!HHHHHH", 77, 0x100, 1, 0, 0, 0) + b"\\x04pypi\\x03org\\x00" + struct.pack("!HH", qtype, 1)
            with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.sendto(q, (server, 53))
                r = u.recv(512)
            return struct.unpack_from("!HHHH", r)
        for qtype in (1, 28, 15):
            ident, flags, _qd, an = ask(qtype)
            print(qtype, ident, flags & 15, an)
        ident, flags, _qd, an = ask(0, struct.pack("!HHHHHH", 78, 0x100, 1, 0, 0, 0) + b"\\x04py")
        print("malformed", ident, flags & 15)
        with socket.create_connection((server, 53), timeout=5) as t:      # TCP too
            q = struct.pack("!HHHHHH", 79, 0x100, 1, 0, 0, 0) + b"\\x04pypi\\x03org\\x00" + struct.pack("!HH", 1, 1)
            t.sendall(struct.pack("!H", len(q)) + q)
            size = struct.unpack("!H", t.recv(2, socket.MSG_WAITALL))[0]
            r = t.recv(size, socket.MSG_WAITALL)
            print("tcp", socket.inet_ntoa(r[-4:]))
    """
    out = kr("run", "--upstream", "direct", "--", *py(code))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "localhost" in lines[0] and name not in lines[0]
    assert lines[1].startswith("198.18.0.") and lines[2].startswith("198.18.0.") and lines[1] != lines[2]
    assert lines[3] == "no v6"
    assert lines[4] == "1 77 0 1"              # A: one answer
    assert lines[5] == "28 77 0 0"             # AAAA: NOERROR, none
    assert lines[6] == "15 77 5 0"             # MX: REFUSED
    assert lines[7] == "malformed 78 1"        # FORMERR
    assert lines[8] == f"tcp {lines[2]}"       # the same name, the same address


def test_the_pool_hands_out_distinct_addresses_and_keeps_them(fence):
    code = """
        import socket
        names = [f"n{i}.test" for i in range(200)]
        first = [socket.gethostbyname(n) for n in names]
        again = [socket.gethostbyname(n.upper() + ".") for n in names]
        print(len(set(first)), first == again)
    """
    out = kr("run", "--upstream", "direct", "--", *py(code))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "200 True"


# ── addresses, ports, IPv6 ──────────────────────────────────────────────────


def test_literal_addresses_ipv4_and_ipv6_are_captured_and_judged(fence, tmp_path):
    ev = tmp_path / "events.jsonl"
    code = """
        import socket
        for addr, port in (("192.0.2.7", 443), ("2001:db8::7", 7000), ("198.19.200.1", 7000)):
            with socket.create_connection((addr, port), timeout=10) as s:
                if port == 443:
                    s.sendall(b"not TLS")          # no SNI to compare: judged by the address
                print(addr, s.getpeername()[0], s.recv(10))
    """
    out = kr("run", "--upstream", "direct", "--capture-port", "7000", "--events", str(ev), "--", *py(code))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["192.0.2.7 192.0.2.7 b''", "2001:db8::7 2001:db8::7 b''",
                                       "198.19.200.1 198.19.200.1 b''"]
    assert "192.0.2.7:443  " in out.stderr and "[2001:db8::7]:7000  " in out.stderr
    assert "198.19.200.1:7000  unknown_address" in out.stderr     # a synthetic address never given out
    refused = {(e["protocol"], e["host"]) for e in events(ev) if e["kind"] == "refuse"}
    assert refused == {("capture", "192.0.2.7"), ("capture", "2001:db8::7"), ("capture", "198.19.200.1")}


def test_captured_ports_cannot_be_listened_on_but_others_can(fence):
    code = """
        import errno, socket
        for port in (443, 8443, 9999):
            s = socket.socket()
            try:
                s.bind(("0.0.0.0", port)); s.listen(); print(port, "ok")
            except OSError as e:
                print(port, errno.errorcode[e.errno])
            s.close()
    """
    out = kr("run", "--upstream", "direct", "--allow", "example.test:8443", "--", *py(code))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["443 EADDRINUSE", "8443 EADDRINUSE", "9999 ok"]
    out = kr("run", "--upstream", "direct", "--no-capture", "--allow", "example.test:8443", "--", *py(code))
    assert out.stdout.splitlines() == ["443 ok", "8443 ok", "9999 ok"]


def test_cmd_cannot_remove_the_routes(fence):
    code = """
        import errno
        from kodarelay import netlink
        for what, call in (("del v4", lambda: netlink.delete_local_route("0.0.0.0/0")),
                           ("del v6", lambda: netlink.delete_local_route("::/0")),
                           ("add", lambda: netlink.add_local_route("10.9.0.0/16"))):
            try:
                call(); print(what, "done")
            except OSError as e:
                print(what, errno.errorcode.get(e.errno, e.errno))
        import socket
        with socket.create_connection(("192.0.2.9", 80), timeout=10) as s:     # still captured
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: 192.0.2.9\\r\\n\\r\\n")
            print(s.recv(12))
    """
    out = kr("run", "--upstream", "direct", "--", *py(code))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["del v4 EPERM", "del v6 EPERM", "add EPERM", "b'HTTP/1.1 403'"]


def test_no_capture_gives_the_old_fence(fence, name, site):
    curl = require_tool("curl")
    script = f"{curl} -s --noproxy '*' --max-time 10 http://{name}:{site.port}/"
    out = kr("run", "--upstream", "direct", "--no-capture", *allow(name, site.port), "--", "sh", "-c", script)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "direct connections had no route" in last, out.stderr


def test_the_fence_line_names_the_captured_ports(fence, site):
    out = kr("run", "--upstream", "direct", "--capture-port", str(site.port), "--", "sh", "-c", "exit 3")
    assert out.returncode == 3
    last = out.stderr.strip().splitlines()[-1]
    assert f"direct connections to port 80, 443, {site.port} were captured" in last
    assert "had no route" not in last.split("to other ports")[0]


@pytest.mark.parametrize("flags", [["--no-capture"], ["--no-isolate"]])
def test_capture_port_without_capture_is_a_usage_error(flags):
    out = kr("run", *flags, "--capture-port", "8080", "--", "true")
    assert out.returncode == 2
    assert "--capture-port" in out.stderr and flags[0] in out.stderr


def test_capture_port_must_be_a_port():
    out = kr("run", "--capture-port", "0", "--", "true")
    assert out.returncode == 2


# ── 80 and 443: Host and SNI (in a network namespace of the test's own) ──────


@pytest.fixture(scope="module")
def own_netns(fence) -> None:
    if os.geteuid() != 0:
        pytest.skip("sites on ports 80 / 443 of a network namespace of the test's own need root")
    pytest.importorskip("trustme")


def in_netns(name: str, tmp_path: Path, *args: str) -> dict[str, object]:
    ca = tmp_path / "ca.pem"
    out = subprocess.run([shutil.which("unshare") or "unshare", "--net", "--", sys.executable,
                          str(HERE / "capture_netns.py"), name, str(ca), "--", *args],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT + 30, env=clean_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_port_80_checks_each_requests_host(own_netns, name, tmp_path):
    code = f"""
        import socket
        def ask(s, host):
            s.sendall(f"GET /{{host}} HTTP/1.1\\r\\nHost: {{host}}\\r\\n\\r\\n".encode())
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                head += s.recv(1)
            length = int([l.split(b":")[1] for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0])
            body = b""
            while len(body) < length:
                body += s.recv(length - len(body))
            print(head.split(b"\\r\\n")[0].decode(), body.decode().strip())
        with socket.create_connection(({name!r}, 80), timeout=10) as s:   # one kept-alive connection
            ask(s, {name!r})
            ask(s, "evil.test")
            ask(s, {name!r}.upper() + ":80")
    """
    res = in_netns(name, tmp_path, "--upstream", "direct", "--allow", f"{name},127.0.0.1:80", "--", *py(code))
    assert res["rc"] == 0, res["stderr"]
    lines = str(res["stdout"]).splitlines()
    assert lines[0] == f"HTTP/1.1 200 OK hello from /{name}"
    assert lines[1].startswith("HTTP/1.1 421 Misdirected Request kodarelay: GET refused (host_mismatch)")
    assert lines[2] == f"HTTP/1.1 200 OK hello from /{name.upper()}:80"
    assert res["http"] == [[f"/{name}", name], [f"/{name.upper()}:80", name]]   # the origin gets the name
    assert f"{name}:80  host_mismatch" in str(res["stderr"])


def test_port_80_refusal_is_a_403_with_its_body(own_netns, name, tmp_path):
    curl = require_tool("curl")
    script = f"{curl} -s --noproxy '*' --max-time 10 -w ' %{{http_code}}' http://refused.test/x"
    res = in_netns(name, tmp_path, "--upstream", "direct", "--", "sh", "-c", script)
    assert str(res["stdout"]).endswith(" 403"), res
    assert "refused.test:80" in str(res["stdout"]) and "not_allowed" in str(res["stdout"])
    assert "refused.test:80  not_allowed" in str(res["stderr"])


def test_port_443_checks_the_sni(own_netns, name, tmp_path):
    curl = require_tool("curl")
    ca = tmp_path / "ca.pem"
    code = f"""
        import socket, ssl, subprocess
        out = subprocess.run([{curl!r}, "-s", "--noproxy", "*", "--max-time", "10", "--cacert", {str(ca)!r},
                              "https://{name}/tls"], capture_output=True, text=True)
        print(out.stdout.strip())
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(({name!r}, 443), timeout=10)
        try:
            ctx.wrap_socket(raw, server_hostname="evil.test")
            print("handshake done")
        except (ssl.SSLError, OSError) as e:
            print("refused", type(e).__name__)
    """
    res = in_netns(name, tmp_path, "--upstream", "direct", "--allow", f"{name},127.0.0.1:443", "--", *py(code))
    assert res["rc"] == 0, res["stderr"]
    assert str(res["stdout"]).splitlines() == ["hello from /tls", "refused SSLEOFError"]
    assert res["https"] == [["/tls", name]]
    assert f"{name}:443  sni_mismatch: the TLS SNI names evil.test" in str(res["stderr"])


def test_where_capture_cannot_be_set_up_one_line_says_so_and_no_route_is_left(fence):
    """The helper's own step, in a namespace of the test's: the fence's nameserver port is
    taken, so capture fails; it says so in one line and takes its routes away again."""
    code = """
        import errno, socket, sys
        from kodarelay import isolate, netlink
        from kodarelay.fencedns import nameservers
        isolate.loopback_up()
        server = nameservers(open("/etc/resolv.conf").read())[0]
        netlink.add_address(server)
        taken = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind((server, 53))
        print(isolate._set_up_capture("/nonexistent.sock", [80]))
        try:
            socket.create_connection(("192.0.2.1", 80), timeout=5)
            print("connected")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """
    out = subprocess.run([shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--",
                          *py(code)], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env())
    assert out.stdout.splitlines() == ["None", "ENETUNREACH"], out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("kodarelay: fence: capture is off ("), out.stderr


def test_port_80_takes_no_proxy_requests(own_netns, name, tmp_path):
    """A captured connection to port 80 is a connection to that origin: a CONNECT, or an
    absolute-form request naming another host, is a 400 and never reaches anyone."""
    code = f"""
        import socket
        for request in (b"CONNECT evil.test:443 HTTP/1.1\\r\\nHost: evil.test:443\\r\\n\\r\\n",
                        b"GET http://evil.test/x HTTP/1.1\\r\\nHost: {name}\\r\\n\\r\\n",
                        b"GET http://{name}/abs HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n"):
            with socket.create_connection(({name!r}, 80), timeout=10) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                print(data.split(b"\\r\\n")[0].decode(), data.splitlines()[-1].decode())
    """
    res = in_netns(name, tmp_path, "--upstream", "direct", "--allow", f"{name},127.0.0.1:80", "--", *py(code))
    assert res["rc"] == 0, res["stderr"]
    lines = str(res["stdout"]).splitlines()
    assert lines[0].startswith("HTTP/1.1 400 ") and lines[1].startswith("HTTP/1.1 400 ")
    assert lines[2] == "HTTP/1.1 200 OK hello from /abs"
    assert res["http"] == [["/abs", name]]
