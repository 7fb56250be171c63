#!/usr/bin/env bash
# fence_ipmi.sh: power a failed hypervisor off through its BMC with ipmitool (IPMI v2.0 over LAN, UDP 623), with
# OpenNebula's fence_host.sh contract: base64 host XML on stdin; exit 0 only once `chassis power status` reports the
# power off; any failure exits non-zero (fail closed: oneha then recovers none of the host's VMs).
#
# Setup: onehost update <host>  ->  FENCE_IP = "10.0.0.21"   (the BMC address)
#        /etc/oneha/fence/<host name>.cred or default.cred, mode 0600 (0640 root:oneha), with
#            user=ADMIN
#            password=secret
#        [policy.default] fencing = ["/opt/oneha/fence/fence_ipmi.sh"]  in /etc/oneha/oneha.toml
# The password reaches ipmitool through its environment (-E reads IPMI_PASSWORD), never through argv (`ps`).
# Environment: see fence-lib.sh (ONEHA_FENCE_DEADLINE_S, ONEHA_FENCE_POLL_S, ONEHA_FENCE_CRED_DIR), and
#   ONEHA_IPMI_INTERFACE (default lanplus), ONEHA_IPMITOOL (default ipmitool).
set -euo pipefail
FENCE_NAME="fence_ipmi"
# shellcheck source=fence-lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/fence-lib.sh"

IPMI_INTERFACE="${ONEHA_IPMI_INTERFACE:-lanplus}"
IPMITOOL="${ONEHA_IPMITOOL:-ipmitool}"
[[ "$IPMI_INTERFACE" =~ ^(lan|lanplus)$ ]] || die "ONEHA_IPMI_INTERFACE must be lan or lanplus"

ipmi() {
    IPMI_PASSWORD="$CRED_PASSWORD" "$IPMITOOL" -I "$IPMI_INTERFACE" -H "$FENCE_IP" -U "$CRED_USER" -E "$@"
}

power_is_off() {
    local out
    out="$(ipmi chassis power status 2>&1)" || { log "power status failed: $out"; return 1; }
    [[ "$out" == *"Chassis Power is off"* ]]
}

read_host
read_credentials

log "host ${HOST_ID} (${HOST_NAME}): powering off through the BMC at ${FENCE_IP}"
if ! out="$(ipmi chassis power off 2>&1)"; then
    # An already-off host may refuse the command; only a confirmed power state counts.
    power_is_off || die "host ${HOST_ID}: power off failed: ${out}"
fi
if wait_power_off power_is_off; then
    log "host ${HOST_ID} (${HOST_NAME}): power is off"
    exit 0
fi
die "host ${HOST_ID}: power still not off after ${FENCE_DEADLINE_S}s"
