"""One configuration for every command: ``--config`` > ``HEIST_VICTIM_CONFIG`` > defaults, ``HEIST_VICTIM_*`` on top;
``heist keys add`` says where it wrote and warns when the server on the settings' port keeps its keys elsewhere."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from heist.cli.main import main
from tests.conftest import free_port
from tests.servers import image_bytes, start_victim, tiny_models
from victim_service.settings import CONFIG_ENV, SettingsError, redis_url_public, resolve_settings


@dataclass
class Run:
    rc: int
    out: str
    err: str


@pytest.fixture
def heist(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """The ``heist`` entry point in-process, as a user sees it (exit code, stdout, stderr)."""

    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["heist", *args])
        monkeypatch.setenv("COLUMNS", "400")  # one warning per line, not wrapped by rich
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main()
        got = capsys.readouterr()
        return Run(int(exc.value.code or 0), got.out, " ".join(got.err.split()))

    return run


def _toml(path: Path, port: int, prefix: str) -> Path:
    path.write_text(f'port = {port}\nkey_prefix = "{prefix}"\n[tiers.gold]\nrate = 2.0\n')
    return path


def test_resolution_order_flag_then_env_then_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (CONFIG_ENV, "HEIST_VICTIM_PORT", "HEIST_VICTIM_KEY_PREFIX", "HEIST_VICTIM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    flag = _toml(tmp_path / "flag.toml", 8101, "flag:")
    env = _toml(tmp_path / "env.toml", 8102, "env:")

    default = resolve_settings(None)
    assert (default.origin, default.path, default.settings.port) == ("defaults", None, 8000)
    assert set(default.settings.tiers) == {"free", "pro", "internal"}

    monkeypatch.setenv(CONFIG_ENV, str(env))
    from_env = resolve_settings(None)
    assert from_env.origin == f"{CONFIG_ENV}={env}"
    assert (from_env.settings.port, from_env.settings.key_prefix) == (8102, "env:")

    from_flag = resolve_settings(flag)  # the flag wins over the variable
    assert from_flag.origin == f"--config {flag}"
    assert (from_flag.settings.port, from_flag.settings.key_prefix) == (8101, "flag:")

    # HEIST_VICTIM_* variables override single fields of whichever file was chosen...
    monkeypatch.setenv("HEIST_VICTIM_PORT", "8103")
    monkeypatch.setenv("HEIST_VICTIM_TIERS__GOLD__RATE", "7")
    assert resolve_settings(flag).settings.port == 8103
    assert resolve_settings(None).settings.tiers["gold"].rate == 7.0
    # ...and a command-line option (--port, --redis-url) wins over them
    cli = resolve_settings(flag, {"port": 8104, "redis_url": None})
    assert cli.settings.port == 8104
    assert cli.settings.key_prefix == "flag:"

    # a bad value from a variable is blamed on the variable, not on the file
    monkeypatch.setenv("HEIST_VICTIM_PORT", "abc")
    with pytest.raises(SettingsError, match=r"^environment variable HEIST_VICTIM_PORT: port: "):
        resolve_settings(flag)
    monkeypatch.setenv("HEIST_VICTIM_PORT", "8103")
    monkeypatch.setenv("HEIST_VICTIM_TIERS__GOLD__RATE", "fast")
    with pytest.raises(SettingsError, match=r"^environment variable HEIST_VICTIM_TIERS__GOLD__RATE: tiers\.gold\.rate"):
        resolve_settings(flag)
    monkeypatch.setenv("HEIST_VICTIM_TIERS__GOLD__RATE", "7")

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match=r"missing\.toml: cannot read"):
        resolve_settings(None)


def test_monitor_escalation_for_an_unknown_tier_is_refused() -> None:
    from victim_service.settings import Settings

    with pytest.raises(SettingsError, match=r"v\.toml: monitor\.escalation names tier\(s\) 'gold' not defined"):
        Settings.from_mapping({"monitor": {"escalation": {"default": [], "gold": []}}}, "v.toml")
    ok = Settings.from_mapping({"monitor": {"escalation": {"default": [], "free": []}}}, "v.toml")
    assert set(ok.monitor.escalation) == {"default", "free"}


def test_relative_paths_in_a_settings_file_are_relative_to_the_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """query_log.path and images_dir were taken from the working directory, unlike data_dir: a server
    started from another folder wrote its query log somewhere else than `heist log` read it."""
    from victim_service.settings import Settings

    cfg = tmp_path / "conf" / "v.toml"
    cfg.parent.mkdir()
    cfg.write_text('data_dir = "state"\n[query_log]\npath = "logs/q.jsonl"\nimages_dir = "/abs/images"\n')
    monkeypatch.chdir(tmp_path)
    s = Settings.from_file(cfg)
    assert s.data_dir == cfg.parent / "state"
    assert s.query_log.path == cfg.parent / "logs" / "q.jsonl"
    assert s.query_log.images_dir == Path("/abs/images")


def test_store_names_redis_without_password_and_compares_spellings() -> None:
    assert redis_url_public("redis://user:s3cret@LOCALHOST") == "redis://127.0.0.1:6379/0"
    assert redis_url_public("rediss://cache.example:6380/2") == "rediss://cache.example:6380/2"
    a = resolve_settings(None, {"redis_url": "redis://:pw@localhost:6379/0", "key_prefix": "p:"}).settings.store()
    b = resolve_settings(None, {"redis_url": "redis://127.0.0.1:6379", "key_prefix": "p:"}).settings.store()
    c = resolve_settings(None, {"redis_url": "redis://127.0.0.1:6379", "key_prefix": "q:"}).settings.store()
    assert "pw" not in a.describe()
    assert a.same_keys_as(b)
    assert not a.same_keys_as(c)


def test_keys_add_warns_when_the_running_server_keeps_keys_elsewhere(
    tmp_path: Path, redis_url: str, heist: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tiny_models(tmp_path / "models", ("denoise",))
    prefix = f"heist-test:{uuid.uuid4().hex[:12]}:"
    srv = start_victim(tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 1}],
                       tiers={"free": {"rate": None}}, keys={}, redis_url=redis_url, key_prefix=prefix)
    try:
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["store"] == {"backend": "redis", "redis_url": redis_url_public(redis_url), "key_prefix": prefix,
                                   "data_dir": str(srv.data_dir.resolve())}
        for var in (CONFIG_ENV, "HEIST_VICTIM_REDIS_URL", "HEIST_VICTIM_KEY_PREFIX"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path / "cli-data"))
        monkeypatch.setenv("HEIST_VICTIM_PORT", str(srv.process.port))

        # the tour's old mistake: no --config, so the key lands in the local key file the server never reads
        wrong = heist("keys", "add", "alice", "--tier", "free")
        assert wrong.rc == 0, wrong.err
        local = tmp_path / "cli-data" / "victim" / "keys.json"
        assert f"stored in the key file {local} (settings: defaults)" in wrong.err
        assert f"warning: the server running at {srv.url} keeps its keys in Redis " in wrong.err
        assert f"(prefix {prefix})" in wrong.err
        assert "--config FILE or HEIST_VICTIM_CONFIG=FILE" in wrong.err
        listed = heist("keys", "list")
        assert "warning: the server running at" in listed.err  # reading the wrong store is flagged too
        assert "these are not the keys that server checks" in " ".join(listed.err.split())
        log = heist("log", "tail", "-n", "2")  # an empty table here read as "no traffic"
        assert "this is not that server's query log" in " ".join(log.err.split())
        png = image_bytes(16, 16)
        refused = httpx.post(f"{srv.url}/v1/models/denoise/translate", content=png,
                             headers={"X-API-Key": wrong.out.strip(), "Content-Type": "image/png"})
        assert refused.status_code == 401

        # the same command with the server's settings, named by the variable: no warning, and the key works
        monkeypatch.setenv(CONFIG_ENV, str(srv.settings_path))
        right = heist("keys", "add", "alice", "--tier", "free")
        assert right.rc == 0, right.err
        assert f"stored in Redis {redis_url_public(redis_url)} (prefix {prefix})" in right.err
        assert f"(settings: {CONFIG_ENV}={srv.settings_path})" in right.err
        assert "warning" not in right.err
        assert "warning" not in heist("log", "tail", "-n", "1").err
        ok = httpx.post(f"{srv.url}/v1/models/denoise/translate", content=png,
                        headers={"X-API-Key": right.out.strip(), "Content-Type": "image/png"})
        assert ok.status_code == 200, ok.text
        revoked = heist("keys", "revoke", "alice")
        assert revoked.rc == 0, revoked.err
        assert "warning" not in revoked.err
        assert json.loads(local.read_text())["keys"]  # the stray key is still in the local file, untouched
    finally:
        srv.stop()

    # no server on that port: nothing to compare, no warning
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.setenv("HEIST_VICTIM_PORT", str(free_port()))
    quiet = heist("keys", "add", "bob", "--tier", "free")
    assert quiet.rc == 0, quiet.err
    assert "warning" not in quiet.err


def test_relative_paths_survive_the_copy_heist_serve_gives_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``heist serve --config s.toml`` (a relative path) copies the settings to a temporary folder for its
    workers; ``data_dir = "state"`` then pointed into that folder (keys 401, state deleted at shutdown) and
    ``source = "../models/m.pt"`` stopped every worker with a traceback."""
    from victim_service.settings import Settings

    here = tmp_path / "c"
    here.mkdir()
    (here / "s.toml").write_text('data_dir = "state"\n[[models]]\nname = "m"\nsource = "../models/m.pt"\n'
                                 '[query_log]\npath = "log/q.jsonl"\n')
    monkeypatch.chdir(here)
    for var in (CONFIG_ENV, "HEIST_VICTIM_DATA_DIR", "HEIST_VICTIM_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    read = Settings.from_file("s.toml")
    copy = Settings.from_file(read.to_json_file(tmp_path / "elsewhere" / "settings.json"))
    for s in (read, copy):
        assert s.data_dir == here / "state"
        assert Path(s.models[0].source).resolve() == (tmp_path / "models" / "m.pt").resolve()
        assert s.query_log.path == here / "log" / "q.jsonl"
    mapped = Settings.from_mapping({"data_dir": "mapped"})  # relative to where the command runs
    assert Settings.from_file(mapped.to_json_file(tmp_path / "elsewhere" / "m.json")).data_dir == here / "mapped"


def test_an_infinite_rate_is_refused_not_read_as_unlimited() -> None:
    """``rate = inf`` (valid TOML) switched the limit off in silence; "unlimited" is the documented spelling."""
    import tomllib

    from victim_service.settings import Settings

    with pytest.raises(SettingsError, match=r"tiers\.free\.rate: Input should be a finite number"):
        Settings.from_mapping({"tiers": tomllib.loads("[free]\nrate = inf\nburst = 5\n")})
    assert Settings.from_mapping({"tiers": {"free": {"rate": "unlimited"}}}).tiers["free"].rate is None
