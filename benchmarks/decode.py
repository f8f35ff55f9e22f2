"""Generation speed of InfiMM against the bare language model, IDEFICS and a LLaVA-style model.

Flamingo's claim (Alayrac et al. 2022, sec. 1 and 2.2) is that images do not lengthen the language model's
sequence: with the image keys/values computed once, a decode step should cost the bare LM plus the gated
cross-attention blocks and nothing that grows with the number of images. This script measures that claim on the
systems of `benchmarks/models.py` (random weights, fp32, the same "medium" dims).

Method. One worker process per system (``spawn`` by default, ``fork`` for ``--tiny``); inside it the system and
the bare LM are built once, and each repeat runs their two ``generate()`` calls in two threads that take turns step
by step (system prefill, bare prefill, system step 1, bare step 1, ...; which one starts alternates), so a busy
machine slows both alike. Each ``generate()`` call is greedy with exactly ``--new-tokens`` tokens (``min_new_tokens`` =
``max_new_tokens``); a logits processor stamps the clock at every step: prefill = start of ``generate()`` to the
first logits (the first forward, plus generate's setup), decode ms/token = the median over decode steps of the
time from the step's start (its turn) to its logits (one decode forward plus generate's per-step work; the median
keeps a neighbour's burst during a few steps out). Reported figures are medians over the repeats; the ratio to the
bare LM is the median of the per-repeat ratios of those pairs.

Usage::

    python benchmarks/decode.py                      # full run, writes docs/decode.md and docs/decode.png
    python -m benchmarks.decode --quick              # smoke run: 2 repeats, 8 new tokens
    python benchmarks/decode.py --systems infimm,idefics --images 1,8 --profile
    python benchmarks/decode.py --compile --images 1 # also time torch.compile of the forward
    python benchmarks/decode.py --tiny --out-dir /tmp/decode   # seconds; what the smoke test runs
    python benchmarks/decode.py --from-json results.json --out-dir /tmp/decode   # the report again, no run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the `benchmarks` package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.models import GATE, LABELS, SYSTEMS, dims_for, import_infimm
from benchmarks.report import (
    BATCHED_CASE, IMAGE_COUNTS, add_output_arguments, compile_lines, decode_checks, decode_markdown, decode_plot,
    decode_table,
    machine_description, vision_check_line, write_report,
)
from benchmarks.worker import collect, run_worker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default 2; --tiny 1)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--images", default=",".join(map(str, IMAGE_COUNTS)),
                   help="image counts to run (batch-1 cases; the batch-4 case has 1 image)")
    p.add_argument("--batch", default="1,4", help="batch sizes to run: 1 (the image-count sweep), 4 (1 image)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 8 new tokens")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the same layout (seconds; for tests)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 5; --quick 2; --tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case and model first (default 1)")
    p.add_argument("--new-tokens", type=int, help="new tokens per generate (default 64; --quick 8; --tiny 4)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default 64; --tiny 32)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the InfiMM and bare-LM forwards")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one decode step")
    p.add_argument("--profile-images", default="1,8", help="image counts whose decode step is profiled")
    p.add_argument("--no-vision-check", action="store_true", help="skip the vision tower + resampler check")
    p.add_argument("--vision-repeats", type=int,
                   help="timed rounds of the vision check (default 40; --quick 6; --tiny 2): each takes ~0.1 s")
    p.add_argument("--start-method", choices=("spawn", "fork", "forkserver"),
                   help="how workers start (default spawn; fork for --tiny)")
    add_output_arguments(p, "decode")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.images = [int(x) for x in args.images.split(",") if x.strip()]
    args.batch = [int(x) for x in args.batch.split(",") if x.strip()]
    args.profile_images = [int(x) for x in args.profile_images.split(",") if x.strip()]
    if args.threads is None:
        args.threads = 1 if args.tiny else 2
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 2 if args.quick else 5
    if args.vision_repeats is None:
        args.vision_repeats = 2 if args.tiny else 6 if args.quick else 40
    if args.new_tokens is None:
        args.new_tokens = dims_for(True)["new_tokens"] if args.tiny else 8 if args.quick else dims_for(False)["new_tokens"]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one prefill and one decode step)")
    forkable = args.device == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    if args.start_method is None:
        args.start_method = "fork" if args.tiny and forkable else "spawn"
    elif args.start_method == "fork" and not forkable:
        p.error("--start-method fork works on CPU only (a CUDA context does not survive a fork)")
    return args


def run(args) -> dict:
    """Every selected system in its own worker; the merged results (what `--json` saves)."""
    started = time.perf_counter()
    dims = dims_for(args.tiny)
    if args.prompt_tokens:
        dims["prompt_tokens"] = args.prompt_tokens
    cases = [(n, 1) for n in args.images if 1 in args.batch]
    if 4 in args.batch and BATCHED_CASE[0] in args.images:
        cases.append(BATCHED_CASE)
    if not cases:
        raise SystemExit("no case selected: check --images and --batch")
    if args.start_method == "fork":
        # Import the heavy modules once, before forking; the parent itself runs no tensor op.
        import timm  # noqa: F401
        import transformers  # noqa: F401
        from transformers import IdeficsForVisionText2Text, LlavaForConditionalGeneration  # noqa: F401

        import_infimm()

    machine = machine_description(args.device, args.threads)
    print(f"Machine: {machine}")
    print(f"Cases (images, batch): {cases}; systems: {args.systems}; {args.repeats} repeats, {args.new_tokens} new "
          f"tokens, {dims['prompt_tokens']}-token prompt; workers by {args.start_method}", flush=True)

    workers = [s for s in args.systems if s != "bare"] or ["bare"]
    # The InfiMM process first: its bare-LM timings are the bare LM rows.
    workers.sort(key=lambda s: s != "infimm")
    results = {}
    for system in workers:
        job = {
            "system": system, "dims": dims, "cases": cases, "device": args.device, "threads": args.threads,
            "repeats": args.repeats, "warmup": args.warmup, "new_tokens": args.new_tokens, "verbose": True,
            "profile": args.profile, "profile_images": args.profile_images,
            "vision_check": not args.no_vision_check, "vision_repeats": args.vision_repeats, "compile": args.compile,
        }
        print(f"- {LABELS[system]}: worker started", flush=True)
        start = time.perf_counter()
        results[system] = run_worker(job, args.start_method)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    settings = {"argv": args.argv, "quick": args.quick, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "warmup": args.warmup, "elapsed_s": time.perf_counter() - started}
    return {"machine": machine, "dims": dims, "settings": settings, "gate": GATE,
            **collect(results, args.systems, cases, dims)}


def show(results):
    """The tables, checks and profiles on the console."""
    for name, err in results["errors"].items():
        print(f"\n{name} failed:\n{err}", file=sys.stderr)
    print()
    print("\n".join(decode_table(results["rows"])))
    if results.get("vision_check"):
        print("\nVision prefill: " + vision_check_line(results["vision_check"]))
    checks = decode_checks(results["rows"], results.get("vision_check"))
    if checks:
        print("\nTargets:\n" + "\n".join(checks))
    if results.get("compile"):
        print("\n" + "\n".join(compile_lines(results["compile"])))
    for name, table in results.get("profiles", {}).items():
        print(f"\nProfile of {name}: {table}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps the profiler's start/stop chatter off the console
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    show(results)
    write_report(results, None if args.no_write else args.out_dir, "decode", decode_markdown, decode_plot,
                 None if args.from_json else args.json)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
