"""A user exports a trained run: the adapter folder, a merged model, and a GGUF file for llama.cpp / Ollama.

Every export is loaded back here independently of the export's own checks.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from studio.tuned import export, gguf_writer

PROBE = [{"role": "user", "content": "Name a planet close to the Sun."}]


@pytest.fixture(scope="module")
def adapter_model(run_dir, bundled_model_dir):
    """The run's adapter on the base model, loaded the plain PEFT way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    return torch.tensor([tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]])


@pytest.fixture(scope="module")
def gguf_export(run_dir, tmp_path_factory):
    """``python -m studio export RUN --format gguf --out DIR``, run once for the GGUF tests."""
    from studio.cli import main

    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run_dir), "--format", "gguf", "--gguf-type", "f16", "--out", str(out)]) == 0
    return out, json.loads(buf.getvalue())


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_adapter_export_is_the_runs_adapter_without_training_files(run_dir, tmp_path):
    out = tmp_path / "adapter-out"
    result = export.export_adapter(run_dir, out)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "export.json"} <= names
    assert not names & {"ref", "training_args.bin", "optimizer.pt"}, "training-only files must stay behind"
    assert (out / "adapter_model.safetensors").read_bytes() == (run_dir / "adapter" / "adapter_model.safetensors"
                                                                ).read_bytes()
    assert result.checks["loads_with_peft"] and result.checks["max_logit_diff_vs_run_adapter"] == 0.0
    assert result.checks["max_logit_change_vs_base"] > 0.05
    # the exported adapter names a base model another machine can load, not this machine's converted copy
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "hub id" in result.checks["base_model"]


def test_an_exported_adapter_names_the_hub_id_or_says_its_base_is_local(tmp_path):
    from studio.config.run import RunConfig

    for name, expected in (("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct"),
                           (str(tmp_path), str(tmp_path / "snapshot"))):
        folder = tmp_path / "out"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path":
                                                                str(tmp_path / "snapshot"), "r": 4}))
        note = export.portable_base_model(folder, RunConfig().updated({"model.name_or_path": name}))
        data = json.loads((folder / "adapter_config.json").read_text())
        assert data["base_model_name_or_path"] == expected and data["r"] == 4
        assert ("hub id" in note) == (name.count("/") == 1 and not name.startswith("/"))
    assert "a local model, not from the hub" in note and "set base_model_name_or_path" in note


def test_merged_export_gives_the_adapter_models_logits(run_dir, tmp_path, adapter_model, probe_ids):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = export.export_merged(run_dir, out)
    assert result.checks["vs_adapter_model"]["ok"]

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the bundled base is stored in float32: merged in float32, not 4-bit
    assert getattr(merged.config, "quantization_config", None) is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k], "the adapter must be merged in, not carried along"
    diff = (_logits(merged, probe_ids) - _logits(adapter_model, probe_ids)).abs().max().item()
    assert diff < 1e-3


def test_headless_gguf_export_loads_with_transformers_gguf_reader(gguf_export, adapter_model, tokenizer,
                                                                  probe_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, printed = gguf_export
    gguf_file = out / "tiny-F16.gguf"
    assert printed["path"] == str(gguf_file) and gguf_file.is_file()
    assert printed["checks"]["vs_adapter_model"]["ok"] and printed["checks"]["tokenizer_same_ids"]

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    want, got = _logits(adapter_model, probe_ids), _logits(loaded, probe_ids)
    assert (got - want).abs().max().item() < 0.25  # f16 weights
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file.name)
    text = tokenizer.apply_chat_template(PROBE + [{"role": "assistant", "content": "Mercury, 58 million km."}],
                                         tokenize=False)
    assert gguf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./tiny-F16.gguf" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_layout_and_tokenizer_match_llama_cpps_own_conversion_of_the_model(gguf_export):
    """The bundled SmolLM2 GGUF was written by llama.cpp's converter: ours must use the same tensor names and
    shapes, hyperparameters and tokenizer metadata."""
    from gguf import GGUFReader

    from studio.models import bundled

    ours = GGUFReader(str(gguf_export[0] / "tiny-F16.gguf"))
    theirs = GGUFReader(str(bundled.gguf_path()))
    assert {t.name: t.shape.tolist() for t in ours.tensors} == {t.name: t.shape.tolist() for t in theirs.tensors}
    assert {t.tensor_type.name for t in ours.tensors} == {"F16", "F32"}
    assert {t.tensor_type.name for t in ours.tensors if t.name.endswith("norm.weight")} == {"F32"}

    keys = [k for k in theirs.fields if k.startswith(("llama.", "tokenizer."))]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.ggml.token_type" in keys
    for key in keys:
        assert key in ours.fields, f"{key} is missing"
        a, b = ours.fields[key].contents(), theirs.fields[key].contents()
        assert (a == pytest.approx(b)) if isinstance(b, float) else (a == b), key


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_each_supported_family_round_trips_through_gguf_exactly_in_f32(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if family == "qwen2":  # Qwen2 has q/k/v biases: make them matter
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.data.normal_(0, 0.5)
    gguf_writer.write_gguf(model, tokenizer, tmp_path / "m.gguf", ftype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max().item() < 1e-4


def _llama2_style_tokenizer():
    """A small tokenizer laid out like Llama 2 / Mistral v0.x ones: SentencePiece-style BPE with '▁' for spaces,
    byte fallback tokens <0x00>..<0xFF>, <unk> <s> </s> first, pieces in merge order, BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from studio.data import SAMPLE_PATH

    texts = [v if isinstance(v, str) else " ".join(m["content"] for m in v)
             for r in map(json.loads, SAMPLE_PATH.read_text(encoding="utf-8").splitlines())
             for v in (r["prompt"], r["completion"])]
    spm_normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = spm_normalizer
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for ch in sorted({c for piece in learned["vocab"] for c in piece}):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = spm_normalizer
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    return tok


def test_sentencepiece_style_tokenizers_round_trip_through_gguf(tmp_path):
    """Llama 2 and Mistral v0.x use SentencePiece-style tokenizers: llama.cpp's 'llama' vocabulary with scores."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    tok = _llama2_style_tokenizer()
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gguf_writer.write_gguf(model, tok, tmp_path / "m.gguf", ftype="f32")

    meta = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert meta["tokenizer.ggml.model"].contents() == "llama"
    assert meta["tokenizer.ggml.add_bos_token"].contents() is True
    assert meta["tokenizer.ggml.token_type"].contents()[3:259] == [6] * 256  # byte tokens are BYTE
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")  # rebuilds merges from the scores
    for text in ["What is the capital of France?", "  two  spaces", "Ünïcödé ☃ 12×8 = 96.",
                 tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                         tokenize=False)]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == ids, text
        assert back.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max().item() < 1e-4


def test_other_architectures_get_a_clear_message(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(export.ExportError, match="Llama, Mistral and Qwen2 families.*'gpt2'.*merged"):
        gguf_writer.write_gguf(model, tokenizer, tmp_path / "m.gguf")


def test_export_never_overwrites_a_folder_it_did_not_write(run_dir, tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match="did not write"):
        export.export_adapter(run_dir, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    # an earlier studio export in the same place is replaced when asked to
    export.export_adapter(run_dir, tmp_path / "again")
    export.export_adapter(run_dir, tmp_path / "again", overwrite=True)
