"""XML bodies like oned's, written from the lab model (element names and order from OpenNebula's XSDs).

Independent of `oneha.opennebula`'s parser on purpose: a bug in one must not be hidden by the other.
Strings are built by hand (no DOM) and cached per object in the model, invalidated on every change, so
`one.hostpool.info` at 1,000 hosts is a join of cached strings.

Pool bodies are short as oned's (`vm_pool.xsd`: reduced VM, only the last HISTORY with fewer fields);
`.info` bodies are full (`vm.xsd`, all history records). Hosts have one form (`host.xsd`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneha.opennebula import VmState

if TYPE_CHECKING:
    from oneha.lab.cloud import Cloud, Datastore, History, Host, Vm

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})


def esc(text: object) -> str:
    """Escape text content; control characters XML 1.0 cannot carry are dropped."""
    s = str(text).translate(_ESCAPES)
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in s):
        s = "".join(ch for ch in s if ord(ch) >= 32 or ch in "\t\n\r")
    return s


def template(tag: str, values: dict[str, str]) -> str:
    """A TEMPLATE-like element. oned wraps template values in CDATA; escaping is equivalent for parsers."""
    inner = "".join(f"<{k}>{esc(v)}</{k}>" if v != "" else f"<{k}/>" for k, v in values.items() if _tag_ok(k))
    return f"<{tag}>{inner}</{tag}>"


def _tag_ok(name: str) -> bool:
    # Template attribute names come from users (lab.vm.create): only well-formed XML names are written.
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c in "_-." for c in name)


_PERMISSIONS = ("<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A><GROUP_U>0</GROUP_U>"
                "<GROUP_M>0</GROUP_M><GROUP_A>0</GROUP_A><OTHER_U>0</OTHER_U><OTHER_M>0</OTHER_M>"
                "<OTHER_A>0</OTHER_A></PERMISSIONS>")


# ------------------------------------------------------------------------------------------------------------
# Hosts (host.xsd)

def host_xml(cloud: Cloud, host: Host) -> str:
    if host.xml_cache is None:
        host.xml_cache = _host(cloud, host)
    return host.xml_cache


def _host(cloud: Cloud, host: Host) -> str:
    ds_id = cloud.cluster_ds.get(host.cluster_id, 0)
    running = sum(1 for v in host.vm_ids if cloud.vms[v].state == VmState.ACTIVE)
    share = (f"<HOST_SHARE><MEM_USAGE>{running * 524288}</MEM_USAGE><CPU_USAGE>{running * 100}</CPU_USAGE>"
             f"<TOTAL_MEM>{host.capacity * 524288}</TOTAL_MEM><TOTAL_CPU>{host.capacity * 100}</TOTAL_CPU>"
             f"<MAX_MEM>{host.capacity * 524288}</MAX_MEM><MAX_CPU>{host.capacity * 100}</MAX_CPU>"
             f"<RUNNING_VMS>{running}</RUNNING_VMS><VMS_THREAD>{running}</VMS_THREAD>"
             f"<DATASTORES><DISK_USAGE>0</DISK_USAGE><DS><FREE_MB>900000</FREE_MB><ID>{ds_id}</ID>"
             "<TOTAL_MB>1000000</TOTAL_MB><USED_MB>100000</USED_MB></DS><FREE_DISK>900000</FREE_DISK>"
             "<MAX_DISK>1000000</MAX_DISK><USED_DISK>100000</USED_DISK></DATASTORES>"
             "<PCI_DEVICES/><NUMA_NODES/></HOST_SHARE>")
    vms = "".join(f"<ID>{v}</ID>" for v in sorted(host.vm_ids))
    return (f"<HOST><ID>{host.id}</ID><NAME>{esc(host.name)}</NAME><STATE>{int(host.state)}</STATE>"
            f"<PREV_STATE>{int(host.prev_state)}</PREV_STATE><IM_MAD>kvm</IM_MAD><VM_MAD>kvm</VM_MAD>"
            f"<CLUSTER_ID>{host.cluster_id}</CLUSTER_ID><CLUSTER>{esc(host.cluster)}</CLUSTER>{share}"
            f"<VMS>{vms}</VMS>{template('TEMPLATE', host.template)}<MONITORING/></HOST>")


def host_pool_xml(cloud: Cloud) -> str:
    return "<HOST_POOL>" + "".join(host_xml(cloud, h) for h in cloud.hosts.values()) + "</HOST_POOL>"


# ------------------------------------------------------------------------------------------------------------
# VMs (vm.xsd for .info, vm_pool.xsd for pools)

def vm_xml(cloud: Cloud, vm: Vm, full: bool) -> str:
    if full:
        if vm.xml_full is None:
            vm.xml_full = _vm_full(vm)
        return vm.xml_full
    if vm.xml_short is None:
        vm.xml_short = _vm_short(vm)
    return vm.xml_short


def _vm_head(vm: Vm, full: bool) -> str:
    perms = _PERMISSIONS if full else ""
    prev = (f"<PREV_STATE>{int(vm.prev_state)}</PREV_STATE>"
            f"<PREV_LCM_STATE>{int(vm.prev_lcm) if vm.prev_lcm is not None else 0}</PREV_LCM_STATE>") if full else ""
    deploy_id = f"one-{vm.id}" if vm.history else ""
    return (f"<ID>{vm.id}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{esc(vm.name)}</NAME>{perms}<LAST_POLL>0</LAST_POLL><STATE>{int(vm.state)}</STATE>"
            f"<LCM_STATE>{int(vm.lcm)}</LCM_STATE>{prev}<RESCHED>{int(vm.resched)}</RESCHED>"
            f"<STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME><DEPLOY_ID>{deploy_id}</DEPLOY_ID>")


def _vm_full(vm: Vm) -> str:
    history = "".join(_history_full(vm, h) for h in vm.history)
    return (f"<VM>{_vm_head(vm, True)}<MONITORING/><SCHED_ACTIONS/>{template('TEMPLATE', vm.template)}"
            f"{template('USER_TEMPLATE', vm.user_template)}<HISTORY_RECORDS>{history}</HISTORY_RECORDS>"
            "<BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS></VM>")


def _vm_short(vm: Vm) -> str:
    last = _history_short(vm, vm.history[-1]) if vm.history else ""
    tmpl: dict[str, str] = {k: vm.template[k] for k in ("CPU", "MEMORY", "VCPU") if k in vm.template}
    return (f"<VM>{_vm_head(vm, False)}{template('TEMPLATE', tmpl)}<MONITORING/>"
            f"{template('USER_TEMPLATE', vm.user_template)}<HISTORY_RECORDS>{last}</HISTORY_RECORDS></VM>")


def _history_full(vm: Vm, h: History) -> str:
    return (f"<HISTORY><OID>{vm.id}</OID><SEQ>{h.seq}</SEQ><HOSTNAME>{esc(h.hostname)}</HOSTNAME>"
            f"<HID>{h.hid}</HID><CID>{h.cid}</CID><STIME>{h.stime}</STIME><ETIME>{h.etime}</ETIME>"
            f"<VM_MAD>kvm</VM_MAD><TM_MAD>{h.tm_mad}</TM_MAD><DS_ID>{h.ds_id}</DS_ID>"
            f"<PLAN_ID>-1</PLAN_ID><ACTION_ID>-1</ACTION_ID><PSTIME>{h.stime}</PSTIME><PETIME>{h.stime}</PETIME>"
            f"<RSTIME>{h.stime}</RSTIME><RETIME>{h.etime}</RETIME><ESTIME>0</ESTIME><EETIME>0</EETIME>"
            f"<ACTION>{h.action}</ACTION><UID>-1</UID><GID>-1</GID><REQUEST_ID>-1</REQUEST_ID></HISTORY>")


def _history_short(vm: Vm, h: History) -> str:
    return (f"<HISTORY><OID>{vm.id}</OID><SEQ>{h.seq}</SEQ><HOSTNAME>{esc(h.hostname)}</HOSTNAME>"
            f"<HID>{h.hid}</HID><CID>{h.cid}</CID><DS_ID>{h.ds_id}</DS_ID><VM_MAD>kvm</VM_MAD>"
            f"<TM_MAD>{h.tm_mad}</TM_MAD><ACTION>{h.action}</ACTION></HISTORY>")


def vm_pool_xml(cloud: Cloud, vms: list[Vm], full: bool) -> str:
    return "<VM_POOL>" + "".join(vm_xml(cloud, v, full) for v in vms) + "</VM_POOL>"


# ------------------------------------------------------------------------------------------------------------
# Datastores (datastore.xsd)

def datastore_xml(ds: Datastore) -> str:
    clusters = "".join(f"<ID>{c}</ID>" for c in ds.cluster_ids)
    tmpl = {"SHARED": "YES" if ds.shared else "NO", "TM_MAD": ds.tm_mad,
            "TYPE": {0: "IMAGE_DS", 1: "SYSTEM_DS", 2: "FILE_DS"}[ds.type]}
    if ds.type != 1:
        tmpl["DS_MAD"] = "fs"
    return (f"<DATASTORE><ID>{ds.id}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{esc(ds.name)}</NAME>{_PERMISSIONS}<DS_MAD>{'-' if ds.type == 1 else 'fs'}</DS_MAD>"
            f"<TM_MAD>{ds.tm_mad}</TM_MAD><BASE_PATH>/var/lib/one//datastores/{ds.id}</BASE_PATH>"
            f"<TYPE>{ds.type}</TYPE><DISK_TYPE>0</DISK_TYPE><STATE>0</STATE><CLUSTERS>{clusters}</CLUSTERS>"
            "<TOTAL_MB>1000000</TOTAL_MB><FREE_MB>900000</FREE_MB><USED_MB>100000</USED_MB><IMAGES/>"
            f"{template('TEMPLATE', tmpl)}</DATASTORE>")


def datastore_pool_xml(cloud: Cloud) -> str:
    return ("<DATASTORE_POOL>" + "".join(datastore_xml(d) for d in sorted(cloud.datastores.values(),
                                                                          key=lambda d: d.id))
            + "</DATASTORE_POOL>")


# ------------------------------------------------------------------------------------------------------------
# Users (user.xsd) and hooks (hook.xsd, hook_pool.xsd): only what `oneha config check` reads. The lab has one user
# (oneadmin, ID 0, group 0); hooks are whatever `lab.hook.create` registered.

def user_xml(uid: int, name: str) -> str:
    return (f"<USER><ID>{uid}</ID><GID>0</GID><GROUPS><ID>0</ID></GROUPS><GNAME>oneadmin</GNAME>"
            f"<NAME>{esc(name)}</NAME><PASSWORD>-</PASSWORD><AUTH_DRIVER>core</AUTH_DRIVER><ENABLED>1</ENABLED>"
            "<TEMPLATE/><DEFAULT_USER_QUOTAS/></USER>")


# hook.xsd orders the TEMPLATE elements alphabetically; oned writes them in the same order.
_HOOK_FIELDS = ("ARGUMENTS", "ARGUMENTS_STDIN", "CALL", "COMMAND", "LCM_STATE", "REMOTE", "RESOURCE", "STATE")


def hook_pool_xml(hooks: list[dict[str, str]]) -> str:
    body = []
    for hook in hooks:
        tmpl = template("TEMPLATE", {k: hook[k] for k in _HOOK_FIELDS if k in hook})
        body.append(f"<HOOK><ID>{hook['ID']}</ID><NAME>{esc(hook['NAME'])}</NAME><TYPE>{esc(hook['TYPE'])}</TYPE>"
                    f"{tmpl}</HOOK>")
    return "<HOOK_POOL>" + "".join(body) + "</HOOK_POOL>"


# ------------------------------------------------------------------------------------------------------------
# Hook messages (REFERENCE §2; `src/hm/HookStateHost.cc`, `HookStateVM.cc`): names outside, numbers inside.

def hook_message(kind: str, oid: int, state: str, lcm: str | None, remote_host: str | None, body: str) -> str:
    if kind == "HOST":
        # HookStateHost emits REMOTE_HOST before RESOURCE_ID (unlike the schema).
        return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>HOST</HOOK_OBJECT>"
                f"<STATE>{state}</STATE><REMOTE_HOST>{esc(remote_host or '')}</REMOTE_HOST>"
                f"<RESOURCE_ID>{oid}</RESOURCE_ID>{body}</HOOK_MESSAGE>")
    remote = f"<REMOTE_HOST>{esc(remote_host)}</REMOTE_HOST>" if remote_host else "<REMOTE_HOST/>"
    return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>VM</HOOK_OBJECT>"
            f"<STATE>{state}</STATE><LCM_STATE>{lcm}</LCM_STATE><RESOURCE_ID>{oid}</RESOURCE_ID>"
            f"{remote}{body}</HOOK_MESSAGE>")
