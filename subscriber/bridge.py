"""`oneha bridge`: the command OpenNebula's hooks run. It hands the event to Redis durably and exits.

Registered with onehook (state hooks, `$TEMPLATE` as argument or on stdin with ARGUMENTS_STDIN=yes) or, up to 5.8,
in oned.conf as HOST_HOOK/VM_HOOK with `$HID`/`$ID` (REFERENCE §1-2). oned runs hooks with a small global concurrency,
so this must start and finish fast: it imports only the standard library and click (already loaded by `oneha`), and
speaks the three Redis commands it needs over a plain socket instead of importing redis-py (~100 ms of imports).
Validation is deliberately cheap (size, base64); the subscriber decodes safely when it reads the stream.

Exit codes: 0 = the event is in Redis; 1 = Redis could not take it; 2 = bad input or usage.
"""

from __future__ import annotations

import binascii
import os
import re
import socket
import sys
import time
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

import click

from oneha.keys import Keys

DEFAULT_URL = "redis://127.0.0.1:6379/0"
MAX_TEMPLATE_BYTES = 1 << 20  # decoded; matches the subscriber's default max_event_bytes
MAX_INPUT_BYTES = MAX_TEMPLATE_BYTES * 4 // 3 + 4096  # base64 of it, plus line breaks
STREAM_MAXLEN = 100_000  # approximate trim: hooks fire at most a few thousand times in a failure storm
TIMEOUT_S = 5.0


class BridgeError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- where Redis is --------------------------------------------------------------------------------------------


def redis_target() -> tuple[str, str]:
    """(url, key prefix): env ONEHA_REDIS__URL / __KEY_PREFIX, else the TOML in ONEHA_CONFIG, else defaults."""
    url = os.environ.get("ONEHA_REDIS__URL")
    prefix = os.environ.get("ONEHA_REDIS__KEY_PREFIX")
    path = os.environ.get("ONEHA_CONFIG")
    if (url is None or prefix is None) and path:
        import tomllib

        try:
            with open(path, "rb") as fh:
                section = tomllib.load(fh).get("redis", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BridgeError(f"cannot read config {path}: {exc}", 2) from exc
        url = url or section.get("url")
        prefix = prefix or section.get("key_prefix")
    return url or DEFAULT_URL, prefix or "oneha"


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"***@{netloc}").geturl()


# -- a minimal RESP client ---------------------------------------------------------------------------------------


def _command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(reader: BinaryIO) -> bytes:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by Redis")
    kind, body = line[:1], line[1:-2]
    if kind == b"-":
        raise BridgeError(f"Redis refused: {body.decode(errors='replace')}", 1)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return b""
        data = reader.read(size + 2)
        return data[:-2]
    return bytes(body)


def xadd(url: str, stream: str, fields: dict[str, str | bytes], timeout_s: float = TIMEOUT_S) -> str:
    """XADD with approximate MAXLEN; returns the entry id. The reply means Redis has it."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(parts.path)
        db = query.get("db", ["0"])[0]
    elif parts.scheme in ("redis", "rediss"):
        sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=timeout_s)
        if parts.scheme == "rediss":
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        db = parts.path.lstrip("/") or query.get("db", ["0"])[0]
    else:
        raise BridgeError(f"unsupported Redis URL scheme {parts.scheme!r}", 2)
    with sock:
        cmds: list[bytes] = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            secret = unquote(parts.password)
            cmds.append(_command("AUTH", user, secret) if user else _command("AUTH", secret))
        if db not in ("", "0"):
            cmds.append(_command("SELECT", db))
        flat: list[str | bytes] = []
        for key, value in fields.items():
            flat += [key, value]
        cmds.append(_command("XADD", stream, "MAXLEN", "~", str(STREAM_MAXLEN), "*", *flat))
        sock.sendall(b"".join(cmds))
        reader = sock.makefile("rb")
        replies = [_reply(reader) for _ in cmds]
        return replies[-1].decode()


# -- input -----------------------------------------------------------------------------------------------------


def template_from(text: bytes) -> bytes:
    """The base64 `$TEMPLATE`, whitespace tolerated. With ARGUMENTS_STDIN oned may pass further arguments after it
    (the seed's `$TEMPLATE -m -p 5`): everything from the first option on is not ours."""
    tokens = text.split()
    for i, token in enumerate(tokens):
        if token.startswith(b"-"):
            tokens = tokens[:i]
            break
    data = b"".join(tokens)
    if not data:
        raise BridgeError("no $TEMPLATE given (argument or stdin)", 2)
    if len(data) > MAX_INPUT_BYTES:
        raise BridgeError(f"$TEMPLATE too large ({len(data)} bytes)", 2)
    try:
        decoded = binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error as exc:
        raise BridgeError(f"$TEMPLATE is not base64: {exc}", 2) from exc
    if not decoded.lstrip().startswith(b"<"):
        raise BridgeError("$TEMPLATE does not decode to XML", 2)
    return data


def read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise BridgeError("$TEMPLATE on stdin too large", 2)
    return data


def hand_over(kind: str, data: bytes) -> str:
    """Queue the event; returns the line that says what was queued where (oned keeps it in the hook's log)."""
    url, prefix = redis_target()
    fields: dict[str, str | bytes] = {"kind": kind, "data": data, "t": f"{time.time():.6f}"}
    stream = Keys(prefix).bridge_stream
    try:
        entry = xadd(url, stream, fields)
    except (OSError, ValueError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise BridgeError(f"cannot hand the event to Redis at {redacted(url)}: {reason}", 1) from exc
    return f"queued {describe(kind, data)} as entry {entry} of {stream} at {redacted(url)}"


_TAGS = {name: re.compile(rb"<" + name + rb">([A-Za-z0-9_]{1,40})</" + name + rb">")
         for name in (b"HOOK_OBJECT", b"RESOURCE_ID", b"STATE", b"LCM_STATE")}
_BARE = re.compile(rb"\s*<(HOST|VM)>\s*<ID>([0-9]{1,10})</ID>")


def describe(kind: str, data: bytes) -> str:
    """What the event is about, for the operator's eyes only (the subscriber decodes it properly): a few tags of
    the hook message's head are looked up, nothing is parsed or trusted."""
    if kind == "hid":
        return f"host {data.decode()}"
    if kind == "vm_id":
        return f"VM {data.decode()}"
    try:
        head = binascii.a2b_base64(data[:4096], strict_mode=False)[:2048]
    except binascii.Error:
        head = b""
    found = {name.decode(): m[1].decode() for name, rx in _TAGS.items() if (m := rx.search(head))}
    state = "/".join(found[k] for k in ("STATE", "LCM_STATE") if k in found)
    bare = None if "HOOK_OBJECT" in found else _BARE.match(head)
    if bare:  # a state hook's $TEMPLATE is the bare HOST or VM element, its states as numbers (REFERENCE §2)
        obj, oid, state = bare[1].decode(), bare[2].decode(), f"state {state}" if state else ""
    else:
        obj, oid = found.get("HOOK_OBJECT", "event"), found.get("RESOURCE_ID", "?")
    what = f"{obj.lower()} {oid}".replace("vm ", "VM ")
    return f"{what} {state} (template, {len(data)} bytes)" if state else f"{what} (template, {len(data)} bytes)"


@click.command()
@click.argument("template", required=False)
@click.option("--stdin", "use_stdin", is_flag=True, help="Read $TEMPLATE from stdin (ARGUMENTS_STDIN=yes).")
@click.option("--hid", type=click.IntRange(min=0), help="Host ID (oned.conf HOST_HOOK with $HID, OpenNebula <= 5.8).")
@click.option("--vm-id", type=click.IntRange(min=0), help="VM ID (oned.conf VM_HOOK with $ID, OpenNebula <= 5.8).")
def bridge(template: str | None, use_stdin: bool, hid: int | None, vm_id: int | None) -> None:
    """Hand an OpenNebula hook event to the oneha subscribers (through a Redis stream) and exit.

    Exit 0 once Redis holds the event, 1 when Redis cannot take it, 2 on bad input.
    """
    given = sum(x for x in (template is not None, use_stdin, hid is not None, vm_id is not None))
    try:
        if given > 1:
            raise BridgeError("give one of TEMPLATE, --stdin, --hid, --vm-id", 2)
        if hid is not None:
            entry = hand_over("hid", str(hid).encode())
        elif vm_id is not None:
            entry = hand_over("vm_id", str(vm_id).encode())
        elif template is not None:
            entry = hand_over("template", template_from(template.encode()))
        elif use_stdin or not sys.stdin.isatty():
            entry = hand_over("template", template_from(read_stdin()))
        else:
            raise BridgeError("nothing to do: give TEMPLATE, --stdin, --hid or --vm-id", 2)
    except BridgeError as exc:
        click.echo(f"oneha bridge: {exc}", err=True)
        sys.exit(exc.code)
    click.echo(entry)  # the line saying what was queued
