"""Probes beside the decode timings: the vision path against timm's EVA, one decode step op by op, torch.compile."""

from __future__ import annotations

import functools
import math
import statistics
import time

from .models import make_inputs
from .timing import alternate, generation_config, median, paired_ratio, stopwatch, sync_fn, timed_generate


def vision_prefill_check(model, device, repeats, warmup):
    """Vision tower + resampler of one image in InfiMM, against timm's EVA alone plus the resampler's FLOPs.

    Two budgets, both starting from timm's `Eva.forward_features` (a separately built model of the same
    architecture and args):

    - `budget_ms` (the target): EVA time + the resampler's FLOPs at the rate the EVA itself achieves
      (EVA time x resampler FLOPs / EVA FLOPs), i.e. the resampler may cost what the same FLOPs cost in the tower;
      the verdict is the median over rounds of InfiMM / budget, each round timing both back to back;
    - `strict_budget_ms`: EVA time + the resampler's matrix products as bare `torch.matmul` calls of the same
      shapes (no norms, softmax, GELU or Python around them), a lower bound no eager module reaches.
    """
    import timm
    import torch

    config = model.config
    args = dict(config.vision_config.model_args)
    eva = timm.create_model(config.vision_config.architecture, pretrained=False, num_classes=0, **args)
    eva = eva.eval().to(device)
    size, dim = config.image_size, config.vision_hidden_size
    tokens, latents = config.num_vision_tokens, config.resampler_num_latents
    heads, head_dim = config.resampler_heads, config.resampler_head_dim
    inner, mult = heads * head_dim, config.resampler_ff_mult
    pixels = torch.randn(1, 3, size, size, device=device)
    features = torch.randn(1, tokens, dim, device=device)

    # (batch dims, m, k, n) of every matrix product of one resampler layer
    shapes = [
        ((), latents, dim, inner),  # to_q
        ((), tokens + latents, dim, 2 * inner),  # to_kv over concat(media, latents)
        ((heads,), latents, head_dim, tokens + latents),  # q k^T
        ((heads,), latents, tokens + latents, head_dim),  # attn v
        ((), latents, inner, dim),  # to_out
        ((), latents, dim, mult * dim),  # ff in
        ((), latents, mult * dim, dim),  # ff out
    ]
    operands = [
        (torch.randn(*b, m, k, device=device), torch.randn(*b, k, n, device=device)) for b, m, k, n in shapes
    ]
    flops = 2 * config.resampler_depth * sum(math.prod(b) * m * k * n for b, m, k, n in shapes)

    def resampler_gemms():
        for _ in range(config.resampler_depth):
            for a, b in operands:
                torch.matmul(a, b)

    sync = sync_fn(device)
    calls = {
        "infimm_tower_resampler": lambda: model.get_image_features(pixels),
        "timm_eva": lambda: eva.forward_features(pixels),
        "infimm_resampler": lambda: model.model.resampler(features),
        "resampler_gemms": resampler_gemms,
    }
    with torch.inference_mode():
        times = alternate({name: stopwatch(fn, sync) for name, fn in calls.items()}, repeats, warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    eva_flops = count_flops(lambda: eva.forward_features(pixels))
    eva_rate = eva_flops / (medians["timm_eva"] / 1e3)
    # The budget of each round: that round's EVA time, scaled up by the resampler's share of the FLOPs.
    scale = 1 + flops / eva_flops
    ratios = sorted(t / (e * scale) for t, e in zip(times["infimm_tower_resampler"], times["timm_eva"]))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    budget = medians["timm_eva"] * scale
    strict_budget = medians["timm_eva"] + medians["resampler_gemms"]
    return {
        **{f"{k}_ms": v for k, v in medians.items()},
        "rounds": repeats,
        "resampler_gflop": flops / 1e9,
        "eva_gflop": eva_flops / 1e9,
        "eva_gflops_per_s": eva_rate / 1e9,
        "gemm_gflops_per_s": flops / 1e9 / (medians["resampler_gemms"] / 1e3),
        "budget_ms": budget,
        "strict_budget_ms": strict_budget,
        # median and quartiles over rounds of (InfiMM tower + resampler) / (that round's budget)
        "budget_ratio": statistics.median(ratios),
        "budget_ratio_q1": quartiles[0],
        "budget_ratio_q3": quartiles[2],
        # InfiMM's tower path on its own, by difference (the model is not reached into for it)
        "infimm_tower_ms": medians["infimm_tower_resampler"] - medians["infimm_resampler"],
        "passed": statistics.median(ratios) <= 1.0,
        "passed_strict": medians["infimm_tower_resampler"] <= strict_budget,
    }


def count_flops(fn) -> int:
    """FLOPs of `fn()` by torch's FLOP counter, attention counted through SDPA's math path (the fused CPU kernels
    are not counted)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def profile_decode_step(model, inputs, device, row_limit=20, step=3):
    """Profiles one decode step inside `generate()` (from one step's logits to the next) and returns the op table."""
    import torch
    from transformers import LogitsProcessor

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)

    class Window(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Window.calls += 1
            if Window.calls == step:
                prof.start()
            elif Window.calls == step + 1:
                prof.stop()
            return scores

    timed_generate(model, inputs, generation_config(step + 2), device, extra_processors=[Window()])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    return f"one decode step, {total_ms:.2f} ms self CPU in total\n" + events.table(sort_by=sort_by, row_limit=row_limit)


class _GraphBreakTally:
    """Wraps a compiled `forward` and books the graph breaks and graphs dynamo records during each call to the
    phase of that call: `prefill` (more than one new token) or `decode` (one token per row)."""

    def __init__(self, compiled_forward):
        self.compiled_forward = compiled_forward
        # generate() reads the forward's signature to check its keyword arguments: expose the wrapped one.
        functools.update_wrapper(self, compiled_forward)
        self.phases = {phase: {"calls": 0, "graph_breaks": 0, "graphs": 0, "reasons": set()}
                       for phase in ("prefill", "decode")}

    @staticmethod
    def _counts():
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values()), counters["stats"].get("unique_graphs", 0), set(counters["graph_break"])

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        phase = self.phases["prefill" if ids is None or ids.shape[1] > 1 else "decode"]
        breaks, graphs, reasons = self._counts()
        try:
            return self.compiled_forward(*args, **kwargs)
        finally:
            after_breaks, after_graphs, after_reasons = self._counts()
            phase["calls"] += 1
            phase["graph_breaks"] += after_breaks - breaks
            phase["graphs"] += after_graphs - graphs
            phase["reasons"] |= {r.strip().splitlines()[0] for r in after_reasons - reasons if r.strip()}

    def summary(self) -> dict:
        return {name: {**p, "reasons": sorted(p["reasons"])} for name, p in self.phases.items()}


def measure_compiled(model, bare, dims, device, settings):
    """torch.compile of the InfiMM and bare-LM forwards (1 image, batch 1), with the default and the static cache.

    What is compiled: each model's `forward` (`model.forward = torch.compile(model.forward)`, default mode), i.e. the
    vision path, the resampler, the cross-attention blocks and the LM in InfiMM; `generate()`'s own loop, logits
    processors and stopping checks stay eager. Each round runs InfiMM eager, InfiMM compiled, bare eager and bare
    compiled back to back (order alternating), so the speedups are ratios of neighbouring runs. The graph breaks
    and graphs dynamo records are booked to the prefill or the decode steps, whichever call was being compiled.
    """
    import torch
    import torch._dynamo

    results = []
    inputs = make_inputs("infimm", dims, 1, 1, device)
    bare_inputs = make_inputs("bare", dims, 1, 1, device)
    for cache in ("dynamic", "static"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = {"infimm": _GraphBreakTally(torch.compile(model.forward)),
                    "bare": _GraphBreakTally(torch.compile(bare.forward))}
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        gen = generation_config(settings["new_tokens"], **extra)
        entry = {"cache": cache}

        def run(name, mode):
            m, x = (model, inputs) if name == "infimm" else (bare, bare_inputs)
            if mode == "compiled":
                m.forward = compiled[name]
            try:
                return timed_generate(m, x, gen, device)
            finally:
                m.__dict__.pop("forward", None)  # back to the class's forward

        try:
            start = time.perf_counter()
            run("infimm", "compiled")
            run("bare", "compiled")
            entry["first_call_s"] = time.perf_counter() - start
            measures = {key: (lambda key=key: run(*key.split("_")))
                        for key in (f"{name}_{mode}" for name in ("infimm", "bare") for mode in ("eager", "compiled"))}
            runs = alternate(measures, settings["repeats"], settings["warmup"])
            decode = {key: [run[1] for run in values] for key, values in runs.items()}
            prefill = {key: [run[0] for run in values] for key, values in runs.items()}
            entry.update({f"{key}_decode_ms": median(v) for key, v in decode.items()})
            entry.update({f"{key}_prefill_ms": median(v) for key, v in prefill.items()})
            for name in ("infimm", "bare"):
                entry[f"{name}_speedup"] = paired_ratio(decode[f"{name}_eager"], decode[f"{name}_compiled"])
            entry["compiled_ratio"] = paired_ratio(decode["infimm_compiled"], decode["bare_compiled"])
            breaks = torch._dynamo.utils.counters["graph_break"]
            entry["graph_breaks"] = sum(breaks.values())
            entry["graph_break_reasons"] = sorted({reason.strip().splitlines()[0] for reason in breaks if reason.strip()})
            entry["unique_graphs"] = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
            entry["by_phase"] = {name: tally.summary() for name, tally in compiled.items()}
        except Exception as exc:  # the report says what happened instead of stopping the benchmark
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        results.append(entry)
    torch._dynamo.reset()
    return results
