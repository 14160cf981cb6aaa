"""The ``kodarelay`` command: ``run``, ``serve``, ``env`` and ``check``.

Decisions worth knowing (the README repeats them):

* ``run`` and ``serve`` hand out an **empty NO_PROXY**: every connection, ``localhost``
  included, goes through the policy. Allow ``localhost`` (or an IP rule) to reach local
  services. ``env`` does the same unless ``--no-proxy`` says otherwise.
* One port speaks HTTP CONNECT and SOCKS5 (first byte 0x05), so ``ALL_PROXY`` is
  ``http://`` at that port: httpx (without the ``socksio`` extra) and gRPC reject
  ``socks5h://``, while every client that reads ``ALL_PROXY`` speaks HTTP CONNECT.
  ``--all-proxy-scheme socks5h`` is for SOCKS-only setups; ``serve --socks5-port`` points
  ``ALL_PROXY`` at that SOCKS5 port as ``socks5h://`` unless ``--all-proxy-scheme http``.
  Plain-``http://`` requests are forwarded (judged like a CONNECT) unless
  ``--no-forward-http``, which answers them 405.
* ``run``, ``serve`` and ``check`` refuse private addresses (RFC 1918, CGNAT, ULA) a name
  resolves to, as well as the always-guarded ones (loopback, link-local, metadata,
  documentation, ...): a sandbox should not reach the host's LAN by default.
  ``--allow-private`` opts in; an IP / CIDR ``--allow`` rule opts in for what it names.
  The library's servers keep ``deny_private=False`` (drop-in for the crate).
* ``check`` judges an IP literal like the proxy does (rules, then the guard). A name it
  judges by the rules only (no DNS) and says so on stderr when it is allowed.
* ``env --ca-bundle`` wants an existing file and prints its absolute path, like ``run``.
* ``run`` strips every inherited ``*_proxy`` variable from CMD's environment and hands out
  the wide bouquet (``tools=True``: pip, git, npm, yarn, cargo, gRPC, ... names).
* ``run`` fences CMD by default (``kodarelay.isolate``, ``kodarelay._fence``): no route
  but the proxy, no capability, no Unix socket but ``--allow-unix`` paths. Where the fence
  cannot be made it says so in one line and runs CMD unfenced; ``--isolate`` exits 125
  instead, ``--no-isolate`` never fences. The summary mentions the fence when a fenced CMD
  failed and nothing was refused (then a direct connection, which never reaches the proxy
  and cannot be listed, may be why), and once with ``-v``; never on a clean run.
* ``--upstream auto`` (default) chains through the caller's own ``HTTPS_PROXY`` (and
  honours its ``NO_PROXY``); ``direct`` ignores it; a URL chains everything through it.
* Allow / deny patterns may be repeated or comma-separated (``--allow a.com,b.org``).
* Exit codes: ``run`` exits with CMD's status (128 + N if signal N killed it), 127 when
  CMD is not found, 126 when it cannot be executed, 125 when kodarelay itself cannot start
  (port, the fence with ``--isolate``), 2 for bad usage (including a bad pattern or
  upstream URL). ``check``: 0 allowed, 1 refused, 2 bad input. ``serve``: 0 after
  SIGINT / SIGTERM, 1 if it cannot start, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .cli_parser import PROG, build_parser, parse_args  # noqa: F401  (build_parser: the public parser)

log = logging.getLogger("kodarelay")

EXIT_USAGE = 2
EXIT_SERVE_FAILED = 1

#: A few words on each refusal reason, for the summary of ``run``.
REASON_TEXT = {
    "not_allowed": "no --allow rule matches",
    "denied": "a --deny rule matches",
    "bad_host": "malformed host name",
    "resolved_address": (
        "is or resolves to a loopback, link-local, metadata, private, documentation or other special address "
        "(an IP / CIDR --allow rule naming it admits it; --allow-private admits private ranges)"
    ),
    "resolve_failed": "the name does not resolve",
    "bad_request": "malformed proxy request",
    "method_not_allowed": "not a CONNECT request, and plain-HTTP forwarding is off (--no-forward-http; or tunnel, e.g. curl -p)",
    "address_type": "SOCKS5 request for an IP literal no IP rule names (use socks5h:// so the name is sent)",
    "command": "SOCKS5 command other than CONNECT",
    "decider_denied": "the decider said no",
    "decider_timeout": "the decider did not answer in time",
    "decider_error": "the decider failed or gave no valid answer",
    "upstream_refused": "the upstream proxy refused it",
    "needs_inspection": "request rules name this host; a tunnel's requests cannot be read (a host rule tunnels it)",
    "request_not_allowed": "no --allow rule matches this request's method and path",
    "request_denied": "a --deny request rule matches it",
    "bad_path": "the path is not plain (dot segments, backslashes or encoded separators)",
    "sni_mismatch": "a captured TLS connection whose SNI names another host than the one it was made to",
    "host_mismatch": "a captured HTTP request whose Host names another host than the one it was made to",
    "unknown_address": "a captured connection to a synthetic address the fence's DNS did not give out",
}
SUMMARY_LINES = 20
#: how long ``--ask`` waits for the person at the terminal before refusing
ASK_TIMEOUT = 300.0
#: how long ``run`` waits, once CMD ended, for withdrawn questions' refusals to be recorded
WITHDRAW_WAIT = 2.0


class CliError(Exception):
    """A one-line error for stderr, and the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ── argument types ───────────────────────────────────────────────────────────


_METHOD_ONLY = re.compile(r"\*|[A-Z][A-Z0-9_-]{0,31}")


def _patterns(values: Sequence[str] | None) -> list[str]:
    """Repeated and comma-separated patterns, in order (empty pieces kept: the filter names them).

    The commas of a request rule's method list stay with it: ``'GET,HEAD github.com/*,pypi.org'``
    is two patterns."""
    out: list[str] = []
    for value in values or ():
        pieces = value.split(",")
        i = 0
        while i < len(pieces):
            j = i
            while j + 1 < len(pieces) and _METHOD_ONLY.fullmatch(pieces[j].strip()):
                j += 1                      # a method list goes on until its "METHOD host" piece
            if j > i and " " in pieces[j].strip():
                out.append(",".join(pieces[i:j + 1]))
                i = j + 1
            else:
                out.append(pieces[i])
                i += 1
    return out


def build_filter(args: argparse.Namespace) -> Any:
    """The ``Filter`` of ``--allow`` / ``--deny`` / ``--dev-defaults``; CliError naming a bad pattern."""
    from .filter import DEFAULT_DEV_ALLOWLIST, Filter, PatternError

    allow = _patterns(args.allow)
    if args.dev_defaults:
        allow += DEFAULT_DEV_ALLOWLIST
    try:
        return Filter(allow, _patterns(args.deny))
    except PatternError as e:
        raise CliError(f"bad pattern: {e}") from None


def build_upstream(value: str) -> Any:
    """``auto`` (the caller's HTTPS_PROXY / NO_PROXY), ``direct``, or a proxy URL."""
    from .upstream import UpstreamConfig

    if value == "auto":
        return UpstreamConfig.from_env()
    if value == "direct":
        return UpstreamConfig.direct()
    try:
        return UpstreamConfig.from_url(value)
    except ValueError as e:
        raise CliError(f"--upstream: {e} (want auto, direct or [http://][user:pass@]host:port)") from None


def all_proxy_scheme(args: argparse.Namespace, socks_port: bool = False) -> str:
    """``--all-proxy-scheme``, else ``http`` (the port speaks both), or ``socks5h`` for a SOCKS5-only port."""
    if args.all_proxy_scheme is not None:
        return str(args.all_proxy_scheme)
    return "socks5h" if socks_port else "http"


def proxy_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword options for the built-in proxies that come from the policy flags (``--events``,
    ``--policy`` and friends are ``_Hooks``'; inspection's are ``inspection_options``')."""
    options: dict[str, Any] = {"deny_private": not args.allow_private}
    if getattr(args, "metrics", None) is not None:
        options["metrics"] = args.metrics
    return options


def inspection_options(args: argparse.Namespace, flt: Any) -> dict[str, Any]:
    """``inspect=`` and friends when something needs a CA: a request rule in the filter, or
    ``--inspect``. The CA lives in memory for the run unless ``--ca-dir`` keeps it. (A request
    rule that a ``--policy`` reload adds later, with no CA made at start, is refused
    ``needs_inspection`` until the next start.)"""
    from .inspection import needs_ca

    secrets = getattr(args, "secrets", None) or []
    inspect = list(getattr(args, "inspect", None) or ())
    never = list(getattr(args, "no_inspect", None) or ())
    upstream_ca = getattr(args, "upstream_ca", None)
    if upstream_ca is not None and not os.path.isfile(upstream_ca):
        raise CliError(f"--upstream-ca: no such file: {upstream_ca!r}")
    options: dict[str, Any] = {}
    if never:
        options["no_inspect"] = never
    if upstream_ca is not None:
        options["upstream_ca"] = upstream_ca
    if secrets:
        options["secrets"] = secrets
    if not inspect and not needs_ca(flt) and not getattr(args, "ca_dir", None) and not secrets:
        return options
    from .ca import CertificateAuthority, InspectionUnavailable

    try:
        ca = CertificateAuthority.in_dir(args.ca_dir) if getattr(args, "ca_dir", None) else \
            CertificateAuthority.generate()
    except InspectionUnavailable as e:
        raise CliError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CliError(f"--ca-dir: {e}") from None
    options["inspect"] = ca
    if inspect:
        options["inspect_hosts"] = inspect
    return options


def log_event(event: Any) -> None:
    """``-v``: one line per admitted tunnel; ``-vv``: its end too. Refusals are not repeated
    here: the ``kodarelay.violations`` logger already says each once."""
    where = host_port(event.host, event.port) + (getattr(event, "path", None) or "")   # a judged request's path
    what = event_label(event)
    if event.kind == "allow":
        why = f"{event.source} {event.rule}" if event.rule else str(event.source)
        log.info("allowed %s %s (%s)", what, where, why)
    elif event.kind == "end":
        log.debug(
            "ended %s %s: %s bytes up, %s down, %.2fs",
            what, where, event.bytes_up, event.bytes_down, event.duration or 0.0,
        )


def event_label(event: Any) -> str:
    """What kind of connection an event is about, as a reader names it: ``CONNECT`` tunnel,
    forwarded ``http GET``, ``socks5`` tunnel (the protocol alone says ``http`` for both)."""
    method = getattr(event, "method", None)
    if event.protocol == "http":
        return "CONNECT" if method in (None, "CONNECT") else f"http {method}"
    return str(event.protocol)


def check_ca_bundle(path: str | None) -> str | None:
    """An existing CA bundle file as an absolute path (CMD may change directory)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CliError(f"--ca-bundle: no such file: {path!r}")
    return os.path.abspath(path)


def host_port(host: str, port: int | None) -> str:
    text = f"[{host}]" if ":" in host and not host.startswith("[") and port is not None else host
    return text if port is None else f"{text}:{port}"


def format_bouquet(pairs: Sequence[tuple[str, str]], fmt: str) -> str:
    """``sh`` (``export K='v'``), ``json`` (an object) or ``dotenv`` (``K=v``) text, newline-terminated."""
    if fmt == "json":
        return json.dumps(dict(pairs), indent=2) + "\n"
    if fmt == "dotenv":
        return "".join(f"{k}={_dotenv_quote(v)}\n" for k, v in pairs)
    return "".join(f"export {k}={_sh_quote(v)}\n" for k, v in pairs)


def _sh_quote(value: str) -> str:
    """Always single quotes, so every POSIX shell reads the value back byte for byte."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


_DOTENV_SAFE = re.compile(r"[A-Za-z0-9_./:,@%+=\-\[\]]*")


def _dotenv_quote(value: str) -> str:
    """Bare when safe (what ``docker --env-file`` needs), else double-quoted with escapes."""
    if _DOTENV_SAFE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("\n", "\\n")
    return f'"{escaped}"'


def _configure_logging(verbose: int, quiet: bool = False, *, timestamps: bool = False, refusals: bool = True) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    fmt = "%(asctime)s kodarelay: %(message)s" if timestamps else "kodarelay: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Refusals are logged at INFO (or WARNING) by kodarelay.violations: serve always shows
    # them; run shows them with -v only, since it summarises them when CMD ends.
    if refusals:
        logging.getLogger("kodarelay.violations").setLevel(logging.ERROR if quiet else logging.INFO)
    elif not verbose:
        logging.getLogger("kodarelay.violations").setLevel(logging.ERROR)


# ── shared by run and serve ─────────────────────────────────────────────────


class _Hooks:
    """``--policy``, ``--events``, ``--dns-ttl`` and ``--learn``: the options they add to the
    proxies, and what they do once the proxies run and when they stop."""

    def __init__(self, args: argparse.Namespace, flt: Any, *, learn: bool = False) -> None:
        from .audit import JsonLines, Tally, admit_all, fan_out
        from .policyfile import PolicyError, PolicyWatcher

        self.filter = flt
        self.options: dict[str, Any] = {}
        self.tally = Tally()
        self.watcher: PolicyWatcher | None = None
        self.events: JsonLines | None = None
        self._handles: list[Any] = []
        if getattr(args, "policy", None):
            try:
                self.watcher = PolicyWatcher(args.policy, self._apply, flt.allow_patterns, flt.deny_patterns,
                                             self._apply_clients, self._reloaded)
            except PolicyError as e:
                raise CliError(f"--policy: {e}") from None
            self.filter = self.watcher.filter()
            if self.watcher.policy.clients or self.watcher.policy.require_auth:
                self.options["clients"] = list(self.watcher.policy.clients)
                self.options["require_auth"] = self.watcher.policy.require_auth
        # Events cost the engine its GIL-free path (it serves cached plans only when nobody
        # listens per request), so they are only asked for when something reads them.
        consumers: list[Callable[[Any], None]] = [self.tally] if learn or bool(getattr(args, "verbose", 0)) else []
        if getattr(args, "verbose", 0):
            consumers.append(log_event)
        if getattr(args, "events", None):
            try:
                self.events = JsonLines(args.events)
            except OSError as e:
                raise CliError(f"--events: cannot open {args.events!r}: {e.strerror or e}") from None
            consumers.append(self.events)
        if consumers:
            self.options["on_event"] = fan_out(consumers)
        if getattr(args, "dns_ttl", None) is not None:
            self.options["dns_ttl"] = args.dns_ttl
        self.asker: Any = None
        if getattr(args, "ask", False):
            if learn:
                raise CliError("--ask and --learn do not mix: --learn admits everything the rules leave open")
            from .ask import TerminalDecider

            try:
                self.asker = TerminalDecider()
            except OSError as e:
                raise CliError(f"--ask needs a terminal to ask on: {e.strerror or e}") from None
            self.options["decider"] = self.asker
            self.options["decider_timeout"] = ASK_TIMEOUT
        if learn:
            self.options["decider"] = admit_all

    def _apply(self, flt: Any) -> None:
        for h in self._handles:
            h.set_filter(flt)

    def _apply_clients(self, policy: Any) -> None:
        for h in self._handles:
            h.set_clients(policy.clients, policy.require_auth)

    def _reloaded(self, ok: bool) -> None:
        for h in self._handles:
            for server in h._servers:
                server.metrics.policy_reloaded(ok)

    def started(self, handles: Sequence[Any]) -> None:
        self._handles = list(handles)
        if self.watcher is not None:
            self.watcher.start()

    def reload(self) -> None:
        if self.watcher is not None:
            self.watcher.reload()

    def files_read_or_written(self) -> list[str]:
        """What the proxy reads or writes for these hooks (``--policy``, ``--events``): kept
        out of a fenced CMD's reach (read-only in its mount namespace)."""
        files = [self.watcher.path] if self.watcher is not None else []
        if self.events is not None and self.events.path is not None:
            files.append(self.events.path)
        return [os.path.abspath(f) for f in files]

    @property
    def reason_text(self) -> dict[str, str] | None:
        """The summary's words for the decider reasons when the decider is the person (``--ask``)."""
        if self.asker is None:
            return None
        from .ask import SUMMARY_TEXT

        return SUMMARY_TEXT

    def withdraw_questions(self) -> int:
        """End ``--ask``'s open questions; how many there were (each becomes a refusal)."""
        return self.asker.withdraw_all() if self.asker is not None else 0

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.asker is not None:
            self.asker.close()
        if self.events is not None:
            self.events.close()


class _Counter:
    """A count other threads add to (``on_violation``), and a bounded wait for it to reach a value."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()

    def add(self, _item: Any = None) -> None:
        with self._cond:
            self.value += 1
            self._cond.notify_all()

    def wait_for(self, target: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.value >= target, timeout)


def _secrets(args: argparse.Namespace) -> list[Any]:
    """The ``--secret`` values as ``Secret`` objects; with any, kodarelay becomes non-dumpable."""
    from .cli_secrets import SecretUsageError, keep_out_of_dumps, parse_secrets

    try:
        secrets = parse_secrets(getattr(args, "secret", None), os.environ)
    except SecretUsageError as e:
        raise CliError(str(e)) from None
    if secrets:
        keep_out_of_dumps()
    return secrets


def _run_ca_dir() -> str:
    import tempfile

    directory = tempfile.mkdtemp(prefix="kodarelay-ca-")
    os.chmod(directory, 0o755)            # CMD may run as another user (apt's _apt reads it)
    return directory


def _merged_bundle(ca_bundle: str | None, directory: str, env: dict[str, str], run_ca: Any = None) -> str:
    """The run's one CA bundle (``kodarelay.cabundle``): the system's roots followed by
    ``--ca-bundle`` and the inspection CA's certificate; ``env`` gains the WGETRC /
    APT_CONFIG that name it for wget and apt."""
    from .cabundle import tool_configs, write_run_bundle

    try:
        extra = [ca_bundle] if ca_bundle is not None else []
        if run_ca is not None:
            own = os.path.join(directory, "kodarelay-ca.pem")
            with open(own, "wb") as f:
                f.write(run_ca.cert_pem)
            os.chmod(own, 0o644)
            extra.append(own)
        merged = write_run_bundle(extra, directory)
        env.update(tool_configs(merged, directory, env))
    except OSError as e:
        raise CliError(f"--ca-bundle: cannot write the run's bundle: {e.strerror or e}", 125) from None
    return str(merged)


# ── serve ────────────────────────────────────────────────────────────────────


def cmd_serve(args: argparse.Namespace) -> int:
    from . import isolate
    from .builtin import BuiltInProxy, BuiltInSocks5Proxy
    from .env import proxy_env_vars, socks5_env_vars

    _configure_logging(args.verbose, timestamps=True)
    flt = build_filter(args)
    upstream = build_upstream(args.upstream)
    ca_bundle = check_ca_bundle(args.ca_bundle)
    refused = _Counter()
    count = refused.add

    args.secrets = _secrets(args)
    hooks = _Hooks(args, flt)
    flt = hooks.filter
    try:
        inspection = inspection_options(args, flt)
    except CliError:
        hooks.stop()
        raise
    options: dict[str, Any] = {"upstream": upstream, "on_violation": count, **hooks.options, **proxy_options(args),
                               **inspection}
    ca_dir: str | None = None
    if inspection.get("inspect") is not None:
        # clients of a serve need the CA in a file: the --ca-dir's own bundle, else one of the run's
        ca_dir = None if args.ca_dir else _run_ca_dir()
        directory = args.ca_dir or ca_dir
        assert directory is not None
        ca_bundle = _merged_bundle(ca_bundle, directory, {}, inspection["inspect"])
    separate_socks = args.socks5_port is not None and (args.socks5_port == 0 or args.socks5_port != args.port)
    scheme = all_proxy_scheme(args, socks_port=separate_socks)
    isolate.block_signals()  # SIGINT / SIGTERM wait for sigwaitinfo below; threads inherit the mask
    handles = []
    try:
        try:
            handles.append(
                BuiltInProxy(flt, port=args.port or None, socks5=True, forward_http=args.forward_http, **options).start()
            )
            if separate_socks:
                socks_options = {k: v for k, v in options.items() if k != "metrics"}   # one metrics port
                handles.append(BuiltInSocks5Proxy(flt, port=args.socks5_port or None, **socks_options).start())
        except ValueError as e:
            raise CliError(f"serve: {e}") from None
        except OSError as e:
            port = args.port if len(handles) == 0 else args.socks5_port
            raise CliError(f"serve: cannot listen on 127.0.0.1:{port}: {e.strerror or e}", EXIT_SERVE_FAILED) from None
        except TimeoutError as e:
            raise CliError(f"serve: {e}", EXIT_SERVE_FAILED) from None
        main = handles[0]
        socks_port = handles[1].port if len(handles) > 1 and scheme == "socks5h" else main.port
        pairs = dict(proxy_env_vars(main.port, ca_bundle, no_proxy="", tools=True))
        pairs.update(socks5_env_vars(socks_port, scheme=scheme))
        from .secrets import secret_env

        pairs.update(secret_env(args.secrets))       # the clients' phantoms
        try:
            sys.stdout.write(format_bouquet(sorted(pairs.items()), "sh"))
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        where = f"127.0.0.1:{main.port} (HTTP CONNECT + SOCKS5)"
        if len(handles) > 1:
            where += f", 127.0.0.1:{handles[1].port} (SOCKS5)"
        if main.uds_path is not None:
            where += f", UDS bridge {main.uds_path}"
        if main.metrics_port is not None:
            where += f", metrics http://{args.metrics[0]}:{main.metrics_port}/metrics"
        print(
            f"kodarelay: serving on {where}; upstream {upstream}; refusals are logged here (stderr); "
            "stop with Ctrl-C or SIGTERM",
            file=sys.stderr,
            flush=True,
        )
        hooks.started(handles)
        while True:
            info = signal.sigwaitinfo((signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT))
            if info.si_signo == signal.SIGHUP and hooks.watcher is not None:
                hooks.reload()          # with --policy, SIGHUP reloads it; without, it stops
                continue
            log.debug("got %s; stopping", signal.Signals(info.si_signo).name)
            break
    finally:
        hooks.withdraw_questions()
        for h in handles:
            h.shutdown()
        hooks.stop()
        if ca_dir is not None:
            import shutil

            shutil.rmtree(ca_dir, ignore_errors=True)
    total = max(refused.value, sum(h.refused_total for h in handles))
    print(f"kodarelay: stopped ({total} refused)", file=sys.stderr)
    return 0


# ── env ──────────────────────────────────────────────────────────────────────


def cmd_env(args: argparse.Namespace) -> int:
    from .env import proxy_env_vars, socks5_env_vars

    ca_bundle = check_ca_bundle(args.ca_bundle)
    try:
        pairs = dict(proxy_env_vars(args.port, ca_bundle, no_proxy=args.no_proxy, tools=args.tools,
                                    client=args.client, token=args.token))
        if args.socks5_port is not None:
            pairs.update(socks5_env_vars(args.socks5_port, client=args.client, token=args.token))
    except ValueError as e:
        raise CliError(str(e)) from None
    sys.stdout.write(format_bouquet(sorted(pairs.items()), args.format))
    return 0


# ── check ────────────────────────────────────────────────────────────────────


def _has_port(pattern: str) -> bool:
    pattern = pattern.strip()
    return "]:" in pattern if pattern.startswith("[") else pattern.count(":") == 1


def cmd_check(args: argparse.Namespace) -> int:
    """Judge a target as the proxy would: rules, then (for an IP literal) the address guard.

    A name is judged by the rules only: resolving it here could give another answer than
    the proxy's own lookup later, so ``check`` does no DNS and says so (on stderr, keeping
    stdout to lines a script can parse) when it allows a name.
    """
    from .filter import is_ip_literal, url_hint

    flt = build_filter(args)
    request = args.method is not None or args.path is not None
    d = flt.explain(args.target, method=args.method, path=args.path) if request else flt.explain(args.target)
    if request and d.reason in ("allowed", "request_not_allowed", "request_denied", "bad_path"):
        where = host_port(d.host or args.target, d.port)
        verdict = "allowed" if d.allowed else "denied"
        from .requestrules import shown_path

        print(f"{verdict} {args.method or 'GET'} {where}{shown_path(args.path or '/')} rule={d.rule or '-'} "
              f"reason={d.reason}")
        if d.reason == "bad_path":
            print(f"note: {d.detail}")
        if d.allowed and flt.needs_inspection(d.host or args.target, d.port):
            print("note: over https:// only an inspected tunnel can be judged per request; a plain tunnel "
                  "to this host is refused (needs_inspection)")
        return 0 if d.allowed else 1
    if d.reason == "bad_host":
        hint = url_hint(args.target)
        if hint is not None:
            what, suggestion = hint
            tail = f" (did you mean {suggestion!r}?)" if suggestion else ""
            raise CliError(f"check: {args.target!r} {what}; check takes HOST[:PORT]{tail}")
        raise CliError(f"check: bad host {args.target!r}: {d.detail}")
    deny_private = not args.allow_private
    literal = d.host is not None and is_ip_literal(d.host)
    if d.allowed and literal and d.host is not None:
        d = flt.check_resolved(d.host, d.port, [d.host], deny_private=deny_private)
    target = host_port(d.host or args.target, d.port)
    verdict = "allowed" if d.allowed else "denied"
    print(f"{verdict} {target} rule={d.rule if d.rule is not None else '-'} reason={d.reason}")
    if d.reason == "not_allowed" and d.port is None and any(_has_port(p) for p in flt.allow_patterns):
        print("note: no port given, and port-limited allow rules never match an unknown port; try HOST:PORT")
    if d.reason == "resolved_address":
        admit = "--allow-private or " if deny_private and "private" in d.detail else ""
        print(f"note: {d.detail}; the proxy refuses it unless {admit}an IP / CIDR --allow rule names it")
    if d.allowed and not literal:
        guarded = ("" if d.host == "localhost" else "loopback, ") + "link-local, metadata, documentation, reserved" + (
            " or private" if deny_private else " or other special"
        )
        print(
            f"{PROG}: note: judged by name only (no DNS); the proxy also refuses {d.host} if it resolves to "
            f"a {guarded} address that no IP / CIDR --allow rule names",
            file=sys.stderr,
        )
    return 0 if d.allowed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status.

    The command raises its RLIMIT_NOFILE soft limit to the hard limit first (the library
    offers ``raise_open_files_limit`` but never does it on its own)."""
    from .limits import raise_open_files_limit

    raise_open_files_limit()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run, "serve": cmd_serve, "env": cmd_env, "check": cmd_check}
    try:
        return int(commands[args.command](args))
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `kodarelay env ... | head -1`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter's final flush quiet
        except OSError:
            pass
        return 1


# ``kodarelay run`` lives in cli_run (it imports what it shares from here, so it comes last)
from .cli_run import cmd_run, summarize  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
