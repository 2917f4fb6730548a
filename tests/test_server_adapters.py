"""Saved adapters on a real server: runtime load/unload, hot reload of --adapters-dir, bad adapters."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from server_support import PROMPTS, VERSION, bad_adapter, complete, make_adapter, wait_for

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def pool(server):
    """A folder inside the adapters dir that is not itself an adapter (the watcher ignores it)."""
    path = server.adapters_dir / "pool"
    path.mkdir(exist_ok=True)
    return path


def _text(http, model, prompt=PROMPTS[0], max_tokens=16):
    return complete(http, model, prompt, max_tokens)["choices"][0]["text"]


def _model_ids(http):
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_load_use_unload_then_404(http, server, pool):
    shutil.copytree(server.adapters_dir / "a1", pool / "copy_of_a1", dirs_exist_ok=True)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "api1", "lora_path": "pool/copy_of_a1"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "api1@v1"
    assert "api1" in _model_ids(http)
    out = http.post(
        "/v1/completions", json={"model": "api1", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    )
    assert out.headers[VERSION] == "api1@v1"
    # the same weights as a1 give the same text, different from the base model's
    assert out.json()["choices"][0]["text"] == _text(http, "a1") != _text(http, server.model)
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "api1", "lora_path": "pool/copy_of_a1"})
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "api1"}).status_code == 200
    gone = http.post("/v1/completions", json={"model": "api1", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "api1" not in _model_ids(http)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "api1"}).status_code == 404


def test_load_inplace_makes_a_new_version(http, server, pool):
    make_adapter(pool / "v_a", seed=21)
    make_adapter(pool / "v_b", seed=22)
    assert (
        http.post("/v1/load_lora_adapter", json={"lora_name": "inplace", "lora_path": "pool/v_a"}).status_code
        == 200
    )
    first = _text(http, "inplace")
    r = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "inplace", "lora_path": "pool/v_b", "load_inplace": True}
    )
    assert r.json()["version"] == "inplace@v2"
    second = http.post(
        "/v1/completions", json={"model": "inplace", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    )
    assert second.headers[VERSION] == "inplace@v2" and second.json()["choices"][0]["text"] != first
    same = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "inplace", "lora_path": "pool/v_b", "load_inplace": True}
    )
    assert same.json()["version"] == "inplace@v2"  # identical content: no new version
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "inplace"}).status_code == 200


def test_reserved_and_invalid_names_are_400(http, server, pool):
    for name in (server.model, "live", "has space", "x" * 200):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "pool/v_a"})
        assert r.status_code == 400, (name, r.text)
    for name in (server.model, "live"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 400


BAD_KINDS = [
    "rank",
    "targets",
    "shape",
    "nan",
    "inf",
    "no_weights",
    "no_config",
    "corrupt_weights",
    "corrupt_config",
    "deep_config",
    "bad_alpha",
    "string_alpha",
    "huge_b",
    "huge_alpha",
    "no_lora_b",
    "rank_pattern",
]


def test_bad_adapters_are_400_and_everything_keeps_serving(http, server, pool):
    before = {m: _text(http, m) for m in ("a1", "a2", server.model)}
    models_before = _model_ids(http)
    outside = Path(tempfile.mkdtemp(prefix="trainserve-outside-"))
    make_adapter(outside / "good", seed=31)
    os.symlink(outside / "good", pool / "link_out")
    (pool / "file_link").mkdir(exist_ok=True)
    shutil.copy(outside / "good" / "adapter_config.json", pool / "file_link" / "adapter_config.json")
    os.symlink(
        outside / "good" / "adapter_model.safetensors", pool / "file_link" / "adapter_model.safetensors"
    )
    cases = {kind: f"pool/bad_{kind}" for kind in BAD_KINDS}
    for kind in BAD_KINDS:
        bad_adapter(server.adapters_dir / "a1", pool / f"bad_{kind}", kind)
    cases.update(
        {
            "outside_abs": str(outside / "good"),
            "outside_rel": "../../" + outside.name + "/good",
            "dotdot": "pool/../../x",
            "symlink_dir": "pool/link_out",
            "symlink_file": "pool/file_link",
            "missing": "pool/does_not_exist",
        }
    )
    for case, path in cases.items():
        r = http.post("/v1/load_lora_adapter", json={"lora_name": f"bad_{case}", "lora_path": path})
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], case
        assert "trainserve-adapters-" not in err["message"]  # the user's path, not the private snapshot
        for server_path in (str(server.adapters_dir), str(server.adapters_dir.resolve())):
            assert server_path not in err["message"], (case, err["message"])  # relative to --adapters-dir
        # everything loaded before still answers, with the same outputs
        assert _model_ids(http) == models_before, case
        for model, text in before.items():
            assert _text(http, model) == text, (case, model)
    assert (
        "exceeds max_lora_rank"
        in http.post("/v1/load_lora_adapter", json={"lora_name": "r", "lora_path": cases["rank"]}).json()[
            "error"
        ]["message"]
    )
    assert (
        "outside the adapters directory"
        in http.post(
            "/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": cases["outside_abs"]}
        ).json()["error"]["message"]
    )
    messages = {
        kind: http.post("/v1/load_lora_adapter", json={"lora_name": "m", "lora_path": cases[kind]}).json()[
            "error"
        ]["message"]
        for kind in ("bad_alpha", "string_alpha", "huge_b", "huge_alpha", "no_lora_b", "rank_pattern")
    }
    assert all("Error:" not in m for m in messages.values()), messages  # no raw Python exception text
    assert "lora_alpha must be a finite number" in messages["string_alpha"]
    assert "overflows" in messages["huge_b"] and "overflows" in messages["huge_alpha"]
    assert "no lora_B tensor" in messages["no_lora_b"]
    assert "rank_pattern (rank 4)" in messages["rank_pattern"]
    deep = http.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": cases["deep_config"]})
    assert "nested too deeply" in deep.json()["error"]["message"]  # was a 500 (RecursionError)
    assert http.get("/health").json()["status"] == "ok"
    shutil.rmtree(outside)


def test_hot_reload_directory(http, server):
    hot = server.adapters_dir / "hot"
    make_adapter(hot, seed=41)

    def version():
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        return cards["hot"]["version"] if "hot" in cards else None

    assert wait_for(version, what="hot to appear") == "hot@v1"
    v1 = _text(http, "hot")
    # replace the directory atomically (save elsewhere, rename over): a new version, new outputs
    staging = server.adapters_dir / ".staging"
    make_adapter(staging, seed=42)
    shutil.rmtree(hot)
    os.rename(staging, hot)
    wait_for(lambda: version() == "hot@v2", what="hot@v2")
    r = http.post(
        "/v1/completions", json={"model": "hot", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    )
    assert r.headers[VERSION] == "hot@v2" and r.json()["system_fingerprint"] == "hot@v2"
    assert r.json()["choices"][0]["text"] != v1
    # overwrite the files in place
    make_adapter(hot, seed=41)
    wait_for(lambda: version() == "hot@v3", what="hot@v3")
    assert _text(http, "hot") == v1  # the v1 weights again
    # touching the files without changing them is no new version
    for f in hot.iterdir():
        os.utime(f)
    time.sleep(1.5)  # several polls
    assert version() == "hot@v3"
    # a broken adapter in the directory is reported and not served; the rest keeps serving
    bad_adapter(server.adapters_dir / "a1", server.adapters_dir / "hot_bad", "nan")
    wait_for(lambda: "hot_bad" in http.get("/health").json().get("adapter_errors", {}), what="hot_bad error")
    assert "hot_bad" not in _model_ids(http) and _text(http, "hot") == v1
    shutil.rmtree(server.adapters_dir / "hot_bad")
    shutil.copytree(server.adapters_dir / "a1", server.adapters_dir / ".fixed")
    os.rename(server.adapters_dir / ".fixed", server.adapters_dir / "hot_bad")
    wait_for(lambda: "hot_bad" in _model_ids(http), what="hot_bad fixed")
    assert _text(http, "hot_bad") == _text(http, "a1")
    # removing the directory stops serving it
    shutil.rmtree(hot)
    shutil.rmtree(server.adapters_dir / "hot_bad")
    wait_for(lambda: "hot" not in _model_ids(http) and "hot_bad" not in _model_ids(http), what="removal")
    r = http.post("/v1/completions", json={"model": "hot", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404


def test_running_request_finishes_on_its_version(http, server, pool):
    make_adapter(pool / "pin_a", seed=51)
    make_adapter(pool / "pin_b", seed=52)
    assert (
        http.post("/v1/load_lora_adapter", json={"lora_name": "pin", "lora_path": "pool/pin_a"}).status_code
        == 200
    )
    body = {"model": "pin", "prompt": PROMPTS[1], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers[VERSION] == "pin@v1"
        lines = r.iter_lines()
        for line in lines:  # wait for the first tokens, then reload underneath the running request
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                break
        swap = http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "pin", "lora_path": "pool/pin_b", "load_inplace": True},
        )
        assert swap.json()["version"] == "pin@v2"
        queue = [
            ln
            for ln in http.get("/metrics").text.splitlines()
            if ln.startswith("trainserve_engine_queue_length")
        ]
        assert float(queue[0].split()[-1]) >= 1  # the streamed request was still running during the reload
        new = http.post("/v1/completions", json={**body, "max_tokens": 8})
        assert new.headers[VERSION] == "pin@v2"
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert {c["system_fingerprint"] for c in chunks} == {"pin@v1"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert new.json()["choices"][0]["text"] != expected[: len(new.json()["choices"][0]["text"])]
    metrics = http.get("/metrics").text
    assert 'trainserve_adapter_swaps_total{kind="reload"}' in metrics
    http.post("/v1/unload_lora_adapter", json={"lora_name": "pin"})


def test_health_error_clears_when_the_good_content_returns(http, server):
    """A rejected update is listed in /health; putting the served content back clears it (same digest)."""
    flip = server.adapters_dir / "flip"
    make_adapter(flip, seed=51)
    good = server.adapters_dir.parent / "flip_good"
    shutil.copytree(flip, good, dirs_exist_ok=True)

    def errors():
        return http.get("/health").json().get("adapter_errors", {})

    bad = Path(bad_adapter(good, server.adapters_dir.parent / "flip_bad", "nan"))
    weights = "adapter_model.safetensors"
    assert wait_for(lambda: "flip" in _model_ids(http), what="flip to load")
    shutil.copyfile(bad / weights, flip / weights)  # in place: the name stays served meanwhile
    assert "NaN" in wait_for(lambda: errors().get("flip"), what="the rejection in /health")
    shutil.copyfile(good / weights, flip / weights)  # the served content again (same digest)
    wait_for(lambda: "flip" not in errors(), what="the error to clear")
    assert complete(http, "flip", max_tokens=2)["system_fingerprint"] == "flip@v1"  # still the first version
    for path in (flip, good, bad):
        shutil.rmtree(path)
    wait_for(lambda: "flip" not in _model_ids(http), what="flip to go")


def test_deeply_nested_config_in_the_directory_is_listed_in_health(http, server):
    """An adapter_config.json json.loads cannot take (RecursionError) is a rejected adapter in /health,
    not an aborted watcher pass that leaves it neither served nor reported."""
    deep = Path(bad_adapter(server.adapters_dir / "a1", server.adapters_dir.parent / "deep_tmp", "deep_config"))
    os.rename(deep, server.adapters_dir / "deep")
    message = wait_for(lambda: http.get("/health").json().get("adapter_errors", {}).get("deep"), what="the rejection")
    assert "nested too deeply" in message
    assert complete(http, "a1", max_tokens=2)["system_fingerprint"].startswith("a1@")
    shutil.rmtree(server.adapters_dir / "deep")
    wait_for(lambda: "deep" not in http.get("/health").json().get("adapter_errors", {}), what="the error to clear")
