"""Settings: TOML + environment, validation errors that say what is wrong, and docs that cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oneha.config_cli import render_docs
from oneha.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "oneha.toml"
    path.write_text(text)
    return path


def test_cluster_overrides_apply_on_top_of_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, """
[policy.default]
host_action = "migrate"
fencing = ["/usr/local/bin/fence_ipmi.sh"]
host_grace_s = 30
[policy.clusters.100]
fencing = "none"
include_suspended = true
""")
    settings = load_settings(path)
    assert settings.policy.for_cluster(0).fencing == ["/usr/local/bin/fence_ipmi.sh"]
    special = settings.policy.for_cluster(100)
    assert special.fencing == "none" and special.include_suspended and special.host_action == "migrate"
    assert special.host_grace_s == 30


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[redis]\nurl = "redis://file:6379/0"\n')
    monkeypatch.setenv("ONEHA_REDIS__URL", "redis://env:6379/1")
    assert load_settings(path).redis.url == "redis://env:6379/1"


def test_credentials_come_from_the_one_auth_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:s3cret\n")
    monkeypatch.setenv("ONE_AUTH", str(auth))
    monkeypatch.setenv("ONE_XMLRPC", "http://front:2633/RPC2")
    settings = load_settings()
    assert settings.oned_session == "oneadmin:s3cret"
    assert settings.oned.endpoint == "http://front:2633/RPC2"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize("text, needle", [
    ('[policy.default]\nhost_action = "explode"\n', "policy.default.host_action"),
    ('[policy.default]\nfencing = []\n', "fencing"),
    ('[worker]\nunknown_option = 1\n', "worker.unknown_option"),
    ('[policy.default\n', "cannot read config"),
    ('[redis]\nsocket_timeout_s = 1.0\n', "wait_timeout_ms must be shorter than socket_timeout_s"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_cli_exits_2_on_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy.default]\nvm_crash_action = "reboot"\n')
    proc = subprocess.run([sys.executable, "-m", "oneha", "config", "check", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "vm_crash_action" in proc.stderr


def test_configuration_docs_are_current() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == render_docs(), \
        "docs/configuration.md is stale: run `oneha config docs --output docs/configuration.md`"


def test_sentinel_urls_serve_the_store_and_the_broker() -> None:
    """One `sentinel://` URL and master name: redis-py's Sentinel client for the store, kombu's sentinel
    transport (with `master_name`) for Celery's broker."""
    from oneha import redisconn
    from oneha.celeryconf import celery_config
    from oneha.settings import RedisSettings, Settings

    url = "sentinel://127.0.0.1:26379;sentinel://127.0.0.2:26380;sentinel://localhost/2"
    assert redisconn.parse_sentinel_url(url) == ([("127.0.0.1", 26379), ("127.0.0.2", 26380),
                                                  ("localhost", 26379)], 2)
    with pytest.raises(ConfigError, match="sentinel_master"):
        redisconn.connect(RedisSettings(url=url))
    with pytest.raises(ConfigError, match="not sentinel"):
        redisconn.parse_sentinel_url("sentinel://127.0.0.1:26379;redis://127.0.0.1:6379")
    client = redisconn.connect(RedisSettings(url=url, sentinel_master="oneha"))  # connects lazily
    assert client.connection_pool.service_name == "oneha"  # type: ignore[attr-defined]
    config = celery_config(Settings(redis=RedisSettings(url=url, sentinel_master="oneha")))
    assert config["broker_url"] == url and config["broker_transport_options"]["master_name"] == "oneha"


def test_tunables_reach_the_subscriber_components() -> None:
    """Settings, not module constants: each tunable gets to the object that uses it (clients connect lazily)."""
    from oneha.settings import RedisSettings, Settings, SubscriberSettings
    from oneha.subscriber.service import Service

    settings = Settings(redis=RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=1.5, connect_timeout_s=0.5),
                        subscriber=SubscriberSettings(zmq_batch_messages=7, reconcile_poke_min_s=9.0,
                                                      bridge_stale_consumer_s=99.0, dispatch_retry_s=3.0))
    svc = Service(settings, celery=object())
    options = svc.r.get_connection_kwargs()
    assert (options["socket_timeout"], options["socket_connect_timeout"], options["decode_responses"]) == \
        (1.5, 0.5, True)
    assert svc.listener.tuning.zmq_batch_messages == 7
    assert svc.reconciler.tuning.reconcile_poke_min_s == 9.0
    assert svc.stream.stale_consumer_ms == 99_000
    assert svc.dispatcher.retry_s == 3.0
