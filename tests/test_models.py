"""Choosing the loading path and resolving model sources, with messages that say what to do."""
import pytest

from studio.models import load as models
from studio.config.run import RunConfig
from studio.models.load import DeviceInfo, ModelLoadError


def cuda(**kw):
    return DeviceInfo(kind="cuda", name="RTX 3070", total_gib=8.0, free_gib=7.5, bf16=True, **kw)


@pytest.mark.parametrize("device,backend,four_bit,model,expected", [
    (DeviceInfo(kind="cpu", name="cpu"), "auto", True, "Qwen/Qwen2.5-3B-Instruct", "full"),
    (DeviceInfo(kind="mps", name="Apple"), "auto", True, "Qwen/Qwen2.5-3B-Instruct", "full"),
    (cuda(unsloth=True, bitsandbytes=True), "auto", True, "Qwen/Qwen2.5-3B-Instruct", "unsloth"),
    (cuda(unsloth=False, bitsandbytes=True), "auto", True, "Qwen/Qwen2.5-3B-Instruct", "bnb"),
    (cuda(unsloth=True, bitsandbytes=True), "bnb", True, "Qwen/Qwen2.5-3B-Instruct", "bnb"),
    (cuda(unsloth=True, bitsandbytes=True), "auto", False, "Qwen/Qwen2.5-3B-Instruct", "full"),
    (cuda(unsloth=True, bitsandbytes=True), "auto", True, "bundled:smollm2-135m", "full"),
])
def test_backend_is_chosen_from_the_device_and_what_is_installed(device, backend, four_bit, model, expected):
    cfg = RunConfig().updated({"model.backend": backend, "model.load_in_4bit": four_bit, "model.name_or_path": model})
    assert models.choose_backend(cfg, device) == expected


def test_several_processes_never_take_unsloth(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = RunConfig().updated({"model.name_or_path": "Qwen/Qwen2.5-3B-Instruct"})
    assert models.choose_backend(cfg, cuda(unsloth=True, bitsandbytes=True)) == "bnb"


@pytest.mark.parametrize("backend,device,message", [
    ("unsloth", DeviceInfo(kind="cpu", name="cpu"), "needs a CUDA GPU"),
    ("unsloth", cuda(unsloth=False, bitsandbytes=True), "pip install unsloth"),
    ("bnb", cuda(unsloth=False, bitsandbytes=False), "pip install bitsandbytes"),
])
def test_impossible_backend_says_what_to_install(backend, device, message):
    cfg = RunConfig().updated({"model.backend": backend})
    with pytest.raises(ModelLoadError, match=message):
        models.choose_backend(cfg, device)


def test_model_sources_that_cannot_work_get_a_plain_reason(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve_source(str(tmp_path / "nothing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.resolve_source(str(tmp_path / "folder"))
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        models.resolve_source("not a model id at all")


def test_a_gguf_file_is_converted_once_into_a_trainable_checkpoint(tmp_path, monkeypatch):
    from studio.models import bundled

    monkeypatch.setenv("KTO_STUDIO_MODELS", str(tmp_path / "models"))
    src = models.resolve_source(str(bundled.gguf_path()))
    assert src.kind == "gguf"
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src.path)
    assert getattr(cfg, "quantization_config", None) is None  # a GGUF-loaded model refuses training; this one won't
    again = models.resolve_source(str(bundled.gguf_path()))
    assert again.path == src.path


def test_two_gpus_are_detected_and_the_model_tab_explains_accelerate(monkeypatch):
    import types

    import torch

    from studio.ui.model_tab import device_markdown

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="RTX 3090", major=8, minor=6, total_memory=24 * 2**30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (20 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    d = models.detect_device()
    assert (d.kind, d.count, d.compute_capability, d.total_gib) == ("cuda", 2, "8.6", 24.0)
    text = device_markdown(d)
    assert "accelerate launch -m studio train" in text and "Unsloth trains on one GPU" in text


def test_gemma_switches_unsloths_compiler_off_before_unsloth_loads_and_nothing_else_does(tmp_path):
    env: dict = {}
    note = models.unsloth_compile_switch("gemma", unsloth_loaded=False, env=env)
    assert env == {"UNSLOTH_COMPILE_DISABLE": "1"} and "compiler switched off" in note
    assert models.unsloth_compile_switch("gemma", unsloth_loaded=True, env=env) is None  # already off: fine
    other: dict = {}
    for model_type in ("mistral", "llama", "qwen2", None):
        assert models.unsloth_compile_switch(model_type, unsloth_loaded=False, env=other) is None
    assert other == {}
    (tmp_path / "config.json").write_text('{"model_type": "gemma"}')
    assert models._model_type(str(tmp_path)) == "gemma"
    assert models._model_type(str(tmp_path / "absent")) is None


def test_gemma_after_unsloth_loaded_with_its_compiler_on_is_refused_with_the_ways_out():
    with pytest.raises(ModelLoadError, match="Restart the studio") as e:
        models.unsloth_compile_switch("gemma", unsloth_loaded=True, env={})
    assert "UNSLOTH_COMPILE_DISABLE=1 python app.py" in str(e.value) and "model.backend: bnb" in str(e.value)
