"""`oneha deploy install`: put the deploy kit that ships in the wheel (units, fence scripts, bridge wrapper, hook
templates, example configs, Prometheus and Grafana files) in place, with owners and modes, saying what it does.

Layout (the docs, the units and the hook templates use these paths; other prefixes are written into the files):
  PREFIX/bin/oneha-bridge            root:root 0755   the command oned's hook manager runs (as oneadmin)
  PREFIX/fence/*.sh                  root:root 0755   fence scripts run by the workers (as oneha)
  PREFIX/share/...                   root:root 0644   hook templates, Prometheus, Grafana, self-fence kit, examples
  UNIT_DIR/oneha-*.service           root:root 0644   systemd units
  ETC/                               root:oneha 0751  others may traverse (oneadmin reaches bridge.toml), not list
  ETC/oneha.toml                     root:oneha 0640  services' config (only written when absent)
  ETC/bridge.toml                    root:oneadmin 0640  the bridge's Redis URL, nothing else (only when absent)
  ETC/fence/                         root:oneha 0750  BMC credentials (<host>.cred, default.cred)
oned's credentials (ETC/one_auth, root:root 0600) are the operator's to write: systemd hands the services a copy.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import click

SCRIPTS = ("bin/oneha-bridge", "fence/fence_ipmi.sh", "fence/fence_redfish.sh")
SHARED = ("hooks", "prometheus", "grafana", "selffence")
EXAMPLES = ("oneha.toml.example", "bridge.toml.example")


def kit_root() -> Path:
    """The deploy kit: oneha/deploy/ in an installed wheel, deploy/ beside the package in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "deploy", here.parent / "deploy"):
        if (candidate / "systemd").is_dir():
            return candidate
    raise click.ClickException("the deploy kit is missing from this installation (oneha/deploy)")


@dataclass(frozen=True)
class Item:
    """One thing to put in place: a directory (src None) or a file copied from the kit."""

    dest: Path
    mode: int
    owner: str = "root"
    group: str = "root"
    src: Path | None = None
    keep_existing: bool = False  # configuration: never overwritten

    def describe(self) -> str:
        what = "mkdir" if self.src is None else "install"
        return f"{what} -m {self.mode:04o} -o {self.owner} -g {self.group} {self.dest}"


def plan(kit: Path, prefix: Path, etc: Path, unit_dir: Path, root: Path, user: str, bridge_user: str) -> list[Item]:
    def at(path: Path) -> Path:
        return root / path.relative_to("/") if path.is_absolute() else root / path

    items = [Item(at(prefix), 0o755), Item(at(prefix / "bin"), 0o755), Item(at(prefix / "fence"), 0o755),
             Item(at(prefix / "share"), 0o755), Item(at(unit_dir), 0o755),
             Item(at(etc), 0o751, group=user), Item(at(etc / "fence"), 0o750, group=user)]
    items += [Item(at(prefix / rel), 0o755, src=kit / rel) for rel in SCRIPTS]
    items.append(Item(at(prefix / "fence" / "fence-lib.sh"), 0o644, src=kit / "fence" / "fence-lib.sh"))
    for sub in SHARED:
        items.append(Item(at(prefix / "share" / sub), 0o755))
        for path in sorted((kit / sub).iterdir()):
            executable = os.access(path, os.X_OK)
            items.append(Item(at(prefix / "share" / sub / path.name), 0o755 if executable else 0o644, src=path))
    items += [Item(at(prefix / "share" / name), 0o644, src=kit / name) for name in EXAMPLES]
    items += [Item(at(unit_dir / path.name), 0o644, src=path) for path in sorted((kit / "systemd").iterdir())]
    items += [Item(at(etc / "oneha.toml"), 0o640, group=user, src=kit / "oneha.toml.example", keep_existing=True),
              Item(at(etc / "bridge.toml"), 0o640, group=bridge_user, src=kit / "bridge.toml.example",
                   keep_existing=True)]
    return items


def rewrite(text: str, prefix: Path, etc: Path) -> str:
    """The kit's files name /opt/oneha and /etc/oneha; another prefix is written into them."""
    return text.replace("/opt/oneha", str(prefix)).replace("/etc/oneha", str(etc))


def apply(item: Item, prefix: Path, etc: Path, chown: bool) -> str:
    if item.src is None:
        item.dest.mkdir(parents=True, exist_ok=True)
    elif item.keep_existing and item.dest.exists():
        return f"kept {item.dest} (exists; compare with {item.src.name})"
    else:
        data = item.src.read_bytes()
        with contextlib.suppress(UnicodeDecodeError):  # binary: copied as it is
            data = rewrite(data.decode(), prefix, etc).encode()
        tmp = item.dest.with_name(item.dest.name + ".oneha-new")
        tmp.write_bytes(data)
        os.replace(tmp, item.dest)
    os.chmod(item.dest, item.mode)
    if chown:
        shutil.chown(item.dest, item.owner, item.group)
    return item.describe()


def _missing_accounts(user: str, bridge_user: str) -> list[str]:
    missing = []
    for name, lookup in ((user, grp.getgrnam), (bridge_user, grp.getgrnam), ("root", pwd.getpwnam)):
        try:
            lookup(name)
        except KeyError:
            missing.append(name)
    return missing


@click.group()
def deploy() -> None:
    """Install the deploy kit shipped in the wheel (units, fence scripts, bridge wrapper, configs)."""


@deploy.command()
@click.option("--prefix", type=click.Path(path_type=Path), default=Path("/opt/oneha"), show_default=True,
              help="Where the venv lives: bin/, fence/ and share/ go here.")
@click.option("--etc", "etc", type=click.Path(path_type=Path), default=Path("/etc/oneha"), show_default=True)
@click.option("--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="Install under this directory (like DESTDIR: packaging, tests); paths inside files stay as given.")
@click.option("--user", default="oneha", show_default=True, help="Group the services run as.")
@click.option("--bridge-user", default="oneadmin", show_default=True, help="Group of oned (reads bridge.toml).")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def install(prefix: Path, etc: Path, unit_dir: Path, root: Path, user: str, bridge_user: str, dry_run: bool) -> None:
    """Put units, fence scripts, the bridge wrapper, hook templates and example configs in place."""
    for name, path in (("--prefix", prefix), ("--etc", etc), ("--unit-dir", unit_dir)):
        if not path.is_absolute():
            raise click.BadParameter("must be an absolute path", param_hint=name)
    items = plan(kit_root(), prefix, etc, unit_dir, root, user, bridge_user)
    chown = os.geteuid() == 0
    if chown and not dry_run and (missing := _missing_accounts(user, bridge_user)):
        click.echo(f"oneha deploy: no group {', '.join(missing)}: create the service user first "
                   f"(useradd --system --home-dir /var/lib/oneha --shell /usr/sbin/nologin {user})", err=True)
        sys.exit(2)
    for item in items:
        click.echo(f"would {item.describe()}" if dry_run else apply(item, prefix, etc, chown))
    if not chown:
        click.echo(f"note: not root, owners left as {pwd.getpwuid(os.geteuid()).pw_name}; modes set as listed")
    if not dry_run:
        click.echo(f"next: write {etc}/one_auth (root:root 0600), edit {etc}/oneha.toml, then "
                   f"`oneha config check --config {etc}/oneha.toml`")
