"""Chat with the base model and a tuned adapter side by side, from one model in memory.

The base model is loaded once (as in training: NF4 4-bit on CUDA when the run used 4-bit, full precision on CPU/MPS)
and wrapped in a PEFT ``PeftModel``. Every saved adapter or checkpoint of any run is attached to it by name with
``load_adapter`` and picked with ``set_adapter``; the base side is the same model inside ``disable_adapter()``, which
is exactly TRL's reference model for a LoRA run. Both sides get the same prompt (rendered with the model's chat
template), the same sampling settings and the same seed, so any difference in the replies comes from training.

No Gradio here: the Chat tab, ``studio.tuned.evaluate`` and the tests use this module directly.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.config.run import RunConfig
from studio.models import cpu_threads
from studio.errors import UsageError
from studio.runs import folder
from studio.runs.folder import is_adapter_dir

log = logging.getLogger(__name__)

Progress = Callable[[str], None] | None


class ChatError(UsageError, RuntimeError):
    """Something the user can fix (no adapter yet, a run folder without run.yaml...); the message says what."""


# ---- runs and their adapters -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterChoice:
    """One saved adapter: the final ``adapter/`` of a run or one of its ``checkpoint-N/`` folders."""

    run_dir: Path
    path: Path

    @property
    def run(self) -> str:
        return self.run_dir.name

    @property
    def label(self) -> str:
        which = "final adapter" if self.path.name == folder.ADAPTER_DIR else self.path.name
        return f"{self.run} · {which}"


def run_adapters(run_dir: str | Path) -> list[AdapterChoice]:
    """The adapters of one run: the final adapter first, then checkpoints, newest first."""
    run_dir = Path(run_dir)
    return [AdapterChoice(run_dir, p) for p in folder.adapters(run_dir)]


def list_adapters(root: str | Path | None = None) -> list[AdapterChoice]:
    """Every adapter of every run under the studio's runs folder, the oldest run first (a new run is added at the
    end, so a list on screen keeps its order when it is refreshed)."""
    from studio import paths

    root = Path(root) if root else paths.runs_dir()
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and folder.is_run_folder(p)]
    runs.sort(key=lambda p: (p / folder.CONFIG_FILE).stat().st_mtime)
    return [a for r in runs for a in run_adapters(r)]


def newest(adapters: list[AdapterChoice]) -> AdapterChoice | None:
    """The adapter to offer first: the final adapter (else newest checkpoint) of the most recent run."""
    if not adapters:
        return None
    last_run = adapters[-1].run_dir
    return next(a for a in adapters if a.run_dir == last_run)


def resolve_adapter(spec: str | Path | AdapterChoice) -> AdapterChoice:
    """An adapter from a run folder (its final adapter, else its newest checkpoint) or an adapter/checkpoint folder."""
    if isinstance(spec, AdapterChoice):
        return spec
    p = Path(spec).expanduser().resolve()
    if not p.exists():
        raise ChatError(f"{p} does not exist: give a run folder (with run.yaml) or one of its adapter folders")
    if folder.is_run_folder(p):
        found = run_adapters(p)
        if not found:
            raise ChatError(f"run {p.name} has no saved adapter yet: train it (or let it reach a checkpoint) first")
        return found[0]
    if is_adapter_dir(p) and folder.is_run_folder(p.parent):
        return AdapterChoice(p.parent, p)
    if is_adapter_dir(p):
        raise ChatError(f"{p} is an adapter but its folder has no run.yaml, so its base model is unknown: "
                        "point at an adapter inside a studio run folder")
    raise ChatError(f"{p} is neither a run folder (no run.yaml) nor an adapter folder (no adapter_config.json)")


# ---- loading -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseKey:
    """What makes two runs share a loaded base model."""

    name_or_path: str
    quantized: bool
    dtype: str
    trust_remote_code: bool


def base_key(cfg: RunConfig, device) -> BaseKey:
    from studio.models import load as models

    # the training path decides: Unsloth and bitsandbytes runs trained against an NF4 base, 'full' runs a 16/32-bit one
    try:
        backend = models.choose_backend(cfg, device)
    except models.ModelLoadError:  # e.g. a run forced to Unsloth, opened on a machine without it
        backend = "bnb" if device.kind == "cuda" and cfg.model.load_in_4bit else "full"
    quantized = backend in ("unsloth", "bnb") and device.kind == "cuda" and device.bitsandbytes
    return BaseKey(cfg.model.name_or_path, quantized, str(models.compute_dtype(cfg, device)).removeprefix("torch."),
                   cfg.model.trust_remote_code)


def load_base(cfg: RunConfig, device=None, progress: Progress = None):
    """The run's base model for inference, loaded the way training saw it, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.models import load as models

    device = device or models.detect_device()
    key = base_key(cfg, device)
    source = models.resolve_source(cfg.model.name_or_path, progress)
    kw: dict[str, Any] = dict(dtype=getattr(torch, key.dtype), trust_remote_code=key.trust_remote_code)
    if key.quantized:
        from transformers import BitsAndBytesConfig

        # the same NF4 quantization as training, so the base side is the reference the adapter was trained against
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kw["dtype"])
        kw["device_map"] = {"": 0}
    if progress:
        progress(f"Loading {cfg.model.name_or_path} for chat ({'NF4 4-bit' if key.quantized else key.dtype}) "
                 f"on {device.name}…")
    try:
        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=key.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source.path, **kw)
    except (OSError, ValueError) as e:
        raise models.ModelLoadError(f"could not load {cfg.model.name_or_path}: {e}") from e
    if not key.quantized and device.kind in ("cuda", "mps"):
        model.to(device.kind)
    model.eval()
    model.config.use_cache = True
    return model, models.prepare_tokenizer(tok), key


# ---- generation --------------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    max_new_tokens: int = 200
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0
    repetition_penalty: float = 1.0


def content_text(content: Any) -> str:
    """Message content as plain text: a string, or Gradio's list of {'type': 'text', 'text': ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("content", "")))
    if isinstance(content, (list, tuple)):
        return "".join(content_text(c) for c in content)
    return str(content)


def build_messages(history: list[dict], user_text: str, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for the next turn: optional system prompt, the earlier turns of this side, the new question."""
    msgs = []
    if system_prompt and system_prompt.strip():
        msgs.append({"role": "system", "content": system_prompt.strip()})
    for m in history:
        if m.get("role") in ("user", "assistant"):
            msgs.append({"role": m["role"], "content": content_text(m.get("content"))})
    msgs.append({"role": "user", "content": user_text})
    return msgs


@dataclass
class _Loaded:
    adapter: AdapterChoice
    name: str
    stamp: float  # adapter file mtime when loaded: a retrained run is loaded again


class ChatModel:
    """One base model in memory with any number of run adapters attached; thread-safe (one forward at a time)."""

    def __init__(self, device=None):
        self.device = device
        self.model = None  # peft.PeftModel once an adapter is attached
        self.tokenizer = None
        self.key: BaseKey | None = None
        self.cfg: RunConfig | None = None
        self.active: AdapterChoice | None = None
        self._adapters: dict[Path, _Loaded] = {}
        self._count = 0
        self._pending_base = None
        # A plain Lock, not an RLock: Gradio may resume a streaming generator on another worker thread, and only a
        # Lock may be released by a thread other than the one that took it. Nothing below takes it twice.
        self.lock = threading.Lock()
        self.cut_off = False  # the last streamed reply stopped at max_new_tokens, not at the model's end of turn

    # -- adapters --
    @cpu_threads.released
    def use(self, adapter: str | Path | AdapterChoice, progress: Progress = None) -> AdapterChoice:
        """Make ``adapter`` the tuned side, loading its base model and the adapter only when not loaded yet."""
        from peft import PeftModel

        from studio.models import load as models

        choice = resolve_adapter(adapter)
        cfg = folder.read_config(choice.run_dir)
        with self.lock:
            if self.device is None:
                self.device = models.detect_device()
            key = base_key(cfg, self.device)
            if self.key != key:
                self._unload()
                base, tok, key = load_base(cfg, self.device, progress)
                self.tokenizer, self.key = tok, key
                self._pending_base = base
            self.cfg = cfg
            stamp = _adapter_stamp(choice.path)
            loaded = self._adapters.get(choice.path)
            if loaded is not None and loaded.stamp != stamp:  # the run was trained again: reload its files
                self.model.delete_adapter(loaded.name)
                del self._adapters[choice.path]
                loaded = None
            if loaded is None:
                self._count += 1
                name = f"adapter{self._count}"
                if progress:
                    progress(f"Attaching adapter {choice.label}…")
                if self.model is None:
                    self.model = PeftModel.from_pretrained(self._pending_base, str(choice.path), adapter_name=name,
                                                           is_trainable=False)
                    self._pending_base = None
                else:
                    self.model.load_adapter(str(choice.path), adapter_name=name, is_trainable=False)
                loaded = self._adapters[choice.path] = _Loaded(choice, name, stamp)
            self.model.set_adapter(loaded.name)
            self.model.eval()
            self.active = choice
            return choice

    def unload(self) -> None:
        with self.lock:
            self._unload()

    def _unload(self) -> None:
        self.model = self.tokenizer = self.key = self.cfg = self.active = None
        self._pending_base = None
        self._adapters.clear()
        from studio.models.load import free_memory

        free_memory()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def adapter_enabled(self, tuned: bool):
        """Context: the tuned adapter on (``tuned``) or every adapter off (the base model)."""
        self._require()
        return contextlib.nullcontext() if tuned else self.model.disable_adapter()

    @property
    def input_device(self):
        return self.model.get_base_model().get_input_embeddings().weight.device

    def _require(self) -> None:
        if self.model is None:
            raise ChatError("no adapter is loaded: pick a run's adapter first")

    # -- prompts --
    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: list[dict]) -> list[int]:
        """Token ids of the prompt for the next assistant turn."""
        self._require()
        if self.uses_chat_template:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
            return list(out["input_ids"])
        # a base model without a chat template sees the turns as plain text, as in plain-text training rows
        return list(self.tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])

    def feedback_prompt(self, messages: list[dict]) -> Any:
        """The prompt as a KTO data row stores it: the messages, or the plain text without a chat template."""
        return messages if self.uses_chat_template else "\n\n".join(m["content"] for m in messages)

    # -- generation --
    def stream(self, messages: list[dict], tuned: bool, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield the reply as it grows (the whole text so far each time). Holds the model until done or closed."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        settings = settings or GenerationSettings()
        with self.lock:
            self._require()
            ids = torch.tensor([self.render(messages)], device=self.input_device)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            cancel = threading.Event()
            failure: list[BaseException] = []
            seen = {"length": ids.shape[1], "last": None}
            self.cut_off = False

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    seen["length"], seen["last"] = input_ids.shape[1], int(input_ids[0, -1])
                    return cancel.is_set()

            sample = settings.temperature > 0
            gen_kw = dict(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(settings.max_new_tokens),
                do_sample=sample, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                pad_token_id=self.tokenizer.pad_token_id, repetition_penalty=float(settings.repetition_penalty),
            )
            if sample:
                gen_kw.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
            else:  # silence "temperature is set but do_sample is False" from generation configs that set them
                gen_kw.update(temperature=None, top_p=None, top_k=None)

            def work():
                try:
                    # the same seed on both sides: with identical logits the two replies are identical
                    torch.manual_seed(int(settings.seed))
                    with self.adapter_enabled(tuned), torch.inference_mode():
                        self.model.generate(**gen_kw)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(e)
                    streamer.end()

            worker = threading.Thread(target=work, name="chat-generate", daemon=True)
            worker.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield text
            finally:
                cancel.set()
                worker.join()
            if failure:
                raise failure[0]
            # stopped by max_new_tokens rather than by the model's end of turn: front ends mark the reply as cut off
            eos = self.model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {self.tokenizer.eos_token_id}
            self.cut_off = (seen["length"] - ids.shape[1] >= int(settings.max_new_tokens)
                            and seen["last"] not in eos)

    def reply(self, messages: list[dict], tuned: bool, settings: GenerationSettings | None = None) -> str:
        text = ""
        for text in self.stream(messages, tuned, settings):
            pass
        return text

    def logits(self, messages: list[dict] | str, tuned: bool):
        """Next-token logits after the prompt (for checks: the adapter toggle, exports)."""
        import torch

        with self.lock:
            self._require()
            ids = self.render(messages) if isinstance(messages, list) else self.tokenizer(messages)["input_ids"]
            x = torch.tensor([list(ids)], device=self.input_device)
            with self.adapter_enabled(tuned), torch.inference_mode():
                return self.model(input_ids=x).logits[0].float().cpu()

    def describe(self) -> str:
        if not self.loaded:
            return "No model loaded."
        k = self.key
        return (f"Base **{k.name_or_path}** ({'NF4 4-bit' if k.quantized else k.dtype}) on {self.device.name}; "
                f"tuned side: **{self.active.label}**")


def _adapter_stamp(path: Path) -> float:
    for n in ("adapter_model.safetensors", "adapter_model.bin"):
        f = path / n
        if f.is_file():
            return f.stat().st_mtime
    return 0.0


@dataclass
class Turn:
    """One generated reply, remembered so that rating it stores exactly the prompt it answered."""

    side: str
    messages: list[dict]
    reply: str
    adapter: str | None
    base_model: str | None
    settings: dict = field(default_factory=dict)
    prompt: Any = None  # as a data row stores it (ChatModel.feedback_prompt)
    time: float = field(default_factory=time.time)
