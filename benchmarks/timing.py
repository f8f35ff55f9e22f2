"""Timers that hold on a busy machine: what is compared runs in turns, so a neighbour's burst slows both sides.

- `timed_generate_in_turns`: two `generate()` calls in two threads stepping in turns (prefill, prefill, step 1,
  step 1, ...); `measure_pair` repeats it, alternating which one starts (the decode benchmark).
- `run_in_turns` / `rounds_in_turns`: several calls on one model in threads taking turns layer by layer, so even
  a single long forward (a prefill) shares the machine with what it is compared to (the prefix-reuse benchmark);
- `alternate`: several measurements, one of each per round, the order reversed every other round (the vision check
  and the torch.compile probe).

Reported figures are medians; a ratio is the median of the per-round ratios of neighbouring measurements.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import threading
import time

from .models import BOS, EOC_TOKEN, EOS, MEDIA_TOKEN


def sync_fn(device):
    """A callable that waits for the device's queued work (a no-op on CPU), so the clock sees finished work."""
    import torch

    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@contextlib.contextmanager
def collector_paused():
    """No garbage-collector pauses inside the timed region (a collection first, so none is due)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerators, denominators):
    """Median of the ratios of measurements taken side by side (round i with round i)."""
    return median([a / b for a, b in zip(numerators, denominators)])


class Turns:
    """Threads that take turns one at a time, in a fixed cyclic order of their names.

    Only one thread computes at any moment, and the turns change every few tens of milliseconds, so a busy
    neighbour slows every participant alike and their ratios stay put. `busy[name]` sums the ms a thread held the
    turn (from `wait` returning to its next `hand_over`). A thread that has finished gives up its turns for good.
    """

    def __init__(self, *names: str):
        self._cond = threading.Condition()
        self._names = names
        self._turn = names[0]
        self._done = set()
        self._since = {}
        self.busy = dict.fromkeys(names, 0.0)

    def wait(self, name: str):
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name)
        self._since[name] = time.perf_counter()

    def hand_over(self, name: str, finished: bool = False):
        now = time.perf_counter()
        with self._cond:
            if name in self._since:
                self.busy[name] += (now - self._since.pop(name)) * 1e3
            if finished:
                self._done.add(name)
            start = self._names.index(name)
            waiting = [n for i in range(1, len(self._names) + 1)
                       if (n := self._names[(start + i) % len(self._names)]) not in self._done]
            if waiting:
                self._turn = waiting[0]
            self._cond.notify_all()


def make_clock(sync, suppress_ids, turns=None, name=None):
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        """Records how long each step took, from the start of the step (or of its turn) to its logits, and keeps
        `suppress_ids` (the special tokens of the prompt layout) out of the generated text, so every system decodes
        ordinary text. `durations[0]` is the prefill (with generate's setup), then one entry per decode step."""

        def __init__(self):
            self.durations = []
            self.step_start = None

        def __call__(self, input_ids, scores):
            sync()
            self.durations.append((time.perf_counter() - self.step_start) * 1e3)
            if suppress_ids:
                scores[:, suppress_ids] = -float("inf")
            if turns is not None:
                turns.hand_over(name)
                turns.wait(name)
            self.step_start = time.perf_counter()
            return scores

    return StepClock()


def generation_config(new_tokens: int, **extra):
    """Greedy, exactly `new_tokens` new tokens (`min_new_tokens` = `max_new_tokens`), the prompt layout's ids."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, use_cache=True, **extra,
    )


def step_times(clock, new_tokens: int):
    """(prefill ms, median decode step ms, mean decode step ms) from a clock's durations."""
    if len(clock.durations) < new_tokens:
        raise RuntimeError(f"expected {new_tokens} steps, timed {len(clock.durations)}")
    durations = clock.durations[:new_tokens]  # a deferred stop check may run one extra step
    steps = durations[1:]
    # The median step, not the mean: every decode step does the same work (the sequence grows by 1 token in 64),
    # so the median is the step's cost and a busy neighbour's burst during a few steps does not move it.
    return durations[0], statistics.median(steps), statistics.fmean(steps)


def clocked_generate(model, inputs, gen_config, clock, sync, extra_processors=(), **generate_kwargs):
    """`generate()` with `clock` stamping every step; checks that exactly `max_new_tokens` tokens came out."""
    from transformers import LogitsProcessorList

    sync()
    clock.step_start = time.perf_counter()
    out = model.generate(
        **inputs, generation_config=gen_config, logits_processor=LogitsProcessorList([clock, *extra_processors]),
        **generate_kwargs,
    )
    sequences = out if hasattr(out, "shape") else out.sequences
    generated = sequences.shape[1] - inputs["input_ids"].shape[1]
    if generated != gen_config.max_new_tokens:
        raise RuntimeError(f"expected {gen_config.max_new_tokens} new tokens, got {generated}")
    return out


def timed_generate(model, inputs, gen_config, device, extra_processors=()):
    """One `generate()`; returns (prefill ms, median decode step ms, mean decode step ms)."""
    sync = sync_fn(device)
    clock = make_clock(sync, [EOC_TOKEN, MEDIA_TOKEN])
    with collector_paused():
        clocked_generate(model, inputs, gen_config, clock, sync, extra_processors)
    return step_times(clock, gen_config.max_new_tokens)


def timed_generate_in_turns(first, second, gen_config, device):
    """Two `generate()` calls, `first` and `second` each a (model, inputs) pair, stepping in turns (`Turns`).

    Returns the two (prefill ms, median decode step ms, mean decode step ms) tuples, in that order."""
    sync = sync_fn(device)
    turns = Turns("first", "second")
    clocks = {name: make_clock(sync, [EOC_TOKEN, MEDIA_TOKEN], turns, name) for name in ("first", "second")}
    errors = []

    def run(name, model, inputs):
        try:
            turns.wait(name)
            clocked_generate(model, inputs, gen_config, clocks[name], sync)
        except BaseException as exc:  # reported by the caller; the other thread must not wait for this one
            errors.append(exc)
        finally:
            turns.hand_over(name, finished=True)

    with collector_paused():
        threads = [threading.Thread(target=run, args=(name, *pair)) for name, pair in (("first", first), ("second", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return tuple(step_times(clocks[name], gen_config.max_new_tokens) for name in ("first", "second"))


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


def alternate(measures: dict, rounds: int, warmup: int = 0) -> dict:
    """Runs every measurement once per round, in the given order on even rounds and reversed on odd ones, so
    neighbouring measurements share the machine's state; `warmup` untimed rounds first.

    `measures` maps a name to a callable returning one measurement (e.g. ms); returns name -> list of `rounds`."""
    results = {name: [] for name in measures}
    for r in range(warmup + rounds):
        names = list(measures) if r % 2 == 0 else list(reversed(measures))
        for name in names:
            value = measures[name]()
            if r >= warmup:
                results[name].append(value)
    return results


def stopwatch(fn, sync):
    """A measurement for `alternate`: the wall time of `fn()` in ms, the device synchronised on both sides."""

    def measure():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    return measure


def run_in_turns(model, calls: dict, sync) -> tuple[dict, dict]:
    """Runs the `calls` (name -> callable, each using `model`) in threads that take turns at every element of the
    model's `ModuleList`s (decoder layers, vision blocks, resampler layers), in the order of `calls`.

    A prefill is one long forward, so the turns change inside it, layer by layer, as `timed_generate_in_turns`
    changes them step by step. Returns (name -> ms the call held the turn, name -> the call's return value)."""
    import torch

    turns = Turns(*calls)
    owner = {}  # thread id -> name: the hooks are shared by every thread running the model

    def hook(module, args):
        name = owner.get(threading.get_ident())
        if name is not None:
            sync()
            turns.hand_over(name)
            turns.wait(name)

    layers = [layer for module in model.modules() if isinstance(module, torch.nn.ModuleList) for layer in module]
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    values, errors = {}, []
    # Grad and inference modes are per thread: the calls run in the caller's.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(name, fn):
        owner[threading.get_ident()] = name
        try:
            turns.wait(name)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                values[name] = fn()
            sync()
        except BaseException as exc:  # reported by the caller; the other threads must not wait for this one
            errors.append(exc)
        finally:
            turns.hand_over(name, finished=True)

    try:
        with collector_paused():
            threads = [threading.Thread(target=run, args=item) for item in calls.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    return dict(turns.busy), values


def rounds_in_turns(model, make_calls, rounds: int, warmup: int, sync) -> tuple[dict, dict]:
    """`warmup` + `rounds` runs of `run_in_turns` over fresh `make_calls()` (name -> callable; what a call needs
    prepared, e.g. a copied cache, is made there, outside the timing), the order reversed every other round.

    Returns (name -> list of `rounds` busy ms, name -> the last round's return value)."""
    times, values = None, {}
    for r in range(warmup + rounds):
        calls = make_calls()
        if r % 2:
            calls = dict(reversed(calls.items()))
        busy, values = run_in_turns(model, calls, sync)
        if times is None:
            times = {name: [] for name in calls}
        if r >= warmup:
            for name, ms in busy.items():
                times[name].append(ms)
    return times, values
