"""Settings come from the environment with safe defaults; bad values fail at startup."""

from pathlib import Path

import pytest

from config.settings import SETTINGS_DOC, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_safe():
    s = Settings.from_env({})
    assert s.db_pool_size == 4 and s.max_body_bytes == 1 << 20 and s.max_batch_events == 1000
    assert s.database_url is None and not s.production and s.secrets == {}


def test_production_refuses_without_a_secret():
    with pytest.raises(SettingsError):
        Settings.from_env({"SLUICE_ENV": "production"})
    with pytest.raises(SettingsError):
        Settings.from_env({"DYNO": "web.1"})  # Heroku implies production
    assert Settings.from_env({"DYNO": "web.1", "SLUICE_SECRET": "s"}).production


def test_hardening_settings():
    s = Settings.from_env(
        {
            "SLUICE_AUTHORIZE_URL": "https://origin.example/auth?x=1",
            "AUTHORIZE_FORWARD_HEADERS": "Cookie, X-Tenant",
            "CORS_ORIGINS": "https://a.example, http://localhost:3000/, *",
        }
    )
    assert s.authorize_url == "https://origin.example/auth?x=1"
    assert s.authorize_forward_headers == ("Cookie", "X-Tenant")
    assert s.cors_origins == ("https://a.example", "http://localhost:3000", "*")
    assert Settings.from_env({}).proxy_hops == 0
    assert Settings.from_env({"DYNO": "web.1", "SLUICE_SECRET": "s"}).proxy_hops == 1
    assert Settings.from_env({"DYNO": "web.1", "SLUICE_SECRET": "s", "PROXY_HOPS": "2"}).proxy_hops == 2


def test_secrets_for_rotation():
    s = Settings.from_env({"SLUICE_SECRETS": "old:aaa, new:bbb", "SLUICE_SECRET": "ccc"})
    assert s.secrets == {"old": "aaa", "new": "bbb", "default": "ccc"}
    with pytest.raises(SettingsError):
        Settings.from_env({"SLUICE_SECRETS": "no-colon"})


@pytest.mark.parametrize(
    "env",
    [
        {"DB_POOL_SIZE": "zero"},
        {"DB_POOL_SIZE": "0"},
        {"BATCH_MAX_WAIT_MS": "-1"},
        {"PORT": "x"},
        {"MAX_BATCH_EVENTS": "100", "INGEST_MAX_BACKLOG": "10"},
        {"SLUICE_AUTHORIZE_URL": "ftp://origin/authorize"},
        {"SLUICE_AUTHORIZE_URL": "not a url"},
        {"AUTHORIZE_FORWARD_HEADERS": "Cookie, Bad Header"},
        {"CORS_ORIGINS": "https://app.example.com/path"},
        {"CORS_ORIGINS": "app.example.com"},
        {"MAX_CONNECTIONS_PER_IP": "-1"},
        {"HEADER_TIMEOUT_S": "0"},
    ],
)
def test_bad_values_fail_at_startup(env):
    with pytest.raises(SettingsError):
        Settings.from_env(env)


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in SETTINGS_DOC if f"`{name}`" not in readme]
    assert missing == []


def test_every_numeric_setting_is_read_from_the_environment():
    from dataclasses import fields

    defaults = Settings.from_env({})
    numeric = {f.name for f in fields(Settings) if f.type in ("int", "float")}
    for name in SETTINGS_DOC:
        field = name.lower()
        if field not in numeric or name in ("PORT",):
            continue
        value = {"LONGPOLL_MAX_S": 3, "MAX_HEADER_BYTES": 4096}.get(name, 7)
        changed = Settings.from_env(
            {name: str(value), "INGEST_MAX_BACKLOG": "5000", "MAX_BATCH_EVENTS": "7"}
            if name != "INGEST_MAX_BACKLOG"
            else {name: str(value), "MAX_BATCH_EVENTS": "7"}
        )
        assert getattr(changed, field) == value != getattr(defaults, field), name


def test_mercure_keys():
    assert not Settings.from_env({}).mercure
    one = Settings.from_env({"MERCURE_PUBLISHER_JWT_KEY": "k"})
    assert one.mercure and one.mercure_subscriber_key == ("k", "HS256")  # one key serves both
    both = Settings.from_env(
        {"MERCURE_PUBLISHER_JWT_KEY": "p", "MERCURE_SUBSCRIBER_JWT_KEY": "s", "MERCURE_ANONYMOUS": "1"}
    )
    assert (both.mercure_publisher_key, both.mercure_subscriber_key) == (("p", "HS256"), ("s", "HS256"))
    assert both.mercure_anonymous
    with pytest.raises(SettingsError, match="HS256, RS256 or ES256"):
        Settings.from_env({"MERCURE_PUBLISHER_JWT_KEY": "k", "MERCURE_PUBLISHER_JWT_ALG": "none"})
    with pytest.raises(SettingsError, match="MERCURE_SUBSCRIBER_JWT_KEY"):
        Settings.from_env({"MERCURE_SUBSCRIBER_JWT_KEY": "not a pem", "MERCURE_SUBSCRIBER_JWT_ALG": "RS256"})


def test_tune_gc_freezes_what_exists_and_collects_young_objects_less_often():
    """In a fresh interpreter (the test process's own collector stays as it is)."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc\nfrom web.app import create_app\n"
            "from runtime.devenv import GC_YOUNG_THRESHOLD, tune_gc\n"
            "before = gc.get_threshold()\ntune_gc()\n"
            "print(before[0], gc.get_threshold()[0], GC_YOUNG_THRESHOLD, gc.get_freeze_count())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    before, after, wanted, frozen = (int(v) for v in out.stdout.split())
    assert before == 700 and after == wanted == 20_000
    assert frozen > 10_000  # the imported app's objects are no longer walked


def test_the_development_server_binds_loopback_and_webhooks_have_their_own_secret():
    assert Settings.from_env({}).host == "127.0.0.1"
    assert Settings.from_env({"HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert Settings.from_env({"DYNO": "web.1", "SLUICE_SECRET": "s"}).host == "0.0.0.0"
    s = Settings.from_env({"SLUICE_SECRET": "token-secret", "SLUICE_WEBHOOK_URL": "http://o/h"})
    assert s.webhook_secret and s.webhook_secret != "token-secret"
    assert "token-secret" not in s.webhook_secret
    assert Settings.from_env({"SLUICE_SECRET": "t", "SLUICE_WEBHOOK_SECRET": "w"}).webhook_secret == "w"
