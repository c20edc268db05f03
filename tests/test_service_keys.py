"""``heist keys`` and ``heist serve``: keys added from the CLI (file store or Redis) are accepted by a
server started in the same environment; revoked keys stop working; user mistakes are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from heist.cli.main import app, main
from tests.conftest import free_port
from tests.servers import VictimServer, image_bytes, start_victim, tiny_models, tiny_torchscript
from victim_service.keys import FileKeyStore, KeyStoreError, hash_key

PNG = image_bytes(16, 16)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # tiny TorchScript test models
HEIST = [sys.executable, "-c", "from heist.cli.main import main; main()"]


@dataclass
class Run:
    rc: int
    out: str
    err: str


@pytest.fixture
def heist(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run the ``heist`` entry point in-process (exit code, stdout, stderr), as a user would see it."""

    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["heist", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main()
        got = capsys.readouterr()
        return Run(int(exc.value.code or 0), got.out, got.err)

    return run


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"heist serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("heist serve did not become ready")


def test_keys_added_by_cli_work_on_heist_serve_models_dir(
    tmp_path: Path, heist: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    tiny_models(models, ("sr4x",))
    tiny_torchscript(models, "scripted")
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "HEIST_VICTIM_KEY_CACHE_S": "0",
           "HEIST_VICTIM_ADMIN_KEY": "hk_admin_for_this_test_only", "HEIST_VICTIM_TORCH_THREADS": "1",
           "HEIST_VICTIM_BATCH_PROBE_S": "0.02", "TMPDIR": str(tmp_path / "tmp")}
    added = heist("keys", "add", "carol", "--tier", "free")
    assert added.rc == 0, added.err
    key = added.out.strip()
    assert key.startswith("hk_")
    assert len(key) == 35
    assert "shown only once" in added.err
    stored = json.loads((tmp_path / "data" / "victim" / "keys.json").read_text())
    assert key not in json.dumps(stored)
    assert hash_key(key) in stored["keys"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([*HEIST, "serve", "--models-dir", str(models), "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, proc)
        names = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()}
        assert set(names) == {"sr4x", "scripted"}
        assert names["sr4x"]["max_batch_source"] == "auto"
        # the README's curl: raw body with Content-Type, and multipart
        raw = httpx.post(f"{url}/v1/models/sr4x/translate", content=PNG,
                         headers={"X-API-Key": key, "Content-Type": "image/png"})
        assert raw.status_code == 200, raw.text
        assert raw.headers["content-type"] == "image/png"
        multi = httpx.post(f"{url}/v1/models/scripted/translate", files={"image": ("photo.png", PNG, "image/png")},
                           headers={"X-API-Key": key})
        assert multi.status_code == 200
        # a key added while the server runs works at once (same data dir)
        later = heist("keys", "add", "dora", "--tier", "pro").out.strip()
        assert httpx.post(f"{url}/v1/models/sr4x/translate", content=PNG,
                          headers={"Authorization": f"Bearer {later}", "Content-Type": "image/png"}).status_code == 200
        long = "customer-with-a-name-longer-than-an-80-column-table-leaves"
        assert heist("keys", "add", long, "--tier", "pro").rc == 0
        monkeypatch.delenv("COLUMNS", raising=False)  # as in a user's pipe (pytest-xdist workers set 80)
        listed = heist("keys", "list")
        assert "carol" in listed.out
        assert "dora" in listed.out
        assert long in listed.out  # piped or captured, rich must not cut it to fit 80 columns
        assert key not in listed.out
        assert heist("keys", "revoke", "carol").rc == 0
        gone = httpx.post(f"{url}/v1/models/sr4x/translate", content=PNG,
                          headers={"X-API-Key": key, "Content-Type": "image/png"})
        assert gone.status_code == 401
        # the embedded log saw all of it
        log = httpx.get(f"{url}/v1/admin/log", headers={"X-API-Key": "hk_admin_for_this_test_only"}).json()
        assert [e["status"] for e in log] == [200, 200, 200, 401]
    finally:
        proc.send_signal(signal.SIGTERM)  # as docker stop does
        rc = proc.wait(timeout=30)
    assert rc == 0, (tmp_path / "serve.log").read_text()[-2000:]
    # the settings file handed to uvicorn holds the admin key in clear: SIGTERM left it behind
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cli_mistakes_are_one_line_errors(
    tmp_path: Path, heist: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("HEIST_VICTIM_REDIS_URL", raising=False)

    def one_line_error(run: Run, *needles: str) -> None:
        assert run.rc == 2, (run.out, run.err)
        text = " ".join(run.err.split())  # rich wraps long lines
        assert text.startswith("error: ")
        assert "Traceback" not in run.err
        for needle in needles:
            assert needle in text, (needle, text)

    one_line_error(heist("keys", "add", "eve", "--tier", "gold"), "unknown tier 'gold'", "free, pro, internal")
    one_line_error(heist("keys", "add", "not a name", "--tier", "free"), "client name")
    one_line_error(heist("keys", "add", "eve\n", "--tier", "free"), "client name")  # a second "eve" in the list
    one_line_error(heist("keys", "revoke", "nobody"), "no stored key for client 'nobody'")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nothing = f"redis://127.0.0.1:{free.getsockname()[1]}/0"  # bound, not listening: nothing answers
        for args in (("add", "eve"), ("list",), ("revoke", "eve")):
            one_line_error(heist("keys", *args, "--redis-url", nothing), "the key store (Redis) is unreachable",
                           nothing, "scripts/ensure-redis.sh")
    (tmp_path / "empty").mkdir()
    one_line_error(heist("serve", "--models-dir", str(tmp_path / "empty")), "no model to serve")
    cfg = tmp_path / "victim.toml"
    cfg.write_text("[tiers.free]\nrate = -1\n")
    one_line_error(heist("serve", "--config", str(cfg)), "tiers.free.rate", "greater than 0")
    cfg.write_text("[tiers.free]\nrate = 1\nburst = 2\nspeed = 3\n")
    one_line_error(heist("serve", "--config", str(cfg)), "tiers.free.speed", "Extra inputs are not permitted")
    cfg.write_text("[tiers\nrate = 1\n")
    one_line_error(heist("serve", "--config", str(cfg)), "not valid TOML")
    cfg.write_text('[[models]]\nname = "m"\nsource = "missing.safetensors"\n')
    one_line_error(heist("serve", "--config", str(cfg)), "model 'm': model source", "no such file")
    cfg.write_text('[[models]]\nname = "m"\nsource = "zoo:sr4x"\n')
    one_line_error(heist("serve", "--config", str(cfg), "--workers", "2"), "several workers need redis_url")
    with socket.socket() as taken:  # found before the zoo build and the model loads (it was found after them)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(heist("serve", "--config", str(cfg), "--port", str(port)),
                       f"cannot listen on 127.0.0.1:{port} (Address already in use); stop the server using it")
    cfg.write_text('[[models]]\nname = "m"\nsource = "x.pt"\ndefenses = [{name = "jpeg", quality = 500}]\n')
    one_line_error(heist("serve", "--config", str(cfg)), "defense 'jpeg': quality")
    one_line_error(heist("serve", "--config", str(tmp_path / "nope.toml")), "cannot read settings file")


def _statuses(srv: VictimServer, key: str, n: int) -> list[int]:
    return [httpx.post(f"{srv.url}/v1/models/d/translate", content=PNG,
                       headers={"X-API-Key": key, "Content-Type": "image/png"}).status_code for _ in range(n)]


def _until_refused(srv: VictimServer, key: str, n: int = 12, timeout_s: float = 20.0) -> float:
    """Seconds until ``n`` requests in a row with ``key`` are all refused (401); fails after ``timeout_s``
    (far below the 300 s ``key_cache_s`` of the tests, generous for a loaded machine)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if set(_statuses(srv, key, n)) == {401}:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"key still accepted {timeout_s} s after its revocation")


def test_keys_in_redis_are_shared_with_every_worker_and_revocations_reach_them(
        tmp_path: Path, redis_url: str) -> None:
    """Two workers cache lookups for 300 s, yet a revocation (CLI, or a key deleted by hand and then
    ``keys/reload`` on whichever worker answers) stops the key on both within about a second."""
    models = tiny_models(tmp_path / "m", ("denoise",))
    srv = start_victim(tmp_path, models=[{"name": "d", "source": str(models["denoise"]), "max_batch": 1}],
                       tiers={"free": {"rate": 1000.0, "burst": 1000}}, keys={}, redis_url=redis_url,
                       key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:", workers=2,
                       extra={"key_cache_s": 300.0})
    try:
        import redis

        runner = CliRunner()
        res = runner.invoke(app, ["keys", "add", "frank", "--tier", "free", "--config", str(srv.settings_path)])
        assert res.exit_code == 0, res.output
        key = res.stdout.strip()
        assert set(_statuses(srv, key, 16)) == {200}  # both workers have it cached now
        r = httpx.post(f"{srv.url}/v1/models/d/translate", content=PNG,
                       headers={"X-API-Key": key, "Content-Type": "image/png"})
        assert r.headers["ratelimit-limit"] == "1000"
        stored = redis.Redis.from_url(redis_url).hgetall(f"{srv.key_prefix}keys")
        assert list(stored) == [hash_key(key).encode()]
        assert not (Path(srv.data_dir) / "keys.json").exists()  # Redis mode writes no key file
        res = runner.invoke(app, ["keys", "revoke", "frank", "--config", str(srv.settings_path)])
        assert res.exit_code == 0
        _until_refused(srv, key)

        res = runner.invoke(app, ["keys", "add", "gina", "--tier", "free", "--config", str(srv.settings_path)])
        key = res.stdout.strip()
        assert set(_statuses(srv, key, 16)) == {200}
        redis.Redis.from_url(redis_url).hdel(f"{srv.key_prefix}keys", hash_key(key))  # an operator, by hand
        time.sleep(1.2)
        assert 200 in _statuses(srv, key, 4)  # nothing told the workers: their 300 s cache still vouches
        assert httpx.post(f"{srv.url}/v1/admin/keys/reload", headers=srv.admin_headers).status_code == 200
        _until_refused(srv, key)
    finally:
        srv.stop()


def test_a_revoked_stored_key_stops_within_a_second_in_the_file_store(tmp_path: Path) -> None:
    models = tiny_models(tmp_path / "m", ("denoise",))
    srv = start_victim(tmp_path, models=[{"name": "d", "source": str(models["denoise"]), "max_batch": 1}],
                       tiers={"free": {"rate": 1000.0, "burst": 1000}}, keys={}, extra={"key_cache_s": 300.0})
    try:
        runner = CliRunner()
        res = runner.invoke(app, ["keys", "add", "hana", "--tier", "free", "--config", str(srv.settings_path)])
        assert res.exit_code == 0, res.output
        key = res.stdout.strip()
        assert set(_statuses(srv, key, 4)) == {200}
        res = runner.invoke(app, ["keys", "revoke", "hana", "--config", str(srv.settings_path)])
        assert res.exit_code == 0, res.output
        _until_refused(srv, key, n=4)
    finally:
        srv.stop()


def test_file_key_store_is_atomic_and_rejects_duplicates(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    k1 = store.add("a", "free")
    store.add("b", "pro")
    with pytest.raises(KeyStoreError, match="already has a key"):
        store.add("a", "pro")
    assert [r.name for r in store.records()] == ["a", "b"]
    assert store.lookup(hash_key(k1)).tier == "free"  # type: ignore[union-attr]
    assert store.revoke("a")
    assert not store.revoke("a")
    assert store.lookup(hash_key(k1)) is None
    assert not list(tmp_path.glob(".*.tmp"))
