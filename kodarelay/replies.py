"""The proxy's own replies, written for the reader: status lines, the one-line refusals of
``403`` and friends, and ``Proxy-Authorization`` reading. Shared by the CONNECT server
(``server.py``) and plain-HTTP forwarding (``forward.py``), neither of which imports the other.
"""

from __future__ import annotations

import base64
import binascii

from .violations import _printable

REASONS = {
    200: "Connection Established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}


def status_line(code: int, proxy_error: str | None = None) -> bytes:
    """``HTTP/1.1 <code> <reason>`` plus an optional ``X-Proxy-Error`` header, then the blank line."""
    head = f"HTTP/1.1 {code} {REASONS[code]}\r\n"
    if proxy_error is not None:
        head += f"X-Proxy-Error: {proxy_error}\r\n"
    return (head + "\r\n").encode("ascii")


#: What would admit a request refused for each reason (the body of a 403).
_ADMIT = {
    "not_allowed": "allow it with --allow {target}",
    "denied": "a deny rule matches it; only removing that --deny rule admits it",
    "resolved_address": "it resolves to a loopback, link-local, private or reserved address; "
                        "an IP or CIDR --allow rule naming that address admits it "
                        "(a private one also --allow-private)",
    "bad_host": "the host name is malformed; no rule admits it",
    "decider_denied": "the approval hook said no; --allow {target} admits it without asking",
    "decider_timeout": "the approval hook did not answer in time; --allow {target} admits it without asking",
    "decider_error": "the approval hook failed; --allow {target} admits it without asking",
    "address_type": "send the host name instead (socks5h://), or allow the address with --allow {target}",
    "needs_inspection": "request rules name this host, and a tunnel's requests cannot be read; "
                        "tunnel it with a host rule (--allow {target}), or use plain http:// to have each request judged",
}


def admit_resolved(host: str, port: int | None, address: str, private: bool, literal: bool) -> str:
    """What admits a target the guard refused, naming the address: the exact ``--allow``."""
    shown_addr = f"[{address}]" if ":" in address else address
    where = f"{shown_addr}:{port}" if port is not None else shown_addr
    flag = f"--allow {where}" if literal else f"--allow {host},{where}"
    return f"{flag} admits it" + (" (or --allow-private, for every private address)" if private else "")


def refusal_reply(code: int, reason: str | None = None, host: str = "", port: int | None = None,
                  method: str = "CONNECT", detail: str = "", address: str | None = None,
                  private: bool = False) -> bytes:
    """A refusal written for the reader: the 403 names host, port, reason and what admits it.

    Used by the CONNECT path on both front-ends (so their bytes are identical) and by
    forwarding. A 405 says how to turn forwarding on. Other codes carry ``detail`` as a
    one-line body when given, else they are the bare status line (the crate's replies).
    Host and port only: never a path, query or userinfo.
    """
    shown = _printable(host, 255)
    shown = f"[{shown}]" if ":" in shown else shown
    target = f"{shown}:{port}" if port is not None else shown
    if code == 403 and reason == "resolved_address" and address:
        literal = _is_literal(host)
        what = f"it is a {detail[3:]} address" if literal and detail.startswith("is ") else \
            f"{shown} {detail}" if detail else f"{shown} resolves to {address}"
        text = (f"kodarelay: {method} to {target} refused ({reason}): {what}; "
                f"{admit_resolved(shown, port, address, private, literal)}")
    elif code == 403:
        admit = _ADMIT.get(reason or "", "ask whoever runs the proxy to allow it").format(target=target)
        text = f"kodarelay: {method} to {target} refused ({reason}); {admit}"
    elif code == 405:
        what = f"{method} to {target}" if host else f"{method}"
        text = (f"kodarelay: {what} refused (method_not_allowed): this proxy only tunnels CONNECT; "
                "plain-HTTP forwarding is off (forward_http=True, or kodarelay without --no-forward-http)")
    elif detail:
        text = f"kodarelay: {method + ' to ' + target + ': ' if host else ''}{detail}"
    else:
        return status_line(code, reason if code == 403 else None)
    body = (text + "\n").encode("ascii", "replace")
    head = f"HTTP/1.1 {code} {REASONS[code]}\r\n"
    if reason is not None:
        head += f"X-Proxy-Error: {reason}\r\n"
    if code == 407:
        head += 'Proxy-Authenticate: Basic realm="kodarelay"\r\n'      # (clients then send credentials)
    head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + body


def _is_literal(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


OK_REPLY = status_line(200)


def basic_user(value: bytes) -> str | None:
    """The user of a ``Basic`` credential (attribution; the password is ignored)."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = decoded.partition(":")[0]
    return _printable(user, 100) if user else None
