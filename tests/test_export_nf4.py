"""Issue 27, item 2: a merged export from a base stored in bitsandbytes NF4 (the ``unsloth/*-bnb-4bit`` repos the
Model tab offers for 8 GB cards) is the model the user trained: the 4-bit kernel's own dequantized matrices plus the
LoRA update, added in float32 and rounded once to bf16; and it passes the export's own check against that model.

Tiny real-architecture models (Llama, Mistral, Qwen2) with random weights, NF4 with and without double
quantization, made on the CPU (bitsandbytes quantizes there too), and a random non-zero LoRA adapter.
"""
from __future__ import annotations

import pytest
import torch

from bench.export_models import base_model, quantize_nf4, random_lora_run
from studio.tuned import export, merge, reference

CASES = [("llama", False, False), ("llama", True, False), ("mistral", False, False), ("mistral", True, False),
         ("qwen2", False, False), ("qwen2", True, True)]  # (architecture, double quant, rsLoRA scaling)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4-models")

    def get(arch: str, double_quant: bool) -> str:
        return quantize_nf4(base_model(arch, str(root)), str(root / f"{arch}-nf4-dq{int(double_quant)}"),
                            double_quant)
    return get


def _kernel_matrices(path):
    """Each 4-bit layer's matrix as transformers' own loader and bitsandbytes' dequantize give it."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name + ".weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}, model


@pytest.mark.parametrize("arch,double_quant,rslora", CASES)
def test_merged_export_from_an_nf4_base_is_the_kernels_matrices_plus_the_update(arch, double_quant, rslora,
                                                                                 models, tmp_path):
    from safetensors import safe_open

    base = models(arch, double_quant)
    run = random_lora_run(base, tmp_path / "run", std=0.05, use_rslora=rslora)
    result = export.export_merged(run, tmp_path / "merged")
    assert result.checks["base_stored_in_4bit"] and result.checks["dtype"] == "bfloat16"
    assert result.checks["vs_adapter_model"]["ok"], result.checks
    # the floor: the trained model merged by PEFT and rounded to bf16 once, as the saved merge must be
    floor = result.checks["vs_adapter_model"]["rounding_floor_diff"]
    assert 0 < floor <= result.checks["vs_adapter_model"]["tolerance"] / reference.FLOOR_FACTOR + 1e-9

    matrices, _ = _kernel_matrices(base)
    lora = merge.read_lora(run / "adapter")
    assert set(lora.pairs) == set(matrices)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        for name, w in matrices.items():
            a, b, scale = lora.pairs[name]
            assert scale == pytest.approx(16 / (8 ** 0.5 if rslora else 8))
            exact = w + scale * (b.float() @ a.float())
            # added in float32 and rounded once: bit for bit, not merged into already-rounded 16-bit weights
            assert torch.equal(f.get_tensor(name), exact.to(torch.bfloat16)), name


def test_the_kernel_computes_with_the_dequantized_matrix(models):
    """What the merge adds the update to is what bitsandbytes' 4-bit layer multiplies with (up to its bf16
    arithmetic), not the weights before quantization."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = models("llama", True)
    matrices, model = _kernel_matrices(base)
    original = AutoModelForCausalLM.from_pretrained(base.replace("-nf4-dq1", ""), dtype=torch.float32)
    layer = "model.layers.1.mlp.down_proj"
    kernel = model.get_submodule(layer)
    assert isinstance(kernel, bnb.nn.Linear4bit)
    x = torch.randn(3, 5, kernel.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = kernel(x)
    dequantized = x @ matrices[layer + ".weight"].T
    before_quantization = x @ original.get_submodule(layer).weight.float().T
    assert (y - dequantized).abs().max() < 0.2 * (y - before_quantization).abs().max()


def test_the_check_fails_a_merged_model_without_the_update(models, tmp_path, monkeypatch):
    """The check is not vacuous: a merged model that lost the adapter (as a merge into rounded 16-bit weights
    loses small updates) is refused, and says how far it is."""
    run = random_lora_run(models("llama", True), tmp_path / "run", std=0.05)
    monkeypatch.setattr(merge.LoraWeights, "delta", lambda self, name: torch.zeros(()))
    with pytest.raises(export.ExportError, match="differ from the trained model"):
        export.export_merged(run, tmp_path / "merged")


def test_a_4bit_base_dequantizes_on_a_machine_without_a_gpu(models):
    from studio.models.full_precision import BaseWeights, merged_dtype

    weights = BaseWeights(models("qwen2", True))
    assert weights.device == ("cuda" if torch.cuda.is_available() else "cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in weights.quantized and weights.shape(name) == (128, 128)
    assert weights.get(name).dtype == torch.float32
    assert not any(k.endswith(("absmax", "quant_map")) or "quant_state" in k for k in weights.names())
    assert merged_dtype(models("qwen2", True)) == torch.bfloat16


def test_reading_a_merged_tensor_twice_gives_the_same_values(models, tmp_path):
    """safetensors hands out views of one memory map: adding the update in place once changed what every later
    read of that tensor returned (the GGUF check then saw base + 2 updates)."""
    from studio.models.full_precision import BaseWeights

    base = models("llama", True).replace("-nf4-dq1", "")  # the 16-bit checkpoint the NF4 one was made from
    run = random_lora_run(base, tmp_path / "run", std=0.05)
    merged = merge.MergedWeights(BaseWeights(base), merge.read_lora(run / "adapter"))
    name = "model.layers.0.self_attn.o_proj.weight"
    first, second = merged.get(name), merged.get(name)
    assert torch.equal(first, second) and not torch.equal(first, merged.base.get(name))


def test_the_tolerance_follows_the_rounding_floor_not_only_the_logits_scale():
    """A deep 4-bit-stored base (28 layers of random weights on the GPU: max diff 0.224 at logits up to 7.0, top-1
    92%) moves more under bf16 rounding than 2% of the logits' scale; the check then allows twice the measured
    floor, and still refuses a result far beyond it."""
    torch.manual_seed(0)
    want = torch.randn(1, 50, 64) * 3
    noise = torch.randn_like(want)
    floor = want + 0.1 * noise / noise.abs().max()  # what rounding alone does: 0.1
    exported = want + 0.15 * torch.randn_like(want).clamp(-1, 1)  # an exact merge: about the floor
    assert not reference.compare(exported, want, "16-bit")["ok"] or want.abs().max() * 0.02 >= 0.15
    judged = reference.compare(exported, want, "16-bit", floor)
    assert judged["ok"] and judged["rounding_floor_diff"] == pytest.approx(0.1, rel=1e-4)
    wrong = want + 0.5 * torch.randn_like(want).clamp(-1, 1)  # five times the floor
    assert not reference.compare(wrong, want, "16-bit", floor)["ok"]
