"""Speed benchmarks of InfiMM, runnable as `python benchmarks/NAME.py ...` or `python -m benchmarks.NAME ...`.

- `decode`: decode ms/token against the bare LM, IDEFICS and a LLaVA-style model (docs/decode.md);
- `prefix_reuse`: prefill with a reused language-model cache, multi-turn chat and few-shot (docs/prefix_reuse.md);
- `convert_memory`: peak memory of `infimm-convert`.

Shared parts: `models` (shapes, builders, inputs), `timing` (turn-taking and alternating timers), `probes`
(vision check, profiler, torch.compile), `worker` (the decode benchmark's per-system process) and `report`
(markdown and plots, written from a results dict).
"""
