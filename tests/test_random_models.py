"""The GPU benchmarks' random-weight models must see rows of the lengths they were written with, for every
architecture (a tokenizer that AutoTokenizer rebuilds per model type once reduced every qwen2 row to one token)."""
import json

import pytest
from transformers import AutoTokenizer

from bench.random_models import ARCHS, make_model_dir, write_dataset


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral", "phi3", "gemma"])
def test_every_architecture_tokenizes_bench_rows_to_their_exact_length(tmp_path, model_type):
    spec = dict(ARCHS["tiny-llama"], model_type=model_type)
    d = make_model_dir(f"tiny-{model_type}", root=str(tmp_path), device="cpu", spec=spec)
    tok = AutoTokenizer.from_pretrained(d)
    row = json.loads(open(write_dataset(str(tmp_path / "rows.jsonl"), 1, 37, 21)).readline())
    assert len(tok(row["prompt"], add_special_tokens=False).input_ids) == 37
    assert len(tok(row["completion"], add_special_tokens=False).input_ids) == 21
