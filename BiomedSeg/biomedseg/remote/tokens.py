"""The server's access token: made on first start, kept readable by its owner only, compared in constant time.

The same file is where a client on the same machine finds the token, so ``segment --server``
needs no ``--token`` there. Elsewhere the token comes from ``--token`` or $BIOMEDSEG_TOKEN.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from ..errors import InputError

TOKEN_ENV = "BIOMEDSEG_TOKEN"


def default_token_file() -> Path:
    base = os.environ.get("BIOMEDSEG_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "biomedseg")
    return Path(base) / "server-token"


def load_or_create(path: Path | None = None) -> tuple[str, bool]:
    """(token, made_now). A new token is written with mode 0600 in a folder only its owner can enter;
    an existing file others can read is refused rather than trusted."""
    path = Path(path or default_token_file())
    if path.exists():
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"The token file {path} can be read by other users (mode {stat.filemode(mode)}).",
                             hint=f"chmod 600 {path}, or delete it to make a new token.")
        token = path.read_text().strip()
        if len(token) < 32:
            raise InputError(f"The token file {path} holds no usable token.", hint="Delete it to make a new one.")
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "bmseg_" + secrets.token_urlsafe(32)  # never starts with '-' (a command line would read an option)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def client_token(given: str | None = None, url: str = "") -> str | None:
    """What a client sends: ``given``, else $BIOMEDSEG_TOKEN, else -- for a server on this machine only --
    this machine's server token file (never sent to another host)."""
    if given:
        return given.strip()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if not is_loopback_url(url):
        return None
    path = default_token_file()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def matches(expected: str, header_value: str | None) -> bool:
    """Whether an ``Authorization: Bearer ...`` header carries ``expected`` (constant time)."""
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[len("Bearer "):].strip().encode(), expected.encode())


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

