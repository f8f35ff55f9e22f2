"""Generation speed of InfiMM against the bare language model, IDEFICS and a LLaVA-style model.

Flamingo's claim (Alayrac et al. 2022, sec. 1 and 2.2) is that images do not lengthen the language model's
sequence: with the image keys/values computed once, a decode step should cost the bare LM plus the gated
cross-attention blocks and nothing that grows with the number of images. This script measures that claim.

Systems (all random weights, fp32, built from configs at the same "medium" dims):

- ``infimm``: this package (EVA02-style timm tower, Perceiver resampler, gated cross-attention every 2 layers);
- ``bare``: the same Mistral alone (``MistralForCausalLM``, same dims), the denominator of every ratio;
- ``idefics``: transformers' ``IdeficsForVisionText2Text`` at the closest dims (its LM is Llama-based: same width,
  layers and MLP, but full multi-head attention since it has no key/value-head setting);
- ``llava``: ``LlavaForConditionalGeneration`` with the same Mistral and a CLIP tower of the EVA's size; every
  vision patch becomes one LM token, so its sequence grows with the images.

Method. One worker process per system (``spawn`` by default, ``fork`` for ``--tiny``); inside it the system and
the bare LM are built once, and each repeat runs their two ``generate()`` calls in two threads that take turns step
by step (system prefill, bare prefill, system step 1, bare step 1, ...; which one starts alternates), so a busy
machine slows both alike. Each ``generate()`` call is greedy with exactly ``--new-tokens`` tokens (``min_new_tokens`` =
``max_new_tokens``); a logits processor stamps the clock at every step: prefill = start of ``generate()`` to the
first logits (the first forward, plus generate's setup), decode ms/token = the median over decode steps of the
time from the step's start (its turn) to its logits (one decode forward plus generate's per-step work; the median
keeps a neighbour's burst during a few steps out). Reported figures are medians over the repeats; the ratio to the bare LM is the median of the per-repeat
ratios of those pairs.

Usage::

    python benchmarks/decode.py                      # full run, writes docs/decode.md and docs/decode.png
    python benchmarks/decode.py --quick              # smoke run: 2 repeats, 8 new tokens
    python benchmarks/decode.py --systems infimm,idefics --images 1,8 --profile
    python benchmarks/decode.py --compile --images 1 # also time torch.compile of the forward
    python benchmarks/decode.py --tiny --out-dir /tmp/decode   # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SYSTEMS = ("infimm", "bare", "idefics", "llava")
LABELS = {
    "infimm": "InfiMM (this package)",
    "bare": "bare LM (Mistral)",
    "idefics": "IDEFICS (transformers)",
    "llava": "LLaVA-style (transformers)",
}
IMAGE_COUNTS = (0, 1, 2, 4, 8)  # at batch 1
BATCHED_CASE = (1, 4)  # (images per sample, batch)
TARGET_RATIO = 1.37  # FLOP floor 1.31 plus 5%
TARGET_FLATNESS = 0.03  # 8-image ratio within 3% of the 1-image ratio

BOS, EOS = 1, 2
EOC_TOKEN, MEDIA_TOKEN = 32000, 32001

# Shapes. The "medium" config: EVA02-style tower width 256, 4 blocks, 224 px; Mistral hidden 1024, 8 layers,
# 16 heads / 4 kv heads, MLP 2816, vocab 32002; cross-attention every 2 layers; the resampler and the
# cross-attention keep the preset's shape (6 layers, 64 latents, 8 heads x 64).
MEDIUM = {
    "text": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32002, "max_position_embeddings": 4096},
    "vision": {"img_size": 224, "patch_size": 14, "embed_dim": 256, "depth": 4, "num_heads": 4},
    "connector": {"resampler_depth": 6, "resampler_num_latents": 64, "resampler_heads": 8, "resampler_head_dim": 64,
                  "cross_attn_every_n_layers": 2, "cross_attn_heads": 8, "cross_attn_head_dim": 64},
    "prompt_tokens": 64,
    "new_tokens": 64,
}
# A few-second version of the same layout (for the smoke test): the code paths are those of MEDIUM.
TINY = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32002, "max_position_embeddings": 512},
    "vision": {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "connector": {"resampler_depth": 2, "resampler_num_latents": 4, "resampler_heads": 2, "resampler_head_dim": 8,
                  "cross_attn_every_n_layers": 2, "cross_attn_heads": 2, "cross_attn_head_dim": 8},
    "prompt_tokens": 32,
    "new_tokens": 4,
}


# ----------------------------------------------------------------------------------------------- model builders
def _import_infimm():
    try:
        import infimm
    except ImportError:  # running from a checkout without installing it
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "infimm", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        infimm = importlib.util.module_from_spec(spec)
        sys.modules["infimm"] = infimm
        spec.loader.exec_module(infimm)
    return infimm


def _infimm_config(dims):
    infimm = _import_infimm()
    return infimm.InfiMMConfig.from_preset(
        "infimm-zephyr", vision_config={"model_args": dict(dims["vision"])}, text_config=dict(dims["text"]),
        **dims["connector"],
    )


def build_infimm(dims, gate: float = 0.5):
    import torch

    infimm = _import_infimm()
    torch.manual_seed(0)
    model = infimm.InfiMMForConditionalGeneration(_infimm_config(dims)).eval()
    # Gates start at 0; open them so the cross-attention path is real work, as after training.
    for block in model.model.cross_attention_layers.values():
        block.attn_gate.data.fill_(gate)
        block.ff_gate.data.fill_(gate)
    return model


def build_bare(dims):
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(1)
    return MistralForCausalLM(copy.deepcopy(_infimm_config(dims).text_config)).eval()


def build_idefics(dims, gate: float = 0.5):
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    text, vision, conn = dims["text"], dims["vision"], dims["connector"]
    config = IdeficsConfig(
        vocab_size=text["vocab_size"] - 2,
        additional_vocab_size=2,  # <|endofchunk|> and <image>, as InfiMM's 32000 + 2
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],  # no kv-head setting: full multi-head attention
        max_position_embeddings=text["max_position_embeddings"],
        rms_norm_eps=1e-5,
        cross_layer_interval=conn["cross_attn_every_n_layers"],
        use_resampler=True,
        perceiver_config={
            "use_resampler": True, "resampler_n_latents": conn["resampler_num_latents"],
            "resampler_depth": conn["resampler_depth"], "resampler_n_heads": conn["resampler_heads"],
            "resampler_head_dim": conn["resampler_head_dim"],
        },
        vision_config={
            "embed_dim": vision["embed_dim"], "image_size": vision["img_size"], "patch_size": vision["patch_size"],
            "num_hidden_layers": vision["depth"], "num_attention_heads": vision["num_heads"],
            "intermediate_size": 4 * vision["embed_dim"],
        },
        pad_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS,
    )
    torch.manual_seed(2)
    model = IdeficsForVisionText2Text(config).eval()
    for block in model.model.gated_cross_attn_layers:
        block.alpha_cross_attn.data.fill_(gate)
        block.alpha_dense.data.fill_(gate)
    return model


def llava_tokens_per_image(dims) -> int:
    return (dims["vision"]["img_size"] // dims["vision"]["patch_size"]) ** 2  # CLS dropped ("default")


def build_llava(dims):
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = dims["vision"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision["embed_dim"], intermediate_size=4 * vision["embed_dim"],
            num_hidden_layers=vision["depth"], num_attention_heads=vision["num_heads"],
            image_size=vision["img_size"], patch_size=vision["patch_size"],
        ),
        text_config=copy.deepcopy(_infimm_config(dims).text_config),
        image_token_index=MEDIA_TOKEN,
        image_seq_length=llava_tokens_per_image(dims),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(3)
    return LlavaForConditionalGeneration(config).eval()


BUILDERS = {"infimm": build_infimm, "bare": build_bare, "idefics": build_idefics, "llava": build_llava}


# ------------------------------------------------------------------------------------------------------ inputs
def prompt_ids(num_images: int, batch: int, length: int, seed: int = 0):
    """(batch, length) token ids in the Flamingo layout `<image>text<|endofchunk|><image>text...`, BOS first.

    The `<image>` tokens sit at evenly spaced positions, the first right after BOS; every other token is random
    ordinary text.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, EOC_TOKEN, (batch, length), generator=gen)
    ids[:, 0] = BOS
    if num_images:
        step = (length - 1) // num_images
        if step < 2:
            raise ValueError(f"A {length}-token prompt cannot hold {num_images} images; raise --prompt-tokens.")
        for i in range(num_images):
            ids[:, 1 + i * step] = MEDIA_TOKEN
            if i:
                ids[:, i * step] = EOC_TOKEN
    return ids


def make_inputs(system: str, dims, num_images: int, batch: int, device):
    """Keyword arguments of `generate()` for one case; every system gets the same text."""
    import torch

    length = dims["prompt_tokens"]
    ids = prompt_ids(num_images, batch, length)
    size = dims["vision"]["img_size"]
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, num_images, 3, size, size, generator=gen)
    if system == "bare":
        text = prompt_ids(0, batch, length)  # same length, no image or chunk tokens
        inputs = {"input_ids": text}
    elif system == "infimm":
        inputs = {"input_ids": ids}
        if num_images:
            inputs.update(pixel_values=pixels, image_mask=torch.ones(batch, num_images, dtype=torch.bool))
    elif system == "idefics":
        # IDEFICS marks images by a (batch, tokens, images) mask, not by token ids: each token sees the latest
        # image at or before it. Its processor always sends at least one image slot; a text-only prompt gets a
        # zero image that no token attends to (and that it still encodes).
        slots = max(num_images, 1)
        media_index = (ids == MEDIA_TOKEN).cumsum(1)
        mask = torch.nn.functional.one_hot(media_index, slots + 1)[..., 1:].long()
        if num_images == 0:
            pixels = torch.zeros(batch, 1, 3, size, size)
        inputs = {"input_ids": ids, "pixel_values": pixels, "image_attention_mask": mask}
    elif system == "llava":
        # One LM token per vision patch: each `<image>` becomes `llava_tokens_per_image` image tokens.
        per_image = llava_tokens_per_image(dims)
        rows = []
        for row in ids:
            parts = [torch.full((per_image,), MEDIA_TOKEN) if t == MEDIA_TOKEN else t.view(1) for t in row]
            rows.append(torch.cat(parts))
        inputs = {"input_ids": torch.stack(rows)}
        if num_images:
            inputs["pixel_values"] = pixels.flatten(0, 1)
    else:
        raise ValueError(f"Unknown system {system!r}; choose from {SYSTEMS}.")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return {k: v.to(device) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------------- timing
def _sync_fn(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class _Turns:
    """Two `generate()` calls in two threads that take turns one step at a time (prefill, then each decode step).

    Only one thread computes at any moment, and the two systems' steps alternate every few tens of milliseconds,
    so a busy neighbour slows both equally and their ratio stays put. A thread that has finished gives up its
    turns for good.
    """

    def __init__(self, first: str, second: str):
        self._cond = threading.Condition()
        self._names = (first, second)
        self._turn = first
        self._done = set()

    def wait(self, name: str):
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name)

    def hand_over(self, name: str, finished: bool = False):
        with self._cond:
            if finished:
                self._done.add(name)
            other = self._names[1] if name == self._names[0] else self._names[0]
            if other not in self._done:
                self._turn = other
            self._cond.notify_all()


def _make_clock(sync, suppress_ids, turns=None, name=None):
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        """Records how long each step took, from the start of the step (or of its turn) to its logits, and keeps
        the special tokens of the prompt layout out of the generated text, so every system decodes ordinary text.
        `durations[0]` is the prefill (with generate's setup), then one entry per decode step."""

        def __init__(self):
            self.durations = []
            self.step_start = None

        def __call__(self, input_ids, scores):
            sync()
            self.durations.append((time.perf_counter() - self.step_start) * 1e3)
            scores[:, suppress_ids] = -float("inf")
            if turns is not None:
                turns.hand_over(name)
                turns.wait(name)
            self.step_start = time.perf_counter()
            return scores

    return StepClock()


def generation_config(new_tokens: int, **extra):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, use_cache=True, **extra,
    )


def _step_times(clock, new_tokens: int):
    """(prefill ms, median decode step ms, mean decode step ms) from a clock's durations."""
    if len(clock.durations) < new_tokens:
        raise RuntimeError(f"expected {new_tokens} steps, timed {len(clock.durations)}")
    durations = clock.durations[:new_tokens]  # a deferred stop check may run one extra step
    steps = durations[1:]
    # The median step, not the mean: every decode step does the same work (the sequence grows by 1 token in 64),
    # so the median is the step's cost and a busy neighbour's burst during a few steps does not move it.
    return durations[0], statistics.median(steps), statistics.fmean(steps)


def _generate(model, inputs, gen_config, clock, sync, extra_processors=()):
    from transformers import LogitsProcessorList

    sync()
    clock.step_start = time.perf_counter()
    out = model.generate(
        **inputs, generation_config=gen_config, logits_processor=LogitsProcessorList([clock, *extra_processors])
    )
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    if generated != gen_config.max_new_tokens:
        raise RuntimeError(f"expected {gen_config.max_new_tokens} new tokens, got {generated}")


def timed_generate(model, inputs, gen_config, device, extra_processors=()):
    """One `generate()`; returns (prefill ms, median decode step ms, mean decode step ms)."""
    sync = _sync_fn(device)
    clock = _make_clock(sync, [EOC_TOKEN, MEDIA_TOKEN])
    gc.collect()
    gc.disable()  # no collector pauses inside the timed region
    try:
        _generate(model, inputs, gen_config, clock, sync, extra_processors)
    finally:
        gc.enable()
    return _step_times(clock, gen_config.max_new_tokens)


def timed_generate_in_turns(first, second, gen_config, device):
    """Two `generate()` calls, `first` and `second` each a (model, inputs) pair, stepping in turns (`_Turns`).

    Returns the two (prefill ms, median decode step ms, mean decode step ms) tuples, in that order."""
    sync = _sync_fn(device)
    turns = _Turns("first", "second")
    clocks = {name: _make_clock(sync, [EOC_TOKEN, MEDIA_TOKEN], turns, name) for name in ("first", "second")}
    errors = []

    def run(name, model, inputs):
        try:
            turns.wait(name)
            _generate(model, inputs, gen_config, clocks[name], sync)
        except BaseException as exc:  # reported by the caller; the other thread must not wait for this one
            errors.append(exc)
        finally:
            turns.hand_over(name, finished=True)

    gc.collect()
    gc.disable()
    try:
        threads = [threading.Thread(target=run, args=(name, *pair)) for name, pair in (("first", first), ("second", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gc.enable()
    if errors:
        raise errors[0]
    return tuple(_step_times(clocks[name], gen_config.max_new_tokens) for name in ("first", "second"))


def measure_pair(model, bare, inputs, bare_inputs, gen_config, device, repeats, warmup):
    """Timings of `model` and the bare LM on one case, stepping in turns (which one starts alternates);
    `model=None` times the bare LM alone."""
    runs = {"system": [], "bare": []}
    if model is None:
        for _ in range(warmup):
            timed_generate(bare, bare_inputs, gen_config, device)
        runs["bare"] = [timed_generate(bare, bare_inputs, gen_config, device) for _ in range(repeats)]
        return runs
    pairs = {"system": (model, inputs), "bare": (bare, bare_inputs)}
    for r in range(warmup + repeats):
        order = ("system", "bare") if r % 2 == 0 else ("bare", "system")
        timings = dict(zip(order, timed_generate_in_turns(pairs[order[0]], pairs[order[1]], gen_config, device)))
        if r >= warmup:
            for name in runs:
                runs[name].append(timings[name])
    return runs


def _median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarise(system, num_images, batch, prompt_tokens, runs):
    bare_prefill, bare_decode, _ = zip(*runs["bare"])
    row = {
        "system": system, "images": num_images, "batch": batch, "prompt_tokens": prompt_tokens,
        "bare_prefill_ms": _median(bare_prefill), "bare_decode_ms": _median(bare_decode),
    }
    if runs["system"]:
        prefill, decode, _ = zip(*runs["system"])
        row.update(
            prefill_ms=_median(prefill), decode_ms=_median(decode),
            decode_ratio=_median([s / b for s, b in zip(decode, bare_decode)]),
            prefill_ratio=_median([s / b for s, b in zip(prefill, bare_prefill)]),
            raw=runs["system"], raw_bare=runs["bare"],
        )
    else:
        row.update(prefill_ms=row["bare_prefill_ms"], decode_ms=row["bare_decode_ms"], decode_ratio=1.0,
                   prefill_ratio=1.0, raw=runs["bare"], raw_bare=runs["bare"])
    return row


def _time_callable(fns: dict, repeats: int, warmup: int, sync):
    """Times of several callables (ms per round), timed round-robin so they share the machine's noise."""
    import torch

    results = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for r in range(repeats):
            names = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in names:
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                results[name].append((time.perf_counter() - start) * 1e3)
    return results


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

    times = _time_callable(
        {
            "infimm_tower_resampler": lambda: model.get_image_features(pixels),
            "timm_eva": lambda: eva.forward_features(pixels),
            "infimm_resampler": lambda: model.model.resampler(features),
            "resampler_gemms": resampler_gemms,
        },
        repeats, warmup, _sync_fn(device),
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    eva_flops = _count_flops(lambda: eva.forward_features(pixels))
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


def _count_flops(fn) -> int:
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


def measure_compiled(model, bare, dims, device, settings):
    """torch.compile of the InfiMM and bare-LM forwards (1 image, batch 1), with the default and the static cache.

    What is compiled: each model's `forward` (`model.forward = torch.compile(model.forward)`, default mode), i.e. the
    vision path, the resampler, the cross-attention blocks and the LM in InfiMM; `generate()`'s own loop, logits
    processors and stopping checks stay eager. Each round runs InfiMM eager, InfiMM compiled, bare eager and bare
    compiled back to back (order alternating), so the speedups are ratios of neighbouring runs.
    """
    import torch
    import torch._dynamo

    results = []
    inputs = make_inputs("infimm", dims, 1, 1, device)
    bare_inputs = make_inputs("bare", dims, 1, 1, device)
    for cache in ("dynamic", "static"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = {"infimm": torch.compile(model.forward), "bare": torch.compile(bare.forward)}
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        gen = generation_config(settings["new_tokens"], **extra)
        entry = {"cache": cache}
        runs = {f"{name}_{mode}": [] for name in ("infimm", "bare") for mode in ("eager", "compiled")}

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
            order = list(runs)
            for _ in range(settings["warmup"]):
                for key in order:
                    run(*key.split("_"))
            for r in range(settings["repeats"]):
                for key in order if r % 2 == 0 else reversed(order):
                    runs[key].append(run(*key.split("_")))
            decode = {key: [run[1] for run in values] for key, values in runs.items()}
            prefill = {key: [run[0] for run in values] for key, values in runs.items()}
            entry.update({f"{key}_decode_ms": _median(v) for key, v in decode.items()})
            entry.update({f"{key}_prefill_ms": _median(v) for key, v in prefill.items()})
            for name in ("infimm", "bare"):
                entry[f"{name}_speedup"] = _median(
                    [e / c for e, c in zip(decode[f"{name}_eager"], decode[f"{name}_compiled"])]
                )
            entry["compiled_ratio"] = _median(
                [i / b for i, b in zip(decode["infimm_compiled"], decode["bare_compiled"])]
            )
            breaks = torch._dynamo.utils.counters["graph_break"]
            entry["graph_breaks"] = sum(breaks.values())
            entry["graph_break_reasons"] = sorted({reason.strip().splitlines()[0] for reason in breaks if reason.strip()})
            entry["unique_graphs"] = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
        except Exception as exc:  # the report says what happened instead of stopping the benchmark
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        results.append(entry)
    torch._dynamo.reset()
    return results


# ----------------------------------------------------------------------------------------------------- worker
def worker(job, conn=None):
    """Runs in its own process: one system and the bare LM, every case, stepping in turns."""
    try:
        result = _worker(job)
    except Exception:
        result = {"system": job["system"], "error": traceback.format_exc()}
    if conn is None:
        return result
    conn.send(result)
    conn.close()


def _worker(job):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    dims, system = job["dims"], job["system"]
    settings = {"repeats": job["repeats"], "warmup": job["warmup"], "new_tokens": job["new_tokens"]}
    gen = generation_config(job["new_tokens"])

    bare = build_bare(dims).to(device)
    model = None if system == "bare" else BUILDERS[system](dims).to(device)
    # Everything alive now (modules, models) lives for the whole process: keep it out of the collector's scans
    # so the `gc.collect()` before each timed run stays cheap.
    gc.collect()
    gc.freeze()
    out = {"system": system, "rows": [], "profiles": {}}
    out["models"] = {
        name: {"parameters_m": sum(p.numel() for p in m.parameters()) / 1e6,
               "attn_implementation": m.config.get_text_config()._attn_implementation}
        for name, m in (("bare", bare), (system, model)) if m is not None
    }

    for num_images, batch in job["cases"]:
        try:
            bare_inputs = make_inputs("bare", dims, num_images, batch, device)
            inputs = bare_inputs if model is None else make_inputs(system, dims, num_images, batch, device)
            runs = measure_pair(model, bare, inputs, bare_inputs, gen, device, job["repeats"], job["warmup"])
        except Exception:  # one failing case must not cost the others
            error = traceback.format_exc()
            out["rows"].append({"system": system, "images": num_images, "batch": batch, "error": error})
            print(f"  [{system}] images={num_images} batch={batch}: failed\n{error}", flush=True)
            continue
        row = summarise(system, num_images, batch, inputs["input_ids"].shape[1], runs)
        out["rows"].append(row)
        if job.get("verbose"):
            print(f"  [{system}] images={num_images} batch={batch}: prefill {row['prefill_ms']:.1f} ms, "
                  f"decode {row['decode_ms']:.2f} ms/token, x{row['decode_ratio']:.3f} bare", flush=True)
        if job.get("profile") and batch == 1 and num_images in job["profile_images"]:
            if model is not None:
                out["profiles"][f"{system}, {num_images} images"] = profile_decode_step(model, inputs, device)
            if system in ("infimm", "bare") and "bare" not in out["profiles"]:
                out["profiles"]["bare"] = profile_decode_step(bare, bare_inputs, device)

    extras = []
    if system == "infimm" and job.get("vision_check"):
        extras.append(("vision_check", lambda: vision_prefill_check(
            model, device, job["vision_repeats"], max(1, job["warmup"]))))
    if system == "infimm" and job.get("compile"):
        extras.append(("compile", lambda: measure_compiled(model, bare, dims, device, settings)))
    for name, fn in extras:
        try:
            out[name] = fn()
        except Exception:
            out.setdefault("extra_errors", {})[name] = traceback.format_exc()
    return out


def run_worker(job, start_method):
    """Runs `worker(job)` in a fresh process and returns its result."""
    ctx = multiprocessing.get_context(start_method)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker, args=(job, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"system": job["system"], "error": "worker process died without a result"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"worker exited with code {proc.exitcode}"
    return result


# ------------------------------------------------------------------------------------------------------ report
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


def _fmt(value, digits=2):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_rows(rows):
    header = ["system", "images", "batch", "prompt tokens", "prefill ms", "decode ms/token",
              "bare LM decode ms/token (same process)", "decode / bare LM", "prefill / bare LM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        if "error" in r:
            cells = [LABELS[r["system"]], str(r["images"]), str(r["batch"]), "error"] + [""] * 5
        else:
            cells = [
                LABELS[r["system"]], str(r["images"]), str(r["batch"]), str(r["prompt_tokens"]),
                _fmt(r["prefill_ms"], 1), _fmt(r["decode_ms"]), _fmt(r["bare_decode_ms"]),
                _fmt(r["decode_ratio"], 3), _fmt(r["prefill_ratio"], 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_checks(rows, vision):
    """The speed targets, evaluated on this run; returns markdown lines."""
    by = {(r["system"], r["images"], r["batch"]): r for r in rows if "error" not in r}
    lines = []
    infimm = {n: by[("infimm", n, 1)]["decode_ratio"] for n in IMAGE_COUNTS if n and ("infimm", n, 1) in by}
    if infimm:
        bad = [n for n, v in infimm.items() if v > TARGET_RATIO]
        worst = max(infimm.values())
        lines.append(
            f"- InfiMM decode / bare LM <= {TARGET_RATIO} for 1..8 images: "
            + ", ".join(f"{n} img {v:.3f}" for n, v in infimm.items())
            + f" -> {'PASS' if not bad else 'FAIL'} (worst {worst:.3f})"
        )
    if 1 in infimm and 8 in infimm:
        drift = infimm[8] / infimm[1] - 1
        lines.append(
            f"- 8-image ratio within {TARGET_FLATNESS:.0%} of the 1-image ratio: {infimm[8]:.3f} vs {infimm[1]:.3f} "
            f"({drift:+.1%}) -> {'PASS' if abs(drift) <= TARGET_FLATNESS else 'FAIL'}"
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
            + f" -> {'PASS' if not slower else 'FAIL'}"
        )
    if vision:
        lines.append("- " + vision_check_line(vision))
    return lines


def compile_lines(entries):
    lines = []
    for e in entries or []:
        if "error" in e:
            lines.append(f"- torch.compile, {e['cache']} cache: failed: `{e['error']}`")
        else:
            lines.append(
                f"- {e['cache']} cache (1 image, batch 1): InfiMM decode {e['infimm_eager_decode_ms']:.2f} ms/token "
                f"eager -> {e['infimm_compiled_decode_ms']:.2f} compiled (x{e['infimm_speedup']:.2f}), prefill "
                f"{e['infimm_eager_prefill_ms']:.1f} -> {e['infimm_compiled_prefill_ms']:.1f} ms; bare LM "
                f"{e['bare_eager_decode_ms']:.2f} -> {e['bare_compiled_decode_ms']:.2f} ms/token "
                f"(x{e['bare_speedup']:.2f}); compiled InfiMM / compiled bare {e['compiled_ratio']:.3f}; first "
                f"(compiling) calls {e['first_call_s']:.0f} s; {e['graph_breaks']} graph breaks, "
                f"{e['unique_graphs']} graphs"
                + (f" ({'; '.join(e['graph_break_reasons'])})" if e.get("graph_break_reasons") else "")
            )
    return lines


def _result_args(argv):
    """The command-line arguments that shape the results (not where they are written)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out-dir", "--json"):
            skip = True
        elif not arg.startswith(("--out-dir=", "--json=")):
            kept.append(arg)
    return kept


def write_markdown(path, machine, args, dims, rows, checks, vision, compiled, plot_name, errors, models):
    text, vision_dims, conn = dims["text"], dims["vision"], dims["connector"]
    lines = [
        "# Decode speed: InfiMM against the bare LM, IDEFICS and LLaVA",
        "",
        f"Written by `{' '.join(['python benchmarks/decode.py', *_result_args(args.argv)])}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {machine['threads']} torch threads, "
        f"device `{machine['device']}`" + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"- torch {machine['torch']}, transformers {machine['transformers']}, timm {machine.get('timm', '?')}, "
        f"Python {machine['python']}; fp32",
        f"- load average when the run started: {machine['load_average']}",
        *(["", "A `--quick` smoke run (few repeats, few new tokens): indicative figures only."] if args.quick else []),
        "",
        "## Setup",
        "",
        f"- config: {'TINY (a smoke-test size; not the medium config, timings mean nothing)' if args.tiny else 'medium'}",
        f"- language model: Mistral, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_attention_heads']} heads / {text['num_key_value_heads']} kv heads, MLP {text['intermediate_size']}, "
        f"vocab {text['vocab_size']} (the bare LM is this model alone, `MistralForCausalLM`)",
        f"- vision: timm `eva02_large_patch14_clip_336` architecture at width {vision_dims['embed_dim']}, "
        f"{vision_dims['depth']} blocks, {vision_dims['num_heads']} heads, {vision_dims['img_size']} px, patch "
        f"{vision_dims['patch_size']}",
        f"- InfiMM connector: resampler {conn['resampler_depth']} layers, {conn['resampler_num_latents']} latents, "
        f"{conn['resampler_heads']} heads x {conn['resampler_head_dim']}; a gated cross-attention block every "
        f"{conn['cross_attn_every_n_layers']} decoder layers (before layers 1, 3, ...), "
        f"{conn['cross_attn_heads']} heads x {conn['cross_attn_head_dim']}, gates set to 0.5",
        "- IDEFICS: `IdeficsForVisionText2Text`, the same LM width, layers and MLP (its Llama LM has no kv-head "
        f"setting, so {text['num_attention_heads']} kv heads), cross-attention every "
        f"{conn['cross_attn_every_n_layers']} layers (before layers 0, 2, ...; its own block shape: LM heads, "
        "SwiGLU MLP), its perceiver on with the same shape as InfiMM's, a CLIP-style vision tower of the "
        "EVA's size; a text-only prompt still carries one zero image (as its processor sends)",
        f"- LLaVA-style: `LlavaForConditionalGeneration`, the same Mistral, a CLIP tower of the EVA's size, "
        f"{llava_tokens_per_image(dims)} LM tokens per image (one per patch), so its prompt grows with the images",
        f"- prompt: {dims['prompt_tokens']} tokens, `<image>` tokens evenly spaced in the Flamingo layout; "
        f"{args.new_tokens} new tokens, greedy, exactly that many (`min_new_tokens`); {args.repeats} timed repeat(s) "
        f"after {args.warmup} warmup run(s) per case and model",
        "- models: " + "; ".join(
            f"{LABELS[name]} {info['parameters_m']:.1f} M parameters, LM attention `{info['attn_implementation']}`"
            for name, info in models.items()
        ),
        "- one process per system; in it, the system's and the bare LM's `generate()` run in two threads taking "
        "turns step by step (prefill, prefill, step 1, step 1, ...), so both see the same machine; "
        "prefill = `generate()` start to the first logits; decode ms/token = median over the decode steps of a "
        "step's time in its turn; medians over the repeats; ratios are medians of the per-repeat ratios of those "
        "pairs. The bare LM rows are the bare LM timings of the InfiMM process.",
        "",
        "## Results",
        "",
        *table_rows(rows),
        "",
        f"![decode ms/token against the number of images]({plot_name})",
        "",
        "## Targets (decode / bare LM <= 1.37 for 1-8 images, flat in the number of images, faster than IDEFICS)",
        "",
        *(checks or ["- not evaluated (InfiMM not in this run)"]),
        "",
    ]
    if compiled:
        lines += [
            "## torch.compile",
            "",
            "Compiled: each model's `forward` (`model.forward = torch.compile(model.forward)`, default mode), so for "
            "InfiMM the vision tower, resampler, cross-attention blocks and LM; `generate()`'s loop stays eager. "
            "Eager and compiled runs alternate in the same process; speedups are medians of neighbouring pairs. "
            "Decode steps run as graphs without breaks; the breaks are in the prefill's image bookkeeping (which "
            "slots hold real images, how many per sample).",
            "",
            *compile_lines(compiled),
            "",
        ]
    lines += [
        "## How to run",
        "",
        "```",
        "python benchmarks/decode.py --compile        # this table and plot (about 30 minutes on 2 cores)",
        "python benchmarks/decode.py --quick          # smoke run: 2 repeats, 8 new tokens",
        "python benchmarks/decode.py --systems infimm,bare --images 1,8 --batch 1 --profile   # one decode step, op by op",
        "python benchmarks/decode.py --compile --systems infimm --images 1 --batch 1         # torch.compile timings",
        "python benchmarks/decode.py --device cuda    # on a GPU",
        "```",
        "",
    ]
    if errors:
        lines += ["## Errors", ""] + [f"- {name}: `{err.strip().splitlines()[-1]}`" for name, err in errors.items()] + [""]
    Path(path).write_text("\n".join(lines))


def plot(path, rows, dims):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"infimm": "o", "bare": "s", "idefics": "^", "llava": "D"}
    for system in SYSTEMS:
        points = sorted((r["images"], r["decode_ms"], r["decode_ratio"]) for r in rows
                        if r["system"] == system and r["batch"] == 1 and "error" not in r)
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


def vision_check_line(vision) -> str:
    return (
        "vision tower + resampler, one image: InfiMM {infimm_tower_resampler_ms:.1f} ms vs budget {budget_ms:.1f} ms "
        "(timm EVA alone {timm_eva_ms:.1f} ms for {eva_gflop:.3g} GFLOP, {eva_gflops_per_s:.0f} GFLOP/s; plus the "
        "resampler's {resampler_gflop:.3g} GFLOP at that rate); InfiMM / budget {budget_ratio:.3f} (median of "
        "{rounds} back-to-back rounds, quartiles {budget_ratio_q1:.3f}-{budget_ratio_q3:.3f}) -> {verdict}; split: "
        "InfiMM tower path {infimm_tower_ms:.1f} ms vs timm EVA {timm_eva_ms:.1f} ms, InfiMM resampler "
        "{infimm_resampler_ms:.1f} ms vs its matrix products alone {resampler_gemms_ms:.1f} ms "
        "({gemm_gflops_per_s:.0f} GFLOP/s; EVA + those = {strict_budget_ms:.1f} ms, a lower bound -> {strict})"
    ).format(**vision, verdict="PASS" if vision["passed"] else "FAIL",
             strict="within" if vision["passed_strict"] else "above")


# -------------------------------------------------------------------------------------------------------- main
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
    p.add_argument("--out-dir", default=str(REPO / "docs"), help="where decode.md and decode.png go (default docs/)")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
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
        args.new_tokens = TINY["new_tokens"] if args.tiny else 8 if args.quick else MEDIUM["new_tokens"]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one prefill and one decode step)")
    forkable = args.device == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    if args.start_method is None:
        args.start_method = "fork" if args.tiny and forkable else "spawn"
    elif args.start_method == "fork" and not forkable:
        p.error("--start-method fork works on CPU only (a CUDA context does not survive a fork)")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps the profiler's start/stop chatter off the console
    dims = copy.deepcopy(TINY if args.tiny else MEDIUM)
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

        _import_infimm()

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

    errors = {s: r["error"] for s, r in results.items() if "error" in r}
    for system, res in results.items():
        for row in res.get("rows", []):
            if "error" in row:
                errors[f"{system}, {row['images']} images, batch {row['batch']}"] = row["error"]
        for name, err in res.get("extra_errors", {}).items():
            errors[f"{system}, {name}"] = err
    for name, err in errors.items():
        print(f"\n{name} failed:\n{err}", file=sys.stderr)

    rows = []
    if "bare" in args.systems:
        source = next((s for s in workers if "rows" in results[s]), None)
        if source is not None:
            for r in results[source]["rows"]:
                if "error" in r:
                    rows.append({**r, "system": "bare"})
                    continue
                rows.append({**r, "system": "bare", "prompt_tokens": dims["prompt_tokens"],
                             "prefill_ms": r["bare_prefill_ms"], "decode_ms": r["bare_decode_ms"],
                             "decode_ratio": 1.0, "prefill_ratio": 1.0})
    for system in workers:
        if system == "bare":
            continue
        if "rows" not in results[system]:
            rows += [{"system": system, "images": n, "batch": b, "error": results[system]["error"]} for n, b in cases]
        else:
            rows += results[system]["rows"]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(key=lambda r: (order[r["system"]], r["batch"], r["images"]))

    models = {}
    for res in results.values():
        models.update(res.get("models", {}))
    models = {name: models[name] for name in SYSTEMS if name in models}
    vision = results.get("infimm", {}).get("vision_check")
    compiled = results.get("infimm", {}).get("compile")
    checks = target_checks(rows, vision)

    print()
    print("\n".join(table_rows(rows)))
    if vision:
        print("\nVision prefill: " + vision_check_line(vision))
    if checks:
        print("\nTargets:\n" + "\n".join(checks))
    if compiled:
        print("\n" + "\n".join(compile_lines(compiled)))
    for system, res in results.items():
        for name, table in res.get("profiles", {}).items():
            print(f"\nProfile of {name}: {table}")

    if not args.no_write:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(out_dir / "decode.png", [r for r in rows if "error" not in r], dims)
        write_markdown(out_dir / "decode.md", machine, args, dims, rows, checks, vision, compiled, "decode.png", errors,
                       models)
        print(f"\nWrote {out_dir / 'decode.md'} and {out_dir / 'decode.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "dims": dims, "models": models, "rows": rows, "vision_check": vision,
             "compile": compiled, "errors": errors}, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
