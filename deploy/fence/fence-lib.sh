# shellcheck shell=bash
# Shared by fence_ipmi.sh and fence_redfish.sh (sourced, not run). OpenNebula's fence_host.sh contract:
#   stdin: the host's XML (one.host.info), base64; exit 0 only when the host is confirmed powered off;
#   any other exit = not fenced (oneha then recovers no VM of the host: fail closed). Messages go to stderr.
#
# Environment (all optional):
#   ONEHA_FENCE_CRED_DIR   credentials directory (default /etc/oneha/fence): <host name>.cred, else default.cred;
#                          lines `key=value`: user=, password= (and for Redfish: cacert=, insecure=yes, system=).
#                          The file must not be readable by others (chmod 0600/0640). It is parsed, never sourced.
#   ONEHA_FENCE_DEADLINE_S how long to wait for the power to be seen off (default 60)
#   ONEHA_FENCE_POLL_S     pause between power status reads (default 2)
#   ONEHA_FENCE_PYTHON     python3 used to parse the host XML (default python3; stdlib only)
#
# Host template attributes (onehost update): FENCE_IP = the BMC's address (IPv4, IPv6 or host name; required).

FENCE_NAME="${FENCE_NAME:-fence}"
FENCE_CRED_DIR="${ONEHA_FENCE_CRED_DIR:-/etc/oneha/fence}"
FENCE_DEADLINE_S="${ONEHA_FENCE_DEADLINE_S:-60}"
FENCE_POLL_S="${ONEHA_FENCE_POLL_S:-2}"
FENCE_PYTHON="${ONEHA_FENCE_PYTHON:-python3}"

die() {
    printf '%s: %s\n' "$FENCE_NAME" "$*" >&2
    exit 1
}

log() {
    printf '%s: %s\n' "$FENCE_NAME" "$*" >&2
}

# Reads the base64 host XML from stdin and sets HOST_ID, HOST_NAME, FENCE_IP and FENCE_REDFISH_SYSTEM.
# The XML is parsed by Python's expat without DTDs (a document with <!DOCTYPE or <!ENTITY is refused), values with
# control characters are refused, so nothing from the document can reach a shell word unchecked.
read_host() {
    local b64 xml parsed
    b64="$(cat)" || die "cannot read the host template from stdin"
    [ -n "$b64" ] || die "no host template on stdin"
    xml="$(printf '%s' "$b64" | base64 -d 2>/dev/null)" || die "stdin is not valid base64"
    parsed="$(printf '%s' "$xml" | "$FENCE_PYTHON" -c '
import sys
import xml.etree.ElementTree as ET

data = sys.stdin.buffer.read()
head = data.upper()
if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
    sys.exit("host XML with a DTD or entities is refused")
try:
    root = ET.fromstring(data)
except ET.ParseError as exc:
    sys.exit(f"host XML does not parse: {exc}")
host = root if root.tag == "HOST" else root.find(".//HOST")
if host is None:
    sys.exit("no HOST element in the template")

def get(path):
    el = host.find(path)
    text = (el.text or "").strip() if el is not None else ""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        sys.exit(f"{path} holds control characters")
    return text

for path in ("ID", "NAME", "TEMPLATE/FENCE_IP", "TEMPLATE/FENCE_REDFISH_SYSTEM"):
    print(get(path))
')" || die "cannot parse the host template"
    { read -r HOST_ID; read -r HOST_NAME; read -r FENCE_IP; read -r FENCE_REDFISH_SYSTEM; } <<<"$parsed" || true
    [[ "${HOST_ID:-}" =~ ^[0-9]+$ ]] || die "host template has no valid ID"
    [ -n "${FENCE_IP:-}" ] || die "host ${HOST_ID} (${HOST_NAME:-?}): FENCE_IP is not set in the host template"
    valid_address "$FENCE_IP" || die "host ${HOST_ID}: FENCE_IP is not an IP address or host name; refused"
}

# An IPv4 address, an IPv6 address (hex digits and colons, optionally a dotted tail) or a DNS name; never starting
# with '-' (it would read as an option).
valid_address() {
    local a="$1"
    [ "${#a}" -le 253 ] || return 1
    [[ "$a" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] && return 0
    [[ "$a" =~ ^[0-9A-Fa-f:.]+$ && "$a" == *:*:* ]] && return 0
    [[ "$a" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$ ]]
}

# Sets CRED_FILE and CRED_<key> (user, password, cacert, insecure, system) from <name>.cred or default.cred.
read_credentials() {
    local file key value mode
    CRED_USER="" CRED_PASSWORD="" CRED_CACERT="" CRED_INSECURE="" CRED_SYSTEM=""
    file="${FENCE_CRED_DIR}/default.cred"
    if [[ "${HOST_NAME:-}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] && [ -f "${FENCE_CRED_DIR}/${HOST_NAME}.cred" ]; then
        file="${FENCE_CRED_DIR}/${HOST_NAME}.cred"
    fi
    [ -r "$file" ] || die "no readable credentials file (${FENCE_CRED_DIR}/<host>.cred or default.cred)"
    mode="$(stat -c '%a' "$file")" || die "cannot stat $file"
    [ $(( 8#$mode & 8#007 )) -eq 0 ] || die "$file is readable by others (mode $mode); chmod 0600 it"
    while IFS= read -r line || [ -n "$line" ]; do
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        key="${line%%=*}"
        value="${line#*=}"
        key="${key//[[:space:]]/}"
        case "$key" in
            user) CRED_USER="$value" ;;
            password) CRED_PASSWORD="$value" ;;
            cacert) CRED_CACERT="$value" ;;
            insecure) CRED_INSECURE="$value" ;;
            system) CRED_SYSTEM="$value" ;;
            *) die "$file: unknown key '$key'" ;;
        esac
    done <"$file"
    [ -n "$CRED_USER" ] || die "$file: no user="
    [ -n "$CRED_PASSWORD" ] || die "$file: no password="
    [[ "$CRED_USER" != -* ]] || die "$file: user must not start with '-'"
    CRED_FILE="$file"
}

# wait_power_off CHECK_FUNCTION: calls it until it succeeds (power seen off) or the deadline passes.
wait_power_off() {
    local check="$1" start now
    start="$(date +%s)"
    while :; do
        if "$check"; then
            return 0
        fi
        now="$(date +%s)"
        if [ $(( now - start )) -ge "$FENCE_DEADLINE_S" ]; then
            return 1
        fi
        sleep "$FENCE_POLL_S"
    done
}

[[ "$FENCE_DEADLINE_S" =~ ^[0-9]+$ ]] || die "ONEHA_FENCE_DEADLINE_S must be a whole number of seconds"
[[ "$FENCE_POLL_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "ONEHA_FENCE_POLL_S must be a number of seconds"
