"""The agent runtime's hooks, on loopback only: ask before admitting, change the policy live,
stream every decision, and know which job asked.

    python examples/hooks.py

A small site listens on 127.0.0.1 under the name ``site.test`` (an injected resolver stands in
for DNS). The proxy has no rule for it, so its decider is asked: it admits ``site.test`` once
for job-7, "always" after that. Then the policy is replaced while the proxy runs, and
``site.test`` is refused by a deny rule. Every decision arrives on ``on_event``.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse

from kodarelay import BuiltInProxy, Event, Filter, Request, UpstreamConfig, proxy_env_vars


_out = threading.Lock()


def say(line: str) -> None:
    """One whole line at a time: events arrive on kodarelay's own thread."""
    with _out:
        print(line, flush=True)


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


async def ask(request: Request) -> str:
    """The decider: called only when no rule matched. A real one would ask a person."""
    say(f"  decider asked: {request.client} wants {request.host}:{request.port}")
    return "allow_always" if request.host == "site.test" else "deny"


def on_event(event: Event) -> None:
    say(f"  event: {event.kind} {event.host}:{event.port} source={event.source} reason={event.reason}"
        f" client={event.client}")


async def resolve(host: str, port: int) -> list[str]:
    return {"site.test": ["127.0.0.1"]}[host]


def fetch(env: dict[str, str], url: str) -> str:
    proxy = urllib.parse.urlsplit(env["HTTP_PROXY"])
    conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=10)
    conn.request("GET", url, headers={"Proxy-Authorization": "Basic am9iLTc6"})   # job-7:
    response = conn.getresponse()
    return f"{response.status} {response.read().decode().strip()}"


def main() -> None:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    url = f"http://site.test:{site.server_address[1]}/"
    # 127.0.0.1 is guarded unless an IP rule names it: this rule lets site.test through the
    # guard; it admits no name by itself, so the decider is still asked about site.test.
    policy = Filter(["127.0.0.1"])
    with BuiltInProxy(policy, upstream=UpstreamConfig.direct(), forward_http=True, decider=ask,
                      on_event=on_event, resolver=resolve).start() as proxy:
        env = dict(proxy_env_vars(proxy.port, no_proxy="", client="job-7"))
        say(f"first fetch: {fetch(env, url)}")
        say(f"second fetch (remembered, not asked): {fetch(env, url)}")
        proxy.set_filter(Filter(["127.0.0.1"], deny=["site.test"]))      # live, from any thread
        say(f"after set_filter: {fetch(env, url)}")
        say(f"violations: {[(v.host, v.reason, v.client) for v in proxy.violations()]}")
    site.shutdown()


if __name__ == "__main__":
    main()
