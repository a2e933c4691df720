"""Rollouts: gold samples beside the model's, resume after a kill, one prompt path with training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weighted_mtp.config import load_config
from weighted_mtp.errors import ConfigError
from weighted_mtp.eval.rollout import run_rollouts


class KilledAfter:
    """A progress display that stops the run after `pieces` pieces, as a kill -9 between pieces would."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, total: int, done: int = 0) -> None:
        self.total, self.done = total, done

    def advance(self, problems: int, tokens: int) -> None:
        self.pieces -= 1
        if self.pieces == 0:
            raise KeyboardInterrupt


def micro_config(tmp: Path, shared_data: Path, *overrides: str):
    return load_config(
        defaults="configs/defaults.yaml",
        recipe="critic",
        preset="local-light",
        use_micro_model=True,
        overrides=[
            f"paths.raw_data={shared_data}",
            f"paths.rollouts={tmp / 'rollouts'}",
            f"paths.models={tmp / 'models'}",
            "device=cpu",
            "tracking.enabled=false",
            "rollout.max_new_tokens=12",
            "rollout.temperature=1.0",
            *overrides,
        ],
    ).config


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_rollout_resumes_to_the_same_file_as_an_uninterrupted_one(in_tmp_repo, shared_data):
    config = micro_config(in_tmp_repo, shared_data)
    whole = in_tmp_repo / "whole.jsonl"
    run_rollouts(config, limit=5, n_samples=2, out=whole, workers=1, rows_per_piece=4)

    resumed = in_tmp_repo / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_rollouts(config, limit=5, n_samples=2, out=resumed, workers=1, rows_per_piece=4, progress=KilledAfter(2))
    partial = resumed.with_name("resumed.jsonl.partial")
    assert not resumed.exists() and len(read(partial)) == 2 * 3 * 2  # two pieces of two problems, 2 + gold each
    with open(partial, "a") as handle:
        handle.write('{"problem_id": "mbpp/605", "outp')  # a write cut short by the kill
    summary = run_rollouts(config, limit=5, n_samples=2, out=resumed, workers=1, rows_per_piece=4)
    assert summary.resumed_problems == 4
    assert read(resumed) == read(whole)
    assert not partial.exists() and not resumed.with_name("resumed.jsonl.partial.json").exists()


def test_a_finished_rollout_is_not_sampled_again_with_the_same_settings(in_tmp_repo, shared_data):
    config = micro_config(in_tmp_repo, shared_data)
    out = in_tmp_repo / "r.jsonl"
    first = run_rollouts(config, limit=2, n_samples=2, out=out, workers=1)
    written = out.stat().st_mtime_ns
    again = run_rollouts(config, limit=2, n_samples=2, out=out, workers=1, progress=KilledAfter(1))  # would stop
    assert again == first and out.stat().st_mtime_ns == written
    other = run_rollouts(config, limit=2, n_samples=3, out=out, workers=1)  # other settings: a new rollout
    assert other.n_samples == 2 * 4 and out.stat().st_mtime_ns != written
    assert run_rollouts(config, limit=2, n_samples=3, out=out, workers=1, fresh=True).n_samples == 2 * 4


def test_resuming_with_other_settings_is_refused(in_tmp_repo, shared_data):
    config = micro_config(in_tmp_repo, shared_data)
    out = in_tmp_repo / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_rollouts(config, limit=4, n_samples=2, out=out, workers=1, rows_per_piece=2, progress=KilledAfter(1))
    with pytest.raises(ConfigError, match=r"r\.jsonl\.partial: an unfinished rollout with other settings.*--fresh"):
        run_rollouts(config, limit=4, n_samples=3, out=out, workers=1, rows_per_piece=2)
    from weighted_mtp.models.loading import generation_dtype, resolve_device

    current = generation_dtype(config, resolve_device(config.device))
    other = config.model_copy(update={"generation_dtype": "bfloat16" if current == "float32" else "float32"})
    with pytest.raises(ConfigError, match="other settings"):  # sampled in another dtype: other tokens
        run_rollouts(other, limit=4, n_samples=2, out=out, workers=1, rows_per_piece=2)
    summary = run_rollouts(config, limit=4, n_samples=3, out=out, workers=1, rows_per_piece=2, fresh=True)
    assert summary.n_samples == 4 * 4 and summary.resumed_problems == 0


def test_gold_samples_make_pairs_and_are_labelled_by_the_sandbox(in_tmp_repo, shared_data):
    config = micro_config(in_tmp_repo, shared_data)
    out = in_tmp_repo / "r.jsonl"
    summary = run_rollouts(config, limit=3, n_samples=2, out=out, workers=1)
    records = read(out)
    gold = [r for r in records if r["source"] == "gold"]
    assert len(gold) == 3 and all(r["is_correct"] and r["status"] == "passed" for r in gold)
    # a random micro model fails every test: every problem is a (gold, model) pair
    assert summary.correct == {"gold": 3} and summary.incorrect == {"model": 6}
    assert summary.problems_usable_as_pairs == 3 and summary.problems_with_correct_model_sample == 0
    assert "3 usable as pairs" in summary.line()

    no_gold = run_rollouts(config, limit=3, n_samples=2, out=in_tmp_repo / "n.jsonl", workers=1, include_gold=False)
    assert no_gold.problems_usable_as_pairs == 0 and "gold" not in no_gold.correct


@pytest.mark.parametrize("template", ["alpaca", "chat", "mbpp_fewshot"])
def test_rollouts_and_evaluation_prompt_with_the_token_ids_training_reads(in_tmp_repo, shared_data, template):
    """The prompt part of a training example equals what rollouts and `wmtp eval` feed the model."""
    from weighted_mtp.data.collate import example_from_record
    from weighted_mtp.data.templates import prompt_adds_bos, render
    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.models.loading import load_model

    _, tokenizer = load_model("smollm2-135m", models_dir=in_tmp_repo / "models")
    benchmark = get_benchmark("mbpp")
    problem = benchmark.load(shared_data, "train", 1)[0]
    record = {
        "problem_id": problem.problem_id, "instruction": problem.instruction, "input": problem.input,
        "output": problem.correct[0], "is_correct": True,
    }
    example = example_from_record(
        record, *render(template, record, tokenizer), tokenizer, 4096, add_bos=prompt_adds_bos(template)
    )
    sampled = tokenizer.encode(benchmark.prompt(problem, template, tokenizer), add_bos=prompt_adds_bos(template))
    assert example.input_ids[: example.n_prompt] == sampled


def test_sampling_a_split_in_length_groups_gives_each_problem_its_own_samples(in_tmp_repo, shared_data):
    """Pieces group prompts by length; a problem's samples depend only on its place in the split."""
    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.eval.progress import GenerationProgress
    from weighted_mtp.eval.sampling import SamplingSettings, sample_problems, sample_split
    from weighted_mtp.models.loading import load_model

    model, tokenizer = load_model("micro", models_dir=in_tmp_repo / "models")
    model.eval()
    benchmark = get_benchmark("mbpp")
    problems = benchmark.load(shared_data, "test", 12)
    settings = SamplingSettings(n_samples=2, temperature=1.0, max_new_tokens=6, template="alpaca", seed=3)
    together, _ = sample_split(model, tokenizer, benchmark, problems, settings, GenerationProgress("never"))
    assert list(together) == [benchmark.task_id(p) for p in problems]
    for index in (0, 5, 11):
        alone, _ = sample_problems(model, tokenizer, benchmark, [problems[index]], [index], settings)
        assert alone == {benchmark.task_id(problems[index]): together[benchmark.task_id(problems[index])]}
