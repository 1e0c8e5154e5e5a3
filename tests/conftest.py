"""Shared fixtures. Every test gets its own studio home, so tests never touch a user's files or each other's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The converted bundled model is reused across tests and CI runs (converting takes ~30 s).
os.environ.setdefault("KTO_STUDIO_MODELS", str(ROOT / "studio_data" / "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# ---- the host CPU's bf16 probe, forced both ways ----------------------------------------------------------------
# Behaviour that depends on the device takes a DeviceInfo; a test module that plans or estimates runs declares
# `pytestmark = pytest.mark.usefixtures("host_bf16")` and runs twice, with the host probe (models.cpu_bf16 and torch's
# own CPU probes) forced to "bf16" and to "no bf16", so it passes on a CPU with AVX-512 BF16/AMX and on one without.
# `--host-bf16 yes|no` (or KTO_TEST_HOST_BF16) keeps one of the two (CI forces "no").

def pytest_addoption(parser):
    parser.addoption("--host-bf16", choices=("both", "yes", "no"),
                     default=os.environ.get("KTO_TEST_HOST_BF16", "both"),
                     help="force the host CPU's bf16 probe in the device-dependent tests: both (default), yes, no")


def pytest_generate_tests(metafunc):
    if "host_bf16" in metafunc.fixturenames:
        want = metafunc.config.getoption("--host-bf16", default="both")
        values = {"both": [True, False], "yes": [True], "no": [False]}[want]
        metafunc.parametrize("host_bf16", values, ids=["host-bf16" if v else "host-no-bf16" for v in values],
                             indirect=True)


@pytest.fixture
def host_bf16(request, monkeypatch):
    """The host CPU's bf16 probe forced to ``request.param`` (True: AVX-512 BF16/AMX, False: none)."""
    import torch

    from studio.models import load

    value = bool(getattr(request, "param", False))
    monkeypatch.setattr(load, "cpu_bf16", lambda: value)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: value, raising=False)
    return value


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    home = tmp_path / "studio_home"
    monkeypatch.setenv("KTO_STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2-135M as a trainable checkpoint (converted once per machine)."""
    from studio.models import bundled

    return bundled.ensure_checkpoint()


def make_tiny_model(folder, tokenizer_dir):
    """A 2-layer random Llama (hidden size 32) with the tokenizer (and chat template) of ``tokenizer_dir``: a real
    KTOTrainer step on it takes a fraction of a second on a CPU."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir):
    """A 2-layer random Llama with the bundled tokenizer, for tests of what the engine does around training (stop,
    resume, roll back, history) rather than of what the bundled model learns: its steps are nearly free."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), bundled_model_dir)


def tiny_run_config(tmp_path, **changes):
    """A few-step CPU run on the bundled model and sample data."""
    from studio.config.run import RunConfig

    base = {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "lora.r": 4, "lora.lora_alpha": 8,
        "kto.max_length": 128,
        "train.max_steps": 3, "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
        "train.gradient_checkpointing": False, "train.save_steps": 2, "train.learning_rate": 1e-3,
        "train.warmup_steps": 0.0,
    }
    base.update(changes)
    return RunConfig().updated(base)


_TRAINED: dict[str, Path] = {}


def trained_run_dir(tmp_path_factory) -> Path:
    """A 3-step CPU training run of the bundled model with 12 rows (6 prompts) of the sample data held out. Trained once per
    test session and shared by the chat, evaluation, export and browser tests (treat it as read-only)."""
    if "run" not in _TRAINED:
        from studio.training.engine import Engine

        root = tmp_path_factory.mktemp("trained")
        cfg = tiny_run_config(root, name="tiny", **{"data.eval_fraction": 0.25, "data.eval_max_rows": 12})
        engine = Engine()
        job = engine.start(cfg)
        engine.wait(900)
        assert job.state == "finished", job.error
        _TRAINED["run"] = cfg.run_dir()
    return _TRAINED["run"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_model_dir):
    """The shared trained run's folder (read-only)."""
    return trained_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def chat(run_dir):
    """A ChatModel with the shared run's adapter attached."""
    from studio.tuned.chat import ChatModel

    c = ChatModel()
    c.use(run_dir)
    return c


def wait_for(pred, timeout: float = 300, every: float = 0.1) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass."""
    import time

    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(every)
    return False


def kto_pairs(n: int) -> list[dict]:
    """``n`` prompts, each with one desirable and one undesirable completion (KTO rows, pairs adjacent)."""
    return [{"prompt": f"question {p}", "completion": c, "label": y}
            for p in range(n) for c, y in ((f"good {p}", True), (f"bad {p}", False))]


def unsloth_only_8b(tmp_path) -> str:
    """A model folder (config.json only) that fits an 8 GB card on the Unsloth path but not on bitsandbytes:
    Llama-3.1-8B with an untied 256k vocabulary, whose 16-bit embedding and head alone take 3.9 GiB (Unsloth moves
    the embedding to CPU RAM). Every model preset fits on both paths since issue 27."""
    import json

    from studio.config import presets

    folder = Path(tmp_path) / "big-vocab-8b"
    folder.mkdir(exist_ok=True)
    spec = dict(presets.get("models", "llama-3.1-8b-instruct").get("config"), vocab_size=256_000)
    (folder / "config.json").write_text(json.dumps(spec))
    return str(folder)


@pytest.fixture(autouse=True)
def hub_taken_as_online(monkeypatch):
    """Tests stub the hub's calls; the one-time reachability probe (studio.models.hub.offline) is taken as answered
    "online" unless a test sets it. huggingface_hub's offline switch is restored after each test."""
    from huggingface_hub import constants

    from studio.models import hub

    monkeypatch.setattr(hub, "_offline", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
