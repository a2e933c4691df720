"""The command line: the original dry-run form, and one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from weighted_mtp.cli import main

DRY_RUN = [
    "--config", "configs/defaults.yaml",
    "--recipe", "configs/recipe.baseline.yaml",
    "--preset", "local-light",
    "--use-micro-model",
    "--dry-run",
]


def _listing(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_original_dry_run_command_prints_resolved_config_and_writes_nothing(in_tmp_repo):
    before = _listing(in_tmp_repo)
    proc = subprocess.run(
        [sys.executable, "-m", "weighted_mtp", *DRY_RUN], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: micro" in proc.stdout
    assert "scheme: uniform" in proc.stdout
    assert "tokens / step" in proc.stdout
    assert _listing(in_tmp_repo) == before


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--recipe", "baseline", "training.lrr=1e-4"],
            "error: command line override training.lrr: unknown key 'training.lrr'; did you mean 'training.lr'?",
        ),
        (
            ["--recipe", "baseline", "data.max_length=long"],
            "error: command line override data.max_length: data.max_length: Input should be a valid integer, "
            "unable to parse string as an integer (got 'long')",
        ),
        (["--recipe", "baseline", "--preset", "local-lite"], "error: unknown preset 'local-lite'; did you mean 'local-light'?"),
        (["--recipe", "basline"], "error: unknown recipe 'basline'; did you mean 'baseline'?"),
        (["--recipe", "missing.yaml"], "error: missing.yaml: recipe file not found"),
        (["--config", "nope.yaml", "--recipe", "baseline"], "error: nope.yaml: config file not found"),
        (["--recipe", "baseline", "nonsense.key=1"], "error: command line override nonsense.key: unknown key 'nonsense'"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(in_tmp_repo, capsys, argv, message):
    before = _listing(in_tmp_repo)
    code, err = _run(capsys, "train", *argv, "--dry-run")
    assert code == 2
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert _listing(in_tmp_repo) == before


def test_unknown_key_in_recipe_file_through_cli(in_tmp_repo, capsys):
    recipe = in_tmp_repo / "configs" / "recipe.typo.yaml"
    recipe.write_text("weighting:\n  schem: uniform\n")
    code, err = _run(capsys, "--recipe", "typo", "--dry-run")
    assert code == 2
    assert err == "error: configs/recipe.typo.yaml: unknown key 'weighting.schem'; did you mean 'weighting.scheme'?\n"


def test_bare_form_means_train_and_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "config"):
        assert command in out


def test_console_script_is_installed():
    proc = subprocess.run([Path(sys.executable).with_name("wmtp"), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("weighted_mtp ")


def test_config_command_shows_layers(in_tmp_repo, capsys):
    code = main(["config", "--recipe", "rho1", "--preset", "local-light", "rho1.top_k_ratio=0.3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top_k_ratio: 0.3" in out
    assert "configs/recipe.rho1.yaml < configs/presets/local-light.yaml < command line override rho1.top_k_ratio" in out


def test_an_unknown_command_is_named_as_such(capsys):
    from weighted_mtp.cli import main

    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown command 'frobnicate' (commands: train, config, ls, cp, data, model, generate, eval, rollout, inspect, demo, study)\n"
    )
    assert main(["evla", "--model", "x"]) == 2
    assert capsys.readouterr().err.endswith("did you mean 'eval'?\n")


def test_resume_without_a_checkpoint_fails_before_writing_the_run_directory(in_tmp_repo, shared_data, capsys):
    from weighted_mtp.cli import main

    status = main(["train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model", "--resume",
                   f"paths.raw_data={shared_data}", "tracking.enabled=false", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1] == "error: storage/runs/baseline/checkpoints: --resume given but there is no complete checkpoint"
    assert not (in_tmp_repo / "storage" / "runs" / "baseline").exists()


def _train(shared_data, *overrides):
    from weighted_mtp.cli import main

    return main(["train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model",
                 f"paths.raw_data={shared_data}", "tracking.enabled=false", "device=cpu", "training.max_steps=2",
                 "training.save_every=1", "training.eval_every=null", "data.val_split=null", *overrides])


def test_resuming_a_run_directory_of_another_shape_names_the_difference(in_tmp_repo, shared_data, capsys):
    assert _train(shared_data) == 0
    capsys.readouterr()
    assert _train(shared_data, "model.n_future_tokens=3", "training.max_steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: storage/runs/baseline: holds a checkpoint of another run (model.n_future_tokens is 4 there, 3 here); "
        "set a new experiment.name, or start over with --fresh"
    )
    assert _train(shared_data, "model.n_future_tokens=3", "training.max_steps=3", "experiment.name=other") == 0


def test_fresh_starts_a_run_directory_over(in_tmp_repo, shared_data, capsys):
    import json

    assert _train(shared_data) == 0
    run_dir = in_tmp_repo / "storage" / "runs" / "baseline"
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    assert _train(shared_data, "model.n_future_tokens=3", "training.max_steps=1", "--fresh") == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # nothing of the first run's two steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step_00000001"]
    capsys.readouterr()
    assert _train(shared_data, "--fresh", "--resume") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --resume and --fresh contradict each other: continue the run, or start it over"
    )


def test_a_truncated_checkpoint_is_a_one_line_error(in_tmp_repo, shared_data, capsys):
    assert _train(shared_data) == 0
    capsys.readouterr()
    weights = in_tmp_repo / "storage" / "runs" / "baseline" / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert _train(shared_data, "training.max_steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {weights.relative_to(in_tmp_repo)}: unreadable (") and err.endswith(
        "the checkpoint is damaged: delete storage/runs/baseline/checkpoints/step_00000002 to resume from the one before"
    )


def test_usage_mistakes_are_one_line(capsys):
    from weighted_mtp.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", "--model", "x", "--samples", "y"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: wmtp eval: argument --samples: not allowed with argument --model\n"


def test_info_on_an_unknown_dataset_lists_the_known_ones(in_tmp_repo, capsys):
    from weighted_mtp.cli import main

    assert main(["data", "info", "nosuch"]) == 2
    assert capsys.readouterr().err == "error: unknown dataset 'nosuch' (known: codecontests, humaneval, mbpp, rollouts)\n"


def test_ls_lists_everything_a_command_line_can_name(repo_root, monkeypatch, capsys):
    from weighted_mtp.cli import main
    from weighted_mtp.data.sources import DATASETS
    from weighted_mtp.eval.benchmarks import BENCHMARKS
    from weighted_mtp.models.loading import MODEL_LOADERS

    monkeypatch.chdir(repo_root)
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    recipes = sorted(p.name.removeprefix("recipe.").removesuffix(".yaml") for p in (repo_root / "configs").glob("recipe.*.yaml"))
    names = [*recipes, "local-light", "cpu-smollm2", "a100x4", *MODEL_LOADERS, *BENCHMARKS, *DATASETS]
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(names) <= listed
    assert all(len(line.split()) > 1 for line in out.splitlines() if line.startswith("  "))  # each says what it is


def test_cp_copies_a_recipe_once_and_refuses_to_overwrite(repo_root, tmp_path, monkeypatch, capsys):
    from weighted_mtp.cli import main

    monkeypatch.chdir(repo_root)
    target = tmp_path / "mine" / "rho1.yaml"
    assert main(["cp", "rho1", str(target)]) == 0
    assert target.read_text() == (repo_root / "configs" / "recipe.rho1.yaml").read_text()
    target.write_text("# edited\n")
    capsys.readouterr()
    assert main(["cp", "rho1", str(target)]) == 2
    assert capsys.readouterr().err == f"error: {target}: already exists; nothing was copied\n"
    assert target.read_text() == "# edited\n"
    assert main(["cp", "presets/local-light", str(tmp_path / "light.yaml")]) == 0
    assert main(["cp", "nosuch", str(tmp_path / "x.yaml")]) == 2 and not (tmp_path / "x.yaml").exists()
