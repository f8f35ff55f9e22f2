"""Prefill time when a prompt's prefix is already in the language-model cache: a multi-turn chat and few-shot.

(a) An 8-turn chat, one image per user turn, prompts from the processor's chat template: prefill per turn with the
cache grown turn by turn, and of the whole conversation each turn. Target: turn 8 <= 1.3 x turn 1 with reuse.
(b) 8- and 32-shot captioning over a batch of 16 query images: per-query prefill with the demonstrations' cache
copied and expanded to the batch, and without reuse. Target: <= 1.25 x (8-shot) / 1.5 x (32-shot) the 0-shot
query's, with reuse. Method and reuse pattern: `benchmarks/reuse.py`.

Usage::

    python benchmarks/prefix_reuse.py            # medium config, writes docs/prefix_reuse.md and docs/prefix_reuse.png
    python -m benchmarks.prefix_reuse --quick    # 2 rounds
    python benchmarks/prefix_reuse.py --tiny --quick --out-dir /tmp/reuse   # seconds; what the smoke test runs
    python benchmarks/prefix_reuse.py --from-json results.json --out-dir /tmp/reuse   # the report again, no run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the `benchmarks` package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.models import GATE, dims_for, model_info
from benchmarks.report import (
    add_output_arguments, machine_description, prefix_reuse_markdown, prefix_reuse_plot, reuse_checks, write_report,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 2; --tiny 1)")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the same layout (seconds; for tests)")
    p.add_argument("--quick", action="store_true", help="2 rounds per case")
    p.add_argument("--rounds", type=int, help="timed rounds per case (default 5; --quick 2; --tiny 1)")
    p.add_argument("--warmup", type=int, help="untimed rounds per case first (default 1; --tiny 0)")
    p.add_argument("--without-rounds", type=int, default=1,
                   help="few-shot: timed rounds of the whole prompts without reuse (default 1: minutes each at 32 shots)")
    p.add_argument("--turns", type=int, default=8, help="chat turns (default 8)")
    p.add_argument("--shots", default="8,32", help="demonstration counts of the few-shot cases (default 8,32)")
    p.add_argument("--queries", type=int, default=16, help="query images per few-shot batch (default 16)")
    p.add_argument("--skip", choices=("chat", "few-shot"), help="leave one part out")
    add_output_arguments(p, "prefix_reuse")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.shots = sorted({int(x) for x in args.shots.split(",") if x.strip()})
    except ValueError:
        p.error(f"--shots takes a comma list of positive integers, e.g. 8,32; got {args.shots!r}")
    if not args.shots or min(args.shots) < 1 or min(args.queries, args.turns, args.without_rounds) < 1:
        p.error("--shots, --queries, --turns and --without-rounds must be positive")
    if args.threads is None:
        args.threads = 1 if args.tiny else 2
    if args.rounds is None:
        args.rounds = 1 if args.tiny else 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 1
    return args


def run(args) -> dict:
    import torch
    import transformers

    from benchmarks.reuse import build, cache_argument, chat_benchmark, few_shot_benchmark

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dims = dims_for(args.tiny)
    # The 32-shot prompt and the 8-turn chat are a few hundred tokens: room for them in the tiny config too.
    dims["text"]["max_position_embeddings"] = max(dims["text"]["max_position_embeddings"], 2048)
    machine = machine_description(args.device, args.threads)
    print(f"Machine: {machine}", flush=True)
    model, processor = build(dims, device)
    results = {"machine": machine, "dims": dims, "gate": GATE, "models": {"infimm": model_info(model)},
               "cache_argument": cache_argument(), "errors": {}}
    parts = {
        "chat": lambda: chat_benchmark(model, processor, device, args.turns, args.rounds, args.warmup),
        "few_shot": lambda: few_shot_benchmark(model, processor, device, args.shots, args.queries, args.rounds,
                                               args.warmup, args.without_rounds),
    }
    for name, part in parts.items():
        if args.skip == name.replace("_", "-"):
            continue
        print(f"{name.replace('_', '-')}, {args.rounds} round(s):", flush=True)
        try:
            with torch.inference_mode():
                results[name] = part()
        except Exception:  # the report says what failed; the other part still runs
            results["errors"][name] = traceback.format_exc()
            print(results["errors"][name], file=sys.stderr)
    results["settings"] = {"argv": args.argv, "quick": args.quick, "rounds": args.rounds, "warmup": args.warmup,
                           "without_rounds": args.without_rounds, "turns": args.turns, "shots": args.shots,
                           "queries": args.queries,
                           "elapsed_s": time.perf_counter() - started}
    return results


def main(argv=None):
    args = parse_args(argv)
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    print("\nTargets:\n" + "\n".join(reuse_checks(results)))
    write_report(results, None if args.no_write else args.out_dir, "prefix_reuse", prefix_reuse_markdown,
                 prefix_reuse_plot, None if args.from_json else args.json)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
