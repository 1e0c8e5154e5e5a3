"""Issue 27, item 3: GGUF a hobbyist can run. Quantized types (q8_0, a 4-bit type) and the LoRA alone as a llama.cpp
adapter with an Ollama Modelfile, each written from the bundled model's trained run and read back here with the
``gguf`` reader and transformers, independently of the export's own checks. The sizes of a Llama-3.1-8B export are
computed from its real shapes (no weights needed)."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from studio.tuned import export, gguf_quant, gguf_writer, ollama


@pytest.fixture(scope="module")
def merged_model(run_dir, bundled_model_dir):
    """The run's adapter merged by PEFT itself (float32 base): what every GGUF tensor is compared with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    deltas = {n: m.get_delta_weight("default").detach().clone() for n, m in peft_model.named_modules()
              if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}
    return peft_model.merge_and_unload().eval(), deltas


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _values(t) -> torch.Tensor:
    from gguf import quants

    return torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(x) for x in reversed(t.shape)]))


def _rel(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantized_gguf_of_the_bundled_model_loads_back(gguf_type, run_dir, merged_model, bundled_model_dir,
                                                        tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(gguf_quant, "llama_tool", lambda name: None)  # as on a machine without llama.cpp
    size = export.estimate(run_dir, "gguf", gguf_type)
    result = export.export_gguf(run_dir, tmp_path / "out", gguf_type=gguf_type)
    written = "q8_0" if gguf_type == "q8_0" else "q4_0"
    path = tmp_path / "out" / f"tiny-{written.upper()}.gguf"
    assert result.path == str(path) and result.checks["gguf_type"] == written
    if gguf_type == "q4_k_m":
        assert "llama-quantize was not found" in result.checks["note"] and "q4_0" in size["text"]
    # the size shown before writing is the tensor data written (the rest is the tokenizer: vocabulary, merges)
    assert size["bytes"] <= path.stat().st_size <= size["bytes"] + 3_000_000
    f16 = sum(2 * p.numel() for p in merged_model[0].parameters())
    assert path.stat().st_size < (0.6 if written == "q8_0" else 0.4) * f16

    tensors = _tensors(path)
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    assert {k for n, k in kinds.items() if n.endswith("norm.weight")} == {"F32"}  # as llama.cpp keeps them
    if written == "q8_0":
        assert {k for n, k in kinds.items() if not n.endswith("norm.weight")} == {"Q8_0"}
    else:
        assert kinds["token_embd.weight"] == "Q8_0"  # tied: it is the output matrix too
        assert kinds["blk.0.ffn_down.weight"] == kinds["blk.29.attn_v.weight"] == "Q5_0"  # layers with more bits
        assert kinds["blk.3.ffn_down.weight"] == kinds["blk.0.ffn_up.weight"] == "Q4_0"
    merged = dict(merged_model[0].named_parameters())
    for gg, hf in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                   ("blk.12.ffn_up.weight", "model.layers.12.mlp.up_proj.weight"),
                   ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                   ("blk.5.attn_norm.weight", "model.layers.5.input_layernorm.weight")):
        err = _rel(_values(tensors[gg]), merged[hf].detach())
        assert err <= gguf_quant.TOLERANCE[kinds[gg]], (gg, err)
        assert err > 0 or kinds[gg] == "F32"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    chat = [{"role": "user", "content": "Name three planets and say which is largest."},
            {"role": "assistant", "content": "Mercury, Venus and Jupiter; Jupiter is by far the largest planet."}]
    ids = torch.tensor([tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
    with torch.inference_mode():
        got, want = loaded(input_ids=ids).logits, merged_model[0](input_ids=ids).logits
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree >= (0.9 if written == "q8_0" else 0.6), agree
    assert result.checks["vs_adapter_model"]["ok"]


def test_gguf_adapter_is_the_peft_update_in_llama_cpps_layout(run_dir, merged_model, tmp_path):
    from gguf import GGUFReader

    from studio.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run_dir), "--format", "gguf-adapter", "--out", str(tmp_path / "lora")]) == 0
    printed = json.loads(buf.getvalue())
    path = tmp_path / "lora" / "tiny-lora-F16.gguf"
    assert printed["path"] == str(path)
    fields = GGUFReader(str(path)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.lora.alpha"].contents() == 8.0  # the run's lora_alpha (r 4): llama.cpp scales alpha / r
    tensors = _tensors(path)
    deltas = merged_model[1]
    assert len(tensors) == 2 * len(deltas) == 2 * 7 * 30
    for module, gg in (("model.layers.3.mlp.down_proj", "blk.3.ffn_down.weight"),
                       ("model.layers.7.self_attn.v_proj", "blk.7.attn_v.weight"),
                       ("model.layers.7.self_attn.k_proj", "blk.7.attn_k.weight")):
        a, b = _values(tensors[gg + ".lora_a"]), _values(tensors[gg + ".lora_b"])
        assert a.shape[0] == b.shape[1] == 4  # rank
        update = (8.0 / 4) * (b @ a)
        want = deltas["base_model.model." + module]
        if "k_proj" in module:  # rows in llama.cpp's rotary order, as in the model file
            want = gguf_writer._permute_for_llama_cpp(want, 3)
        assert _rel(update, want) < 2e-3, module
    assert path.stat().st_size < 10_000_000
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert "FROM smollm2:135m" in modelfile and "ADAPTER ./tiny-lora-F16.gguf" in modelfile
    assert printed["checks"]["worst_update_relative_rms_error"] < 2e-3


def _llama_8b():
    """Names and shapes of Llama-3.1-8B's tensors (its config), no weights."""
    from bench.export_models import lora_shapes
    from bench.random_models import ARCHS

    spec = ARCHS["llama3.1-8b"]
    shapes = {"model.embed_tokens.weight": (spec["vocab_size"], spec["hidden_size"]),
              "lm_head.weight": (spec["vocab_size"], spec["hidden_size"]), "model.norm.weight": (spec["hidden_size"],)}
    for i in range(spec["num_hidden_layers"]):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (spec["hidden_size"],)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (spec["hidden_size"],)
    shapes.update({k + ".weight": v for k, v in lora_shapes(spec).items()})

    class Shapes:
        def names(self):
            return list(shapes)

        def shape(self, name):
            return shapes[name]

    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in spec.items() if k != "model_type"})
    return Shapes(), config, spec


def test_a_4bit_gguf_of_llama_3_1_8b_fits_5_gb_and_its_adapter_200_mb():
    from bench.export_models import lora_shapes

    shapes, config, spec = _llama_8b()
    n = sum(int(np.prod(shapes.shape(k))) for k in shapes.names())
    assert 8.0e9 < n < 8.1e9
    sizes = {}
    for t in ("f16", "q8_0", "q4_0", "q4_k_m"):
        lay, planned = gguf_writer.plan(shapes, config, t)
        sizes[t] = gguf_writer.planned_bytes(planned, t, lay.n_layer)
    assert 15.9e9 < sizes["f16"] < 16.2e9 and 8.4e9 < sizes["q8_0"] < 8.7e9
    assert sizes["q4_0"] <= 5.0e9 and sizes["q4_k_m"] <= 5.0e9, sizes
    rank16 = sum(16 * (o + i) for o, i in lora_shapes(spec).values())
    assert 2 * rank16 <= 200e6  # f16 lora_a + lora_b


def test_quantizing_on_worker_processes_gives_the_same_bytes(tmp_path):
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    items = [(Q.Q8_0, rng.standard_normal((300, 256), dtype=np.float32)), (Q.F32, np.ones(7, np.float32)),
             (Q.Q4_0, rng.standard_normal((2, 9, 64), dtype=np.float32)), (Q.F16, np.ones((3, 5), np.float16))]
    serial = list(gguf_quant.quantized_stream(iter(items), workers=1))
    parallel = list(gguf_quant.quantized_stream(iter(items), workers=2, total_elements=1 << 30))
    assert len(serial) == len(parallel) == 4
    for s, p in zip(serial, parallel):
        assert s.dtype == p.dtype and s.shape == p.shape and np.array_equal(s, p)
    assert serial[0].shape == (300, 272) and serial[2].shape == (2, 9, 36)


def test_an_adapters_modelfile_starts_from_the_ollama_library_model_or_says_what_to_put_there(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"
    for name in ("Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"):
        text = ollama.adapter_modelfile("a.gguf", name, template)
        assert "FROM qwen2.5:7b-instruct-q4_K_M" in text and "ADAPTER ./a.gguf" in text
        assert "TEMPLATE" not in text  # the library model brings its own
    text = ollama.adapter_modelfile("a.gguf", str(tmp_path), template)
    assert "FROM ./base-model.gguf" in text and "no Ollama library name" in text and "convert_hf_to_gguf" in text
    assert "TEMPLATE" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "FROM /models/base.gguf" in ollama.adapter_modelfile("a.gguf", str(tmp_path), None, "/models/base.gguf")


def test_cli_prints_the_size_without_writing(run_dir, tmp_path):
    from studio.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run_dir), "--format", "gguf", "--gguf-type", "q8_0", "--estimate"]) == 0
    printed = json.loads(buf.getvalue())
    assert printed["format"] == "gguf" and 100e6 < printed["bytes"] < 200e6 and "q8_0" in printed["text"]


@pytest.mark.skipif(gguf_quant.llama_tool("llama-completion") is None, reason="llama.cpp is not installed")
def test_llama_cpp_runs_the_q4_k_m_file_and_the_adapter(run_dir, tmp_path):
    r = export.export_gguf(run_dir, tmp_path / "q4", gguf_type="q4_k_m")
    assert r.checks["gguf_type"] == "q4_k_m" and r.checks["llama_cpp"] == "loads and generates"
    assert {"Q4_K", "Q6_K"} <= set(r.checks["tensor_types"])
    a = export.export_gguf_adapter(run_dir, tmp_path / "lora")
    assert a.checks["llama_cpp"] == "loads and generates"


def test_llama_cpps_rotary_order_is_undone_exactly():
    w = torch.arange(6 * 16 * 5, dtype=torch.float32).reshape(6 * 16, 5)
    for heads in (1, 3, 6):
        p = gguf_writer._permute_for_llama_cpp(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(gguf_writer._unpermute_from_llama_cpp(p, heads), w)


def test_a_4bit_gguf_of_a_random_weight_model_is_held_to_its_own_rounding_floor(tmp_path, tiny_model_dir):
    """A random-weight model's logits are almost flat, so 4-bit rounding changes its top token at most positions
    (the GPU check failed Llama and Mistral for that). The export compares the file with the model holding exactly
    the file's rounded weights: transformers' reading of the file must give that model's logits, and the trained
    model's may be off by what that rounding moves them, not by a fixed share of a scale."""
    from studio.training.engine import Engine

    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 2,
                                        "train.save_steps": 2})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(300)
    assert job.state == "finished", job.error
    result = export.export_gguf(cfg.output_dir, tmp_path / "out", gguf_type="q4_0")
    vs = result.checks["vs_adapter_model"]
    assert vs["ok"] and "rounding_floor_diff" in vs
    read = vs["vs_file_weights"]  # the file as transformers reads it = the model with the file's weights
    assert read["ok"] and read["max_abs_logit_diff"] < 1e-3 * max(vs["max_abs_logit"], 1.0)


def test_a_file_in_the_wrong_rotary_order_fails_the_check_even_with_its_floor(run_dir, tmp_path, monkeypatch):
    """Q and K rows written in HF's order instead of llama.cpp's (and read back the same way) keep every tensor
    check consistent and the floor exact, but llama.cpp and transformers read the rotary pairs wrongly: the logits
    of the file as read must then be far from the floor's, and the export refuses it."""
    monkeypatch.setattr(gguf_writer.Layout, "permute", lambda self, name, t: t)
    monkeypatch.setattr(gguf_writer.Layout, "unpermute", lambda self, name, t: t)
    with pytest.raises(export.ExportError, match="does not reproduce"):
        export.export_gguf(run_dir, tmp_path / "out", gguf_type="q8_0")
