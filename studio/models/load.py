"""Finding the device, resolving a model source, and loading a model for training or chat.

Three loading paths, chosen automatically (``RunConfig.model.backend == 'auto'``) and reported to the user:

- ``unsloth``: CUDA and Unsloth importable: Unsloth ``FastLanguageModel`` 4-bit, its LoRA and gradient checkpointing.
- ``bnb``: CUDA without Unsloth: transformers + bitsandbytes NF4 (double quant) + PEFT LoRA, prepared for training
  by ``prepare_4bit_for_training`` (embeddings, LM head and norms stay 16-bit: ``frozen_dtype_name``).
- ``full``: CPU / Apple MPS (or CUDA with 4-bit off): full precision (bf16 where supported) + PEFT LoRA.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from studio.config.run import BUNDLED_MODEL, RunConfig
from studio.errors import StudioError

log = logging.getLogger(__name__)
Progress = Callable[[str], None] | None

BACKEND_LABELS = {
    "unsloth": "Unsloth 4-bit + LoRA (CUDA)",
    "bnb": "bitsandbytes NF4 4-bit + PEFT LoRA (CUDA)",
    "full": "full precision + PEFT LoRA (no quantization)",
}


class ModelLoadError(StudioError, RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass
class DeviceInfo:
    kind: str  # "cuda" | "mps" | "cpu"
    name: str
    count: int = 1
    total_gib: float | None = None
    free_gib: float | None = None
    compute_capability: str | None = None
    bf16: bool = False
    unsloth: bool = False
    bitsandbytes: bool = False
    flash_attn: bool = False
    triton: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_device() -> DeviceInfo:
    import torch

    common = dict(unsloth=_has("unsloth"), bitsandbytes=_has("bitsandbytes"), flash_attn=_has("flash_attn"),
                  triton=_has("triton"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info = DeviceInfo(
            kind="cuda", name=props.name, count=torch.cuda.device_count(), total_gib=round(total / 2**30, 2),
            free_gib=round(free / 2**30, 2), compute_capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(), **common,
        )
        if info.count > 1:
            info.notes.append(
                f"{info.count} GPUs: the Train tab trains on one, or on all of them (data-parallel, its 'GPUs' "
                "choice: `accelerate launch -m studio train RUN.yaml`, the bitsandbytes path; Unsloth trains on one GPU)."
            )
        return info
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceInfo(kind="mps", name="Apple MPS", bf16=True, **common)
    import platform

    return DeviceInfo(kind="cpu", name=platform.processor() or platform.machine() or "CPU", bf16=cpu_bf16(),
                      **common)


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX: most server CPUs since 2020, recent
    desktop ones with AVX-512). There a LoRA step in bfloat16 autocast is 2-5x faster than in float32 (measured on the
    CI's 2-core Xeon); without it bfloat16 is emulated and slower, so float32 stays. ``KTO_STUDIO_CPU_BF16=0``: no, on
    any CPU (plan, estimate and train as without it: bench/first_run_flow.py --float32)."""
    if os.environ.get("KTO_STUDIO_CPU_BF16") == "0":
        return False
    import torch

    cpu = getattr(torch, "cpu", None)
    try:
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    except Exception:  # an unusual build: the safe choice
        return False


def choose_backend(cfg: RunConfig, device: DeviceInfo, world: int = 1) -> str:
    want = cfg.model.backend
    if device.kind != "cuda":
        if want in ("unsloth", "bnb"):
            raise ModelLoadError(
                f"model.backend '{want}' needs a CUDA GPU, and this machine has {device.kind}. Use 'auto' or 'full'."
            )
        return "full"
    if want == "unsloth" and not device.unsloth:
        raise ModelLoadError("model.backend 'unsloth' was asked for but Unsloth is not installed: "
                             "`pip install unsloth` (see the README's GPU notes) or use 'auto'.")
    if want == "bnb" and not device.bitsandbytes:
        raise ModelLoadError("model.backend 'bnb' needs bitsandbytes: `pip install bitsandbytes`, or use 'auto'.")
    if want != "auto":
        return want
    if not cfg.model.load_in_4bit or cfg.model.name_or_path == BUNDLED_MODEL:
        # a 135M model fits any card in 16-bit; quantizing it would only cost quality and speed
        return "full"
    # ``world``: the run plan's process count (training.plan.world_size, the one reader of WORLD_SIZE): Unsloth
    # trains on one GPU
    if device.unsloth and os.environ.get("KTO_STUDIO_NO_UNSLOTH") != "1" and world == 1:
        return "unsloth"
    if device.bitsandbytes:
        return "bnb"
    return "full"


def dtype_name(cfg: RunConfig, device: DeviceInfo) -> str:
    """``model.dtype`` resolved for a device, as a torch dtype name ('bfloat16' | 'float16' | 'float32')."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if device.kind == "cuda":
        return "bfloat16" if device.bf16 else "float16"
    # CPU (weights stay float32: chat, evaluation and the held-out scores keep full precision; training may still
    # compute in bf16 autocast, see ``cpu_autocast``); MPS too: bf16/fp16 training on MPS is still patchy
    return "float32"


def cpu_autocast(cfg: RunConfig, device: DeviceInfo) -> bool:
    """Whether a CPU run trains in bfloat16 autocast: ``model.dtype`` 'auto' on a CPU with native bf16 matmuls
    (``cpu_bf16``), the float32 weights cast per matmul as on a GPU. 2.5x faster a step on the CI's 2-core Xeon
    (bench/cpu_duration.py: 11.0 s against 27.7 s); an explicit ``model.dtype: float32`` keeps float32 math."""
    return device.kind == "cpu" and device.bf16 and cfg.model.dtype == "auto"


def compute_dtype(cfg: RunConfig, device: DeviceInfo):
    import torch

    return getattr(torch, dtype_name(cfg, device))


def frozen_dtype_name(backend: str, compute: str) -> str:
    """The dtype of the frozen weights a 4-bit load leaves unquantized (embeddings, LM head, norms) on a loading
    path, given the compute dtype (``dtype_name``): the compute dtype, on every path. The run plan records it
    (``RunPlan.frozen_dtype``); the loader loads them in it and the memory estimate counts its bytes.

    PEFT's ``prepare_model_for_kbit_training`` would upcast them to float32 on the bitsandbytes path, and with them
    the residual stream: a 128k-152k vocabulary's embedding and head then take 4+ GB (2+ GB more than in 16 bits),
    which put Qwen2.5-7B, Llama-3.1-8B and Gemma-7B over an 8 GB card. The float32 copies hold the same 16-bit values,
    TRL's log-prob kernel casts the head back to the compute dtype tile by tile, and the norms normalise in float32
    internally either way: what changes is the residual stream's precision, 16-bit as in any 16-bit model (and as
    Unsloth keeps it)."""
    if backend not in BACKEND_LABELS:
        raise ValueError(f"unknown loading path '{backend}'")
    return compute


# ---- model sources ---------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    path: str  # what from_pretrained gets
    gguf_file: str | None = None
    kind: str = "hub"  # "bundled" | "local" | "gguf" | "hub"


def resolve_source(name_or_path: str, progress: Progress = None, token: str | None = None) -> ModelSource:
    """Turn the user's model field into something ``from_pretrained`` can read, downloading/converting as needed."""
    from studio.models import bundled

    if name_or_path == BUNDLED_MODEL:
        return ModelSource(str(bundled.ensure_checkpoint(progress)), kind="bundled")
    p = Path(name_or_path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        # GGUF weights are quantized for inference; convert once to a trainable checkpoint beside the others.
        from studio import paths

        target = paths.models_dir() / (p.stem + "-from-gguf")
        if not (target / "done").is_file():
            if progress:
                progress(f"Converting {p.name} into a trainable checkpoint (once)…")
            bundled.convert_gguf(p, target)
        return ModelSource(str(target), kind="gguf")
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a folder but holds no config.json: point at a model folder or a .gguf file")
        _check_config_file(p / "config.json")
        return ModelSource(str(p), kind="local")
    if name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".")):
        raise ModelLoadError(
            f"'{name_or_path}' is neither an existing folder/.gguf file nor a hub id like 'Qwen/Qwen2.5-3B-Instruct'"
        )
    return ModelSource(download(name_or_path, progress=progress, token=token), kind="hub")


def download(repo_id: str, progress: Progress = None, token: str | None = None) -> str:
    """Download (or find in the HF cache) a hub model with byte progress; interrupted downloads resume."""
    from studio.models import hub

    def bytes_progress(done, total, msg):
        if progress:
            progress(f"{msg}: {done / 1e9:.2f} / {total / 1e9:.2f} GB")

    try:
        return hub.download(repo_id, token=token, poll_s=5, progress=bytes_progress if progress else None)
    except hub.HubError as e:
        raise ModelLoadError(str(e)) from None


# ---- loading -----------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    backend: str
    device: DeviceInfo
    source: ModelSource
    dtype: object = None

    @property
    def label(self) -> str:
        return BACKEND_LABELS[self.backend]


def prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # TRL's KTO collator expects left padding for prompts
    tok.padding_side = "left"
    return tok


def lora_targets(model, requested) -> list[str]:
    """Module names for LoRA: the requested list, or every linear layer inside the decoder blocks."""
    if requested != "all-linear":
        return list(requested)
    import torch

    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in ("lm_head", "embed_out", "output", "score") and "vision" not in full:
                names.add(leaf)
    return sorted(names)


def _check_config_file(f: Path) -> None:
    """A model folder's config.json must be a JSON object naming its model_type; say which file when it is not."""
    import json

    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{f} is not a readable model config ({type(e).__name__}: {e}): copy the model folder "
                             "again, or point at another model") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ModelLoadError(f"{f} is not a model config (no model_type): copy the model folder again, or point "
                             "at another model")


REMOTE_CODE_HINT = ("{name} needs code from its own repository to load (a custom architecture). If you trust its "
                    "authors, set model.trust_remote_code: true (Model & preset tab, or --set "
                    "model.trust_remote_code=true); otherwise pick another model")


def _needs_remote_code(path: str) -> bool:
    """A model whose config maps to code in its own repository (auto_map) for a type transformers does not know."""
    import json

    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict) or not data.get("auto_map"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return data.get("model_type") not in CONFIG_MAPPING_NAMES


def load_for_training(cfg: RunConfig, device: DeviceInfo | None = None, progress: Progress = None,
                      resume_adapter: str | None = None, frozen_dtype: str | None = None,
                      world: int = 1) -> LoadedModel:
    """Load ``cfg``'s model for training on the path ``choose_backend`` picks. ``frozen_dtype``: the run plan's
    ``RunPlan.frozen_dtype`` (None: the same rule, ``frozen_dtype_name``, for a caller without a plan); ``world``:
    the plan's process count (``RunPlan.world``)."""
    import torch

    from studio.models import leftovers

    device = device or detect_device()
    backend = choose_backend(cfg, device, world)
    source = resolve_source(cfg.model.name_or_path, progress)
    if not cfg.model.trust_remote_code and _needs_remote_code(source.path):
        raise ModelLoadError(REMOTE_CODE_HINT.format(name=cfg.model.name_or_path))
    dtype = compute_dtype(cfg, device)
    frozen = getattr(torch, frozen_dtype or frozen_dtype_name(backend, dtype_name(cfg, device)))
    if progress:
        progress(f"Loading {cfg.model.name_or_path} with {BACKEND_LABELS[backend]} on {device.name}…")
    leftovers.import_before_models()
    try:
        if backend == "unsloth":
            model, tok = _load_unsloth(cfg, source, dtype, progress)
        else:
            model, tok = load_transformers(cfg, source.path, dtype, backend, device, frozen, world=world)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and not cfg.model.trust_remote_code:
            raise ModelLoadError(REMOTE_CODE_HINT.format(name=cfg.model.name_or_path)) from e
        raise ModelLoadError(f"could not load {cfg.model.name_or_path}: {e}") from e
    return LoadedModel(model, prepare_tokenizer(tok), backend, device, source, dtype)


# Model types whose Unsloth kernels torch's compiler fails to build (Gemma: InductorError at the first training step,
# torch 2.11 + Unsloth 2026.10.9). With Unsloth's compiler switched off they train (docs/GPU_RESULTS.md).
UNSLOTH_EAGER_MODEL_TYPES = frozenset({"gemma"})
COMPILE_SWITCH = "UNSLOTH_COMPILE_DISABLE"


def unsloth_compile_switch(model_type: str | None, unsloth_loaded: bool, env: dict | None = None) -> str | None:
    """Before Unsloth's first import: switch its compiler off for a model type that needs it (Unsloth reads the
    switch when it is imported, for the whole process). Returns a message for the user, or None when nothing needs
    saying. Raises ModelLoadError when Unsloth is already loaded with its compiler on and the model needs it off."""
    env = os.environ if env is None else env
    if model_type not in UNSLOTH_EAGER_MODEL_TYPES or env.get(COMPILE_SWITCH) in ("1", "partial"):
        return None
    if unsloth_loaded:
        raise ModelLoadError(
            f"{model_type} models need Unsloth's compiler off (torch's compiler fails to build their Unsloth kernels), "
            f"and this studio session already loaded Unsloth with it on. Restart the studio and train this model "
            f"first, or start it as `{COMPILE_SWITCH}=1 python app.py`, or use the bitsandbytes path (model.backend: "
            "bnb) where the card can hold it.")
    env[COMPILE_SWITCH] = "1"
    return (f"Unsloth's compiler switched off for this session ({model_type}: torch's compiler fails to build its "
            "Unsloth kernels); other models trained in this session run a little slower until the studio restarts.")


def _model_type(path: str) -> str | None:
    from studio.models.arch import EstimateError, model_config

    try:
        return model_config(path, fetch=False)[0].get("model_type")
    except (EstimateError, OSError, ValueError):
        return None


def _load_unsloth(cfg: RunConfig, source: ModelSource, dtype, progress: Progress = None):
    note = unsloth_compile_switch(_model_type(source.path), "unsloth" in sys.modules)
    if note and progress:
        progress(note)
    from unsloth import FastLanguageModel  # noqa: import patches transformers; only on this path

    model, tok = FastLanguageModel.from_pretrained(
        model_name=source.path, max_seq_length=cfg.kto.max_length, dtype=dtype, load_in_4bit=cfg.model.load_in_4bit,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    targets = lora_targets(model, cfg.lora.target_modules)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
        target_modules=targets, bias=cfg.lora.bias,
        use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
        random_state=cfg.train.seed,
    )
    return model, tok


def load_transformers(cfg: RunConfig, path: str, dtype, backend: str, device: DeviceInfo, frozen_dtype=None,
                      world: int = 1):
    """The bitsandbytes and full-precision paths: transformers' model from ``path``, prepared for training, with a
    PEFT LoRA. ``dtype``: the compute dtype; ``frozen_dtype``: the dtype of the weights 4-bit loading leaves
    unquantized (the run plan's, ``frozen_dtype_name``; default: the compute dtype). On the bitsandbytes path the
    base goes where the device is (one GPU per process under ``accelerate``; a CPU for tests, bitsandbytes' CPU
    backend runs NF4 there - ``choose_backend`` still sends only CUDA runs here)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(dtype=frozen_dtype or dtype, trust_remote_code=cfg.model.trust_remote_code)
    if backend == "bnb":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if device.kind == "cuda" else device.kind}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if backend == "bnb":
        model = prepare_4bit_for_training(model, cfg.train.gradient_checkpointing)
    else:
        if device.kind in ("cuda", "mps") and world == 1:
            model.to(device.kind)
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
    model.config.use_cache = False
    lora = cfg.to_lora_config(lora_targets(model, cfg.lora.target_modules))
    torch.manual_seed(cfg.train.seed)  # the same seed gives the same LoRA initialisation
    model = get_peft_model(model, lora)
    del torch
    return model, tok


def prepare_4bit_for_training(model, gradient_checkpointing: bool = True):
    """A 4-bit base made ready for a LoRA on top, keeping its unquantized weights in the dtype they were loaded in
    (``frozen_dtype_name``; PEFT's ``prepare_model_for_kbit_training`` would upcast them to float32): every base
    weight frozen and, with gradient checkpointing, non-reentrant checkpointing (LoRA weights inside a checkpointed
    layer get their gradients without any input requiring one) and gradients on the embedding's output (which
    TRL's trainer asks for too, and reentrant checkpointing would need)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def free_memory() -> None:
    """Give freed tensors back: Python's garbage, then CUDA's cached blocks (after a run or an unload)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
