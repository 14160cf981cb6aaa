"""The ``kodarelay`` command's arguments: the parser, its help texts and its argument types
(``kodarelay.cli`` runs the subcommands)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import NoReturn

from ._version import __version__

PROG = "kodarelay"


def _port_type(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not lo <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(f"invalid port {text!r} (want {lo}..65535)")
        return int(text)

    parse.__name__ = "port"
    return parse


def _metrics_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise argparse.ArgumentTypeError(f"want [HOST:]PORT, got {text!r}")
    return host, int(port)


def _ttl_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid --dns-ttl {text!r} (want seconds >= 0)")
    return value


MAIN_EPILOG = """\
examples:
  kodarelay run --allow pypi.org,files.pythonhosted.org -- pip download requests
  kodarelay run --dev-defaults --isolate -- npm install
  kodarelay serve --allow github.com --port 3128
  kodarelay env --port 3128 --format json
  kodarelay check github.com:443 --dev-defaults

Each subcommand has its own --help.
"""

RUN_EPILOG = """\
examples:
  kodarelay run --allow pypi.org,files.pythonhosted.org -- pip download requests
  kodarelay run --dev-defaults --deny gist.github.com -- git clone https://github.com/psf/requests
  kodarelay run --allow localhost --ca-bundle ca.pem -- curl https://localhost:8443/
  kodarelay run --allow api.example.com --isolate -- python agent.py
  kodarelay run --allow api.example.com --allow-unix /run/myapp/api.sock -- python agent.py
  kodarelay run --upstream http://proxy.corp:3128 --allow github.com -- ./fetch.sh

CMD gets HTTPS_PROXY / HTTP_PROXY (and the names pip, git, npm, yarn, gRPC... read),
ALL_PROXY=http://... on the same port (it speaks SOCKS5 too; --all-proxy-scheme socks5h
for SOCKS-only clients), the CA variables with --ca-bundle, and an empty NO_PROXY: even
localhost goes through the policy. Names that resolve to private addresses are refused
unless --allow-private (or an IP / CIDR --allow rule naming them). Inherited *_proxy
variables are removed. Plain-http requests are forwarded, judged like a CONNECT
(--no-forward-http: 405).

CMD runs fenced by default (Linux): in its own network and user namespaces (unshare)
whose only way out is the proxy, with no capability, and no Unix socket but the ones
--allow-unix names. A client that ignores the proxy variables is captured: the fence
answers DNS with synthetic addresses, and its connections to ports 80, 443, each --allow
port and each --capture-port reach the proxy, judged like the rest (--no-capture: they
get no connection at all; CMD cannot listen on a captured port).
Where the fence cannot be made, kodarelay says so in one line and runs CMD unfenced;
--isolate refuses instead (exit 125), --no-isolate never fences.

SIGINT / SIGTERM / SIGHUP / SIGQUIT / SIGUSR1 / SIGUSR2 are forwarded to CMD.
Exit status: CMD's (128+N if signal N killed it); 127 CMD not found; 126 CMD not
executable; 125 kodarelay could not start; 2 bad usage. Refusals are summarised on
stderr when CMD ends (--quiet: no summary).
"""

SERVE_EPILOG = """\
examples:
  kodarelay serve --allow github.com,*.githubusercontent.com
  kodarelay serve --dev-defaults --port 3128 --socks5-port 1080
  kodarelay serve --allow localhost --upstream direct -v

Prints the bouquet as export lines on stdout (copy them into the sandbox's shell) and
logs every refusal on stderr. ALL_PROXY is http:// at the main port (it speaks SOCKS5
too), or socks5h:// at --socks5-port. Names resolving to private addresses are refused
unless --allow-private. Runs until SIGINT or SIGTERM, then stops cleanly (exit 0).
--port 0 (the default) picks a free port.
"""

ENV_EPILOG = """\
examples:
  kodarelay env --port 3128
  kodarelay env --port 3128 --socks5-port 1080 --ca-bundle /etc/ssl/mitm.pem --tools
  kodarelay env --port 3128 --format dotenv > proxy.env
  kodarelay env --port 3128 --no-proxy localhost,127.0.0.1 --format json

Without --socks5-port no ALL_PROXY is printed. NO_PROXY is empty unless --no-proxy.
"""

CHECK_EPILOG = """\
examples:
  kodarelay check github.com:443 --dev-defaults
  kodarelay check registry.npmjs.org --allow '*.npmjs.org:443'
  kodarelay check gist.github.com --allow '*.github.com' --deny gist.github.com
  kodarelay check '[::1]:8080' --allow '::1'
  kodarelay check 10.1.2.3:443 --allow 10.0.0.0/8

Prints "allowed" or "denied", the target, the rule that decided and the reason.
An IP literal is judged as the proxy judges it: rules, then the address guard, which
refuses loopback, link-local, metadata, documentation, reserved and (without
--allow-private) private addresses unless an IP / CIDR rule names them. A name is judged
by the rules only (no DNS): the proxy also refuses it if it resolves to such an address
(unless an IP rule, or for the name localhost a localhost rule, admits it).
Exit status: 0 allowed, 1 denied, 2 bad input.
"""


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow", "-a", action="append", metavar="PATTERN",
        help="allow host pattern (repeatable, comma-separated): github.com, *.npmjs.org, pypi.org:443, 10.0.0.0/8",
    )
    p.add_argument("--deny", "-d", action="append", metavar="PATTERN", help="deny pattern; deny wins over allow")
    p.add_argument("--dev-defaults", action="store_true", help="also allow the default dev allowlist (GitHub, npm, PyPI, crates.io, Docker Hub)")
    p.add_argument(
        "--allow-private", action="store_true",
        help="admit private addresses (RFC 1918, CGNAT, ULA) that allowed hosts resolve to or are; "
        "refused by default unless an IP / CIDR --allow rule names them",
    )


def _add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream", default="auto", metavar="auto|direct|URL",
        help="chain through the caller's HTTPS_PROXY (auto, the default), connect directly, or use this proxy URL",
    )
    p.add_argument("--ca-bundle", metavar="PATH", help="CA bundle the clients must trust (sets SSL_CERT_FILE, CURL_CA_BUNDLE, PIP_CERT, ...)")
    p.add_argument(
        "--all-proxy-scheme", choices=("http", "socks5h"), default=None,
        help="scheme of ALL_PROXY (default http: the port speaks both, and httpx / gRPC reject socks5h; "
        "socks5h for SOCKS-only setups; serve --socks5-port defaults to socks5h at that port)",
    )
    p.add_argument("--inspect", action="append", metavar="PATTERN",
                   help="decrypt tunnels to these hosts for the audit trail (request rules and secrets decrypt "
                        "their hosts without it); needs kodarelay[inspect]")
    p.add_argument("--no-inspect", action="append", metavar="PATTERN",
                   help="never decrypt these hosts (clients that pin certificates); a request rule on one is an error")
    p.add_argument("--ca-dir", metavar="DIR",
                   help="keep the inspection CA in DIR (ca.pem, ca-key.pem 0600; made on first use) instead of a "
                        "new one in memory per run")
    p.add_argument("--upstream-ca", metavar="FILE",
                   help="verify inspected origins against FILE instead of the system's trust store")
    p.add_argument("--metrics", metavar="[HOST:]PORT", type=_metrics_address,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; "
                        "port 0 picks one, logged at start)")
    p.add_argument("--secret", action="append", metavar="NAME@HOSTS",
                   help="CMD gets a phantom in NAME; the proxy swaps in the value (kodarelay's own $NAME, or "
                        "NAME=FILE@HOSTS: FILE's first line) in decrypted requests to HOSTS (a comma list); "
                        "needs the fence and kodarelay[inspect]")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--policy", metavar="FILE",
                   help="rules from FILE ('allow PATTERN' / 'deny PATTERN' lines, # comments), reloaded when it "
                        "changes (serve: and on SIGHUP); a bad file keeps the old rules")
    p.add_argument("--events", metavar="FILE",
                   help="write every decision and tunnel end as a JSON line to FILE (- for stderr)")
    p.add_argument("--ask", action="store_true",
                   help="ask on the terminal before admitting a host no rule matches (y once, a always, n no, "
                        "N never; no answer in 5 minutes refuses)")
    p.add_argument("--dns-ttl", type=_ttl_type, metavar="SECONDS",
                   help="reuse a name's checked addresses this long (default 30; 0 resolves every time)")
    p.add_argument(
        "--no-forward-http", dest="forward_http", action="store_false",
        help="answer plain-HTTP proxy requests (GET http://...) with 405 instead of forwarding them",
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser that names the closest flag when one is misspelt (``--alow`` →
    ``--allow``): argparse only says "unrecognized arguments"."""

    def error(self, message: str) -> NoReturn:
        hint = _suggest_flag(message, _known_flags(self))
        super().error(f"{message}{hint}")


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and of its subcommands."""
    flags: list[str] = []
    for action in parser._actions:
        flags += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags += _known_flags(sub)
    return sorted(set(flags))


def _suggest_flag(message: str, flags: Sequence[str]) -> str:
    import difflib

    for word in re.findall(r"--[\w-]+", message):
        if word in flags:
            continue
        close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Allowlisting egress proxy (HTTP CONNECT + SOCKS5) for AI-agent sandboxes.",
        epilog=MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="run a command behind the proxy", epilog=RUN_EPILOG, formatter_class=fmt,
        description="Start the proxy, run CMD with its environment pointing at it, exit with CMD's status.",
        usage="%(prog)s [options] -- CMD [ARGS...]",
    )
    _add_policy_args(run)
    _add_proxy_args(run)
    fence = run.add_mutually_exclusive_group()
    fence.add_argument(
        "--isolate", action="store_true", default=None,
        help="run CMD fenced or not at all (exit 125); the default fences CMD wherever it can",
    )
    fence.add_argument(
        "--no-isolate", dest="isolate", action="store_false", default=None,
        help="run CMD unfenced: a client that ignores the proxy variables reaches the network",
    )
    run.add_argument(
        "--allow-unix", action="append", metavar="PATH",
        help="let fenced CMD connect to this Unix socket (repeatable); no other is reachable",
    )
    run.add_argument(
        "--no-capture", dest="capture", action="store_false", default=True,
        help="fenced CMD's direct connections get no route (the default brings those to ports 80, 443 and "
             "each --allow port to the proxy, with the fence's own DNS)",
    )
    run.add_argument(
        "--capture-port", action="append", type=_port_type(1), metavar="N",
        help="also capture fenced CMD's direct connections to port N (repeatable)",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no refusal summary, no warnings")
    run.add_argument("--learn", action="store_true",
                     help="admit everything deny rules and the guard do not refuse, then print the --allow flags "
                          "CMD needed")
    run.add_argument("--learn-out", metavar="FILE", help="with --learn: also write them as a policy file")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    serve = sub.add_parser(
        "serve", help="run the proxy in the foreground and print export lines", epilog=SERVE_EPILOG, formatter_class=fmt,
        description="Run the proxy in the foreground until SIGINT / SIGTERM.",
    )
    _add_policy_args(serve)
    _add_proxy_args(serve)
    serve.add_argument("--port", "-p", type=_port_type(0), default=0, help="HTTP CONNECT + SOCKS5 port (default: a free one)")
    serve.add_argument("--socks5-port", type=_port_type(0), metavar="PORT", help="also serve SOCKS5 alone on this port (0: a free one)")

    env = sub.add_parser(
        "env", help="print the environment for a proxy on a port", epilog=ENV_EPILOG, formatter_class=fmt,
        description="Print the proxy environment bouquet for a proxy on 127.0.0.1.",
    )
    env.add_argument("--port", "-p", type=_port_type(1), required=True, help="the proxy's HTTP CONNECT port")
    env.add_argument("--socks5-port", type=_port_type(1), metavar="PORT", help="the proxy's SOCKS5 port (adds ALL_PROXY=socks5h://...)")
    env.add_argument("--ca-bundle", metavar="PATH", help="an existing CA bundle file, printed as an absolute path (adds SSL_CERT_FILE, CURL_CA_BUNDLE, ...)")
    env.add_argument("--format", "-f", choices=("sh", "json", "dotenv"), default="sh", help="output format (default sh)")
    env.add_argument("--tools", action="store_true", help="also the names npm, yarn, pip, git, cargo, gRPC, Docker... read")
    env.add_argument("--no-proxy", default="", metavar="LIST", help="NO_PROXY value (default empty: everything goes through the proxy)")
    env.add_argument("--client", metavar="NAME", help="name this client in every proxy URL (NAME:@, or NAME:TOKEN@ with --token)")
    env.add_argument("--token", metavar="TOKEN", help="the client's token (password) in every proxy URL; needs --client")

    check = sub.add_parser(
        "check", help="show whether a host is allowed, and by which rule", epilog=CHECK_EPILOG, formatter_class=fmt,
        description="Judge HOST[:PORT] against the allow / deny rules.",
    )
    check.add_argument("target", metavar="HOST[:PORT]")
    check.add_argument("--method", help="judge one request with this method (request rules)")
    check.add_argument("--path", help="judge one request to this path (request rules; a query is ignored)")
    _add_policy_args(check)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; for ``run``, everything after the first ``--`` is CMD, untouched."""
    parser = build_parser()
    argv = list(argv)
    if argv[:1] == ["run"] and "--" in argv:
        i = argv.index("--")
        args = parser.parse_args(argv[:i])
        tail = argv[i + 1 :]
        args.cmd = [*args.cmd, "--", *tail] if args.cmd else tail  # a "--" that belongs to CMD
        return args
    return parser.parse_args(argv)


