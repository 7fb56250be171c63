#!/usr/bin/env bash
# The install path of docs/operations.md §1 walked as root in a clean root: a fresh container of the debootstrap base
# image (tests/test_install_walk_root.py starts it; run it there, not on a machine you care about). Each phase is a
# step of the docs, done with the docs' commands where they can run without systemd and a real oned: Debian's
# packages, a wheel built from the source tree, the venv, the oneha and oneadmin accounts, `oneha deploy install`
# with real owners and modes, the config, `oneha config check` (every line ✓) against the lab and Debian's Redis,
# then the promises of §1.3 (who reads what, checked as oneha and oneadmin with runuser), the bridge as oneadmin,
# the services as oneha, an upgrade (§6) and the uninstall (§11).
#   /src   the source tree, read-only            /walk  a work directory: files.lst (what `git clone` would give:
#                                                        the tracked and untracked-but-not-ignored files), figures
set -euo pipefail
src=/src; walk=/walk
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
figures="$walk/figures.tsv"; : > "$figures"
failed=0
ms() { date +%s%3N; }
t_start=$(ms); t_phase=$t_start; phase_name=""
phase() {  # close the running phase (its time goes to figures.tsv), open the next
    local now; now=$(ms)
    [ -z "$phase_name" ] || printf '%s\t%d.%d\n' "$phase_name" $(( (now - t_phase) / 1000 )) \
                                   $(( (now - t_phase) % 1000 / 100 )) >> "$figures"
    phase_name="$1"; t_phase=$now
    printf '\n== %s\n' "$1"
}
fail() { echo "FAIL: $*"; failed=1; }
as() { local who=$1; shift; runuser -u "$who" -- "$@"; }  # sudo -u, without sudo (not in the base image)
free_port() {  # [N]: a port P with P .. P+N-1 all free on 127.0.0.1
    python3 - "${1:-1}" <<'PY'
import socket, sys
n = int(sys.argv[1])
while True:
    socks = [socket.socket()]
    socks[0].bind(("127.0.0.1", 0))
    port = socks[0].getsockname()[1]
    try:
        for extra in range(1, n):
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", port + extra))
        print(port)
        break
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
PY
}
cleanup() { kill $(jobs -p) 2>/dev/null || true; }
doc_run() {  # HEADING: run the sh blocks of that section of docs/operations.md as written, but for what needs
    # systemd, oned, an editor or GitHub (systemctl, onehook, $EDITOR, git clone); `apt install` made unattended.
    local log; log="$walk/doc-$(echo "$1" | tr -dc '0-9.').log"
    python3 - "$src/docs/operations.md" "$1" > "$walk/doc-step.sh" <<'PY'
import re, sys
text, heading = open(sys.argv[1]).read(), sys.argv[2]
section = re.split(r"\n#{2,3} ", text.split("\n" + heading, 1)[1], maxsplit=1)[0]
skip = ("systemctl", "onehook", "git clone", "$EDITOR")
for block in re.findall(r"```sh\n(.*?)```", section, re.S):
    for line in block.splitlines():
        cmd = re.sub(r"^\s*#.*$|\s+#\s.*$", "", line).replace(" && systemctl daemon-reload", "").strip()
        cmd = re.sub(r"^apt install ", "apt-get install -y -qq ", cmd)
        if cmd and not cmd.startswith(skip):
            print(cmd)
PY
    [ -s "$walk/doc-step.sh" ] || { fail "no commands under '$1' in docs/operations.md"; return 0; }
    sed 's/^/  $ /' "$walk/doc-step.sh"
    bash -euo pipefail "$walk/doc-step.sh" > "$log" 2>&1 || { tail -n 30 "$log"; fail "a command of '$1'"; exit 1; }
    tail -n "${show_lines:-2}" "$log" | sed 's/^/    /'
}
trap cleanup EXIT

phase "1.1 the machine's packages (the docs' apt line)"
# A container has no init: keep maintainer scripts from starting Redis on the host's 6379 (host networking).
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
# The base image carries pip (the compose build uses it); §1.1 does not ask for it, so a clean walk goes without.
apt-get purge -y -qq python3-pip python3-wheel > /dev/null 2>&1
apt-get update -qq
doc_run "### 1.1 "
echo "$(redis-server --version | cut -d' ' -f1-3); $(ipmitool -V); $(curl --version | head -n1 | cut -d' ' -f1-2)"

phase "1.2 build the wheel from the source tree, install it into /opt/oneha/venv"
mkdir -p /root/oneha && tar -C "$src" --null -T "$walk/files.lst" -c | tar -C /root/oneha -x  # = git clone
cd /root/oneha
doc_run "### 1.2 "
cd /
site="$(/opt/oneha/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for top in workers subscriber lab deploy; do [ ! -e "$site/$top" ] || fail "a top-level '$top' in site-packages"; done
ls /root/oneha/dist

phase "1.3 the service user (and oneadmin, as OpenNebula's packages create it)"
groupadd --system oneadmin && useradd --system --gid oneadmin --home-dir /var/lib/one --shell /bin/bash oneadmin
doc_run "### 1.3 "
id oneha; id oneadmin

phase "1.4 the deploy kit"
doc_run "### 1.4 "

# Every file of the kit that §1 names, and every unit its systemctl lines start, is in place.
python3 - "$src/docs/operations.md" <<'PY' || fail "§1 names a file or unit that deploy install did not put in place"
import glob, re, sys
section = open(sys.argv[1]).read().split("## 1. Install", 1)[1].split("\n## 2.", 1)[0]
paths = set(re.findall(r"(/opt/oneha/[A-Za-z0-9_./*@-]*|/etc/systemd/system/[A-Za-z0-9_./*@-]*)", section))
paths |= {f"/opt/oneha/share/prometheus/{name}" for name in re.findall(r"`(oneha-[a-z-]+\.yml)`", section)}
for line in re.findall(r"^systemctl enable --now (.*?)(?:\s+#.*)?$", section, re.M):
    paths |= {"/etc/systemd/system/" + re.sub(r"@.*", "@", unit) + ".service" for unit in line.split()}
missing = sorted(p for p in paths if not glob.glob(p))
print(f"{len(paths)} paths and units named in §1: " + (f"missing {missing}" if missing else "all present"))
sys.exit(1 if missing else 0)
PY

phase "the lab as oned (run by oneadmin), Debian's Redis (run by redis)"
as oneadmin /opt/oneha/venv/bin/oneha lab sim --port 0 --events-port 0 > "$walk/lab.out" 2> "$walk/lab.err" &
for _ in $(seq 300); do grep -q '^LAB READY' "$walk/lab.out" && break; sleep 0.1; done  # poll for the ready line
read -r _ _ rpc events session < <(grep '^LAB READY' "$walk/lab.out" | sed 's/[a-z]*=//g') \
    || { cat "$walk/lab.err"; exit 1; }
redis_port=$(free_port)
as redis redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no > "$walk/redis.log" &
for _ in $(seq 100); do redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
echo "lab rpc=$rpc events=$events; redis 127.0.0.1:$redis_port"

phase "1.5 configure (one_auth, oneha.toml, bridge.toml) and 1.9 the fence credentials"
doc_run "### 1.5 "
echo "$session" > /etc/oneha/one_auth            # the docs' 'oneadmin:PASSWORD': the lab's session is of that form
# $EDITOR: the endpoints of the lab and this Redis; free metrics ports (the host may run other oneha processes).
/opt/oneha/venv/bin/python - "$rpc" "$events" "$redis_port" "$(free_port)" "$(free_port 2)" <<'PY'
import re, sys
rpc, events, port, sub_port, worker_port = sys.argv[1:]
for path in ("/etc/oneha/oneha.toml", "/etc/oneha/bridge.toml"):
    text = open(path).read()
    text = text.replace('endpoint = "http://localhost:2633/RPC2"', f'endpoint = "{rpc}"')
    text = text.replace('url = "redis://127.0.0.1:6379/0"', f'url = "redis://127.0.0.1:{port}/0"')
    text = re.sub(r'zmq_endpoints = \[[^\]]*\]', f'zmq_endpoints = ["{events}"]', text)
    section, lines = "", []
    for line in text.splitlines():
        section = line if line.startswith("[") else section
        if line.startswith("metrics_port = "):
            line = f"metrics_port = {sub_port if section == '[subscriber]' else worker_port}"
        lines.append(line)
    open(path, "w").write("\n".join(lines) + "\n")
PY
doc_run "### 1.9 "
grep -E '^(endpoint|url|zmq_endpoints|metrics_port|fencing) ' /etc/oneha/oneha.toml

phase "1.6 oneha config check (as root, the docs' command): every line ✓"
show_lines=20 doc_run "### 1.6 "   # exits 1 when anything prevents recovery
check="$walk/doc-1.6.log"
grep -q '^[✗!]' "$check" && fail "config check: a line that is not ✓"
echo "$(grep -c '^✓' "$check") checks ✓, exit 0"

doc_run "### 1.11 "   # flower.env (the table of §1.3 lists it)

phase "1.3 who reads what: owners and modes of the docs' table, then as oneha and as oneadmin"
# The table of docs/operations.md §1.3: | `path` | owner:group mode | read by |
python3 - "$src/docs/operations.md" > "$walk/table.txt" <<'PY'
import re, sys
section = sys.argv[1] and open(sys.argv[1]).read().split("### 1.3", 1)[1].split("\n### ", 1)[0]
for path, owner, mode in re.findall(r"^\| `(/[^`]+)` \| (\S+:\S+) (0\d{3}) \|", section, re.M):
    print(path, owner, mode)
PY
[ -s "$walk/table.txt" ] || fail "no table in docs/operations.md §1.3"
while read -r path owner mode; do
    got="$(stat -c '%U:%G 0%a' "$path" 2>/dev/null || echo missing)"
    if [ "$got" = "$owner $mode" ]; then echo "ok   $path $got"
    else fail "$path is $got, the docs say $owner $mode"; fi
done < "$walk/table.txt"
can() { if "$@" > /dev/null 2>&1; then echo "ok   can: ${*:2}"; else fail "cannot: $*"; fi; }
cannot() { if "$@" > /dev/null 2>&1; then fail "can: $*"; else echo "ok   cannot: ${*:2}"; fi; }
can as oneha cat /etc/oneha/oneha.toml
can as oneha /opt/oneha/venv/bin/oneha config show --config /etc/oneha/oneha.toml
can as oneha cat /etc/oneha/fence/default.cred
can as oneha test -x /opt/oneha/fence/fence_ipmi.sh
cannot as oneha cat /etc/oneha/one_auth
cannot as oneha cat /etc/oneha/bridge.toml
cannot as oneha touch /etc/oneha/oneha.toml
can as oneadmin cat /etc/oneha/bridge.toml
can as oneadmin test -x /opt/oneha/bin/oneha-bridge
cannot as oneadmin cat /etc/oneha/oneha.toml
cannot as oneadmin cat /etc/oneha/one_auth
cannot as oneadmin ls /etc/oneha
cannot as oneadmin ls /etc/oneha/fence
cannot as oneadmin cat /etc/oneha/fence/default.cred
cannot as oneadmin cat /etc/oneha/flower.env
cannot as nobody cat /etc/oneha/bridge.toml

phase "1.7 the bridge as oned's hook manager runs it (oneadmin)"
as oneadmin /opt/oneha/bin/oneha-bridge --hid 3 || fail "the bridge as oneadmin"
printf '<HOST><ID>3</ID><NAME>host0003</NAME><STATE>3</STATE><CLUSTER_ID>0</CLUSTER_ID><VMS/><TEMPLATE/></HOST>' \
    | base64 -w0 | as oneadmin /opt/oneha/bin/oneha-bridge \
    || fail "the bridge as oneadmin, template on stdin"

phase "1.10-1.11 the units' commands as their User= (subscriber, worker@1, worker@2, flower)"
# No systemd in a container: run each installed unit's ExecStart= with its Environment=/EnvironmentFile= (%i, %d and
# $VAR expanded as systemd does), as its User=, with oned's credentials copied as LoadCredential= does (a private
# copy owned by the service user, mode 0400) and StateDirectory= created.
unit_argv() {  # UNIT_FILE INSTANCE CRED_DIR -> NUL-separated: env -i VAR=... ARGV...
    python3 - "$@" <<'PY'
import re, shlex, sys
unit, instance, cred_dir = sys.argv[1:]
env, argv = {"PATH": "/usr/local/bin:/usr/bin:/bin"}, []
spec = lambda v: v.replace("%i", instance).replace("%d", cred_dir)
def assign(text: str) -> None:
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        env[key] = spec(value)
for line in open(unit).read().splitlines():
    key, _, value = line.partition("=")
    if key == "Environment":
        assign(value)
    elif key == "EnvironmentFile":
        try:
            assign(open(spec(value.lstrip("-"))).read())
        except FileNotFoundError:
            if not value.startswith("-"):
                raise
    elif key == "ExecStart":
        for word in shlex.split(spec(value)):  # `$VAR` alone is split on whitespace, `${VAR}` is not
            alone = re.fullmatch(r"\$(\w+)", word)
            argv += env.get(alone[1], "").split() if alone else [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word)]
sys.stdout.write("\0".join(["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]) + "\0")
PY
}
start_unit() {  # UNIT INSTANCE [OLD_ARG|NEW_ARG ...]
    local unit=$1 instance=$2 file cred user; shift 2
    file="/etc/systemd/system/$unit.service"; [ -n "$instance" ] && file="/etc/systemd/system/${unit}@.service"
    cred="/run/credentials/$unit${instance:+@$instance}.service"
    user="$(sed -n 's/^User=//p' "$file")"
    if grep -q '^LoadCredential=one_auth:' "$file"; then
        install -d -m 0500 -o "$user" -g "$user" "$cred"
        install -m 0400 -o "$user" -g "$user" /etc/oneha/one_auth "$cred/one_auth"
    fi
    ! grep -q '^StateDirectory=oneha' "$file" || install -d -m 0700 -o "$user" -g "$user" /var/lib/oneha
    local -a argv; mapfile -d '' argv < <(unit_argv "$file" "$instance" "$cred")
    for swap in "$@"; do argv=("${argv[@]/#"${swap%%|*}"/"${swap#*|}"}"); done
    echo "$unit${instance:+@$instance} as $user: $(printf '%s ' "${argv[@]}" | grep -o '/opt/oneha.*')"
    (cd /var/lib/oneha 2>/dev/null || cd /; exec runuser -u "$user" -- "${argv[@]}") \
        > "$walk/$unit$instance.log" 2>&1 &
}
start_unit oneha-subscriber ""
start_unit oneha-worker 1
start_unit oneha-worker 2   # §1.10: oneha-worker@1 and @2 on one machine, metrics on worker.metrics_port + N - 1
flower_port=$(free_port)
start_unit oneha-flower "" "--port=5555|--port=$flower_port"
alive=""
for _ in $(seq 600); do  # poll up to ~60 s (two shared cores: a Celery worker takes a while to start)
    alive="$(/opt/oneha/venv/bin/oneha incidents --config /etc/oneha/oneha.toml 2>&1 | tail -n 1)"
    case "$alive" in *"1 subscriber(s), 2 worker(s)"*) break ;; esac
    sleep 0.1
done
echo "$alive"
case "$alive" in *"1 subscriber(s), 2 worker(s)"*) ;; *) fail "services not alive"; tail -5 "$walk"/oneha-*.log ;; esac
worker_port="$(sed -n '/^\[worker\]/,/^\[/s/^metrics_port = //p' /etc/oneha/oneha.toml)"
for port in "$(sed -n '/^\[subscriber\]/,/^\[/s/^metrics_port = //p' /etc/oneha/oneha.toml)" \
            "$worker_port" "$((worker_port + 1))"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/metrics" > /dev/null && break; sleep 0.1; done
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^# HELP oneha_' && echo "ok   metrics on 127.0.0.1:$port" \
        || fail "no oneha metrics on 127.0.0.1:$port"
done
for _ in $(seq 100); do grep -q '"scan": "hosts"' "$walk/oneha-subscriber.log" && break; sleep 0.1; done
! grep 'rejected' "$walk/oneha-subscriber.log" || fail "the subscriber rejected what the bridge queued (§1.7)"
flower_auth="$(sed -n 's/^FLOWER_BASIC_AUTH=//p' /etc/oneha/flower.env)"
code=""
for _ in $(seq 300); do  # poll up to ~30 s for Flower to listen
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$flower_port/" || true)"
    [ "$code" = 000 ] || break; sleep 0.1
done
[ "$code" = 401 ] && echo "ok   Flower without the password: 401" || fail "Flower without the password: $code"
code="$(curl -s -o /dev/null -w '%{http_code}' -u "$flower_auth" "http://127.0.0.1:$flower_port/workers")"
[ "$code" = 200 ] && echo "ok   Flower with FLOWER_BASIC_AUTH of flower.env: 200" \
    || fail "Flower with the password: $code"
cleanup; wait 2>/dev/null || true
rm -rf /run/credentials/oneha-*   # systemd removes a unit's credentials when it stops

phase "6 upgrade: the wheel again, deploy install again (configs kept)"
sum="$(sha256sum /etc/oneha/oneha.toml /etc/oneha/bridge.toml)"
/opt/oneha/venv/bin/pip install --quiet --upgrade --force-reinstall --no-deps /root/oneha/dist/oneha-*.whl
/opt/oneha/venv/bin/oneha deploy install --prefix /opt/oneha > "$walk/deploy-again.txt"
grep '^kept' "$walk/deploy-again.txt"
[ "$(sha256sum /etc/oneha/oneha.toml /etc/oneha/bridge.toml)" = "$sum" ] || fail "upgrade changed a config"
[ "$(stat -c '%U:%G %a' /etc/oneha/oneha.toml)" = "root:oneha 640" ] || fail "upgrade changed oneha.toml's owner"

phase "11 uninstall (without systemctl and onehook: no systemd, no oned here)"
uid="$(id -u oneha)"
doc_run "## 11. "
left="$(find / -xdev \( -name 'oneha*' -o -uid "$uid" \) -not -path '/root/oneha*' -not -path '/src/*' \
        -not -path '/walk/*' 2>/dev/null || true)"
[ -z "$left" ] || { echo "$left" | head; fail "left behind after uninstall"; }
phase "end"

printf '\nphase\tseconds\n'; cat "$figures"
[ "$failed" -eq 0 ] || { echo "install walk in a clean root FAILED (see above)"; exit 1; }
echo "install walk in a clean root passed in $(( ($(ms) - t_start) / 1000 )) s"
