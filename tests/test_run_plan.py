"""The run plan (studio.training.plan.plan_run): each `auto` of a run config is decided in one place, and the memory
estimate, auto-fit, the trainer's arguments and the engine read that decision. The device probe is monkeypatched:
no GPU needed."""
import dataclasses
import json

import pytest

from tests.conftest import tiny_run_config
from studio.config.run import RunConfig
from studio.models import load as models
from studio.models.load import DeviceInfo
from studio.runs import folder
from studio.training import memory, plan as planner, trl_seam

# run twice, the host CPU's bf16 probe forced on and off (tests/conftest.py): the plan follows its DeviceInfo only
pytestmark = pytest.mark.usefixtures("host_bf16")

QWEN3B = "Qwen/Qwen2.5-3B-Instruct"


def cuda(**kw):
    base = dict(kind="cuda", name="RTX 3070", total_gib=8.0, free_gib=7.5, bf16=True)
    base.update(kw)
    return DeviceInfo(**base)


CPU = DeviceInfo(kind="cpu", name="cpu")


def test_optim_auto_without_bitsandbytes_is_adamw_torch_in_the_plan_the_estimate_and_the_trainer_args(monkeypatch):
    monkeypatch.setattr(models, "detect_device", lambda: cuda(total_gib=80.0, free_gib=79.0))  # no bitsandbytes
    cfg = RunConfig().updated({"model.name_or_path": QWEN3B, "model.dtype": "float32", "train.optim": "auto"})
    p = planner.plan_run(cfg, fetch=False)  # device from the (patched) probe
    assert p.optim == "adamw_torch"
    assert memory.settings_from_run(cfg, p.device_kind, False).optim == p.optim
    assert str(p.kto_config(cfg).optim.value) == "adamw_torch"
    # with bitsandbytes the one rule says 8-bit, everywhere
    with_bnb = planner.plan_run(cfg, cuda(total_gib=80.0, free_gib=79.0, bitsandbytes=True), fetch=False)
    assert with_bnb.optim == "adamw_8bit" == memory.settings_from_run(cfg, "cuda", True).optim
    assert str(with_bnb.kto_config(cfg).optim.value) == "adamw_8bit"
    assert trl_seam.kto_config(cfg, device="cuda", bnb=False).optim.value == "adamw_torch"


def test_the_memory_estimate_counts_the_optimizer_the_run_uses():
    cfg = RunConfig().updated({"model.name_or_path": QWEN3B})
    eight = memory.estimate(memory.arch_for(QWEN3B, False), "full", memory.settings_from_run(cfg, "cuda", True))
    torch_ = memory.estimate(memory.arch_for(QWEN3B, False), "full", memory.settings_from_run(cfg, "cuda", False))
    assert torch_.components["lora_optimizer"] > eight.components["lora_optimizer"]
    p = planner.plan_run(cfg.updated({"model.load_in_4bit": False}), cuda(total_gib=80.0, free_gib=79.0),
                         fetch=False)
    assert p.optim == "adamw_torch" and p.peak_gib is not None


def test_backend_auto_without_unsloth_is_bnb_for_the_plan_auto_fit_and_the_loader():
    device = cuda(bitsandbytes=True)
    cfg = RunConfig().updated({"model.name_or_path": QWEN3B, "model.backend": "auto", "model.load_in_4bit": True})
    p = planner.plan_run(cfg, device, fetch=False)
    assert p.backend == "bnb" == models.choose_backend(cfg, device)
    assert any("With Unsloth installed" in n for n in p.notes)
    card = planner.plan(cfg, planner.DETECTED, device, model_key="qwen2.5-3b-instruct")
    assert card.card_plan is not None and card.card_plan.path == "bnb"
    assert planner.installed_path(device) == "bnb"


def test_precompute_auto_is_decided_once_and_the_trainer_args_follow_the_plan():
    cfg = RunConfig().updated({"model.dtype": "float32", "kto.precompute_ref_log_probs": "auto",
                               "train.max_steps": -1, "train.num_train_epochs": 1.0})
    p = planner.plan_run(cfg, CPU)
    assert p.precompute_ref is None  # the data is not read yet
    whole = p.with_data(100)
    assert whole.precompute_ref is True and whole.data_rows == 100
    short = planner.plan_run(cfg.updated({"train.max_steps": 1}), CPU, data_rows=1000)
    assert short.precompute_ref is False
    # TRL's own precompute stays off in the constructor (the engine runs it after dropping the reference copy);
    # the rows per pass are the plan's
    args = whole.kto_config(cfg)
    assert args.precompute_ref_log_probs is False and args.precompute_ref_batch_size == whole.precompute_rows
    fixed = planner.plan_run(cfg.updated({"kto.precompute_ref_log_probs": True,
                                          "kto.precompute_ref_batch_size": 3}), CPU)
    assert fixed.precompute_ref is True and fixed.precompute_rows == 3


@pytest.mark.parametrize("rows,epochs", [(2370, 1), (1300, 2), (200, 3)])
def test_epochs_auto_is_decided_once_from_the_training_rows(tmp_path, rows, epochs):
    cfg = RunConfig().updated({"model.dtype": "float32", "train.num_train_epochs": "auto"})
    open_ = planner.plan_run(cfg, CPU)
    assert open_.epochs is None and any(n.startswith("Epochs: 'auto', decided when") for n in open_.notes)
    assert open_.precompute_ref is None  # precompute 'auto' waits for the data too
    p = open_.with_data(rows)
    assert p.epochs == epochs == planner.plan_run(cfg, CPU, data_rows=rows).epochs
    assert f"Epochs: {epochs} ('auto': {rows:,} training rows; small files get up to 3 passes)." in p.notes
    assert p.notes[-1].startswith("Reference log-probs")  # the engine shows the last note once the data is read
    assert p.precompute_ref is True  # every row visited at least once
    args = p.kto_config(cfg)
    assert args.num_train_epochs == epochs and not isinstance(args.num_train_epochs, str)
    saved = json.loads(p.save(tmp_path).read_text())
    assert saved["epochs"] == epochs and "epochs_setting" not in saved
    assert f"Epochs: {epochs}" in planner.plan_text(p)


def test_the_plans_notes_are_typed_fields_not_positions_or_prefixes():
    """The engine shows the setup notes before the data is read and the epochs and reference decisions after it; it
    reads each from its field, so a note's wording or place decides nothing."""
    cfg = RunConfig().updated({"model.dtype": "float32", "train.num_train_epochs": "auto", "train.optim": "auto"})
    open_ = planner.plan_run(cfg, CPU)
    assert open_.path_note.startswith("Path:") and open_.epochs_note and open_.precompute_note
    assert any(n.startswith("Optimizer:") for n in open_.setup_notes)
    assert open_.notes == (open_.path_note, *open_.setup_notes, open_.epochs_note, open_.precompute_note)
    # a setup note worded like a decision stays a setup note once the data is read
    odd = dataclasses.replace(open_, setup_notes=open_.setup_notes + ("Epochs: a word from a person",
                                                                      "Reference log-probs: also a person's"))
    p = odd.with_data(200)
    assert p.setup_notes == odd.setup_notes
    assert p.epochs_note == "Epochs: 3 ('auto': 200 training rows; small files get up to 3 passes)."
    assert p.precompute_note != open_.precompute_note and p.notes[-1] == p.precompute_note
    assert p.path_note not in planner.describe_plan(p) and all(n in planner.describe_plan(p) for n in p.setup_notes)
    assert planner.plan_run(cfg.updated({"train.num_train_epochs": 2.0}), CPU).with_data(200).epochs_note is None


def test_epochs_the_user_set_are_kept():
    cfg = RunConfig().updated({"model.dtype": "float32", "train.num_train_epochs": 2.5})
    p = planner.plan_run(cfg, CPU)
    assert p.epochs == 2.5 and not any(n.startswith("Epochs:") for n in p.notes)
    for rows in (200, 5000):
        assert p.with_data(rows).epochs == 2.5 and p.with_data(rows).kto_config(cfg).num_train_epochs == 2.5
    # with a step cap the epochs do not matter to precompute 'auto': the steps decide
    capped = planner.plan_run(RunConfig().updated({"train.max_steps": 1}), CPU, data_rows=1000)
    assert capped.epochs == 3  # 1,000 rows: 3,000 / 1,000
    assert capped.precompute_ref is False


def test_the_plan_is_frozen_and_serialisable(tmp_path):
    p = planner.plan_run(RunConfig(), CPU, data_rows=[10] * 40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.optim = "adamw_8bit"  # type: ignore[misc]
    saved = json.loads(p.save(tmp_path).read_text())
    assert saved["backend"] == "full" and saved["data_rows"] == 40 and saved["optim"] == p.optim


def test_a_cpu_plan_has_no_gpu_budget_and_no_4bit():
    cfg = RunConfig().updated({"model.name_or_path": QWEN3B, "model.load_in_4bit": True,
                               "model.gpu_memory_gib": 7.5})
    p = planner.plan_run(cfg, CPU)
    assert p.backend == "full" and p.budget_gib is None and p.peak_gib is None
    assert p.dtype == "float32" and p.optim == "adamw_torch"
    with pytest.raises(models.ModelLoadError):
        planner.plan_run(cfg.updated({"model.backend": "bnb"}), CPU)


def test_fill_card_is_planned_once_and_the_config_carries_it():
    big = cuda(total_gib=80.0, free_gib=79.0)
    cfg = RunConfig().updated({"model.dtype": "float32"})  # the bundled 135M model on a big card
    p = planner.plan_run(cfg, big)
    assert p.changes and p.batch * p.accumulation == 16 and p.batch > cfg.train.per_device_train_batch_size
    assert p.config(cfg).train.per_device_train_batch_size == p.batch
    assert p.kto_config(cfg).per_device_train_batch_size == p.batch


def test_the_joint_pass_and_fused_adamw_are_planned_for_a_small_model_on_a_big_card_only():
    big = cuda(total_gib=80.0, free_gib=79.0, bitsandbytes=True)
    cfg = RunConfig().updated({"model.dtype": "float32", "train.optim": "auto"})  # the bundled 135M model
    p = planner.plan_run(cfg, big)
    assert p.joint_pass is None  # precompute 'auto' is open until the data is read
    assert p.optim == "adamw_torch_fused" and p.config(cfg).train.optim == "adamw_torch_fused"
    assert str(p.kto_config(cfg).optim.value) == "adamw_torch_fused"
    assert any("one forward pass" in n for n in p.notes)
    whole = p.with_data(3000)
    assert whole.precompute_ref is True and whole.joint_pass is True
    assert "policy and KL rows in one forward pass" in planner.describe_plan(whole)
    # a reference scored in every step: TRL's own passes (the joint pass needs precomputed reference log-probs)
    assert planner.plan_run(cfg.updated({"train.max_steps": 1}), big, data_rows=3000).joint_pass is False
    # memory.fill_card off, an 8 GB card with a 3B model, a CPU: nothing changes
    off = planner.plan_run(cfg.updated({"memory.fill_card": False}), big, data_rows=3000)
    assert off.joint_pass is False and off.optim == "adamw_8bit"
    small_card = planner.plan_run(RunConfig().updated({"model.name_or_path": QWEN3B}), cuda(bitsandbytes=True),
                                  data_rows=3000, fetch=False)
    assert small_card.joint_pass is False and small_card.optim == "adamw_8bit"
    assert planner.plan_run(cfg, CPU, data_rows=3000).joint_pass is False
    # an optimizer the user chose stays
    chosen = planner.plan_run(cfg.updated({"train.optim": "adamw_8bit"}), big, data_rows=3000)
    assert chosen.optim == "adamw_8bit" and chosen.joint_pass is True


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_the_bitsandbytes_path_keeps_embeddings_head_and_norms_16bit_in_the_plan_the_estimate_and_plan_json(
        dtype, tmp_path):
    """Issue 27: PEFT's float32 upcast put 7-8B models over an 8 GB card; one rule (models.frozen_dtype_name)
    decides the frozen weights' dtype, the plan records it, the estimate counts it."""
    device = cuda(bitsandbytes=True)
    cfg = RunConfig().updated({"model.name_or_path": "Qwen/Qwen2.5-7B-Instruct", "model.backend": "bnb",
                               "model.dtype": dtype, "kto.max_length": 1024, "train.per_device_train_batch_size": 2})
    p = planner.plan_run(cfg, device, fetch=False)
    assert p.backend == "bnb" and p.frozen_dtype == p.dtype == ("bfloat16" if dtype == "auto" else "float16")
    assert p.peak_gib is not None and p.peak_gib < 7.5  # the 16-bit embedding and head fit the 8 GB card's budget
    arch = memory.arch_for("Qwen/Qwen2.5-7B-Instruct", False)
    assert p.estimate["components"]["weights"] == pytest.approx(
        (arch.linear_params() * memory.NF4_BYTES_PER_PARAM + arch.unquantized_params() * 2) / memory.GIB, abs=1e-3)
    assert "embeddings, LM head and norms " + p.frozen_dtype in planner.describe_plan(p)
    p.save(tmp_path)
    assert folder.read_plan(tmp_path)["frozen_dtype"] == p.frozen_dtype


def test_a_cuda_run_predicted_not_to_fit_is_refused_by_the_plan_with_the_reason():
    """model.memory_check's promise: RunWontFit is a ValueError, and plan_run used to file it under 'No memory
    estimate' and start the run anyway."""
    cfg = RunConfig().updated({"model.name_or_path": "Qwen/Qwen2.5-7B-Instruct", "model.backend": "bnb",
                               "kto.max_length": 4096, "train.per_device_train_batch_size": 8})
    with pytest.raises(memory.RunWontFit, match="predicted not to fit"):
        planner.plan_run(cfg, cuda(bitsandbytes=True), fetch=False)
    assert "predicted not to fit" in planner.run_plan_markdown(cfg, planner.DETECTED, cuda(bitsandbytes=True))
    unchecked = planner.plan_run(cfg.updated({"model.memory_check": False}), cuda(bitsandbytes=True), fetch=False)
    assert unchecked.peak_gib is None


def test_the_model_tab_and_the_cli_show_the_plan():
    md = planner.run_plan_markdown(RunConfig(), "cpu", CPU)
    assert "Run plan" in md and "adamw_torch" in md
    assert planner.run_plan_markdown(RunConfig(), "8gb", CPU) == ""  # a card elsewhere: the card plan says it
    assert "**" not in planner.plan_text(planner.plan_run(RunConfig(), CPU))


class _Built(Exception):
    pass


def test_the_engine_builds_the_trainer_from_the_plan_and_writes_it(tmp_path, monkeypatch):
    from studio.training import engine as engine_mod, microbatch

    device = cuda(total_gib=80.0, free_gib=79.0)  # CUDA without bitsandbytes or Unsloth
    monkeypatch.setattr(models, "detect_device", lambda: device)

    class Loaded:
        model = tokenizer = None
        dtype = "torch.float32"
        source = models.ModelSource("x")

    seen = {}

    def load(*a, **k):
        seen["load"] = k
        return Loaded()

    monkeypatch.setattr(models, "load_for_training", load)

    def fake_trainer(*a, **k):
        seen["args"] = k["args"]
        raise _Built

    monkeypatch.setattr(microbatch, "trainer_class", lambda *a, **k: fake_trainer)
    cfg = tiny_run_config(tmp_path, **{"model.dtype": "float32", "train.optim": "auto"})
    eng = engine_mod.Engine()
    job = engine_mod.Job(id="t", config=cfg)
    with pytest.raises(_Built):
        eng._build(job)
    p = job.plan
    # the bundled model on an 80 GB card: launch-bound, fused AdamW (plain AdamW in the config's 'auto' terms)
    assert p.optim == "adamw_torch_fused" and str(seen["args"].optim.value) == "adamw_torch_fused"
    assert seen["args"].per_device_train_batch_size == p.batch
    assert seen["args"].gradient_accumulation_steps == p.accumulation
    assert p.precompute_ref is not None and p.data_rows
    saved = json.loads((job.run_dir / folder.PLAN_FILE).read_text())
    assert saved["optim"] == "adamw_torch_fused" and saved["backend"] == p.backend
    assert seen["load"]["frozen_dtype"] == p.frozen_dtype == saved["frozen_dtype"]  # the loader reads the plan's
    assert any(e.get("plan") for e in job.events)


def test_a_cpu_with_native_bf16_trains_in_bf16_autocast_with_float32_weights():
    bf16_cpu = DeviceInfo(kind="cpu", name="Xeon", bf16=True)
    p = planner.plan_run(RunConfig(), bf16_cpu)
    assert p.dtype == "float32" and p.autocast == "bfloat16"  # weights (chat, scores) stay float32
    args = p.kto_config(RunConfig())
    assert args.bf16 is True and args.use_cpu is True
    assert "bfloat16 autocast" in planner.describe_plan(p)
    # an explicit float32, or a CPU without native bf16: float32 math
    assert planner.plan_run(RunConfig().updated({"model.dtype": "float32"}), bf16_cpu).autocast is None
    plain = planner.plan_run(RunConfig(), CPU)
    assert plain.autocast is None and plain.kto_config(RunConfig()).bf16 is False
