"""Prefill with a reused language-model cache: a multi-turn chat and few-shot captioning, with and without reuse.

The reuse pattern is transformers' documented one. The prefix runs once into a `DynamicCache`; each continuation
is `model.generate(**full_inputs, <cache>=copy.deepcopy(prefix_cache), ...)` where `full_inputs` are the whole
prompt's `input_ids` / `attention_mask` / `pixel_values` (every image of the prompt): `generate()` feeds only the
tokens after the cached ones, and the model is left to encode only the images those tokens need. `<cache>` is the
installed transformers' name of the argument (`cache` from 5.24, `past_key_values` before; `modeling_infimm._CACHE`).

- Chat: turn k's prompt is the conversation so far through the processor's chat template (one image per user
  turn, the assistant's earlier answers included). With reuse, the cache grows turn by turn: each turn's
  `generate()` (with `return_dict_in_generate=True`) writes its answer into the cache the next turn starts from.
  The answers are fixed texts, forced token by token (`prefix_allowed_tokens_fn`), so the random-weight model
  says what the next turn's template holds and the cached tokens are exactly a prefix of the next prompt.
- Few-shot: `<image>caption<|endofchunk|>` demonstrations, then one query image (the layout of
  `examples/few_shot.py`), a batch of queries at once; with reuse, the demonstrations' cache (batch 1) is copied and
  expanded to the batch (`Cache.batch_repeat_interleave`) for each batch.

Prefill = the time a `generate(max_new_tokens=1)` call holds the machine. The calls compared run in threads taking
turns layer by layer (`timing.rounds_in_turns`), the order reversed every other round, and every ratio is the
median of per-round ratios, so a busy machine slows every side alike.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from .models import import_infimm
from .timing import generation_config, median, paired_ratio, rounds_in_turns, sync_fn

QUESTIONS = [
    "What is in this picture?",
    "How does this image differ from the first one?",
    "Which colours stand out here?",
    "Is there any text in this image?",
    "Describe the lighting in this picture.",
    "What would you call this scene?",
    "Which of the images so far is the busiest?",
    "Summarise everything you have seen in one sentence.",
]
ANSWERS = [
    "A field of coloured noise with no clear objects in it.",
    "It is darker, and the noise is finer than in the first image.",
    "Mostly reds and greens, with a few bright blue specks.",
    "No, there is no readable text anywhere in it.",
    "The lighting is flat and even, as if from an overcast sky.",
    "A close-up of a textured surface, perhaps a carpet.",
    "The third one, with the most contrast between neighbouring pixels.",
]
CAPTIONS = [
    "A red bus on a city street.",
    "Two dogs playing in the snow.",
    "A bowl of fruit on a wooden table.",
    "A sailboat on a calm lake.",
    "A cat asleep on a sofa.",
    "A mountain road at sunset.",
    "A child flying a kite on a beach.",
    "A plate of pasta with basil.",
]


def noise_images(count: int, size: int, seed: int):
    """`count` distinct random RGB images a little larger than the tower's input, so the processor really resizes
    and crops them."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    side = size + size // 7
    return [PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def cache_argument() -> str:
    """`generate()`'s name for the language-model cache in the installed transformers."""
    from infimm.modeling_infimm import _CACHE

    return _CACHE


def _check_prefix(prefix_ids, full_ids, what: str):
    """Reuse is exact only when the cached tokens open every row of the longer prompt."""
    if full_ids.shape[1] < prefix_ids.shape[1] or not bool((full_ids[:, : prefix_ids.shape[1]] == prefix_ids).all()):
        raise ValueError(f"{what}: the prompt's tokens do not start with the cached prefix's tokens, so its cache "
                         "cannot be reused; keep the prefix's text unchanged and free of padding.")


def _max_logit_diff(out_a, out_b) -> float:
    return float((out_a.logits[0].float() - out_b.logits[0].float()).abs().max())


def chat_prompts(processor, images, turns: int):
    """The inputs of every turn (the conversation so far, the assistant's turn opened) and the token ids of each
    answer as the next turn's template writes them (up to, not including, its end-of-turn token)."""
    if turns > len(QUESTIONS):
        raise ValueError(f"The chat has {len(QUESTIONS)} scripted turns; ask for at most that many (--turns).")
    messages, prompts = [], []
    for k in range(turns):
        messages.append({"role": "user", "content": [{"type": "image", "image": images[k]},
                                                     {"type": "text", "text": QUESTIONS[k]}]})
        prompts.append(processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"))
        if k < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": ANSWERS[k]}]})
    answers = []
    eos = processor.tokenizer.eos_token_id
    for k in range(turns - 1):
        ids, next_ids = prompts[k]["input_ids"], prompts[k + 1]["input_ids"]
        _check_prefix(ids, next_ids, f"chat turn {k + 2}")
        tail = next_ids[0, ids.shape[1]:].tolist()
        answers.append(tail[: tail.index(eos)])
    return prompts, answers


def _generate_one(model, inputs, **kwargs):
    """The measured call: `generate()` of one token, keeping its logits (to compare reuse with the full prompt)."""
    config = generation_config(1, return_dict_in_generate=True, output_logits=True)
    return model.generate(**inputs, generation_config=config, **kwargs)


def chat_benchmark(model, processor, device, turns: int, rounds: int, warmup: int, log=print) -> list[dict]:
    """One row per turn: prefill with the cache grown over the earlier turns, and of the whole prompt, each with its
    ratio to turn 1's prefill; the three run in turns (`timing.rounds_in_turns`)."""
    from transformers import DynamicCache

    cache_name = cache_argument()
    sync = sync_fn(device)
    prompts, answers = chat_prompts(processor, noise_images(turns, model.config.image_size, seed=0), turns)
    prompts = [p.to(device) for p in prompts]
    rows, state = [], DynamicCache()
    for k, inputs in enumerate(prompts):
        cached = state.get_seq_length()

        def make_calls():
            reused, empty = copy.deepcopy(state), DynamicCache()  # copied here, outside the timing
            return {
                "with": lambda: _generate_one(model, inputs, **{cache_name: reused}),
                "without": lambda: _generate_one(model, inputs),
                "turn1": lambda: _generate_one(model, prompts[0], **{cache_name: empty}),
            }

        times, outputs = rounds_in_turns(model, make_calls, rounds, warmup, sync)
        tokens = inputs["input_ids"].shape[1]
        row = {
            "turn": k + 1, "images": k + 1, "prompt_tokens": tokens, "cached_tokens": cached,
            "new_tokens": tokens - cached,
            "with_ms": median(times["with"]), "without_ms": median(times["without"]),
            "turn1_ms": median(times["turn1"]),
            "with_ratio": paired_ratio(times["with"], times["turn1"]),
            "without_ratio": paired_ratio(times["without"], times["turn1"]),
            "logit_diff": _max_logit_diff(outputs["with"], outputs["without"]),
            "raw": times,
        }
        rows.append(row)
        log(f"  chat turn {k + 1}: {tokens} tokens ({cached} cached), prefill {row['with_ms']:.1f} ms with reuse, "
            f"{row['without_ms']:.1f} ms without; x{row['with_ratio']:.2f} / x{row['without_ratio']:.2f} turn 1; "
            f"max |logit diff| {row['logit_diff']:.2e}")
        if k < len(answers):
            # The turn's answer, forced token by token, written into the cache the next turn starts from.
            answer = answers[k]
            out = model.generate(
                **inputs, **{cache_name: state},
                generation_config=generation_config(len(answer), return_dict_in_generate=True),
                prefix_allowed_tokens_fn=lambda batch_id, ids, start=tokens, answer=answer: [answer[len(ids) - start]],
            )
            if out.sequences[0, tokens:].tolist() != answer:
                raise RuntimeError(f"chat turn {k + 1}: the forced answer did not come out as forced")
            state = getattr(out, cache_name)
            # generate() caches every token it fed: the prompt and all but the last answer token.
            if state.get_seq_length() != tokens + len(answer) - 1:
                raise RuntimeError(f"chat turn {k + 1}: the cache holds {state.get_seq_length()} tokens, expected "
                                   f"{tokens + len(answer) - 1}")
    return rows


def few_shot_inputs(processor, shots: int, queries, shot_images):
    """(prefix inputs, full inputs): the demonstrations alone (batch 1), and one prompt per query image."""
    image, eoc = processor.image_token, processor.eoc_token
    prefix = "".join(f"{image}{CAPTIONS[i % len(CAPTIONS)]}{eoc}" for i in range(shots))
    full = processor(text=[prefix + image] * len(queries), images=[[*shot_images[:shots], q] for q in queries],
                     return_tensors="pt")
    if not shots:
        return None, full
    demos = processor(text=[prefix], images=[shot_images[:shots]], return_tensors="pt")
    _check_prefix(demos["input_ids"], full["input_ids"], f"{shots}-shot prompt")
    return demos, full


def few_shot_benchmark(model, processor, device, shot_counts, num_queries: int, rounds: int, warmup: int,
                       without_rounds: int = 1, log=print) -> list[dict]:
    """One row per shot count: per-query prefill of a batch of `num_queries` with the demonstrations' cache reused
    and without, each with its ratio to the 0-shot batch's per-query prefill.

    Two sets of rounds in turns (`timing.rounds_in_turns`): `rounds` (after `warmup`) of the batch with reuse and
    the 0-shot batch, from a demonstrations' cache computed once; then `without_rounds` of the demonstrations' own
    prefill, the whole prompts without reuse and the 0-shot batch again (whole 32-shot prompts take minutes on a
    CPU, so fewer rounds). Each ratio pairs a call with the 0-shot batch that ran in turns with it."""
    from transformers import DynamicCache

    cache_name = cache_argument()
    size = model.config.image_size
    sync = sync_fn(device)
    queries = noise_images(num_queries, size, seed=1)
    shot_images = noise_images(max(shot_counts), size, seed=2)
    zero = few_shot_inputs(processor, 0, queries, shot_images)[1].to(device)
    rows = []
    for shots in shot_counts:
        demos, full = few_shot_inputs(processor, shots, queries, shot_images)
        demos, full = demos.to(device), full.to(device)

        def run_prefix():
            return model(**demos, **{cache_name: DynamicCache()}, use_cache=True)

        prefix_cache = getattr(run_prefix(), cache_name)
        expand = []  # ms of each call's copy + expand (its own time: no layer runs, so no turn changes in it)

        def run_with():
            # Copying the demonstrations' cache and expanding it to the batch is part of every batch's cost.
            start = time.perf_counter()
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(num_queries)
            sync()
            expand.append((time.perf_counter() - start) * 1e3)
            return _generate_one(model, full, **{cache_name: cache})

        reuse, reuse_out = rounds_in_turns(
            model, lambda: {"with": run_with, "zero": lambda: _generate_one(model, zero)}, rounds, warmup, sync)
        whole, whole_out = rounds_in_turns(
            model, lambda: {"prefix": run_prefix, "without": lambda: _generate_one(model, full),
                            "zero": lambda: _generate_one(model, zero)}, without_rounds, 0, sync)
        expand = expand[-rounds:]  # the timed rounds'
        with_prefill = [w - e for w, e in zip(reuse["with"], expand)]
        prompt_tokens, prefix_tokens = full["input_ids"].shape[1], demos["input_ids"].shape[1]
        row = {
            "shots": shots, "queries": num_queries, "images_per_prompt": shots + 1, "prompt_tokens": prompt_tokens,
            "prefix_tokens": prefix_tokens, "new_tokens": prompt_tokens - prefix_tokens,
            "prefix_ms": median(whole["prefix"]), "expand_ms": median(expand),
            "with_query_ms": median(reuse["with"]) / num_queries,
            "with_prefill_query_ms": median(with_prefill) / num_queries,
            "without_query_ms": median(whole["without"]) / num_queries,
            "zero_query_ms": median(reuse["zero"]) / num_queries,
            "with_ratio": paired_ratio(reuse["with"], reuse["zero"]),
            "with_prefill_ratio": paired_ratio(with_prefill, reuse["zero"]),
            "without_ratio": paired_ratio(whole["without"], whole["zero"]),
            "logit_diff": _max_logit_diff(reuse_out["with"], whole_out["without"]),
            "raw": {**reuse, "expand": expand, **{f"{name}_beside_without": v for name, v in whole.items()}},
        }
        rows.append(row)
        log(f"  {shots}-shot x{num_queries}: per query {row['with_query_ms']:.1f} ms with reuse "
            f"(x{row['with_ratio']:.2f} 0-shot), {row['without_query_ms']:.1f} ms without (x{row['without_ratio']:.2f}); "
            f"prefix once {row['prefix_ms']:.0f} ms; max |logit diff| {row['logit_diff']:.2e}")
    return rows


def build(dims, device):
    """The medium (or tiny) InfiMM of the decode benchmark and its processor."""
    from .models import build_infimm, build_processor

    import_infimm()
    model = build_infimm(dims).to(device)
    return model, build_processor(model.config)
