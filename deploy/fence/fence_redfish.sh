#!/usr/bin/env bash
# fence_redfish.sh: power a failed hypervisor off through its BMC's Redfish API with curl (HTTPS), with OpenNebula's
# fence_host.sh contract: base64 host XML on stdin; exit 0 only once the system's PowerState reads "Off"; any failure
# exits non-zero (fail closed: oneha then recovers none of the host's VMs).
#
# Setup: onehost update <host>  ->  FENCE_IP = "bmc-21.example.net"
#                                   FENCE_REDFISH_SYSTEM = "/redfish/v1/Systems/System.Embedded.1"  (optional)
#        /etc/oneha/fence/<host name>.cred or default.cred, mode 0600 (0640 root:oneha), with
#            user=admin
#            password=secret
#            cacert=/etc/oneha/fence/bmc-ca.pem     (optional; or insecure=yes for self-signed BMCs: not advised)
#            system=/redfish/v1/Systems/1           (optional default for every host)
#        [policy.default] fencing = ["/opt/oneha/fence/fence_redfish.sh"]
# The credentials reach curl as a config on its stdin (-K -), never through argv (`ps`).
# Environment: see fence-lib.sh, and ONEHA_CURL (default curl), ONEHA_REDFISH_TIMEOUT_S (per request, default 10).
set -euo pipefail
FENCE_NAME="fence_redfish"
# shellcheck source=fence-lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/fence-lib.sh"

CURL="${ONEHA_CURL:-curl}"
REQUEST_TIMEOUT_S="${ONEHA_REDFISH_TIMEOUT_S:-10}"
[[ "$REQUEST_TIMEOUT_S" =~ ^[0-9]+$ ]] || die "ONEHA_REDFISH_TIMEOUT_S must be a whole number of seconds"

read_host
read_credentials

SYSTEM="${FENCE_REDFISH_SYSTEM:-${CRED_SYSTEM:-/redfish/v1/Systems/1}}"
[[ "$SYSTEM" =~ ^/redfish/v1/Systems/[A-Za-z0-9._-]+$ ]] || die "Redfish system path '$SYSTEM' refused"
HOSTPART="$FENCE_IP"
[[ "$FENCE_IP" == *:* ]] && HOSTPART="[$FENCE_IP]"
URL="https://${HOSTPART}${SYSTEM}"

tls=()
if [ -n "$CRED_CACERT" ]; then
    tls=(--cacert "$CRED_CACERT")
elif [ "$CRED_INSECURE" = "yes" ]; then
    tls=(--insecure)
fi

# curl config on stdin: `user = "name:password"` with backslashes and quotes escaped.
curl_config() {
    local u="${CRED_USER}:${CRED_PASSWORD}"
    u="${u//\\/\\\\}"
    u="${u//\"/\\\"}"
    printf 'user = "%s"\n' "$u"
}

redfish() {
    curl_config | "$CURL" --silent --show-error --fail --max-time "$REQUEST_TIMEOUT_S" --proto =https \
        "${tls[@]}" -K - -H "Accept: application/json" "$@"
}

power_is_off() {
    local out state
    out="$(redfish "$URL" 2>&1)" || { log "reading PowerState failed: $out"; return 1; }
    state="$(printf '%s' "$out" | "$FENCE_PYTHON" -c '
import json, sys
try:
    print(json.load(sys.stdin).get("PowerState", ""))
except (ValueError, AttributeError):
    print("")
')" || return 1
    [ "$state" = "Off" ]
}

log "host ${HOST_ID} (${HOST_NAME}): ForceOff through ${URL}"
if ! out="$(redfish -X POST -H "Content-Type: application/json" --data '{"ResetType": "ForceOff"}' \
        "${URL}/Actions/ComputerSystem.Reset" 2>&1)"; then
    # Some BMCs answer an error to ForceOff on a system that is already off: only the power state counts.
    power_is_off || die "host ${HOST_ID}: ForceOff failed: ${out}"
fi
if wait_power_off power_is_off; then
    log "host ${HOST_ID} (${HOST_NAME}): PowerState is Off"
    exit 0
fi
die "host ${HOST_ID}: PowerState still not Off after ${FENCE_DEADLINE_S}s"
