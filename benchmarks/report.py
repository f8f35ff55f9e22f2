"""Reports of the benchmarks: markdown and a plot, written from a results dict alone (the one `--json` saves), so
`--from-json` rewrites a report without running anything. Every sentence is either a description of the setup
or method or comes from a figure of the results; what a run did not measure is left out."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from .models import LABELS, REPO, SYSTEMS, llava_tokens_per_image

IMAGE_COUNTS = (0, 1, 2, 4, 8)  # decode: the batch-1 sweep
BATCHED_CASE = (1, 4)  # decode: (images per sample, batch)
TARGET_RATIO = 1.37  # decode / bare LM: the FLOP floor 1.31 of the medium config's cross-attention, plus 5%
TARGET_FLATNESS = 0.03  # the 8-image ratio within 3% of the 1-image ratio


# ------------------------------------------------------------------------------------------------------ shared
def machine_description(device: str, threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "device": device,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import timm

        desc["timm"] = timm.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


def fmt(value, digits=2):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def table(header, rows) -> list[str]:
    """A markdown table: `header` cells, then one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def result_args(argv):
    """The command-line arguments that shaped the results (not where they were written)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out-dir", "--json"):
            skip = True
        elif not arg.startswith(("--out-dir=", "--json=")):
            kept.append(arg)
    return kept


def command(script: str, settings) -> str:
    return " ".join([f"python benchmarks/{script}", *result_args(settings["argv"])])


def machine_lines(machine, settings) -> list[str]:
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {machine['threads']} torch threads, "
        f"device `{machine['device']}`" + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"- torch {machine['torch']}, transformers {machine['transformers']}, timm {machine.get('timm', '?')}, "
        f"Python {machine['python']}; fp32",
        f"- load average when the run started: {machine['load_average']}",
    ]
    if settings.get("quick"):
        lines += ["", "A `--quick` smoke run (few repeats, few new tokens): indicative figures only."]
    return lines


def config_line(dims) -> str:
    if dims["name"] == "tiny":
        return "- config: TINY (a smoke-test size; not the medium config, timings mean nothing)"
    return f"- config: {dims['name']}"


def infimm_setup_lines(dims, gate) -> list[str]:
    """The language model, the vision tower and InfiMM's connector, from the dims the run used."""
    text, vision, conn = dims["text"], dims["vision"], dims["connector"]
    every = conn["cross_attn_every_n_layers"]
    before = ", ".join(str(i) for i in range(every - 1, min(text["num_hidden_layers"], 2 * every + 1), every))
    return [
        f"- language model: Mistral, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_attention_heads']} heads / {text['num_key_value_heads']} kv heads, MLP {text['intermediate_size']}, "
        f"vocab {text['vocab_size']}",
        f"- vision: timm `eva02_large_patch14_clip_336` architecture at width {vision['embed_dim']}, "
        f"{vision['depth']} blocks, {vision['num_heads']} heads, {vision['img_size']} px, patch {vision['patch_size']}",
        f"- InfiMM connector: resampler {conn['resampler_depth']} layers, {conn['resampler_num_latents']} latents, "
        f"{conn['resampler_heads']} heads x {conn['resampler_head_dim']}; a gated cross-attention block every "
        f"{every} decoder layers (before layers {before}, ...), {conn['cross_attn_heads']} heads x "
        f"{conn['cross_attn_head_dim']}, gates set to {gate}",
    ]


def errors_lines(errors) -> list[str]:
    if not errors:
        return []
    return ["## Errors", ""] + [f"- {name}: `{err.strip().splitlines()[-1]}`" for name, err in errors.items()] + [""]


def add_output_arguments(parser, stem: str):
    """The options of where a report goes, shared by the benchmarks' command lines."""
    parser.add_argument("--out-dir", default=str(REPO / "docs"), help=f"where {stem}.md and {stem}.png go (default docs/)")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--from-json", metavar="PATH", help="write the report of a saved --json file; runs nothing")


def write_report(results, out_dir, stem, markdown, plot, json_path=None):
    """`stem.md` and `stem.png` in `out_dir` from `results` (and the results as JSON at `json_path`)."""
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(out_dir / f"{stem}.png", results)
        (out_dir / f"{stem}.md").write_text(markdown(results, f"{stem}.png"))
        print(f"\nWrote {out_dir / f'{stem}.md'} and {out_dir / f'{stem}.png'}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------------ decode
def decode_table(rows) -> list[str]:
    header = ["system", "images", "batch", "prompt tokens", "prefill ms", "decode ms/token",
              "bare LM decode ms/token (same process)", "decode / bare LM", "prefill / bare LM"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([LABELS[r["system"]], str(r["images"]), str(r["batch"]), "error"] + [""] * 5)
        else:
            cells.append([
                LABELS[r["system"]], str(r["images"]), str(r["batch"]), str(r["prompt_tokens"]),
                fmt(r["prefill_ms"], 1), fmt(r["decode_ms"]), fmt(r["bare_decode_ms"]),
                fmt(r["decode_ratio"], 3), fmt(r["prefill_ratio"], 2),
            ])
    return table(header, cells)


def vision_check_line(vision) -> str:
    return (
        "vision tower + resampler, one image: InfiMM {infimm_tower_resampler_ms:.1f} ms vs budget {budget_ms:.1f} ms "
        "(timm EVA alone {timm_eva_ms:.1f} ms for {eva_gflop:.3g} GFLOP, {eva_gflops_per_s:.0f} GFLOP/s; plus the "
        "resampler's {resampler_gflop:.3g} GFLOP at that rate); InfiMM / budget {budget_ratio:.3f} (median of "
        "{rounds} back-to-back rounds, quartiles {budget_ratio_q1:.3f}-{budget_ratio_q3:.3f}) -> {verdict}; split: "
        "InfiMM tower path {infimm_tower_ms:.1f} ms vs timm EVA {timm_eva_ms:.1f} ms, InfiMM resampler "
        "{infimm_resampler_ms:.1f} ms vs its matrix products alone {resampler_gemms_ms:.1f} ms "
        "({gemm_gflops_per_s:.0f} GFLOP/s; EVA + those = {strict_budget_ms:.1f} ms, a lower bound -> {strict})"
    ).format(**vision, verdict=verdict(vision["passed"]), strict="within" if vision["passed_strict"] else "above")


def decode_targets_title() -> str:
    counts = [n for n in IMAGE_COUNTS if n]
    return (f"## Targets (decode / bare LM <= {TARGET_RATIO} for {counts[0]}-{counts[-1]} images, flat in the number "
            "of images, faster than IDEFICS)")


def decode_checks(rows, vision) -> list[str]:
    """The decode speed targets, evaluated on the run's rows; markdown lines."""
    by = {(r["system"], r["images"], r["batch"]): r for r in rows if "error" not in r}
    lines = []
    infimm = {n: by[("infimm", n, 1)]["decode_ratio"] for n in IMAGE_COUNTS if n and ("infimm", n, 1) in by}
    if infimm:
        bad = [n for n, v in infimm.items() if v > TARGET_RATIO]
        lines.append(
            f"- InfiMM decode / bare LM <= {TARGET_RATIO} for {min(infimm)}..{max(infimm)} images: "
            + ", ".join(f"{n} img {v:.3f}" for n, v in infimm.items())
            + f" -> {verdict(not bad)} (worst {max(infimm.values()):.3f})"
        )
    if 1 in infimm and 8 in infimm:
        drift = infimm[8] / infimm[1] - 1
        lines.append(
            f"- 8-image ratio within {TARGET_FLATNESS:.0%} of the 1-image ratio: {infimm[8]:.3f} vs {infimm[1]:.3f} "
            f"({drift:+.1%}) -> {verdict(abs(drift) <= TARGET_FLATNESS)}"
        )
    pairs = [
        (key[1], key[2], by[key], by[("idefics",) + key[1:]])
        for key in by if key[0] == "infimm" and ("idefics",) + key[1:] in by
    ]
    if pairs:
        slower = [(n, b) for n, b, i, d in pairs if i["decode_ratio"] >= d["decode_ratio"]]
        lines.append(
            "- faster than IDEFICS at every image count (decode / bare LM): "
            + ", ".join(f"{n} img x{b} {i['decode_ratio']:.2f} vs {d['decode_ratio']:.2f}" for n, b, i, d in pairs)
            + f" -> {verdict(not slower)}"
        )
    if vision:
        lines.append("- " + vision_check_line(vision))
    return lines


def _phase_sentence(by_phase) -> str:
    """Where InfiMM's graph breaks fell, from the compile probe's per-phase tally."""
    parts = []
    for phase, label in (("decode", "decode steps"), ("prefill", "prefill")):
        p = by_phase[phase]
        reasons = f" ({'; '.join(p['reasons'])})" if p["reasons"] else ""
        parts.append(f"{label} {p['graph_breaks']} graph break(s), {p['graphs']} graph(s){reasons}")
    return "; InfiMM's compiled calls by phase: " + ", ".join(parts)


def compile_lines(entries) -> list[str]:
    lines = []
    for e in entries or []:
        if "error" in e:
            lines.append(f"- torch.compile, {e['cache']} cache: failed: `{e['error']}`")
            continue
        lines.append(
            f"- {e['cache']} cache (1 image, batch 1): InfiMM decode {e['infimm_eager_decode_ms']:.2f} ms/token "
            f"eager -> {e['infimm_compiled_decode_ms']:.2f} compiled (x{e['infimm_speedup']:.2f}), prefill "
            f"{e['infimm_eager_prefill_ms']:.1f} -> {e['infimm_compiled_prefill_ms']:.1f} ms; bare LM "
            f"{e['bare_eager_decode_ms']:.2f} -> {e['bare_compiled_decode_ms']:.2f} ms/token "
            f"(x{e['bare_speedup']:.2f}); compiled InfiMM / compiled bare {e['compiled_ratio']:.3f}; first "
            f"(compiling) calls {e['first_call_s']:.0f} s; {e['graph_breaks']} graph breaks, "
            f"{e['unique_graphs']} graphs"
            + (f" ({'; '.join(e['graph_break_reasons'])})" if e.get("graph_break_reasons") else "")
            + (_phase_sentence(e["by_phase"]["infimm"]) if e.get("by_phase") else "")
        )
    return lines


def closing_lines(script, results, what, examples) -> list[str]:
    """"How to run": the command that wrote the report (with this run's wall time where it was recorded), then
    `examples`; then the run's errors, if any."""
    settings = results["settings"]
    took = f" (this run: {settings['elapsed_s'] / 60:.0f} min)" if settings.get("elapsed_s") else ""
    lines = [f"{command(script, settings)}    # {what}{took}", *examples]
    return ["## How to run", "", "```", *lines, "```", "", *errors_lines(results.get("errors"))]


def decode_markdown(results, plot_name) -> str:
    dims, settings, models = results["dims"], results["settings"], results["models"]
    text, conn = dims["text"], dims["connector"]
    lines = [
        "# Decode speed: InfiMM against the bare LM, IDEFICS and LLaVA",
        "",
        f"Written by `{command('decode.py', settings)}`.",
        "",
        *machine_lines(results["machine"], settings),
        "",
        "## Setup",
        "",
        config_line(dims),
    ]
    setup = infimm_setup_lines(dims, results.get("gate", 0.5))
    setup[0] += " (the bare LM is this model alone, `MistralForCausalLM`)"
    lines += [
        *setup,
        "- IDEFICS: `IdeficsForVisionText2Text`, the same LM width, layers and MLP (its Llama LM has no kv-head "
        f"setting, so {text['num_attention_heads']} kv heads), cross-attention every "
        f"{conn['cross_attn_every_n_layers']} layers (before layers 0, {conn['cross_attn_every_n_layers']}, ...; its "
        "own block shape: LM heads, SwiGLU MLP), its perceiver on with the same shape as InfiMM's, a CLIP-style vision "
        "tower of the EVA's size; a text-only prompt still carries one zero image (as its processor sends)",
        f"- LLaVA-style: `LlavaForConditionalGeneration`, the same Mistral, a CLIP tower of the EVA's size, "
        f"{llava_tokens_per_image(dims)} LM tokens per image (one per patch), so its prompt grows with the images",
        f"- prompt: {dims['prompt_tokens']} tokens, `<image>` tokens evenly spaced in the Flamingo layout; "
        f"{settings['new_tokens']} new tokens, greedy, exactly that many (`min_new_tokens`); {settings['repeats']} "
        f"timed repeat(s) after {settings['warmup']} warmup run(s) per case and model",
        "- models: " + "; ".join(
            f"{LABELS[name]} {info['parameters_m']:.1f} M parameters, LM attention `{info['attn_implementation']}`"
            for name, info in models.items()
        ),
        "- one process per system; in it, the system's and the bare LM's `generate()` run in two threads taking "
        "turns step by step (prefill, prefill, step 1, step 1, ...), so both see the same machine; "
        "prefill = `generate()` start to the first logits; decode ms/token = median over the decode steps of a "
        "step's time in its turn; medians over the repeats; ratios are medians of the per-repeat ratios of those "
        "pairs."
        + (f" The bare LM rows are the bare LM timings of the {LABELS[results['bare_source']].split(' (')[0]} "
           "process." if results.get("bare_source") else ""),
        "",
        "## Results",
        "",
        *decode_table(results["rows"]),
        "",
        f"![decode ms/token against the number of images]({plot_name})",
        "",
        decode_targets_title(),
        "",
        *(decode_checks(results["rows"], results.get("vision_check"))
          or ["- not evaluated (InfiMM not in this run)"]),
        "",
    ]
    if results.get("compile"):
        lines += [
            "## torch.compile",
            "",
            "Compiled: each model's `forward` (`model.forward = torch.compile(model.forward)`, default mode), so for "
            "InfiMM the vision tower, resampler, cross-attention blocks and LM; `generate()`'s loop stays eager. "
            "Eager and compiled runs alternate in the same process; speedups are medians of neighbouring pairs.",
            "",
            *compile_lines(results["compile"]),
            "",
        ]
    lines += closing_lines("decode.py", results, "this table and plot", [
        "python benchmarks/decode.py --quick          # smoke run: 2 repeats, 8 new tokens",
        "python benchmarks/decode.py --systems infimm,bare --images 1,8 --batch 1 --profile   # one decode step, op by op",
        "python benchmarks/decode.py --compile --systems infimm --images 1 --batch 1         # torch.compile timings",
        "python benchmarks/decode.py --device cuda    # on a GPU",
    ])
    return "\n".join(lines)


def decode_plot(path, results):
    plt = _pyplot()
    rows = [r for r in results["rows"] if "error" not in r]
    dims = results["dims"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"infimm": "o", "bare": "s", "idefics": "^", "llava": "D"}
    for system in SYSTEMS:
        points = sorted((r["images"], r["decode_ms"], r["decode_ratio"]) for r in rows
                        if r["system"] == system and r["batch"] == 1)
        if not points:
            continue
        xs, ms, ratio = zip(*points)
        left.plot(xs, ms, marker=markers[system], label=LABELS[system])
        right.plot(xs, ratio, marker=markers[system], label=LABELS[system])
    right.axhline(TARGET_RATIO, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET_RATIO}")
    for ax in (left, right):
        ax.set_xlabel("images in the prompt (batch 1)")
        ax.set_xticks(sorted({r["images"] for r in rows if r["batch"] == 1}))
        ax.grid(alpha=0.3)
    left.set_ylabel("decode ms / token")
    right.set_ylabel("decode ms / token, ratio to the bare LM")
    left.set_ylim(bottom=0)
    fig.legend(*right.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    text = dims["text"]
    fig.suptitle(f"Greedy decode, Mistral {text['hidden_size']} x {text['num_hidden_layers']} layers, "
                 f"{dims['prompt_tokens']}-token prompt")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ prefix reuse
CHAT_TARGET = (8, 1.3)  # turn 8's prefill with reuse <= 1.3 x turn 1's
FEW_SHOT_TARGETS = {8: 1.25, 32: 1.5}  # per-query prefill with reuse <= this x the 0-shot query's
LOGIT_TOLERANCE = 1e-3  # reuse must give the full prompt's first-token logits (fp32 rounding apart)


def reuse_checks(results) -> list[str]:
    """The prefix-reuse targets, evaluated on the run's rows; markdown lines."""
    lines = []
    chat = {r["turn"]: r for r in results.get("chat") or []}
    turn, limit = CHAT_TARGET
    if turn in chat:
        r = chat[turn]
        lines.append(f"- chat, turn {turn} with reuse <= {limit} x turn 1: x{r['with_ratio']:.2f} "
                     f"({fmt(r['with_ms'], 1)} ms vs {fmt(r['turn1_ms'], 1)} ms; without reuse x{r['without_ratio']:.2f}) "
                     f"-> {verdict(r['with_ratio'] <= limit)}")
    for r in results.get("few_shot") or []:
        if r["shots"] in FEW_SHOT_TARGETS:
            limit = FEW_SHOT_TARGETS[r["shots"]]
            lines.append(
                f"- {r['shots']}-shot, per query with reuse <= {limit} x the 0-shot query's: x{r['with_ratio']:.2f} "
                f"({fmt(r['with_query_ms'], 1)} ms vs {fmt(r['zero_query_ms'], 1)} ms; the continuation's prefill "
                f"alone x{r['with_prefill_ratio']:.2f}; without reuse x{r['without_ratio']:.2f}) "
                f"-> {verdict(r['with_ratio'] <= limit)}"
            )
    diffs = [(f"chat turn {r['turn']}", r["logit_diff"]) for r in results.get("chat") or []]
    diffs += [(f"{r['shots']}-shot", r["logit_diff"]) for r in results.get("few_shot") or []]
    if diffs:
        where, worst = max(diffs, key=lambda d: d[1])
        lines.append(f"- reuse gives the full prompt's first-token logits (max |difference| <= {LOGIT_TOLERANCE:g}): "
                     f"worst {worst:.2e} ({where}) -> {verdict(worst <= LOGIT_TOLERANCE)}")
    return lines


def chat_table(rows) -> list[str]:
    header = ["turn", "images", "prompt tokens", "cached tokens", "new tokens", "prefill with reuse ms",
              "prefill without ms", "with reuse / turn 1", "without / turn 1", "max abs logit difference"]
    return table(header, ([str(r["turn"]), str(r["images"]), str(r["prompt_tokens"]), str(r["cached_tokens"]),
                           str(r["new_tokens"]), fmt(r["with_ms"], 1), fmt(r["without_ms"], 1),
                           fmt(r["with_ratio"]), fmt(r["without_ratio"]), f"{r['logit_diff']:.1e}"] for r in rows))


def few_shot_table(rows) -> list[str]:
    header = ["shots", "images per prompt", "prompt tokens", "cached tokens", "per query with reuse ms",
              "of which the continuation's prefill ms", "per query without ms", "0-shot per query ms",
              "with reuse / 0-shot", "without / 0-shot", "demonstrations' prefill (once) ms", "copy + expand ms",
              "max abs logit difference"]
    return table(header, ([str(r["shots"]), str(r["images_per_prompt"]), str(r["prompt_tokens"]),
                           str(r["prefix_tokens"]), fmt(r["with_query_ms"], 1), fmt(r["with_prefill_query_ms"], 1),
                           fmt(r["without_query_ms"], 1), fmt(r["zero_query_ms"], 1), fmt(r["with_ratio"]),
                           fmt(r["without_ratio"]), fmt(r["prefix_ms"], 0), fmt(r["expand_ms"], 1),
                           f"{r['logit_diff']:.1e}"] for r in rows))


def prefix_reuse_markdown(results, plot_name) -> str:
    dims, settings, cache = results["dims"], results["settings"], results["cache_argument"]
    info = results["models"]["infimm"]
    lines = [
        "# Prefix reuse: prefill with the prompt's prefix already in the cache",
        "",
        f"Written by `{command('prefix_reuse.py', settings)}`.",
        "",
        *machine_lines(results["machine"], settings),
        "",
        "## Setup",
        "",
        config_line(dims) + " (the decode benchmark's InfiMM)",
        *infimm_setup_lines(dims, results.get("gate", 0.5)),
        f"- model: {info['parameters_m']:.1f} M parameters, LM attention `{info['attn_implementation']}`; prompts from "
        "the release's tokenizer and the processor (`InfiMMProcessor.apply_chat_template` for the chat), random "
        "noise images",
        f"- reuse, transformers' pattern: the prefix once, `out = model(**prefix_inputs, {cache}=DynamicCache())`, "
        f"then `model.generate(**full_inputs, {cache}=copy.deepcopy(out.{cache}), max_new_tokens=1)` with the full "
        "prompt's `input_ids`, `attention_mask` and `pixel_values` (every image of the prompt)",
        f"- {settings['rounds']} timed round(s) after {settings['warmup']} warmup round(s) per chat turn and per "
        "few-shot case with reuse (the few-shot prompts without reuse: below); in a round, the calls compared run in "
        "threads that take turns at every layer (decoder layers, vision blocks, resampler layers), the order "
        "reversed every other round, so they share the machine's state; prefill = the time a "
        "`generate(max_new_tokens=1)` call held its turns; figures are medians over the rounds, ratios medians of "
        "the per-round ratios",
        "",
    ]
    if results.get("chat") is not None:
        rows = results["chat"]
        lines += [
            "## Chat",
            "",
            f"{len(rows)} turns, one image and one question per user turn, the assistant's answers (fixed texts, forced "
            "token by token) in the conversation. With reuse, each turn starts from the cache the previous turn's "
            f"`generate(..., return_dict_in_generate=True)` returned (`out.{cache}`: the prompt and the answer but its "
            "last token), so it feeds only the tokens after those; without, the whole conversation each turn. Each "
            "round runs turn k with reuse, without, and turn 1 (an empty cache) in turns.",
            "",
            *chat_table(rows),
            "",
        ]
    if results.get("few_shot") is not None:
        rows = results["few_shot"]
        lines += [
            "## Few-shot",
            "",
            f"`<image>caption<|endofchunk|>` per demonstration, then the query's `<image>`; a batch of "
            f"{settings['queries']} query images. With reuse, the demonstrations' cache (batch 1, its own prefill in the "
            f"table) is deep-copied and expanded to the batch (`{cache}.batch_repeat_interleave({settings['queries']})`) "
            "for each batch: per query with reuse = (copy + expand + the continuation's prefill) / queries. "
            f"Without, the whole prompts. {settings['rounds']} round(s) run the batch with reuse and the 0-shot batch "
            f"(`<image>` alone) in turns; then {settings['without_rounds']} round(s) the demonstrations' prefill, the "
            "whole prompts and the 0-shot batch again; each ratio is to the 0-shot batch of the same round.",
            "",
            *few_shot_table(rows),
            "",
        ]
    lines += [
        f"![prefill with and without reuse]({plot_name})",
        "",
        "## Targets",
        "",
        *(reuse_checks(results) or ["- not evaluated (no chat turn 8 and no 8- or 32-shot case in this run)"]),
        "",
    ]
    lines += closing_lines("prefix_reuse.py", results, "this report and plot", [
        "python benchmarks/prefix_reuse.py --quick    # 2 rounds",
        "python benchmarks/prefix_reuse.py --skip chat --shots 4,8,16,32    # few-shot only, more shot counts",
    ])
    return "\n".join(lines)


def prefix_reuse_plot(path, results):
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    chat = results.get("chat") or []
    if chat:
        turns = [r["turn"] for r in chat]
        left.plot(turns, [r["with_ratio"] for r in chat], marker="o", label="with reuse")
        left.plot(turns, [r["without_ratio"] for r in chat], marker="s", label="without reuse")
        turn, limit = CHAT_TARGET
        if turn in turns:
            left.scatter([turn], [limit], marker="_", s=400, color="grey", label="target")
        left.set_xticks(turns)
    left.set_xlabel("chat turn (one image per turn)")
    left.set_ylabel("prefill / turn 1's")
    left.set_ylim(bottom=0)
    left.set_title("Chat: prefill per turn")
    few = results.get("few_shot") or []
    if few:
        shots = [0] + [r["shots"] for r in few]
        right.plot(shots, [1.0] + [r["with_ratio"] for r in few], marker="o", label="with reuse")
        right.plot(shots, [1.0] + [r["without_ratio"] for r in few], marker="s", label="without reuse")
        targets = [(s, FEW_SHOT_TARGETS[s]) for s in shots if s in FEW_SHOT_TARGETS]
        if targets:
            right.scatter(*zip(*targets), marker="_", s=400, color="grey", label="target")
        right.set_xticks(shots)
        right.set_yscale("log")
        right.yaxis.set_major_formatter(ScalarFormatter())
        right.yaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel(f"demonstrations ({results['settings']['queries']} queries per batch)")
    right.set_ylabel("per-query prefill / the 0-shot query's")
    right.set_title("Few-shot: per-query prefill")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    text = results["dims"]["text"]
    fig.suptitle(f"Prefix reuse, InfiMM with Mistral {text['hidden_size']} x {text['num_hidden_layers']} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
