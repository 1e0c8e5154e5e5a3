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
    """The process count comes from the run plan (plan.world_size reads WORLD_SIZE once), not from the env here."""
    from studio.training import plan as planner

    cfg = RunConfig().updated({"model.name_or_path": "Qwen/Qwen2.5-3B-Instruct"})
    device = cuda(unsloth=True, bitsandbytes=True)
    assert models.choose_backend(cfg, device, world=2) == "bnb"
    assert models.choose_backend(cfg, device) == "unsloth"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert models.choose_backend(cfg, device) == "unsloth"  # the loader never reads the env itself
    p = planner.plan_run(cfg, device, fetch=False)
    assert p.world == 2 and p.backend == "bnb"


def test_only_the_run_plan_reads_world_size():
    import ast
    from pathlib import Path

    studio = Path(models.__file__).resolve().parents[1]
    readers = sorted(f.relative_to(studio).as_posix() for f in studio.rglob("*.py")
                     if any(isinstance(n, ast.Constant) and n.value == "WORLD_SIZE"
                            for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))))
    assert readers == ["training/plan.py"]


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


# ---- the bitsandbytes path: NF4 base, nothing upcast (issue 27) ------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma"])
def test_the_bitsandbytes_path_keeps_embeddings_head_and_norms_16bit_and_trains_only_the_lora(tmp_path, model_type):
    """Real bitsandbytes NF4 (its CPU backend) through the studio's own loading function for that path. PEFT's
    prepare_model_for_kbit_training upcast embeddings, head and norms to float32 (4+ GB on a 128k-152k vocabulary),
    which put 7-8B models over an 8 GB card. choose_backend sends only CUDA runs this way, so the loader is called
    directly with a CPU device."""
    import torch
    from bench.random_models import ARCHS, make_model_dir

    spec = dict(ARCHS["tiny-llama"], model_type=model_type, tie_word_embeddings=model_type == "gemma")
    path = make_model_dir(f"tiny-{model_type}", root=str(tmp_path), device="cpu", spec=spec)
    cfg = RunConfig().updated({"model.name_or_path": path, "model.backend": "bnb", "lora.r": 8, "lora.lora_alpha": 16,
                               "train.gradient_checkpointing": True})
    frozen = getattr(torch, models.frozen_dtype_name("bnb", "bfloat16"))
    assert frozen == torch.bfloat16
    model, _ = models.load_transformers(cfg, path, torch.bfloat16, "bnb", DeviceInfo(kind="cpu", name="cpu"), frozen)

    params = dict(model.named_parameters())
    four_bit = [n for n, p in params.items() if type(p).__name__ == "Params4bit"]
    assert len(four_bit) == 2 * 7  # every projection of both layers is NF4
    unquantized = {n: p.dtype for n, p in params.items() if type(p).__name__ != "Params4bit" and "lora_" not in n}
    assert any("embed_tokens" in n for n in unquantized) and sum("norm" in n for n in unquantized) == 2 * 2 + 1
    assert model_type == "gemma" or any("lm_head" in n for n in unquantized)
    assert set(unquantized.values()) == {torch.bfloat16}, unquantized  # no float32 upcast
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(four_bit)
    assert model.base_model.model.is_gradient_checkpointing

    # two optimizer steps through the checkpointed layers: B gets gradients first (A's are zero while B is zero)
    model.train()
    ids = torch.randint(5, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([params[n] for n in sorted(trainable)], lr=1e-2)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads.append({n: params[n].grad is not None and params[n].grad.abs().sum().item() > 0 for n in trainable})
        opt.step()
    assert all(v for n, v in grads[0].items() if ".lora_B." in n)
    assert all(grads[1].values())
    assert set(unquantized.values()) == {p.dtype for n, p in model.named_parameters() if n in unquantized}


def test_a_cpu_without_native_bf16_can_be_asked_for_on_any_cpu(monkeypatch):
    """KTO_STUDIO_CPU_BF16=0 (bench/first_run_flow.py --float32): plan, estimate and train as on a desktop CPU
    without AVX-512 BF16/AMX, whatever this host has; the duration then uses the float32 constant."""
    import torch

    from studio.config.run import RunConfig
    from studio.models import load as models
    from studio.training import duration

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # a host with AMX
    assert models.cpu_bf16()
    monkeypatch.setenv("KTO_STUDIO_CPU_BF16", "0")
    assert not models.cpu_bf16()
    cpu = models.DeviceInfo(kind="cpu", name="cpu", bf16=models.cpu_bf16())
    assert not models.cpu_autocast(RunConfig(), cpu)
    assert duration.seconds_per_token_gparam(RunConfig(), cpu) == duration.SECONDS_PER_TOKEN_GPARAM
