"""XML bodies like oned's, written from the lab model (element names and order from OpenNebula's XSDs).

Independent of `oneha.opennebula`'s parser on purpose: a bug in one must not be hidden by the other.
Strings are built by hand (no DOM) and cached per object in the model, invalidated on every change, so
`one.hostpool.info` at 1,000 hosts is a join of cached strings.

VM bodies come in oned's three forms (`include/VirtualMachine.h`, `include/VirtualMachinePool.h`):
- short (`one.vmpool.info`, `one.vmpool.infoset(ids, false)`; `VirtualMachine::to_xml_short` in
  `src/vm/VirtualMachine.cc`): no PERMISSIONS/PREV_*, a TEMPLATE of CPU/MEMORY/VCPU only, a USER_TEMPLATE cut down to
  the attributes Sunstone and the scheduler need (`VirtualMachineTemplate::to_xml_short`,
  `src/vm/VirtualMachineTemplate.cc`: so no HA, no HA_PRIORITY), the last HISTORY with fewer fields;
- pool extended (`one.vmpool.infoextended`, `one.vmpool.infoset(ids, true)`: the stored `body`, i.e.
  `to_xml_extended(xml, 1, …)`): the whole VM with its last history record only;
- info (`one.vm.info`, and the hook message's body, `src/hm/HookStateVM.cc`): the whole VM, every history record.
Hosts have one form (`host.xsd`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneha.lab.model import host_max
from oneha.opennebula import VmState

if TYPE_CHECKING:
    from oneha.lab.model import Datastore, History, Host, Vm
    from oneha.lab.state import CloudState

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

def host_xml(cloud: CloudState, host: Host) -> str:
    if host.xml_cache is None:
        host.xml_cache = _host(cloud, host)
    return host.xml_cache


def _host(cloud: CloudState, host: Host) -> str:
    ds_id = cloud.cluster_ds.get(host.cluster_id, 0)
    running = sum(1 for v in host.vm_ids if cloud.vms[v].state == VmState.ACTIVE)
    (max_cpu, max_mem), (cpu, mem) = host_max(host), host.used
    share = (f"<HOST_SHARE><MEM_USAGE>{mem}</MEM_USAGE><CPU_USAGE>{cpu}</CPU_USAGE>"
             f"<TOTAL_MEM>{max_mem}</TOTAL_MEM><TOTAL_CPU>{max_cpu}</TOTAL_CPU>"
             f"<MAX_MEM>{max_mem}</MAX_MEM><MAX_CPU>{max_cpu}</MAX_CPU>"
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


def host_pool_xml(cloud: CloudState) -> str:
    return "<HOST_POOL>" + "".join(host_xml(cloud, h) for h in cloud.hosts.values()) + "</HOST_POOL>"


# ------------------------------------------------------------------------------------------------------------
# VMs (vm.xsd for .info, vm_pool.xsd for pools)

def vm_xml(cloud: CloudState, vm: Vm, full: bool) -> str:
    """`full`: the `one.vm.info` body (every history record); else the short pool body."""
    if full:
        if vm.xml_full is None:
            vm.xml_full = _vm_full(vm, vm.history)
        return vm.xml_full
    if vm.xml_short is None:
        vm.xml_short = _vm_short(vm)
    return vm.xml_short


def vm_xml_pool_extended(vm: Vm) -> str:
    """The extended pool body: the whole VM, but only its current history record (n_history = 1)."""
    if vm.xml_pool_ext is None:
        vm.xml_pool_ext = _vm_full(vm, vm.history[-1:])
    return vm.xml_pool_ext


# USER_TEMPLATE attributes the short body keeps (`VirtualMachineTemplate::to_xml_short`): the first three only when
# not empty. SCHED_ACTION (a vector attribute) is kept too; the lab's user templates are flat, so it never has one.
SHORT_USER_NONEMPTY = ("LABELS", "ERROR", "SCHED_MESSAGE")
SHORT_USER_PRESENT = ("SCHED_RANK", "SCHED_DS_RANK", "SCHED_REQUIREMENTS", "SCHED_DS_REQUIREMENTS", "USER_PRIORITY")


def _short_user_template(values: dict[str, str]) -> str:
    if not values:
        return "<USER_TEMPLATE/>"
    kept = {k: values[k] for k in SHORT_USER_NONEMPTY if values.get(k)}
    kept |= {k: values[k] for k in SHORT_USER_PRESENT if k in values}
    return template("USER_TEMPLATE", kept)


def _vm_head(vm: Vm, full: bool) -> str:
    perms = _PERMISSIONS if full else ""
    prev = (f"<PREV_STATE>{int(vm.prev_state)}</PREV_STATE>"
            f"<PREV_LCM_STATE>{int(vm.prev_lcm) if vm.prev_lcm is not None else 0}</PREV_LCM_STATE>") if full else ""
    deploy_id = f"one-{vm.id}" if vm.history else ""
    return (f"<ID>{vm.id}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{esc(vm.name)}</NAME>{perms}<LAST_POLL>0</LAST_POLL><STATE>{int(vm.state)}</STATE>"
            f"<LCM_STATE>{int(vm.lcm)}</LCM_STATE>{prev}<RESCHED>{int(vm.resched)}</RESCHED>"
            f"<STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME><DEPLOY_ID>{deploy_id}</DEPLOY_ID>")


def _vm_full(vm: Vm, records: list[History]) -> str:
    history = "".join(_history_full(vm, h) for h in records)
    # oned keeps template attributes in a std::multimap: written in name order (vm.xsd's TEMPLATE is a sequence in
    # that order)
    tmpl, user = dict(sorted(vm.template.items())), dict(sorted(vm.user_template.items()))
    return (f"<VM>{_vm_head(vm, True)}<MONITORING/><SCHED_ACTIONS/>{_vm_template(tmpl, vm.vectors)}"
            f"{template('USER_TEMPLATE', user)}<HISTORY_RECORDS>{history}</HISTORY_RECORDS>"
            "<BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS></VM>")


def _vm_template(values: dict[str, str], vectors: dict[str, dict[str, str]]) -> str:
    """The TEMPLATE with its vector attributes (VMGROUP, PCI, TOPOLOGY…), all in name order as oned keeps them."""
    items = [(k, esc(v) if v != "" else None) for k, v in values.items() if _tag_ok(k)]
    items += [(k, "".join(f"<{a}>{esc(b)}</{a}>" for a, b in sorted(sub.items()) if _tag_ok(a)))
              for k, sub in vectors.items() if _tag_ok(k)]
    inner = "".join(f"<{k}>{v}</{k}>" if v is not None else f"<{k}/>" for k, v in sorted(items))
    return f"<TEMPLATE>{inner}</TEMPLATE>"


def _vm_short(vm: Vm) -> str:
    last = _history_short(vm, vm.history[-1]) if vm.history else ""
    # oned writes CPU, MEMORY and VCPU even when empty (then DISK/NIC/GRAPHICS, which lab VMs do not have)
    tmpl: dict[str, str] = {k: vm.template.get(k, "") for k in ("CPU", "MEMORY", "VCPU")}
    return (f"<VM>{_vm_head(vm, False)}{template('TEMPLATE', tmpl)}<MONITORING/>"
            f"{_short_user_template(vm.user_template)}<HISTORY_RECORDS>{last}</HISTORY_RECORDS></VM>")


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


def vm_pool_xml(cloud: CloudState, vms: list[Vm], extended: bool) -> str:
    body = (vm_xml_pool_extended(v) if extended else vm_xml(cloud, v, False) for v in vms)
    return "<VM_POOL>" + "".join(body) + "</VM_POOL>"


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


def datastore_pool_xml(cloud: CloudState) -> str:
    return ("<DATASTORE_POOL>" + "".join(datastore_xml(d) for d in sorted(cloud.datastores.values(),
                                                                          key=lambda d: d.id))
            + "</DATASTORE_POOL>")


# ------------------------------------------------------------------------------------------------------------
# Clusters (`Cluster::to_xml`, src/cluster/Cluster.cc: ID, NAME, HOSTS, DATASTORES, VNETS, TEMPLATE; no plan)

def cluster_pool_xml(cloud: CloudState) -> str:
    out = []
    for cid in sorted(cloud.cluster_ds):
        hosts = "".join(f"<ID>{h.id}</ID>" for h in cloud.hosts.values() if h.cluster_id == cid)
        stores = "".join(f"<ID>{d.id}</ID>" for d in sorted(cloud.datastores.values(), key=lambda d: d.id)
                         if cid in d.cluster_ids)
        name = "default" if cid == 0 else f"cluster{cid}"
        out.append(f"<CLUSTER><ID>{cid}</ID><NAME>{name}</NAME><HOSTS>{hosts}</HOSTS>"
                   f"<DATASTORES>{stores}</DATASTORES><VNETS/>"
                   f"{template('TEMPLATE', {'RESERVED_CPU': '', 'RESERVED_MEM': ''})}</CLUSTER>")
    return "<CLUSTER_POOL>" + "".join(out) + "</CLUSTER_POOL>"


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

def hook_message(kind: str, oid: int, state: str, lcm: str | None, remote_host: str | None, body: str,
                 service_id: str | None = None) -> str:
    if kind == "HOST":
        # HookStateHost emits REMOTE_HOST before RESOURCE_ID (unlike the schema).
        return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>HOST</HOOK_OBJECT>"
                f"<STATE>{state}</STATE><REMOTE_HOST>{esc(remote_host or '')}</REMOTE_HOST>"
                f"<RESOURCE_ID>{oid}</RESOURCE_ID>{body}</HOOK_MESSAGE>")
    remote = f"<REMOTE_HOST>{esc(remote_host)}</REMOTE_HOST>" if remote_host else "<REMOTE_HOST/>"
    # HookStateVM.cc: SERVICE_ID (from the user template) after RESOURCE_ID, for VMs of a OneFlow service
    service = f"<SERVICE_ID>{esc(service_id)}</SERVICE_ID>" if service_id else ""
    return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>VM</HOOK_OBJECT>"
            f"<STATE>{state}</STATE><LCM_STATE>{lcm}</LCM_STATE><RESOURCE_ID>{oid}</RESOURCE_ID>"
            f"{service}{remote}{body}</HOOK_MESSAGE>")
