"""Config layering, provenance and validation errors."""

from pathlib import Path

import pytest
import yaml

from weighted_mtp.config import load_config, load_saved_config, save_resolved_config
from weighted_mtp.config.loader import deep_merge, parse_override
from weighted_mtp.errors import ConfigError

RECIPES = ["baseline", "critic", "verifiable", "rho1", "ref_tuning"]
PRESETS = ["local-light", "cpu-smollm2", "a100x4"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_recipe_and_preset_validate(repo_root, recipe, preset, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = load_config("configs/defaults.yaml", recipe, preset).config
    assert config.experiment.pipeline == recipe


def test_layers_apply_in_order(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    resolved = load_config(
        "configs/defaults.yaml",
        "configs/recipe.baseline.yaml",
        "local-light",
        overrides=["training.lr=1e-4", "data.max_length=512", "evaluation.k=[1,5]"],
        use_micro_model=True,
    )
    config = resolved.config
    assert config.training.lr == pytest.approx(1e-4)  # override beats preset's 1e-3
    assert config.data.max_length == 512  # override beats preset's 128
    assert config.training.max_steps == 4  # from the preset
    assert config.weighting.scheme == "uniform"  # from the recipe
    assert config.model.name == "micro"
    assert config.evaluation.k == [1, 5]
    assert resolved.sources[0] == "configs/defaults.yaml"
    assert resolved.sources[-1] == "command line override evaluation.k"


def test_verifiable_recipe_keeps_original_stage2_keys(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = load_config("configs/defaults.yaml", "verifiable").config
    assert config.stage2.value_loss.enabled is True
    assert config.stage2.value_loss.clip_range == pytest.approx(0.2)
    weighting = config.stage2.value_weighting
    assert (weighting.gae_gamma, weighting.gae_lambda) == (1.0, 0.95)
    assert weighting.td_error_normalization == "zscore"
    assert (weighting.weight_clip_min, weighting.weight_clip_max) == (0.1, 3.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("training.lr=1e-4", ("training.lr", 1e-4)),
        ("data.max_length=512", ("data.max_length", 512)),
        ("s3.bucket=null", ("s3.bucket", None)),
        ("model.name=micro", ("model.name", "micro")),
        ("evaluation.k=[1, 5, 10]", ("evaluation.k", [1, 5, 10])),
        ("training.lora.enabled=true", ("training.lora.enabled", True)),
    ],
)
def test_parse_override_values_are_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["training.lr", "=3", "training..lr=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        parse_override(text)


def test_deep_merge_replaces_leaves_and_lists():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}, "d": 1}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_in_recipe_names_file_and_suggests(tmp_path):
    recipe = _write(tmp_path / "recipe.x.yaml", {"training": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(None, str(recipe))
    assert str(err.value) == f"{recipe}: unknown key 'training.learning_rate'; did you mean 'training.lr'?"


def test_unknown_nested_key_in_stage2(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"stage2": {"value_weighting": {"gae_lamda": 0.9}}})
    with pytest.raises(ConfigError, match=r"'stage2.value_weighting.gae_lamda'; did you mean 'stage2.value_weighting.gae_lambda'\?"):
        load_config(None, str(recipe))


def test_wrong_type_names_the_layer_that_set_it(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"training": {"batch_size": "four"}})
    with pytest.raises(ConfigError, match=rf"^{recipe}: training.batch_size: Input should be a valid integer.*'four'"):
        load_config(None, str(recipe))


def test_cross_field_error(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"stage2": {"value_weighting": {"weight_clip_min": 5.0}}})
    with pytest.raises(ConfigError, match="weight_clip_min \\(5.0\\) is above weight_clip_max"):
        load_config(None, str(recipe))


def test_invalid_yaml_names_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  lr: 1\n bad: [\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}:\d+: invalid YAML"):
        load_config(None, str(recipe))


def test_top_level_must_be_mapping(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, str(recipe))


def test_saved_config_round_trips(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = load_config("configs/defaults.yaml", "verifiable", "cpu-smollm2").config
    path = save_resolved_config(config, tmp_path / "run")
    assert load_saved_config(path) == config
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]


def test_saving_the_config_clears_temporaries_of_a_killed_write(tmp_path):
    from weighted_mtp.config import load_config, save_resolved_config

    stale = tmp_path / ".config.yaml.abc123.tmp"
    stale.write_text("half a config")
    other = tmp_path / ".metrics.jsonl.x.tmp"
    other.write_text("not ours")
    save_resolved_config(load_config(recipe="baseline").config, tmp_path)
    assert not stale.exists() and other.exists() and (tmp_path / "config.yaml").is_file()


def test_the_original_designs_rho1_weighted_recipe_is_soft_rho1(monkeypatch):
    from pathlib import Path

    from weighted_mtp.config import load_config

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    for recipe in ("rho1_weighted", "configs/recipe.rho1_weighted.yaml"):
        config = load_config(recipe=recipe).config
        assert (config.experiment.pipeline, config.weighting.scheme, config.rho1.selection) == ("rho1", "rho1", "soft")
        assert config.experiment.name == "rho1_weighted"


def test_wmtp_config_names_the_layer_of_every_value_and_is_the_config_as_yaml(monkeypatch, capsys):
    from pathlib import Path

    import yaml

    from weighted_mtp.cli import main
    from weighted_mtp.config import load_config
    from weighted_mtp.config.loader import public_dump

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    argv = ["--recipe", "verifiable", "--preset", "local-light", "--use-micro-model", "training.lr=3e-4"]
    assert main(["config", *argv]) == 0
    out = capsys.readouterr().out
    config = load_config(recipe="verifiable", preset="local-light", use_micro_model=True, overrides=["training.lr=3e-4"]).config
    assert yaml.safe_load(out) == public_dump(config)
    lines = out.splitlines()
    assert "  lr: 0.0003  # command line override training.lr" in lines
    assert "  name: micro  # --use-micro-model" in lines
    assert "device: cpu  # configs/presets/local-light.yaml" in lines
    assert "generation_dtype: auto" in lines  # the schema's default: no comment
