"""Start-up check of oned for the long-running services: a permanent problem stops the service with one line and
exit code 2 (the units do not restart on 2), a transient one is logged and left to the services' own retries.

Permanent: the session is refused (wrong user or password) or oned says the call itself is wrong. Transient: oned
cannot be reached or answers with a passing error (it may be starting, or in a Raft election).
"""

from __future__ import annotations

import logging

from oneha.opennebula import ErrorKind, classify_error, make_server
from oneha.settings import ConfigError, Settings

log = logging.getLogger("oneha.preflight")


def oned_version(settings: Settings, timeout_s: float | None = None) -> str:
    """`one.system.version` with the configured session (oned authenticates every call). Errors are pyone's."""
    o = settings.oned
    connect_s = min(o.connect_timeout_s, timeout_s) if timeout_s else o.connect_timeout_s
    read_s = min(o.read_timeout_s, timeout_s) if timeout_s else o.read_timeout_s
    server = make_server(o.endpoint, settings.oned_session, connect_s, read_s, o.https_verify)
    return str(server.system.version())


def check_oned_at_start(settings: Settings) -> str | None:
    """None when oned accepted the credentials; a warning text when oned could not be asked (the service starts
    and keeps retrying). Raises ConfigError when retrying cannot help."""
    try:
        version = oned_version(settings)
    except Exception as exc:
        if classify_error(exc) is ErrorKind.TRANSIENT:
            return f"oned at {settings.oned.endpoint} not reachable at start ({type(exc).__name__}); retrying"
        raise ConfigError(f"oned at {settings.oned.endpoint} refused us: {_first_line(exc)} "
                          f"(check the user:password in {settings.oned.auth_file})") from exc
    log.info("oned %s at %s accepted the credentials", version, settings.oned.endpoint)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
