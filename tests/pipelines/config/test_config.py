"""Config loading: every kind of user mistake gives one line naming the file/--set, key and expectation."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, flatten, load_config
from tests.conftest import DEMO_CONFIG, REPO


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["demo.yaml", "nightly.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "pipelines" / "configs" / name)
    assert cfg.name == name.removesuffix(".yaml")


def test_demo_values_and_defaults():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.ingest.source == "demo"
    assert cfg.ingest.demo.num_samples == 16000
    assert cfg.shard.splits == {"train": 0.92, "val": 0.03, "test": 0.05}
    assert (cfg.train.workers, cfg.train.zero_stage, cfg.train.precision, cfg.train.model.size) == (
        2,
        2,
        "auto",
        "small",
    )
    assert cfg.ray.local_num_cpus == 4


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "name: x\nshard:\n  samples_per_shrd: 3\n")
    assert error_of(path) == (f"{path}: shard.samples_per_shrd: unknown key (allowed here: samples_per_shard, splits)")


def test_unknown_section(tmp_path):
    message = error_of(write(tmp_path, "name: x\ntrainer: {}\n"))
    assert "trainer: unknown key" in message and "ingest" in message and "shard" in message


def test_wrong_type(tmp_path):
    path = write(tmp_path, "name: x\ningest:\n  demo:\n    num_samples: many\n")
    assert error_of(path) == (
        f"{path}: ingest.demo.num_samples: input should be a valid integer, "
        "unable to parse string as an integer (got 'many')"
    )


def test_out_of_range(tmp_path):
    path = write(tmp_path, "name: x\nshard:\n  samples_per_shard: 0\n")
    assert error_of(path) == f"{path}: shard.samples_per_shard: input should be greater than or equal to 1 (got 0)"


def test_literal_choice(tmp_path):
    message = error_of(write(tmp_path, "name: x\ningest:\n  source: ftp\n"))
    assert "ingest.source: input should be 'demo', 'folder', 'jsonl' or 'shards' (got 'ftp')" in message


def test_cross_field_rules(tmp_path):
    assert "ingest: path is required when source is 'folder'" in error_of(
        write(tmp_path, "name: x\ningest:\n  source: folder\n")
    )
    assert "shard.splits: split fractions must sum to 1, got 0.9" in error_of(
        write(tmp_path, "name: x\nshard:\n  splits: {train: 0.8, test: 0.1}\n")
    )


def test_missing_required_name(tmp_path):
    assert error_of(write(tmp_path, "shard: {}\n")) == f"{tmp_path / 'cfg.yaml'}: name: required key is missing"


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "name: x\nshard:\n  samples_per_shard: [1,\n")
    assert error_of(path).startswith(f"{path}:4:1: invalid YAML")


def test_top_level_must_be_mapping(tmp_path):
    assert "expected a mapping of sections" in error_of(write(tmp_path, "- a\n- b\n"))


def test_override_sets_typed_values():
    cfg = load_config(
        DEMO_CONFIG,
        ["shard.samples_per_shard=64", "ingest.demo.audio_format=wav", "shard.splits={train: 0.5, test: 0.5}"],
    )
    assert cfg.shard.samples_per_shard == 64
    assert cfg.ingest.demo.audio_format == "wav"
    assert cfg.shard.splits == {"train": 0.5, "test": 0.5}


def test_override_errors_name_the_override():
    assert error_of(DEMO_CONFIG, ["shard.samples_per_shard=-1"]) == (
        "--set shard.samples_per_shard=-1: shard.samples_per_shard: input should be greater than or equal to 1 (got -1)"
    )
    assert error_of(DEMO_CONFIG, ["shard.nope=1"]).startswith("--set shard.nope=1: shard.nope: unknown key")
    assert error_of(DEMO_CONFIG, ["samples_per_shard"]) == "--set samples_per_shard: expected section.key=value"
    assert error_of(DEMO_CONFIG, ["name.first=a"]) == "--set name.first=a: name is a value, not a section"


def test_every_error_is_reported_on_one_line(tmp_path):
    message = error_of(write(tmp_path, "name: x\nshard:\n  samples_per_shard: 0\n  extra: 1\n"))
    assert "shard.samples_per_shard" in message and "shard.extra: unknown key" in message


def test_digest_ignores_formatting_and_key_order(tmp_path):
    a = write(tmp_path, "name: x\nshard: {samples_per_shard: 7, splits: {train: 0.5, test: 0.5}}\n")
    b = tmp_path / "b.yaml"
    b.write_text("# comment\nshard:\n  splits:\n    train: 0.5\n    test: 0.5\n  samples_per_shard: 7\nname: x\n")
    assert load_config(a).digest() == load_config(b).digest()
    assert load_config(a).digest() != load_config(a, ["shard.samples_per_shard=8"]).digest()


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "None", "e": "[1, 2]"}


def test_section_rule_broken_by_an_override_names_the_override():
    message = error_of(DEMO_CONFIG, ["shard.splits.train=0.5"])
    assert message.startswith("--set shard.splits.train=0.5: shard.splits: split fractions must sum to 1")


def test_one_section_loads_alone_and_its_errors_name_the_full_key(tmp_path):
    from pipelines.config import load_section

    train = load_section(DEMO_CONFIG, ["train.micro_batch=8"], "train")
    assert (train.micro_batch, train.zero_stage) == (8, load_config(DEMO_CONFIG).train.zero_stage)
    path = write(tmp_path, "name: x\ntrain:\n  micro_bach: 8\n")
    with pytest.raises(ConfigError) as caught:
        load_section(path, [], "train")
    assert str(caught.value).startswith(f"{path}: train.micro_bach: unknown key (allowed here: ")
    with pytest.raises(ConfigError, match=r"^--set train.zero_stage=5: train.zero_stage: input should be less"):
        load_section(DEMO_CONFIG, ["train.zero_stage=5"], "train")
    assert load_section(DEMO_CONFIG, ["train.placement=SPREAD"], "train").placement == "SPREAD"
    with pytest.raises(ConfigError, match=r"^--set train.placement=spread: train.placement: input should be 'PACK' or"):
        load_section(DEMO_CONFIG, ["train.placement=spread"], "train")
    with pytest.raises(ConfigError, match=r"^--set shard.samples_per_shard=3: only train\.\* keys apply here$"):
        load_section(DEMO_CONFIG, ["shard.samples_per_shard=3"], "train")


def test_loading_a_config_imports_no_ray_torch_webdataset_or_mlflow():
    import subprocess
    import sys

    heavy = ("ray", "torch", "webdataset", "mlflow", "deepspeed", "albumentations", "nlpaug", "pyarrow", "numpy")
    code = (
        "import sys; from pipelines.config import load_config; "
        f"load_config({str(DEMO_CONFIG)!r}); load_config({str(REPO / 'pipelines/configs/nightly.yaml')!r}); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_demo_world_draws_at_the_sizes_prepare_decodes_to():
    cfg = load_config(DEMO_CONFIG, ["prepare.image_size=64", "prepare.max_audio_seconds=2.5"])
    assert (cfg.ingest.demo.image_size, cfg.ingest.demo.sample_rate, cfg.ingest.demo.audio_seconds) == (64, 16000, 2.5)
    assert cfg.prepare.max_member_mb == cfg.ingest.max_member_mb == 64.0
    same = load_config(DEMO_CONFIG, ["ingest.demo.image_size=96"])  # the same value may be written out
    assert same.ingest.demo.image_size == 96


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["ingest.demo.image_size=64"],
            "--set ingest.demo.image_size=64: ingest.demo.image_size is 64 but prepare.image_size is 96: they must "
            "agree (leave ingest.demo.image_size out: it follows prepare.image_size)",
        ),
        (
            ["ingest.max_member_mb=8", "prepare.max_member_mb=16"],
            "--set prepare.max_member_mb=16: prepare.max_member_mb is 16.0 but ingest.max_member_mb is 8.0",
        ),
        (
            ["prepare.image_size=100"],
            "--set prepare.image_size=100: train.model does not fit the prepared data: image_size 100 is not a "
            "multiple of patch_size 32",
        ),
        (["train.model.overrides={patch_sise: 8}"], "train.model.overrides: unknown model field 'patch_sise' (allowed"),
        (["train.model.overrides={vocab_size: 8}"], "'vocab_size' follows the prepared data (the prepare section)"),
    ],
)
def test_sections_that_must_agree_fail_on_one_line_naming_both(overrides, message):
    assert message in error_of(DEMO_CONFIG, overrides)


def test_train_losses_are_the_model_librarys_loss_weights():
    from model.config import LossWeights

    cfg = load_config(DEMO_CONFIG)
    assert cfg.train.losses.weights() == LossWeights(**cfg.train.losses.model_dump())
    assert set(cfg.train.losses.model_dump()) == set(LossWeights().to_dict())
    default = load_config(DEMO_CONFIG, ["train.losses={}"]).train.losses.weights()
    assert default == LossWeights()  # the defaults are the library's
    assert "train.losses.hard_negative_weight: input should be greater than or equal to 1" in error_of(
        DEMO_CONFIG, ["train.losses.hard_negative_weight=0.5"]
    )


@pytest.mark.slow
def test_nightly_builds_the_base_model_for_224_pixel_images_and_10_s_audio():
    from model.multimodal import CrossModalModel, parameter_counts
    from pipelines.config.train import chosen_model

    cfg = load_config(REPO / "pipelines" / "configs" / "nightly.yaml")
    prepare = cfg.prepare
    assert (prepare.image_size, prepare.max_audio_seconds, prepare.sample_rate) == (224, 10.0, 16000)
    assert (prepare.vocab_size, prepare.max_text_len, prepare.max_answers) == (32000, 77, 3129)
    assert prepare.augment.text.p_synonym == 0.0  # the shipped synonym table is the demo world's
    model = chosen_model(cfg.train, **prepare.model_sizes())
    assert (model.size, model.image_encoder, model.patch_size, model.image_patches) == ("base", "vit", 16, 196)
    assert model.audio_samples == 160_000 and model.n_mels == 128
    assert 400e6 < parameter_counts(CrossModalModel(model))["total"] < 460e6
    assert (cfg.train.use_gpu, cfg.train.workers, cfg.train.zero_stage, cfg.train.precision) == (True, 8, 2, "bf16")
    assert cfg.ingest.source == "shards" and cfg.storage.root.startswith("s3://")
    assert sum(cfg.shard.splits.values()) == 1.0 and cfg.shard.splits["test"] > 0
