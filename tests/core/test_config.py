import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from four_m.core.config import CONFIG_DIR, Config, ConfigError, MaskingConfig, load_config
from four_m.core.weights import COMMIT, is_hub_id

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"default", "cc12m"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    written = tmp_path / "resolved.yaml"
    written.write_text(config.to_yaml())
    assert load_config(written) == config


def test_the_config_a_root_records_leaves_the_root_out_and_reads_back_with_it(tmp_path):
    config = load_config("default", root=str(tmp_path / "a"))
    moved = load_config("default", root=str(tmp_path / "b"))
    assert config.recorded_yaml() == moved.recorded_yaml()
    assert "root" not in yaml.safe_load(config.recorded_yaml())
    written = tmp_path / "recorded.yaml"
    written.write_text(config.recorded_yaml())
    assert load_config(written, root=config.root) == config


def test_overrides_and_root(tmp_path):
    config = load_config("default", ["download.image_size=384", "ray.num_cpus=1"], root=str(tmp_path))
    assert config.download.image_size == 384
    assert config.ray.num_cpus == 1
    assert config.root == str(tmp_path)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"download": {"imgae_size": 3}}, "unknown key download.imgae_size"),
        ({"download": {"image_size": "big"}}, "download.image_size: expected int"),
        ({"download": {"image_size": 8}}, "download.image_size: must be in [16, 4096]"),
        ({"download": {"resize_mode": "stretch"}}, "download.resize_mode"),
        ({"verify_checksums": 1}, "verify_checksums: expected bool"),
        ({"download": {"allowed_schemes": "http"}}, "download.allowed_schemes: expected a list"),
        ({"ray": 3}, "ray: expected a mapping"),
        ({"card": {"model_licenses": ["apache-2.0"]}}, "card.model_licenses: expected a mapping"),
        ({"card": {"model_licenses": {"m": 2}}}, "card.model_licenses.m: expected str"),
        ({"card": {"license": "other"}}, "card.license_name: needed with license: other"),
        # the masking's settings are keys of the train section, checked at load, not when training starts
        ({"train": {"mixtures": ["mine"]}}, "train.input_alphas.mine: needed: not a preset"),
        ({"train": {"keep": {"all2all": {"caption": "some"}}}}, "train.keep.all2all.caption: 'some' is not one of"),
        ({"train": {"min_target_tokens": {"depth": 999}}}, "train.min_target_tokens: sum above the target_budget"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize("run", ["../../elsewhere", "a/b", "/abs", "", "..", ".hidden", "a..b", "a\\b", "tab\there"])
def test_a_run_name_that_is_not_one_folder_is_refused_naming_key_and_value(run):
    with pytest.raises(ConfigError) as error:
        load_config("default", [f"train.run={json.dumps(run)}"])  # quoted: YAML reads an empty value as null
    assert f"train.run: {run!r} is not a folder name" in str(error.value) and "\n" not in str(error.value)


def test_plain_run_names_load():
    assert load_config("default", ["train.run=base-cc12m_v2.1"]).train.run == "base-cc12m_v2.1"


@pytest.mark.parametrize(
    ("revision", "given"),
    [("null", "none given"), ("main", "'main' is not one"), ("57c21647", "'57c21647' is not one")],
)
def test_a_hub_model_without_a_full_commit_is_refused_naming_the_key(revision, given):
    with pytest.raises(ConfigError) as error:
        load_config("default", ["label.clip.model=openai/clip-vit-base-patch16", f"label.clip.revision={revision}"])
    message = str(error.value)
    assert "label.clip.revision: openai/clip-vit-base-patch16 is a hub id, so it needs the full 40-hex" in message
    assert given in message and "\n" not in message


def test_local_weights_and_random_init_need_no_revision(tmp_path):
    for model in (str(tmp_path), "./my-depth-model", "~/models/depth", "null"):
        assert load_config("default", [f"label.depth.model={model}"]).label.labeler("depth").revision is None


def test_every_hub_model_of_the_shipped_configs_names_its_commit():
    for path in SHIPPED:
        label = load_config(path).label
        pinned = {n: label.labeler(n) for n in label.labelers if label.labeler(n).model}
        for name, section in pinned.items():
            assert not is_hub_id(section.model) or COMMIT.fullmatch(section.revision or ""), (path.stem, name)
    assert load_config("cc12m").label.labeler("clip").revision == "57c216476eefef5ab752ec549e440a49ae4ae5f3"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("default", ["download.image_size"])


def test_section_hash_ignores_speed_knobs_but_not_output_shape():
    base = Config()
    faster = load_config("default", ["download.threads_per_shard=99"])
    bigger = load_config("default", ["download.image_size=512"])
    default = load_config("default")
    assert faster.section_hash("download") == default.section_hash("download")
    assert bigger.section_hash("download") != default.section_hash("download")
    assert base.section_hash("download") == Config().section_hash("download")


def test_the_masking_of_a_train_section_is_its_masking_fields_alone():
    train = load_config("default", ["train.max_steps=70", "train.input_budget=20"]).train
    assert isinstance(train, MaskingConfig) and type(train.masking) is MaskingConfig
    assert train.masking.input_budget == 20 and train.masking.mixtures == train.mixtures
    assert train.masking == dataclasses.replace(train, max_steps=80).masking  # a longer run masks the same


def test_a_finetune_recipe_changes_the_train_section_and_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"finetune.train .*: train.task: needs both inputs and targets"):
        load_config("default", ["finetune.train={task: {inputs: [rgb_pixels]}}"])
    recipe = "{run: tuned, max_steps: 30, task: {inputs: [caption], targets: [rgb]}}"
    config = load_config("default", [f"finetune.train={recipe}"])
    tuned = config.finetuned()
    assert (tuned.train.run, tuned.train.max_steps, config.train.run) == ("tuned", 30, "tiny")
    assert tuned.train.run_modalities == ("caption", "rgb") and tuned.train.batch_size == config.train.batch_size
    assert tuned.finetune.train == {} and tuned.finetuned() is tuned  # resolved once
    assert load_config("default", ["finetune.train={}"]).finetuned().train == config.train
    with pytest.raises(ConfigError, match=r"finetune.train \(the fine-tune's train section\): unknown key train.stpes"):
        load_config("default", ["finetune.train={stpes: 3}"])
