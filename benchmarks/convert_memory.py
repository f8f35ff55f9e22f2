"""Peak memory and throughput of `infimm-convert` on a synthetic release checkpoint with real-width layers.

    python benchmarks/convert_memory.py [--size-gb 3] [--max-shard-size 1GB] [--check-values] [--workdir DIR] [--keep]

1. A child process writes a release snapshot in the original layout (`model.vision_encoder.*` in EVA-CLIP naming with
   its rope tables and head, `model.perceiver.*`, `model.lang_encoder.*` with the `old_decoder_blocks` /
   `gated_cross_attn_layers` alias lists, one bf16 `pytorch_model.bin`) at InfiMM-Zephyr widths: Mistral-7B decoder
   layers, the full EVA02-L tower, the release's resampler and cross-attention; as many decoder layers as bring the
   file nearest `--size-gb`.
2. Another child converts it (`python -m infimm.convert_weights`), accounted like `/usr/bin/time -v`: its peak resident set
   comes from `wait4`. A third child runs `--help` only, for the resident set of the imports alone.
3. The same file is copied with `shutil.copyfile` + fsync, as a throughput yardstick.

The page cache is warm for both the conversion and the copy (the file was just written); figures are for this
machine only. The memory target of the converter: peak RSS <= largest output shard + largest tensor + 1 GB.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def make_checkpoint(folder: Path, layers: int):
    """Child: the synthetic release snapshot (random bf16 weights, written with the test suite's builders)."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from convert_fixtures import release_state_dict, write_release

    from infimm import InfiMMConfig, InfiMMForConditionalGeneration

    config = InfiMMConfig.from_preset("infimm-zephyr", text_config={"num_hidden_layers": layers})
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in InfiMMForConditionalGeneration(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator, dtype=torch.bfloat16) for key, shape in shapes.items()}
    write_release(release_state_dict(state, config), config, folder, dtype="bfloat16")


def layers_for(size_gb: float) -> tuple[int, float]:
    """Decoder layers whose checkpoint is nearest `size_gb` (meta-device sizes, bf16)."""
    import torch

    from infimm import InfiMMConfig, InfiMMForConditionalGeneration

    def size(layers):
        config = InfiMMConfig.from_preset("infimm-zephyr", text_config={"num_hidden_layers": layers})
        with torch.device("meta"):
            model = InfiMMForConditionalGeneration(config)
        return sum(v.numel() for v in model.state_dict().values()) * 2 / GB

    best = min(range(2, 33), key=lambda layers: abs(size(layers) - size_gb))
    return best, size(best)


def run_measured(args: list[str], env: dict) -> tuple[float, int, int]:
    """(wall seconds, exit status, peak RSS bytes) of a child process."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        child = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}):\n{output[-3000:]}")
    return wall, code, usage.ru_maxrss * 1024  # Linux reports KiB


def shard_stats(folder: Path) -> tuple[int, int, int]:
    """(number of shards, largest shard bytes, largest tensor bytes) of a converted folder."""
    from infimm.convert_weights.reader import read_safetensors_header

    shards = sorted(folder.glob("*.safetensors"))
    largest_tensor = 0
    for shard in shards:
        header, _ = read_safetensors_header(shard)
        largest_tensor = max([largest_tensor] + [e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()])
    return len(shards), max(s.stat().st_size for s in shards), largest_tensor


def timed_copy(source: Path, target: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(source, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0, help="target checkpoint size (default 3)")
    parser.add_argument("--max-shard-size", default="1GB", help="converter shard size (default 1GB)")
    parser.add_argument("--check-values", action="store_true", help="also re-read and compare every tensor")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    parser.add_argument("--_make", nargs=2, metavar=("FOLDER", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._make:
        make_checkpoint(Path(args._make[0]), int(args._make[1]))
        return

    layers, expected_gb = layers_for(args.size_gb)
    work = Path(tempfile.mkdtemp(prefix="infimm-convert-bench-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        snapshot, output = work / "snapshot", work / "converted"
        print(f"writing a {expected_gb:.2f} GB release checkpoint ({layers} decoder layers) to {snapshot} ...")
        run_measured([sys.executable, __file__, "--_make", str(snapshot), str(layers)], env)
        checkpoint = snapshot / "pytorch_model.bin"
        size = checkpoint.stat().st_size

        command = [sys.executable, "-m", "infimm.convert_weights", "--input", str(snapshot), "--output", str(output),
                   "--max-shard-size", args.max_shard_size] + (["--check-values"] if args.check_values else [])
        startup_s, _, baseline_rss = run_measured([sys.executable, "-m", "infimm.convert_weights", "--help"], env)
        convert_s, _, peak_rss = run_measured(command, env)
        shards, largest_shard, largest_tensor = shard_stats(output)
        copy_s = timed_copy(checkpoint, work / "copy.bin")

        budget = largest_shard + largest_tensor + 1 * GB
        rows = [
            ("checkpoint (pytorch_model.bin, bf16)", f"{size / GB:.2f} GB, {layers} decoder layers"),
            ("output", f"{shards} shards of <= {args.max_shard_size}; largest {largest_shard / GB:.2f} GB"),
            ("largest tensor", f"{largest_tensor / GB:.3f} GB"),
            ("peak RSS, conversion", f"{peak_rss / GB:.2f} GB"),
            ("peak RSS, imports only (--help)", f"{baseline_rss / GB:.2f} GB"),
            ("target: largest shard + largest tensor + 1 GB", f"{budget / GB:.2f} GB"),
            ("peak RSS / target", f"{peak_rss / budget:.2f}"),
            ("peak RSS / largest shard", f"{peak_rss / largest_shard:.2f}"),
            ("peak RSS / checkpoint size", f"{peak_rss / size:.2f}"),
            ("conversion" + (" (+ value check)" if args.check_values else ""),
             f"{convert_s:.1f} s, {size / GB / convert_s:.2f} GB/s (process start and imports included)"),
            ("  of which process start and imports (--help)", f"{startup_s:.1f} s"),
            ("  conversion alone", f"{convert_s - startup_s:.1f} s, {size / GB / (convert_s - startup_s):.2f} GB/s"),
            ("plain copy of the same file (+ fsync)", f"{copy_s:.1f} s, {size / GB / copy_s:.2f} GB/s"),
            ("throughput: conversion alone / copy", f"{copy_s / (convert_s - startup_s):.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
        for name, value in rows:
            print(f"| {name.ljust(width)} | {value} |")
        print(json.dumps({"checkpoint_bytes": size, "layers": layers, "shards": shards, "largest_shard": largest_shard,
                          "largest_tensor": largest_tensor, "peak_rss": peak_rss, "baseline_rss": baseline_rss,
                          "convert_s": convert_s, "startup_s": startup_s, "copy_s": copy_s}))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
