"""What serving costs: `infimm serve` (transformers' server) against `generate()` in the same run, and its throughput.

The medium config of the decode benchmark (`benchmarks/models.py`, random weights, fp32) is saved as a Hub folder
and served by `python -m infimm.serve` in a subprocess on 127.0.0.1; clients are the official `openai` package.

(a) Overhead of one request on an idle server: a streamed chat completion against the processor's chat template
and `model.generate()` in this process with the same prompt and settings (greedy, exactly --new-tokens tokens), in
alternating rounds. Time to first token: from the call to the first generated token (rendering the prompt and the
image included on both sides; for the server also HTTP, the model's process and streaming back). Per token: from the
first to the last token, divided by the tokens after the first. Target: the server within 1.15x of `generate()`.

(b) Requests per second with 1, 4 and 8 concurrent clients (each sends its share of --requests in turn): text-only
on the plain server and with `--continuous-batching` (target: >= 2x at 8 clients), and with one image per request
on both (with continuous batching, requests with images run `generate()` one at a time).

The generation config of the saved folder has no end-of-sequence token, so every answer is --new-tokens long.
The server's processes get --threads torch threads, as does this process; only one side computes at a time. One
thread by default: on a shared 2-core machine a 2-thread OpenMP team stalls whenever a neighbour holds a core, and
the server's `generate()` (on a worker thread) and a script's (on its main thread) then do not stall alike (a medium
forward measured 6x apart, 50 against 300 ms); with one thread they agree.

Usage::

    python benchmarks/serve.py                        # medium config; prints the tables (docs/serving.md has them)
    python benchmarks/serve.py --json results.json    # also the raw figures
    python benchmarks/serve.py --tiny --rounds 1 --requests 4 --new-tokens 4   # seconds; a check of the script
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the `benchmarks` package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.models import GATE, build_infimm, build_processor, dims_for, model_info
from benchmarks.report import fmt, machine_description, table, verdict
from benchmarks.timing import median

TARGET_OVERHEAD = 1.15
TARGET_BATCHING = 2.0
STARTUP_TIMEOUT = 600.0
QUESTION = ("Describe, step by step and in plain words, what a careful reader would notice first in this picture, "
            "then what they would notice on a second look, and why.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny config of the same layout (a check of the script)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="overhead: alternating rounds (default 5, after 1 warmup)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (default 32)")
    p.add_argument("--requests", type=int, default=8, help="throughput: requests per case (default 8)")
    p.add_argument("--clients", default="1,4,8", help="throughput: concurrent clients (default 1,4,8)")
    p.add_argument("--part", choices=("all", "overhead", "throughput"), default="all", help="what to measure")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    if min([args.threads, args.rounds, args.new_tokens, args.requests, *args.clients]) < 1:
        p.error("--threads, --rounds, --new-tokens, --requests and --clients must be positive")
    return args


# --------------------------------------------------------------------------------------------------- the server
class Served:
    """`python -m infimm.serve FOLDER` in its own process group, waited for with a bound and stopped by its id."""

    def __init__(self, folder: Path, threads: int, log: Path, *options: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.model, self.log = str(folder), log
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "infimm.serve", str(folder), "--port", str(self.port), "--device", "cpu",
                   *options]
        with open(log, "w") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def __enter__(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the server did not start within {STARTUP_TIMEOUT:.0f} s:\n{self.log.read_text()[-4000:]}")

    def __exit__(self, *exc):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(30)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=600, max_retries=0)


# ------------------------------------------------------------------------------------------------- measurements
def image_uri(size: int, seed: int = 0) -> str:
    import numpy as np
    import PIL.Image

    buffer = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_content(image: str | None, question: str = QUESTION):
    if image is None:
        return question
    return [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]


class _Clock:
    """A streamer for `generate()` that notes when each generated token arrives (the prompt comes first)."""

    def __init__(self):
        self.prompt_seen, self.times = False, []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.extend([time.perf_counter()] * value.numel())

    def end(self):
        pass


def direct_generate(model, processor, image: str | None, new_tokens: int) -> dict:
    """`generate()` here, on the prompt the server renders for the same request."""
    import torch

    content = [{"type": "text", "text": QUESTION}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    clock = _Clock()
    started = time.perf_counter()  # the prompt's rendering counts, as it does in the server
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=clock)
    return {"ttft_ms": 1e3 * (clock.times[0] - started),
            "ms_per_token": 1e3 * (clock.times[-1] - clock.times[0]) / max(len(clock.times) - 1, 1),
            "tokens": len(clock.times)}


def served_request(server: Served, image: str | None, new_tokens: int) -> dict:
    """One streamed chat completion; the times of its first and last content chunks."""
    client = server.client()
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": openai_content(image)}], max_tokens=new_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    first = last = None
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_ms": 1e3 * (first - started), "ms_per_token": 1e3 * (last - first) / max(tokens - 1, 1),
            "tokens": tokens}


def overhead(model, processor, server: Served, image: str | None, rounds: int, new_tokens: int) -> dict:
    """Alternating rounds (the order flips every round) after one warmup of each; medians and paired ratios."""
    direct, served = [], []
    for index in range(rounds + 1):
        pair = [lambda: direct_generate(model, processor, image, new_tokens),
                lambda: served_request(server, image, new_tokens)]
        if index % 2:
            pair.reverse()
        results = [run() for run in pair]
        if index % 2:
            results.reverse()
        if index:  # the first round warms both up
            direct.append(results[0])
            served.append(results[1])
    summary = {"rounds": {"direct": direct, "served": served}}
    for key in ("ttft_ms", "ms_per_token"):
        summary[f"direct_{key}"] = median([r[key] for r in direct])
        summary[f"served_{key}"] = median([r[key] for r in served])
        summary[f"ratio_{key}"] = median([s[key] / d[key] for s, d in zip(served, direct)])
        summary[f"added_{key}"] = median([s[key] - d[key] for s, d in zip(served, direct)])
    summary["tokens"] = sorted({r["tokens"] for r in direct + served})
    return summary


def throughput(server: Served, clients: int, requests: int, image: str | None, new_tokens: int) -> dict:
    """`requests` chat completions from `clients` threads (each sends its share in turn): requests per second."""
    client = server.client()
    shares = [requests // clients + (index < requests % clients) for index in range(clients)]

    def one_client(share: int) -> int:
        tokens = 0
        for _ in range(share):
            answer = client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": openai_content(image)}],
                max_tokens=new_tokens, temperature=0,
            )
            tokens += answer.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one_client, shares))
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "seconds": elapsed, "requests_per_s": requests / elapsed,
            "tokens_per_s": tokens / elapsed}


# ---------------------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    import torch
    import transformers

    from infimm.hub_infimm import save_hub_folder

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dims = dims_for(args.tiny)
    model = build_infimm(dims, gate=GATE)
    processor = build_processor(model.config)
    results = {"argv": args.argv, "machine": machine_description("cpu", args.threads), "config": dims["name"],
               "model": model_info(model), "new_tokens": args.new_tokens, "rounds": args.rounds,
               "requests": args.requests, "throughput": []}
    image = image_uri(dims["vision"]["img_size"])
    with tempfile.TemporaryDirectory(prefix="infimm-serve-bench-") as tmp:
        folder = save_hub_folder(model, processor, Path(tmp) / f"infimm-{dims['name']}")
        # No end-of-sequence token: every answer is exactly as long as asked (greedy, like the decode benchmark).
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "pad_token_id": 2,
                                                                   "do_sample": False}))
        image_count = {"text": None, "image": image}
        # The KV cache of continuous batching, sized for this run (left to itself it takes 60% of the machine's RAM).
        batching = ["--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", "256",
                    "--cb-max-batch-tokens", "1024"]
        servers = (("plain", []), ("continuous batching", batching))
        if args.part == "overhead":
            servers = servers[:1]
        for name, options in servers:
            print(f"\nserver: {name}", flush=True)
            with Served(folder, args.threads, Path(tmp) / f"{name.replace(' ', '-')}.log", *options) as server:
                if name == "plain" and args.part != "throughput":
                    results["overhead"] = {}
                    for kind, source in image_count.items():
                        results["overhead"][kind] = overhead(model, processor, server, source, args.rounds,
                                                             args.new_tokens)
                        print(f"  overhead, {kind}: {results['overhead'][kind]}", flush=True)
                for kind, source in image_count.items() if args.part != "overhead" else ():
                    for clients in args.clients:
                        row = {"server": name, "input": kind,
                               **throughput(server, clients, args.requests, source, args.new_tokens)}
                        results["throughput"].append(row)
                        print(f"  {kind}, {clients} clients: {row['requests_per_s']:.3f} requests/s", flush=True)
    return results


def markdown(results: dict) -> str:
    lines = [f"Command: `{' '.join(['python benchmarks/serve.py', *results['argv']])}`", ""]
    machine = results["machine"]
    lines += [f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {machine['threads']} torch "
              f"threads, torch {machine['torch']}, transformers {machine['transformers']}; load average at the start "
              f"{machine['load_average']}. Model: {results['config']} config, {results['model']['parameters_m']:.1f} M "
              f"parameters, fp32, `{results['model']['attn_implementation']}`; {results['new_tokens']} new tokens "
              "per answer.", ""]
    if results.get("overhead"):
        header = ["prompt", "generate() TTFT ms", "served TTFT ms", "TTFT ratio", "TTFT added ms",
                  "generate() ms/token", "served ms/token", "per-token ratio", f"within {TARGET_OVERHEAD}x"]
        rows = []
        for kind, row in results["overhead"].items():
            passed = max(row["ratio_ttft_ms"], row["ratio_ms_per_token"]) <= TARGET_OVERHEAD
            rows.append([kind, fmt(row["direct_ttft_ms"], 1), fmt(row["served_ttft_ms"], 1),
                         fmt(row["ratio_ttft_ms"]), fmt(row["added_ttft_ms"], 1), fmt(row["direct_ms_per_token"], 1),
                         fmt(row["served_ms_per_token"], 1), fmt(row["ratio_ms_per_token"]), verdict(passed)])
        lines += [f"One request on an idle server against the processor and `generate()` in the same run (medians "
                  f"of {results['rounds']} alternating rounds; ratios and added ms are medians of the per-round ones):",
                  "", *table(header, rows), ""]
    if results["throughput"]:
        by_case = {(r["server"], r["input"], r["clients"]): r for r in results["throughput"]}
        clients = sorted({r["clients"] for r in results["throughput"]})
        header = ["server", "input", *[f"{c} client{'s' * (c > 1)} req/s" for c in clients],
                  "speed-up at the most clients"]
        rows = []
        for server in ("plain", "continuous batching"):
            for kind in ("text", "image"):
                cells = [by_case.get((server, kind, c)) for c in clients]
                base = by_case.get(("plain", kind, clients[-1]))
                speedup = cells[-1]["requests_per_s"] / base["requests_per_s"] if cells[-1] and base else float("nan")
                rows.append([server, kind, *[fmt(cell["requests_per_s"], 3) if cell else "n/a" for cell in cells],
                             fmt(speedup)])
        lines += [f"Requests per second, {results['requests']} requests per case (tokens/s = req/s x "
                  f"{results['new_tokens']}); the speed-up is against the plain server at the same input "
                  f"(target for text with continuous batching: >= {TARGET_BATCHING}x):", "", *table(header, rows)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    text = markdown(results)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
