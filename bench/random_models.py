"""Real architectures with random weights, for GPU speed/memory measurements where no hub is reachable.

Speed and memory depend on shapes, not weight values. Each model gets a byte-level BPE tokenizer in which each of
2,704 two-letter words (" xy") is one token, and data of exact token lengths, so a row of seq tokens is exactly seq
tokens. (An earlier word-level tokenizer was silently emptied for qwen2 models: transformers 5 rebuilds a qwen2
checkpoint's tokenizer as Qwen2Tokenizer from vocab + merges only, so every "w123" word vanished and each row was a
single EOS token. tests/test_random_models.py checks every architecture keeps its lengths.)
"""
from __future__ import annotations

import json
import os
import random

ARCHS = {
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5, head_dim=128),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4100, tie_word_embeddings=True,
                       max_position_embeddings=4096),
}


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
WORDS = [a + b for a in LETTERS for b in LETTERS]  # 2704 words, each " xy" one token


def make_model_dir(arch: str, root: str = "/tmp/models", device: str = "cuda", spec: dict | None = None) -> str:
    """A checkpoint of ``arch`` (a key of ARCHS, or any name with a config ``spec``) with random bf16 weights and
    the bench's two-letter-word BPE tokenizer, built once under ``root``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    d = os.path.join(root, arch)
    if os.path.exists(os.path.join(d, "done")):
        return d
    os.makedirs(d, exist_ok=True)
    spec = dict(spec if spec is not None else ARCHS[arch])
    spec.pop("original_max_position_embeddings", None)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(d, max_shard_size="4GB")
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    # byte-level BPE, one token per " xy" word: survives AutoTokenizer rebuilding it as the model type's own class
    # (transformers 5 forces Qwen2Tokenizer for qwen2, which keeps only vocab+merges and would drop WordLevel words)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\u0120": 4}
    merges = []
    for a in LETTERS:
        vocab.setdefault(a, len(vocab))
    for a in LETTERS:
        vocab["\u0120" + a] = len(vocab)
        merges.append(("\u0120", a))
    for w in WORDS:
        vocab["\u0120" + w] = len(vocab)
        merges.append(("\u0120" + w[0], w[1]))
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    tk.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.save_pretrained(d)
    open(os.path.join(d, "done"), "w").write("ok")
    return d


def write_dataset(path: str, n: int, prompt_len: int, completion_len: int, seed: int = 0,
                  desirable: float = 0.6) -> str:
    """KTO rows of exact token lengths (the completion gets one EOS token added by TRL)."""
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = "".join(" " + rnd.choice(WORDS) for _ in range(prompt_len))
            c = "".join(" " + rnd.choice(WORDS) for _ in range(completion_len))
            f.write(json.dumps({"prompt": p, "completion": c, "label": rnd.random() < desirable}) + "\n")
    return path
