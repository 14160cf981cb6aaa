"""``kodarelay run``: CMD behind the proxy (fenced by default), its summary of refusals,
and learn mode's report. What ``run`` shares with ``serve`` (hooks, counters, secrets, the
run's CA bundle) stays in ``kodarelay.cli``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .cli import (REASON_TEXT, SUMMARY_LINES, WITHDRAW_WAIT, CliError, _configure_logging,
                  _Counter, build_upstream,
                  _Hooks, _merged_bundle, _run_ca_dir, _secrets, all_proxy_scheme, build_filter, check_ca_bundle,
                  host_port, inspection_options, proxy_options)

log = logging.getLogger("kodarelay.cli")


def _summary_host(host: str | None) -> str:
    """A violation's host as the summary shows it: a URL (a refused plain-HTTP request's
    target) is cut to its ``host[:port]``, since a path or query must never be printed."""
    if not host:
        return "-"
    from .filter import url_hint

    hint = url_hint(host)
    if hint is None:
        return host
    return hint[1] or "-"


def summarize(violations: Sequence[Any], total: int, reason_text: dict[str, str] | None = None) -> list[str]:
    """Lines for stderr: each refused (host:port, reason) once, with its count, most frequent first.
    ``reason_text`` overrides the words for some reasons (``--ask``: "you answered no")."""
    if not total and not violations:
        return []
    counts = Counter((_summary_host(v.host), v.port, v.reason) for v in violations)
    details: dict[tuple[str, int | None, str], str] = {}
    for v in violations:     # a refusal served from the engine's cache carries no detail: share one
        detail = getattr(v, "detail", None)
        if detail:
            details.setdefault((_summary_host(v.host), v.port, v.reason), detail)
    n = max(total, len(violations))
    lines = [f"refused {n} connection{'s' if n != 1 else ''}:"]
    for (host, port, reason), count in counts.most_common(SUMMARY_LINES):
        detail = details.get((host, port, reason))
        why = detail or (reason_text or {}).get(reason) or REASON_TEXT.get(reason, reason)
        lines.append(f"  {count}x {host_port(host, port)}  {reason}: {why}")
    if len(counts) > SUMMARY_LINES:
        lines.append(f"  ... and {len(counts) - SUMMARY_LINES} more destinations")
    if total > len(violations):
        lines.append(f"  (details kept for the last {len(violations)} only)")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    from . import isolate
    from .builtin import BuiltInProxy

    cmd: list[str] = args.cmd
    if not cmd:
        raise CliError("run: no command given; put it after --, e.g. kodarelay run --allow pypi.org -- pip download x")
    _configure_logging(args.verbose, args.quiet, refusals=False)
    flt = build_filter(args)
    upstream = build_upstream(args.upstream)
    ca_bundle = check_ca_bundle(args.ca_bundle)
    ca_dir: str | None = None
    if not isolate.command_exists(cmd[0]):
        raise CliError(f"{cmd[0]}: command not found", isolate.EXIT_NOT_FOUND)
    args.secrets = _secrets(args)
    if args.secrets:
        if args.isolate is False:
            raise CliError("--secret needs the fence: with --no-isolate CMD runs as you, in kodarelay's namespaces, "
                           "and could read the value from kodarelay's memory")
        args.isolate = True             # fenced or not at all: never an unfenced CMD beside a value
    fenced, allow_unix = plan_fence(args)
    capture = fenced and getattr(args, "capture", False)
    scheme = all_proxy_scheme(args)
    refused = _Counter()
    count = refused.add

    args.learn = args.learn or args.learn_out is not None
    hooks = _Hooks(args, flt, learn=args.learn)
    try:
        inspection = inspection_options(args, hooks.filter)
    except CliError:
        hooks.stop()
        raise
    sigmask = isolate.block_signals()  # before the proxy thread starts, so it inherits the mask
    try:
        handle = BuiltInProxy(
            hooks.filter, upstream=upstream, socks5=True, forward_http=args.forward_http, on_violation=count,
            violation_capacity=4096, capture=capture, **hooks.options, **proxy_options(args), **inspection
        ).start()
    except ValueError as e:
        hooks.stop()
        raise CliError(str(e)) from None
    except (OSError, TimeoutError) as e:
        hooks.stop()
        raise CliError(f"cannot start the proxy: {e}", isolate.EXIT_RUN_FAILED) from None
    hooks.started([handle])
    log.info("proxy on 127.0.0.1:%d (HTTP CONNECT + SOCKS5), upstream %s", handle.port, upstream)
    try:
        sig = isolate.pending_stop_signal()
        if sig is not None:  # told to stop before CMD existed: don't start it
            return 128 + sig
        base = isolate.clean_env(os.environ)
        from .secrets import secret_env

        base.update(secret_env(args.secrets))        # CMD holds the phantoms, never a value
        run_ca = inspection.get("inspect")
        if ca_bundle is not None or run_ca is not None:
            # one bundle: the system's roots, the given one, and the run's inspection CA
            ca_dir = _run_ca_dir()
            ca_bundle = _merged_bundle(ca_bundle, ca_dir, base, run_ca)
        pid = None
        fence_info: dict[str, object] = {}
        captured = _capture_options(capture, handle, hooks.filter, args)
        if fenced:
            try:
                if handle.uds_path is None:
                    raise isolate.FenceUnavailable("the proxy has no UDS bridge (see the warning above)")
                pid = isolate.spawn_isolated(
                    cmd, base, sigmask, os.fspath(handle.uds_path), ca_bundle=ca_bundle,
                    all_proxy_scheme=scheme, allow_unix=allow_unix, protect=hooks.files_read_or_written(),
                    hide=[s.path for s in args.secrets if s.path is not None], private=bool(args.secrets),
                    **captured, info=fence_info,
                )
            except isolate.FenceUnavailable as e:
                if args.isolate:
                    raise
                fenced = False
                _warn_unfenced(args, str(e).removeprefix("--isolate: ").split("; CMD was not run")[0])
        if pid is None:
            base.update(isolate.run_bouquet(handle.port, ca_bundle, scheme))
            pid = isolate.spawn(cmd, base, sigmask)
        code = isolate.supervise(pid)
    except isolate.RunError as e:
        raise CliError(str(e), e.exit_code) from None
    finally:
        # A question still open when CMD ended is nobody's to answer: withdraw it, and let its
        # refusal be recorded (bounded wait) so the summary lists it.
        withdrawn = hooks.withdraw_questions()
        if withdrawn:
            refused.wait_for(refused.value + withdrawn, WITHDRAW_WAIT)
        handle.shutdown()
        hooks.stop()
        if ca_dir is not None:
            import shutil

            shutil.rmtree(ca_dir, ignore_errors=True)
    if not args.quiet:
        allowed = hooks.tally.line()
        if allowed is not None and args.verbose:
            print(f"kodarelay: {allowed}", file=sys.stderr)
        for line in summarize(handle.violations(), max(refused.value, handle.refused_total), hooks.reason_text):
            print(f"kodarelay: {line}" if not line.startswith("  ") else line, file=sys.stderr)
        if fenced and ((code != 0 and not refused.value) or args.verbose):
            note = capture_note(fence_info.get("capture_ports") or ()) if fence_info.get("capture") else FENCE_NOTE  # type: ignore[arg-type]
            print(f"kodarelay: {note}", file=sys.stderr)
    if args.learn:
        _report_learned(hooks.tally, args.learn_out, deny_private=not args.allow_private)
    return code


def _report_learned(tally: Any, out: str | None, deny_private: bool) -> None:
    """Learn mode's result: the exact flags on stderr, and a policy file with ``--learn-out``
    (a name the guard needed an IP rule for is learned with its address: ``kodarelay.learn``)."""
    from .learn import learned_targets

    targets = learned_targets(tally.destinations(), deny_private=deny_private)
    flags = [f"--allow {t}" for t in targets]
    if not flags:
        print("kodarelay: learn: CMD reached no destination", file=sys.stderr)
    else:
        print(f"kodarelay: learn: CMD reached {len(flags)} destination{'s' if len(flags) != 1 else ''}; "
              "to allow exactly these:", file=sys.stderr)
        print("  " + " ".join(flags), file=sys.stderr)
    if out is not None:
        try:
            with open(out, "w", encoding="utf-8") as f:
                f.write("# written by kodarelay run --learn\n")
                f.writelines(f"allow {t}\n" for t in targets)
        except OSError as e:
            raise CliError(f"--learn-out: cannot write {out!r}: {e.strerror or e}", 1) from None


FENCE_NOTE = (
    "CMD ran fenced: only the proxy led out; direct connections had no route and Unix "
    "sockets were refused (neither is listed above)"
)


def capture_note(ports: Sequence[int]) -> str:
    """The fence line when capture was on: captured ports were judged, the rest had no route."""
    shown = ", ".join(str(p) for p in ports)
    return (f"CMD ran fenced: only the proxy led out; direct connections to port {shown} were captured and "
            "judged by it (listed above as capture), to other ports they had no route; Unix sockets were "
            "refused (not listed above)")


def _capture_options(capture: bool, handle: Any, flt: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``spawn_isolated``'s capture arguments: the proxy's capture socket and the ports
    (``kodarelay.capture``: 80, 443, each ``--allow`` port, each ``--capture-port``)."""
    path = getattr(handle, "capture_path", None)
    if not capture or path is None:
        return {}
    from .capture import capture_ports

    return {"capture_path": os.fspath(path), "capture_ports": capture_ports(flt, args.capture_port or ())}


def plan_fence(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """Whether to try the fence, and the ``--allow-unix`` paths (absolute).

    ``--isolate``: fenced or not at all (exit 125). The default: fenced wherever it can be
    made; otherwise one line on stderr (not with ``--quiet``) and CMD runs unfenced.
    ``--allow-unix`` with ``--no-isolate`` is a usage error (it would promise a fence).
    """
    from . import isolate
    from ._fence import canonical_unix_path

    allow_unix = [canonical_unix_path(p) for p in args.allow_unix or ()]
    for path in allow_unix:
        if len(os.fsencode(path)) > 107:
            raise CliError(f"--allow-unix: path too long for a Unix socket: {path!r}")
    if getattr(args, "capture_port", None):
        if args.isolate is False or not getattr(args, "capture", True):
            raise CliError("--capture-port needs the fence's capture; it means nothing with "
                           + ("--no-isolate" if args.isolate is False else "--no-capture"))
    if args.isolate is False:
        if allow_unix:
            raise CliError("--allow-unix needs the fence; it means nothing with --no-isolate")
        return False, []
    why = isolate.fence_unavailable()
    if why is None and args.isolate is None:
        why = isolate.probe_namespaces()  # the default must not let unshare's own error through
    if why is None:
        return True, allow_unix
    if args.isolate:
        raise CliError(f"--isolate: {why}; refusing to run CMD unfenced", isolate.EXIT_RUN_FAILED)
    _warn_unfenced(args, why)
    return False, []


def _warn_unfenced(args: argparse.Namespace, why: str) -> None:
    if not args.quiet:
        print(
            f"kodarelay: no network fence here ({why}); CMD runs unfenced: a client that ignores "
            "the proxy variables is not stopped (--isolate refuses to run unfenced)",
            file=sys.stderr, flush=True,
        )
