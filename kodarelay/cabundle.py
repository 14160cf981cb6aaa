"""One CA bundle for every client of a run: the system's roots plus the bundles the user adds.

``--ca-bundle FILE`` used to *replace* the system store for CMD's clients (SSL_CERT_FILE and
friends name one file), so every public host failed verification once a private CA was
added. ``kodarelay run`` now writes one bundle, the system's trust store followed by the
given ones, and hands that file to every CA variable of the bouquet. Two clients read none
of the variables: wget gets a ``WGETRC`` (the user's own ``~/.wgetrc`` or ``$WGETRC`` first,
then ``ca_certificate``) and apt an ``APT_CONFIG`` (``#include`` of the user's ``$APT_CONFIG``,
then ``Acquire::https::CAInfo``); apt reads its ``apt.conf.d`` as before. The files live in a
directory of the run's own (0755, files 0644: CMD may run as another user) that the command
removes when CMD ends.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Where distributions keep the system's trust store as one PEM file.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",            # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",              # Fedora, RHEL
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",                        # openSUSE
    "/etc/ssl/cert.pem",                             # macOS, some BSDs
)


def system_bundle() -> str | None:
    """The system's trust store as one PEM file, or None when none is found."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, *SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def write_run_bundle(extra: Sequence[str], directory: str | os.PathLike[str]) -> Path:
    """``directory/ca-bundle.pem``: the system's roots, then each of ``extra`` (0644)."""
    out = Path(directory) / "ca-bundle.pem"
    parts: list[bytes] = []
    base = system_bundle()
    for path in ([base] if base else []) + list(extra):
        data = Path(path).read_bytes()
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    out.write_bytes(b"".join(parts))
    out.chmod(0o644)
    return out


def tool_configs(bundle: str | os.PathLike[str], directory: str | os.PathLike[str],
                 environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``WGETRC`` and ``APT_CONFIG`` files naming ``bundle`` (the user's own settings kept),
    as ``(variable, path)`` pairs."""
    directory = Path(directory)
    bundle = os.fspath(bundle)
    wgetrc = directory / "wgetrc"
    own = environ.get("WGETRC") or os.path.join(environ.get("HOME", "/nonexistent"), ".wgetrc")
    text = ""
    try:
        text = Path(own).read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    if text and not text.endswith("\n"):
        text += "\n"
    wgetrc.write_text(text + f"ca_certificate = {bundle}\n", encoding="utf-8")
    apt = directory / "apt.conf"
    include = environ.get("APT_CONFIG")
    apt_text = f'#include "{include}";\n' if include and os.path.isfile(include) else ""
    apt.write_text(apt_text + f'Acquire::https::CAInfo "{bundle}";\n', encoding="utf-8")
    for f in (wgetrc, apt):
        f.chmod(0o644)
    return [("APT_CONFIG", str(apt)), ("WGETRC", str(wgetrc))]


__all__ = ["SYSTEM_BUNDLES", "system_bundle", "tool_configs", "write_run_bundle"]
