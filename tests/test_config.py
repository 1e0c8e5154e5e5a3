"""The run config: one typed object, YAML round trip, clear messages naming the bad field, mapping to TRL/PEFT."""
import pytest

from studio.config.run import ConfigError, RunConfig
from studio.training.trl_seam import kto_config


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = RunConfig().updated({"name": "my-run", "train.learning_rate": 3e-4, "lora.target_modules": ["q_proj", "v_proj"],
                               "kto.beta": 0.2, "data.eval_fraction": 0.1, "model.backend": "full"})
    path = cfg.save(tmp_path / "run.yaml")
    again = RunConfig.load(path)
    assert again == cfg
    assert again.lora.target_modules == ["q_proj", "v_proj"]


def test_shipped_presets_load():
    cfg = RunConfig.load("presets/runs/quickstart.yaml")
    assert cfg.train.max_steps > 0 and cfg.model.name_or_path == "bundled:smollm2-135m"


@pytest.mark.parametrize("yaml_text,field", [
    ("kto:\n  betta: 0.1\n", "kto.betta"),
    ("train:\n  learning_rate: -1\n", "train.learning_rate"),
    ("train:\n  per_device_train_batch_size: 1\n", "train.per_device_train_batch_size"),
    ("model:\n  backend: turbo\n", "model.backend"),
    ("lora:\n  r: zero\n", "lora.r"),
    ("memory:\n  micro_batch_size: 0\n", "memory.micro_batch_size"),
    ("memory:\n  tiled_mlp: true\n", "memory.tiled_mlp"),
    ("kto:\n  precompute_ref_batch_size: 0\n", "kto.precompute_ref_batch_size"),
    ("kto:\n  precompute_ref_batch_size: many\n", "kto.precompute_ref_batch_size"),
])
def test_bad_field_gets_a_message_naming_it(tmp_path, yaml_text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        RunConfig.load(p)
    assert field in str(e.value)


def test_batch_of_one_explains_the_kto_rule():
    with pytest.raises(ConfigError, match="at least 2.*KL"):
        RunConfig().updated({"train.per_device_train_batch_size": 1})


def test_unknown_dotted_field_is_refused():
    with pytest.raises(ConfigError, match="train.lr"):
        RunConfig().updated({"train.lr": 1e-4})


def test_not_yaml_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.load(p)


def test_maps_to_kto_and_lora_configs_by_field_name(tmp_path):
    cfg = RunConfig().updated({"output_dir": str(tmp_path), "kto.beta": 0.25, "kto.max_length": 512,
                               "train.learning_rate": 1e-4, "train.warmup_steps": 0.05, "lora.r": 8})
    kto = kto_config(cfg, device="cpu")
    assert (kto.beta, kto.max_length, kto.learning_rate, kto.warmup_steps) == (0.25, 512, 1e-4, 0.05)
    assert kto.per_device_train_batch_size == cfg.train.per_device_train_batch_size
    assert kto.output_dir == str(tmp_path) and kto.use_cpu
    assert kto.optim == "adamw_torch"
    assert kto_config(cfg, device="cuda", bnb=True).optim == "adamw_8bit"
    lora = cfg.to_lora_config(["q_proj"])
    assert lora.r == 8 and lora.lora_alpha == cfg.lora.lora_alpha and lora.target_modules == {"q_proj"}


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (2, 2.0), ("2", 2.0), (2.5, 2.5)])
def test_epochs_take_a_positive_number_or_auto(value, expected):
    assert RunConfig().train.num_train_epochs == "auto"  # the default: decided from the data by the run plan
    assert RunConfig().updated({"train.num_train_epochs": value}).train.num_train_epochs == expected


@pytest.mark.parametrize("value", [0, -1, "x", None])
def test_bad_epochs_get_a_message_naming_the_field_and_the_choices(value):
    with pytest.raises(ConfigError, match=r"train\.num_train_epochs: is .*use a number of passes .* or 'auto'"):
        RunConfig().updated({"train.num_train_epochs": value})


def test_an_old_run_yaml_with_one_epoch_still_loads_and_auto_never_reaches_trl(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  num_train_epochs: 1.0\n")
    assert RunConfig.load(p).train.num_train_epochs == 1.0
    again = RunConfig.load(RunConfig().save(tmp_path / "auto.yaml"))
    assert again.train.num_train_epochs == "auto"
    assert kto_config(again, device="cpu").num_train_epochs == 1.0  # outside the plan (no rows): one pass


def test_the_epochs_rule():
    from studio.config.run import AUTO_EPOCH_ROWS, AUTO_MAX_EPOCHS, resolve_epochs

    assert (AUTO_EPOCH_ROWS, AUTO_MAX_EPOCHS) == (3000, 3)
    assert [resolve_epochs("auto", n) for n in (6000, 3000, 2370, 1300, 200, 1)] == [1, 1, 1, 2, 3, 3]
    assert resolve_epochs("auto", None) is None and resolve_epochs(2.5, 200) == 2.5
