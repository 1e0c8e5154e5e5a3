"""Getting a model: download progress and resuming, gated models, the token, the cache and deleting from it.

No hub is reachable here, so huggingface_hub's network calls are replaced by stand-ins that write into a
temporary cache laid out as huggingface_hub lays it out."""
from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from studio.models import hub, repo_size
from studio.config.run import RunConfig


def fake_snapshot(root: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A cache entry the way huggingface_hub writes one: blobs, a snapshot of symlinks, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(data)
        (snap / name).symlink_to(blob)
    return snap


def test_the_cache_lists_each_model_with_its_size_and_deletes_one(tmp_path):
    cache, converted = tmp_path / "hub", tmp_path / "converted"
    fake_snapshot(cache, "org/big", {"config.json": b"{}", "model.safetensors": b"x" * 5000})
    fake_snapshot(cache, "org/small", {"config.json": b"{}", "model.safetensors": b"x" * 100}, commit="b" * 40)
    (converted / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (converted / "SmolLM2-135M-Instruct" / "model.safetensors").write_bytes(b"y" * 300)

    listed = hub.cached_models(cache, converted)
    assert [(m.name, m.kind) for m in listed] == [("org/big", "hub"), ("SmolLM2-135M-Instruct", "converted"),
                                                 ("org/small", "hub")]
    assert listed[0].size_bytes >= 5000
    assert "3 model(s)" in hub.describe_cache(listed, cache)

    freed = hub.delete_cached("org/big", cache, converted)
    assert freed >= 5000
    assert [m.name for m in hub.cached_models(cache, converted)] == ["SmolLM2-135M-Instruct", "org/small"]
    assert not (cache / "models--org--big").exists()
    with pytest.raises(hub.HubError, match="not in the model cache"):
        hub.delete_cached("org/big", cache, converted)


def test_an_interrupted_download_shows_as_partial_with_the_bytes_it_has(tmp_path):
    cache = tmp_path / "hub"
    blobs = cache / "models--org--half" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc.incomplete").write_bytes(b"z" * 1234)
    [m] = hub.cached_models(cache, tmp_path / "none")
    assert (m.name, m.kind, m.size_bytes) == ("org/half", "partial", 1234)


def test_download_reports_byte_progress_until_done(tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    files = {"config.json": b"{}" * 10, "model.safetensors": b"w" * 4000}

    class Info:
        def __init__(self, size):
            self.file_size = size

    def fake(repo_id, *, local_files_only=False, dry_run=False, cache_dir=None, token=None, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        if dry_run:
            return [Info(len(b)) for b in files.values()]
        import time

        time.sleep(0.3)  # long enough for a progress poll mid-download
        return str(fake_snapshot(Path(cache_dir), repo_id, files))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    seen = []
    path = hub.download("org/model", progress=lambda done, total, msg: seen.append((done, total, msg)),
                        root=cache, poll_s=0.05)
    assert Path(path, "model.safetensors").read_bytes() == files["model.safetensors"]
    total = sum(len(b) for b in files.values())
    assert seen[-1] == (total, total, "Downloaded org/model")
    assert all(t == total and 0 <= d <= total for d, t, _ in seen)
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


def test_a_gated_model_explains_the_licence_step_the_token_and_the_unsloth_copy(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, *, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        response = httpx.Response(403, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise GatedRepoError("Access to model is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(hub.HubError) as err:
        hub.download("meta-llama/Llama-3.1-8B-Instruct", root=tmp_path)
    msg = str(err.value)
    assert "gated" in msg and "accept the licence" in msg and "https://huggingface.co/meta-llama/Llama-3.1-8B" in msg
    assert "token" in msg and "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit" in msg


def test_offline_download_says_the_hub_cannot_be_reached(tmp_path):
    with pytest.raises(hub.HubError, match="cannot be reached"):
        hub.download("org/never-downloaded", root=tmp_path)  # HF_HUB_OFFLINE=1 in tests


def test_the_token_goes_to_huggingface_hubs_login_and_nowhere_else(monkeypatch, caplog, tmp_path):
    import huggingface_hub

    secret = "hf_" + "S3cretT0ken" * 3
    calls = []
    monkeypatch.setattr(huggingface_hub, "login", lambda **kw: calls.append(kw))
    caplog.set_level(logging.DEBUG)
    status = hub.login(f"  {secret}\n")
    assert calls == [dict(token=secret, add_to_git_credential=False, skip_if_logged_in=False)]
    assert secret not in status and secret not in caplog.text
    cfg = RunConfig()
    assert secret not in cfg.to_yaml()


def test_a_rejected_or_malformed_token_is_not_repeated_in_the_message(monkeypatch):
    import huggingface_hub

    secret = "hf_" + "Wr0ng" * 6

    def refuse(**kw):
        raise ValueError(f"Invalid token passed: {kw['token']}")

    monkeypatch.setattr(huggingface_hub, "login", refuse)
    with pytest.raises(hub.HubError) as err:
        hub.login(secret)
    assert secret not in str(err.value) and "did not accept" in str(err.value)
    with pytest.raises(hub.HubError, match="start with 'hf_'"):
        hub.login("password123")
    with pytest.raises(hub.HubError, match="paste"):
        hub.login("   ")


# ---- how much a download fetches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("full, four_bit, gb16, gb4", [
    # the repos' published sizes: 16-bit safetensors, and Unsloth's pre-quantized bitsandbytes NF4 copies
    ("Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit", 15.23, 5.55),
    ("meta-llama/Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", 16.06, 5.70),
    ("mistralai/Mistral-7B-Instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit", 14.50, 4.14),
    ("google/gemma-7b-it", "unsloth/gemma-7b-it-bnb-4bit", 17.08, 5.57),
])
def test_the_download_size_is_the_size_of_the_repo_named_16bit_or_4bit(full, four_bit, gb16, gb4):
    sixteen, four = repo_size.download_size(full), repo_size.download_size(four_bit)
    assert not sixteen.four_bit and four.four_bit
    assert sixteen.gb == pytest.approx(gb16, rel=0.02) and four.gb == pytest.approx(gb4, rel=0.02)
    assert f"about {four.gb:.1f} GB to download (`{four_bit}`, stored in 4 bits)" == four.describe()


def test_a_cached_repos_size_follows_its_configs_storage_form_and_unknown_or_local_models_have_none(
        tmp_path, monkeypatch):
    import json

    from huggingface_hub import constants

    from studio.config import presets

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    spec = dict(presets.get("models", "mistral-7b-instruct-v0.3").get("config"))
    fake_snapshot(tmp_path, "someone/Plain-7B", {"config.json": json.dumps(spec).encode()})
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    fake_snapshot(tmp_path, "someone/Plain-7B-bnb-4bit",
                  {"config.json": json.dumps({**spec, "quantization_config": quant}).encode()})
    fake_snapshot(tmp_path, "someone/Plain-7B-fp32",
                  {"config.json": json.dumps({**spec, "torch_dtype": "float32"}).encode()})
    plain = repo_size.download_size("someone/Plain-7B")
    assert plain.gb == pytest.approx(repo_size.download_size("mistralai/Mistral-7B-Instruct-v0.3").gb)
    assert repo_size.download_size("someone/Plain-7B-bnb-4bit").four_bit
    assert repo_size.download_size("someone/Plain-7B-bnb-4bit").gb < plain.gb / 3
    assert repo_size.download_size("someone/Plain-7B-fp32").gb == pytest.approx(2 * plain.gb)
    assert repo_size.download_size("someone/never-downloaded") is None
    assert repo_size.download_size("bundled:smollm2-135m") is None and repo_size.download_size(str(tmp_path)) is None


# ---- offline known once (issue 30, item 1) ---------------------------------------------------------------------------

def test_offline_is_probed_once_and_then_lookups_answer_from_the_cache(monkeypatch):
    """One failed probe decides "offline" for the process: later lookups neither probe again nor reach for the hub
    (a stubbed hub call that would retry is never made), and they fail at once with what to do."""
    import transformers
    from huggingface_hub import constants

    from studio.data.inspect import _tokenizers, load_tokenizer
    from studio.data.normalize import DataError
    from studio.models.arch import EstimateError, model_config

    probes, hub_calls = [], []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests run with HF_HUB_OFFLINE=1: the probe decides
    monkeypatch.setattr(hub, "_offline", None)
    monkeypatch.setattr(hub, "_probe", lambda timeout: probes.append(timeout) or False)

    def from_pretrained(name, **kw):
        if not kw.get("local_files_only"):
            hub_calls.append(name)  # the real one retries the hub for up to a minute here
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: hub_calls.append(a) or "")
    _tokenizers.pop("mistralai/Mistral-7B-Instruct-v0.3", None)
    assert hub.offline() and hub.offline()
    assert probes == [hub.PROBE_TIMEOUT_S] and probes[0] <= 5
    assert constants.HF_HUB_OFFLINE  # huggingface_hub itself answers from the cache from now on
    with pytest.raises(DataError, match="not in the local cache and the hub cannot be reached"):
        load_tokenizer("mistralai/Mistral-7B-Instruct-v0.3")
    with pytest.raises(EstimateError, match="not downloaded yet"):
        model_config("someorg/uncached-model", fetch=True)
    with pytest.raises(hub.HubError, match="hub cannot be reached"):
        hub.download("someorg/uncached-model", root=Path("/nonexistent-cache"))
    assert hub_calls == [] and len(probes) == 1


def test_hf_hub_offline_decides_without_a_probe(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "_offline", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_probe", lambda timeout: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.offline()
