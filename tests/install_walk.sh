#!/usr/bin/env bash
# The install path of docs/operations.md §1, walked without root or Docker: a wheel built from this source tree, a fresh
# venv, `oneha deploy install` into a temporary prefix, the lab as oned, a throw-away Redis, and it ends with
# `oneha config check` passing (plus the bridge queuing an event with its own config). Not root: owners stay the
# current user's (the docs' useradd and chown steps are left out); the example config's fence scripts are the
# installed ones (present and executable is what config check can see; no BMC here).
# Too slow for the test suite (it installs every dependency into a new venv): run it by hand, ~1-3 min.
#   tests/install_walk.sh [WORKDIR]      (WORKDIR kept for inspection when given; a temp dir otherwise)
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"; mkdir -p "$work"
[ $# -gt 0 ] || trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
[ $# -eq 0 ] || trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
root="$work/root"; prefix="$root/opt/oneha"; etc="$root/etc/oneha"; venv="$prefix/venv"
group="$(id -gn)"
py="${PYTHON:-python3}"
step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s)

step "1.2 build the wheel from the source tree and install it into a fresh venv"
"$py" -m pip wheel --quiet --no-deps -w "$work/dist" "$src" 2> "$work/pip-wheel.log" || { cat "$work/pip-wheel.log"; exit 1; }
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet "$work"/dist/oneha-*.whl 2> "$work/pip.log" || { cat "$work/pip.log"; exit 1; }
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
failed=0
for top in workers subscriber lab deploy; do
    if [ -e "$site/$top" ]; then echo "FAIL: the wheel put a top-level '$top' into site-packages"; failed=1; fi
done
echo "site-packages, oneha entries: $(cd "$site" && ls -d oneha* | tr "\n" " ")"

step "1.4 put the deploy kit in place"
"$venv/bin/oneha" deploy install --prefix "$prefix" --etc "$etc" --unit-dir "$root/etc/systemd/system" \
    --user "$group" --bridge-user "$group" | tail -n 4
test -x "$prefix/bin/oneha-bridge" && test -x "$prefix/fence/fence_ipmi.sh"
test -f "$root/etc/systemd/system/oneha-worker@.service" && test -f "$prefix/share/prometheus/oneha-scrape.yml"

step "the lab as oned, a Redis"
"$venv/bin/oneha" lab sim --port 0 --events-port 0 > "$work/lab.out" 2> "$work/lab.err" &
for _ in $(seq 100); do grep -q '^LAB READY' "$work/lab.out" && break; sleep 0.1; done  # poll for the ready line
read -r _ _ rpc events session < <(grep '^LAB READY' "$work/lab.out" | sed 's/[a-z]*=//g')
redis_port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no > "$work/redis.log" &
for _ in $(seq 100); do redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
echo "lab rpc=$rpc events=$events redis=127.0.0.1:$redis_port"

step "1.5 configure: one_auth, oneha.toml, bridge.toml"
install -m 0600 /dev/null "$etc/one_auth" && echo "$session" > "$etc/one_auth"
cfg="$etc/oneha.toml"
"$venv/bin/python" - "$cfg" "$rpc" "$events" "$redis_port" "$venv" <<'PY'
import re, sys
cfg, rpc, events, port, venv = sys.argv[1:]
text = open(cfg).read()
text = text.replace('endpoint = "http://localhost:2633/RPC2"', f'endpoint = "{rpc}"')
text = text.replace('url = "redis://127.0.0.1:6379/0"', f'url = "redis://127.0.0.1:{port}/0"')
text = re.sub(r'zmq_endpoints = \[[^\]]*\]', f'zmq_endpoints = ["{events}"]', text)
text = re.sub(r'(?m)^metrics_port = \d+$', 'metrics_port = 0', text)  # free ports: this machine may run others
open(cfg, "w").write(text)
PY
sed -i "s|redis://127.0.0.1:6379/0|redis://127.0.0.1:$redis_port/0|" "$etc/bridge.toml"

step "1.6 oneha config check"
ONE_AUTH="$etc/one_auth" "$venv/bin/oneha" config check --config "$cfg"

step "1.7 the bridge, as oned's hook manager runs it, with its own config"
ONEHA_BIN="$venv/bin/oneha" ONEHA_CONFIG="$etc/bridge.toml" "$prefix/bin/oneha-bridge" --hid 3

step "1.10 the services from the installed wheel: a subscriber and worker@1 beat, oneha incidents counts them"
export ONE_AUTH="$etc/one_auth"
"$venv/bin/oneha" subscribe --config "$cfg" > "$work/subscriber.log" 2>&1 &
"$venv/bin/oneha" worker --config "$cfg" --instance 1 --concurrency 2 > "$work/worker.log" 2>&1 &
alive=""
for _ in $(seq 300); do  # poll up to ~30 s
    alive="$("$venv/bin/oneha" incidents --config "$cfg" | tail -n 1)"
    case "$alive" in *"1 subscriber(s), 1 worker(s)"*) break ;; esac
    sleep 0.1
done
echo "$alive"
case "$alive" in *"1 subscriber(s), 1 worker(s)"*) ;; *) echo "FAIL: services not alive"; tail -5 "$work"/*.log; failed=1 ;; esac

[ "$failed" -eq 0 ] || { echo "install walk FAILED (see above)"; exit 1; }
echo "install walk passed in $(( $(date +%s) - t0 )) s (work dir $work)"
