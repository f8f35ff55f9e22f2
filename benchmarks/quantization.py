"""Weight memory and output drift of quantized InfiMM loading: bitsandbytes int8 / NF4, torchao int8 / int4.

Two tables, both computed:

1. Weight bytes of the three presets at their real sizes (`InfiMMConfig.from_preset(...)`), in bf16 and under
   each backend. The model is built on the meta device (no storage); each Linear is quantized or not by the rule
   quantized loading applies: the model class's `_modules_to_not_quantize`, matched by transformers' own
   `should_convert_module`, over the modules the backend converts (bitsandbytes: exact `nn.Linear`; torchao:
   any `nn.Linear`, and for int4 only those whose `in_features` the group size divides). A quantized weight of
   shape (N, K) then takes what its backend stores (read off the tensors the backends build, and checked against
   real loads by `drift`, for every backend it loads, and by the test suite):

   - bitsandbytes LLM.int8: N*K int8 + one fp32 scale per output row (`SCB`): N*K + 4N bytes;
   - torchao int8 weight-only (`Int8Tensor`): N*K int8 + an fp32 scale and an int8 zero point per row: N*K + 5N;
   - bitsandbytes NF4 (blocksize 64): N*K/2 bytes + one fp32 absmax per 64 values + the 16-entry fp32 code;
     with double quantization the absmax are int8, plus one fp32 absmax per 256 of them, a 256-entry fp32 code
     and an fp32 offset;
   - torchao int4 on CPU (`Int4OpaqueTensor`, group 128): N*K/2 bytes + a (scale, zero) pair per 128 values of a
     row, in the weight dtype (bf16).

   Everything else (the skipped modules, embeddings, norms, gates, biases) stays at 2 bytes a value.

2. How far int8 and 4-bit move the outputs of the MEDIUM config of `benchmarks/decode.py` (EVA 256 wide, 4 blocks,
   224 px; Mistral 1024 wide, 8 layers; the preset's resampler and cross-attention; random weights, gates opened to
   0.5), saved once in fp32 and loaded with `from_pretrained(..., quantization_config=...)`, on one image prompt:
   the float model's greedy continuation of `--new-tokens` tokens is scored by every loaded model (teacher forcing),
   giving the max and mean absolute logit difference over the float logits' std, and how many of the continuation's
   tokens each model also ranks first; then each model generates greedily on its own, and the table gives how many
   leading tokens match the float model's. The quantized models compute in fp32 (the drift is the quantization's
   alone); a bf16 load and the float model with its gates shut (images ignored) give the scale.

Usage::

    python benchmarks/quantization.py                  # both tables at full size; markdown on stdout
    python benchmarks/quantization.py --weights-only   # table 1 only (seconds, no weights are allocated)
    python benchmarks/quantization.py --tiny           # table 2 on a tiny config (seconds), for smoke runs
    python benchmarks/quantization.py --json out.json  # also the raw figures
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script, or loaded from its path: the `benchmarks` package is at the root
    sys.path.insert(0, str(REPO))

from benchmarks.models import BOS, EOC_TOKEN, GATE, MEDIA_TOKEN, MEDIUM, infimm_config  # noqa: E402
from benchmarks.models import import_infimm as _import_infimm  # noqa: E402

PRESETS = ("infimm-zephyr", "infimm-llama13b", "infimm-vicuna13b")

BACKENDS = ("bnb-int8", "torchao-int8", "bnb-nf4", "bnb-nf4-dq", "torchao-int4")
LABELS = {
    "bf16": "bf16",
    "bnb-int8": "bitsandbytes int8 (LLM.int8)",
    "torchao-int8": "torchao int8 weight-only",
    "bnb-nf4": "bitsandbytes NF4",
    "bnb-nf4-dq": "bitsandbytes NF4 + double quant",
    "torchao-int4": "torchao int4 weight-only (CPU)",
    "shut": "float, gates shut (images ignored)",
}
GROUP_SIZE = 128  # torchao int4's default group
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit blocksize on CPU and CUDA
BNB_NESTED_BLOCKSIZE = 256  # double quantization: one fp32 absmax per 256 int8 absmax

# Tiny, but every quantized Linear still fits the CPU kernels (bitsandbytes 4-bit packs rows in 32s and needs
# in_features >= its blocksize 64; torchao int4 needs out_features % 16 == 0 and in_features % group == 0).
TINY = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32002, "max_position_embeddings": 512},
    "vision": {"img_size": 28, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 2},
    "connector": {"resampler_depth": 2, "resampler_num_latents": 4, "resampler_heads": 2, "resampler_head_dim": 8,
                  "cross_attn_every_n_layers": 2, "cross_attn_heads": 2, "cross_attn_head_dim": 32},
    "prompt_tokens": 16,
}
TINY_GROUP_SIZE = 32


# ------------------------------------------------------------------------------------------------ the rules
def quantization_config(backend: str, group_size: int = GROUP_SIZE):
    """The `quantization_config` a user passes for `backend` (no skip list: the model class's default applies)."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if backend == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if backend in ("bnb-nf4", "bnb-nf4-dq"):
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=backend == "bnb-nf4-dq"
        )
    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if backend == "torchao-int4":
        # torchao's own `Int4WeightOnlyConfig` has no CPU layout (its kernels are CUDA / XPU / NPU ones); the CPU
        # one (tinygemm's `_weight_int4pack_mm_for_cpu`) is this prototype config.
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=group_size))
    raise ValueError(f"Unknown backend {backend!r}; choose from {BACKENDS}.")


def default_skips(model) -> list[str]:
    """The module names quantized loading keeps float by default: the model class's declared list."""
    return list(type(model)._modules_to_not_quantize)


def quantized_linears(model, backend: str, skips=None, group_size: int = GROUP_SIZE) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of the Linears `backend` quantizes, by the rule of the loaders.

    bitsandbytes replaces modules whose type is exactly `nn.Linear` and whose module name `should_convert_module`
    accepts; torchao quantizes any `nn.Linear` whose weight's parameter name it accepts, and its int4 config leaves
    a weight float when the group size does not divide `in_features`.
    """
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    skips = default_skips(model) if skips is None else skips
    chosen = {}
    for name, module in model.named_modules():
        if backend.startswith("bnb-"):
            if type(module) is not nn.Linear or not should_convert_module(name, skips):
                continue
        else:
            if not isinstance(module, nn.Linear) or not should_convert_module(f"{name}.weight", skips):
                continue
            if backend == "torchao-int4" and module.in_features % group_size:
                continue
        chosen[name] = (module.out_features, module.in_features)
    return chosen


def quantized_weight_bytes(backend: str, out_features: int, in_features: int, group_size: int = GROUP_SIZE,
                           float_bytes: int = 2) -> int:
    """Bytes `backend` stores for one quantized (out_features, in_features) weight (see the module docstring)."""
    n, k = out_features, in_features
    values = n * k
    if backend == "bnb-int8":
        return values + 4 * n
    if backend == "torchao-int8":
        return values + 5 * n
    if backend in ("bnb-nf4", "bnb-nf4-dq"):
        blocks = math.ceil(values / BNB_BLOCKSIZE)
        packed = math.ceil(values / 2) + 16 * 4  # two values a byte, and the NF4 code
        if backend == "bnb-nf4":
            return packed + 4 * blocks
        return packed + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 256 * 4 + 4
    if backend == "torchao-int4":
        if n % 16:
            raise ValueError(f"torchao int4 on CPU needs out_features divisible by 16; a Linear has {n}.")
        return values // 2 + 2 * float_bytes * n * (k // group_size)
    raise ValueError(f"Unknown backend {backend!r}; choose from {BACKENDS}.")


PARTS = ("vision tower", "resampler", "cross-attention", "LM decoder", "embeddings + final norm", "lm_head")


def part_of(name: str) -> str:
    """Which part of InfiMM a parameter or module name of `InfiMMForConditionalGeneration` belongs to."""
    if name.startswith("model.vision_tower."):
        return "vision tower"
    if name.startswith("model.resampler."):
        return "resampler"
    if name.startswith("model.cross_attention_layers."):
        return "cross-attention"
    if name.startswith("model.language_model.model.layers."):
        return "LM decoder"
    if name.startswith("model.language_model.lm_head"):
        return "lm_head"
    return "embeddings + final norm"


def predicted_weight_bytes(model, backend: str | None, group_size: int = GROUP_SIZE, float_bytes: int = 2,
                           skips=None) -> dict[str, int]:
    """{part: bytes} of `model`'s parameters once `backend` (None: no quantization) has loaded it.

    `model` may live on the meta device: only names and shapes are read.
    """
    chosen = quantized_linears(model, backend, skips, group_size) if backend else {}
    weights = {f"{name}.weight": shape for name, shape in chosen.items()}
    totals = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        if name in weights:
            size = quantized_weight_bytes(backend, *weights[name], group_size=group_size, float_bytes=float_bytes)
        else:
            size = param.numel() * float_bytes
        totals[part_of(name)] += size
    return totals


def _tensor_bytes(tensor) -> int:
    """Bytes a parameter holds, quantization state included (bitsandbytes' `SCB` / `quant_state`, torchao's
    inner tensors)."""
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor).__module__.startswith("torchao"):
        names, _ = inner()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    size = tensor.numel() * tensor.element_size()
    scb = getattr(tensor, "SCB", None)
    if scb is not None:
        size += scb.numel() * scb.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        size += sum(t.numel() * t.element_size() for t in parts)
    return size


def stored_weight_bytes(model) -> dict[str, int]:
    """{part: bytes} of the parameters a loaded model really holds."""
    totals = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        totals[part_of(name)] += _tensor_bytes(param)
    return totals


def loaded_quantized_linears(model) -> set[str]:
    """Names of the Linears of a loaded model whose weight is quantized (bitsandbytes modules, torchao tensors)."""
    from torch import nn

    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if type(module).__module__.startswith("bitsandbytes") or type(weight).__module__.startswith("torchao"):
            names.add(name)
    return names


# ----------------------------------------------------------------------------------------- table 1: weights
def weight_table(presets=PRESETS, backends=BACKENDS) -> tuple[str, dict]:
    import torch

    infimm = _import_infimm()
    from infimm.device_map_infimm import meta_model

    raw = {}
    for preset in presets:
        model = meta_model(infimm.InfiMMConfig.from_preset(preset), dtype=torch.bfloat16)
        params = dict.fromkeys(PARTS, 0)
        for name, param in model.named_parameters():
            params[part_of(name)] += param.numel()
        without_tower = [name for name in default_skips(model) if not name.endswith("vision_tower")]
        raw[preset] = {
            "params": params,
            "bytes": {backend: predicted_weight_bytes(model, backend if backend != "bf16" else None)
                      for backend in ("bf16", *backends)},
            # What an explicit skip list without the tower (the resampler and lm_head only) would give.
            "bytes_tower_quantized": {backend: predicted_weight_bytes(model, backend, skips=without_tower)
                                      for backend in backends if backend in ("bnb-int8", "bnb-nf4")},
            "skips": default_skips(model),
        }
    gib = 1024**3
    lines = ["| part | " + " | ".join(presets) + " |", "|---|" + "---:|" * len(presets)]
    for part in PARTS:
        cells = [f"{raw[p]['params'][part] / 1e6:,.1f} M" for p in presets]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    cells = [f"{sum(raw[p]['params'].values()) / 1e9:,.2f} B" for p in presets]
    lines.append("| **all parameters** | " + " | ".join(cells) + " |")
    lines += ["", "| weights (GiB) | " + " | ".join(presets) + " |", "|---|" + "---:|" * len(presets)]
    for backend in ("bf16", *backends):
        cells = []
        for p in presets:
            total = sum(raw[p]["bytes"][backend].values())
            ratio = total / sum(raw[p]["bytes"]["bf16"].values())
            cells.append(f"{total / gib:.2f}" + ("" if backend == "bf16" else f" ({ratio:.0%})"))
        lines.append(f"| {LABELS[backend]} | " + " | ".join(cells) + " |")
    kept = ("vision tower", "resampler", "embeddings + final norm", "lm_head")
    cells = [f"{sum(raw[p]['bytes']['bf16'][part] for part in kept) / gib:.2f}" for p in presets]
    lines.append("| of which kept bf16 by default (tower, resampler, embeddings, norms, lm_head) | "
                 + " | ".join(cells) + " |")
    for backend in ("bnb-int8", "bnb-nf4"):
        if backend in backends:
            cells = [f"{sum(raw[p]['bytes_tower_quantized'][backend].values()) / gib:.2f}" for p in presets]
            lines.append(f"| {LABELS[backend]}, vision tower quantized too (explicit skip list) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines), raw


# -------------------------------------------------------------------------------------------- table 2: drift
def build_model(dims, seed: int = 0, gate: float = GATE):
    """InfiMM at `dims` with random weights (fp32) and open gates, as `benchmarks/decode.py` builds it."""
    import torch

    infimm = _import_infimm()
    config = infimm_config(dims)
    torch.manual_seed(seed)
    model = infimm.InfiMMForConditionalGeneration(config).eval()
    set_gates(model, gate)
    return model


def set_gates(model, value: float):
    for block in model.model.cross_attention_layers.values():
        block.attn_gate.data.fill_(value)
        block.ff_gate.data.fill_(value)


def image_prompt(dims, seed: int = 0):
    """One prompt in the Flamingo layout `<s><image>text...` (random ordinary tokens) and one random image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, EOC_TOKEN, (1, dims["prompt_tokens"]), generator=gen)
    ids[0, 0], ids[0, 1] = BOS, MEDIA_TOKEN
    size = dims["vision"]["img_size"]
    pixels = torch.randn(1, 1, 3, size, size, generator=gen)
    return ids, pixels


def _greedy(model, ids, pixels, new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:]


def _logits(model, sequence, pixels):
    import torch

    with torch.no_grad():
        return model(input_ids=sequence, pixel_values=pixels.to(model.dtype), use_cache=False).logits[0].float()


def drift(dims, backends=BACKENDS, new_tokens: int = 32, group_size: int = GROUP_SIZE, workdir=None) -> dict:
    """Loads the same saved model in float and under each backend and scores one image prompt (see module doc)."""
    import torch

    infimm = _import_infimm()
    cls = infimm.InfiMMForConditionalGeneration
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp) / "model"
        build_model(dims).save_pretrained(folder)
        ids, pixels = image_prompt(dims)
        reference = cls.from_pretrained(folder, dtype=torch.float32).eval()
        tokens = _greedy(reference, ids, pixels, new_tokens)
        sequence = torch.cat([ids[0], tokens])[None]
        base = _logits(reference, sequence, pixels)
        std = float(base.std())
        start = ids.shape[1] - 1  # the position whose logits predict the first new token
        targets = sequence[0, start + 1:]

        def score(logits, generated=None, seconds=None, model=None):
            diff = (logits - base).abs()
            row = {
                "max_abs_over_std": float(diff.max()) / std,
                "mean_abs_over_std": float(diff.mean()) / std,
                "top1_agreement": float((logits[start:-1].argmax(-1) == targets).float().mean()),
            }
            if generated is not None:
                same = (generated == tokens).long()
                row["greedy_prefix"] = int(same.cumprod(0).sum())
                row["greedy_agreement"] = float(same.float().mean())
            if model is not None:
                row["quantized_linears"] = len(loaded_quantized_linears(model))
                row["weight_bytes"] = sum(stored_weight_bytes(model).values())
            if seconds is not None:
                row["load_seconds"] = seconds
            return row

        rows = {}
        shut = copy.deepcopy(reference)
        set_gates(shut, 0.0)
        rows["shut"] = score(_logits(shut, sequence, pixels), _greedy(shut, ids, pixels, new_tokens))
        del shut
        bf16 = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
        rows["bf16"] = score(_logits(bf16, sequence, pixels), _greedy(bf16, ids, pixels, new_tokens), model=bf16)
        del bf16
        for backend in backends:
            started = time.perf_counter()
            model = cls.from_pretrained(
                folder, dtype=torch.float32, quantization_config=quantization_config(backend, group_size)
            ).eval()
            seconds = time.perf_counter() - started
            # As loaded: on CPU, bitsandbytes repacks its weights at the first forward (another layout).
            stored = sum(stored_weight_bytes(model).values())
            expected = set(quantized_linears(reference, backend, group_size=group_size))
            if loaded_quantized_linears(model) != expected:
                raise RuntimeError(
                    f"{backend}: the loaded model quantized other Linears than `_modules_to_not_quantize` implies; "
                    f"extra {sorted(loaded_quantized_linears(model) - expected)[:5]}, "
                    f"missing {sorted(expected - loaded_quantized_linears(model))[:5]}."
                )
            predicted = sum(predicted_weight_bytes(reference, backend, group_size, float_bytes=4).values())
            row = score(_logits(model, sequence, pixels), _greedy(model, ids, pixels, new_tokens), seconds, model)
            row["weight_bytes"], row["predicted_weight_bytes"] = stored, predicted
            rows[backend] = row
            del model
        return {"rows": rows, "logits_std": std, "new_tokens": new_tokens, "prompt_tokens": ids.shape[1],
                "float_weight_bytes": sum(stored_weight_bytes(reference).values())}


def drift_table(result) -> str:
    n = result["new_tokens"]
    lines = [
        f"| loaded as | max abs logit diff / std | mean abs logit diff / std | top-1 = float's next token "
        f"(of {n}) | greedy: leading tokens = float's (of {n}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"| {LABELS[name]} | {row['max_abs_over_std']:.3f} | {row['mean_abs_over_std']:.4f} | "
            f"{row['top1_agreement'] * n:.0f} | {row['greedy_prefix']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-only", action="store_true", help="table 1 only")
    parser.add_argument("--tiny", action="store_true", help="table 2 on a tiny config (seconds)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)

    import torch

    # bitsandbytes logs "inputs will be cast from float32 to float16" at every int8 matmul of an fp32 model.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = tuple(b for b in args.backends.split(",") if b)
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"Unknown backends {sorted(unknown)}; choose from {BACKENDS}.")

    import bitsandbytes
    import torchao
    import transformers

    print(f"- torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}, torchao {torchao.__version__}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    output = {}
    if not args.tiny:
        table, raw = weight_table(backends=backends)
        output["weights"] = raw
        print("### Weight memory of the presets\n")
        print(table + "\n")
    if not args.weights_only:
        dims, group = (TINY, TINY_GROUP_SIZE) if args.tiny else (MEDIUM, GROUP_SIZE)
        started = time.perf_counter()
        result = drift(dims, backends, args.new_tokens, group)
        output["drift"] = result
        print(f"### Output drift, {'tiny' if args.tiny else 'medium'} config, one image prompt of "
              f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens\n")
        print(drift_table(result) + "\n")
        checks = [f"{b}: {result['rows'][b]['weight_bytes']:,} B stored, {result['rows'][b]['predicted_weight_bytes']:,}"
                  f" B by the rule" for b in backends]
        print("Weight bytes of the loaded models (fp32 compute) against the rule of table 1: " + "; ".join(checks))
        print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(output, indent=1, default=str))


if __name__ == "__main__":
    main()
