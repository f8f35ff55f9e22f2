"""Builders of InfiMM checkpoints in the layouts found in the wild, written from a model of this package.

The layouts follow the README ("Converting checkpoints") and the published release code: the release's Flamingo
module (`vision_encoder` = EVA-CLIP in its original naming, `perceiver`, `lang_encoder` with the decoder layers
wrapped as `layers.N.decoder_layer` / `layers.N.gated_cross_attn_layer` plus the alias lists `old_decoder_blocks`
and `gated_cross_attn_layers`). They are spelled out here by hand, independently of `convert_weights`, so a test
compares the converter against this description rather than against itself.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from conftest import RELEASE_DIR, TOKENIZER_DIR


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# timm's EVA naming -> the original EVA-CLIP naming (the inverse of timm's checkpoint filter, by hand).
_TIMM_TO_EVA_CLIP = (
    (r"^(blocks\.\d+\.attn)\.q_proj\.bias$", r"\1.q_bias"),
    (r"^(blocks\.\d+\.attn)\.v_proj\.bias$", r"\1.v_bias"),
    (r"^(blocks\.\d+\.attn)\.norm\.", r"\1.inner_attn_ln."),
    (r"^(blocks\.\d+\.mlp)\.fc1_g\.", r"\1.w1."),
    (r"^(blocks\.\d+\.mlp)\.fc1_x\.", r"\1.w2."),
    (r"^(blocks\.\d+\.mlp)\.norm\.", r"\1.ffn_ln."),
    (r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3."),
)


def to_eva_clip_name(timm_key: str) -> str:
    for pattern, replacement in _TIMM_TO_EVA_CLIP:
        if re.match(pattern, timm_key):
            return re.sub(pattern, replacement, timm_key)
    return timm_key


def eva_clip_state_dict(state: dict, config, *, clip_dim: int = 24) -> dict:
    """The vision tower of an InfiMM state dict as the original EVA-CLIP code stores it: its own names, the rope
    tables (one module shared by every block, so one storage under many names), and the CLIP projection head."""
    prefix = "model.vision_tower.timm_model."
    tower = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    eva = {to_eva_clip_name(key): value for key, value in tower.items()}
    args = config.vision_config.model_args
    grid = (args["img_size"] // args["patch_size"]) ** 2
    head_dim = args["embed_dim"] // args["num_heads"]
    generator = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(grid, head_dim, generator=generator), torch.randn(grid, head_dim, generator=generator)
    eva["rope.freqs_cos"], eva["rope.freqs_sin"] = cos, sin
    for i in range(args["depth"]):
        eva[f"blocks.{i}.attn.rope.freqs_cos"], eva[f"blocks.{i}.attn.rope.freqs_sin"] = cos, sin
    dtype = eva["cls_token"].dtype
    eva["head.weight"] = torch.randn(clip_dim, args["embed_dim"], generator=generator).to(dtype)
    eva["head.bias"] = torch.randn(clip_dim, generator=generator).to(dtype)
    return eva


def release_state_dict(state: dict, config, *, alias_index: str = "layer", share_aliases: bool = True) -> dict:
    """An InfiMM state dict (this package's keys) in the layout of the release's inner Flamingo module (no `model.`
    prefix). The values are the same tensor objects, except alias copies when `share_aliases=False`.

    `alias_index`: "layer" indexes `gated_cross_attn_layers` by decoder layer (the release's list has a None slot
    where a layer has no block), "block" by block order.
    """
    out = {"vision_encoder." + key: value for key, value in eva_clip_state_dict(state, config).items()}
    blocks = {layer: block for block, layer in enumerate(config.cross_attention_layers)}

    def alias(value):
        return value if share_aliases else value.clone()

    for key, value in state.items():
        if key.startswith("model.resampler."):
            rest = key[len("model.resampler."):]
            rest = re.sub(r"^layers\.(\d+)\.attn\.", r"layers.\1.0.", rest)
            rest = re.sub(r"^layers\.(\d+)\.ff\.", r"layers.\1.1.", rest)
            out["perceiver." + rest] = value
        elif key.startswith("model.language_model."):
            rest = key[len("model.language_model."):]
            layer = re.match(r"^model\.layers\.(\d+)\.(.+)$", rest)
            if layer:
                i, rest = layer.groups()
                out[f"lang_encoder.model.layers.{i}.decoder_layer.{rest}"] = value
                out[f"lang_encoder.old_decoder_blocks.{i}.{rest}"] = alias(value)
            else:
                out["lang_encoder." + rest] = value  # model.embed_tokens, model.norm, lm_head
        elif key.startswith("model.cross_attention_layers."):
            i, rest = re.match(r"^model\.cross_attention_layers\.(\d+)\.(.+)$", key).groups()
            index = i if alias_index == "layer" else blocks[int(i)]
            out[f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.{rest}"] = value
            out[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = alias(value)
    return out


def flamingo_state_dict(model, **kwargs) -> dict:
    """`release_state_dict` of a model's weights (copied, so edits do not reach the model)."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return release_state_dict(state, model.config, **kwargs)


def trainable_state_dict(model) -> dict:
    """What OpenFlamingo's trainable-only save keeps for InfiMM: resampler and cross-attention, no alias lists."""
    return {key: value for key, value in flamingo_state_dict(model).items()
            if key.startswith("perceiver.") or ".gated_cross_attn_layer." in key}


def legacy_config(config, dtype: str = "float32", visual: dict | None = None) -> dict:
    """A release-style config.json: `visual` / `language` blocks; the connector sizes of a tiny model (the release
    hard-codes its own) ride along as top-level fields. The `visual` switches are EVA02-CLIP-L's (the release's);
    `visual` replaces any of its fields, for a model built with matching `model_args`."""
    args = config.vision_config.model_args
    language = config.text_config.to_dict()
    for key in ("dtype", "transformers_version", "architectures"):
        language.pop(key, None)
    language.update(architectures=["MistralForCausalLM"], torch_dtype=dtype, _name_or_path="tiny-mistral")
    return {
        "_name_or_path": "./",
        "architectures": ["InfiMMZephyrModel"],
        "auto_map": {"AutoConfig": "configuration_infimm_zephyr.InfiMMConfig",
                     "AutoModelForCausalLM": "modeling_infimm_zephyr.InfiMMZephyrModel"},
        "model_type": "infimm-zephyr",
        "seq_length": 1024,
        "tokenizer_type": "LlamaTokenizer",
        "torch_dtype": dtype,
        "transformers_version": "4.35.2",
        "use_cache": True,
        "use_flash_attn": False,
        "cross_attn_every_n_layers": config.cross_attn_every_n_layers,
        "use_grad_checkpoint": False,
        "freeze_llm": True,
        "image_token_id": config.media_token_id,
        "eoc_token_id": config.eoc_token_id,
        "resampler_depth": config.resampler_depth,
        "resampler_num_latents": config.resampler_num_latents,
        "resampler_heads": config.resampler_heads,
        "resampler_head_dim": config.resampler_head_dim,
        "cross_attn_heads": config.cross_attn_heads,
        "cross_attn_head_dim": config.cross_attn_head_dim,
        "visual": {
            "image_size": args["img_size"], "layers": args["depth"], "width": args["embed_dim"],
            "head_width": args["embed_dim"] // args["num_heads"], "patch_size": args["patch_size"],
            "mlp_ratio": 2.6667, "eva_model_name": "eva-clip-l-14-336", "drop_path_rate": 0.0, "xattn": False,
            "fusedLN": True, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True,
            "subln": True, "embed_dim": 24, **(visual or {}),
        },
        "language": language,
    }


def copy_tokenizer(folder: Path, *, without_media_tokens: bool = False):
    """The release's real tokenizer; optionally as the bare LLM's (no `<|endofchunk|>` / `<image>`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    if without_media_tokens:
        (folder / "added_tokens.json").unlink()
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < 32000]
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 32000}
        config.pop("additional_special_tokens", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        special = json.loads((folder / "special_tokens_map.json").read_text())
        special.pop("additional_special_tokens", None)
        (folder / "special_tokens_map.json").write_text(json.dumps(special))


def write_release_snapshot(model, folder: Path, *, shards: int = 1, visual: dict | None = None) -> Path:
    return write_release(flamingo_state_dict(model), model.config, folder, shards=shards, visual=visual)


def write_release(flamingo_state: dict, config, folder: Path, *, shards: int = 1, dtype: str = "float32",
                  visual: dict | None = None) -> Path:
    """A local snapshot of a released repo: legacy config (`visual` overrides its vision fields), `pytorch_model.bin`
    (or shards + index) with `model.` keys, tokenizer, generation and preprocessor configs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(legacy_config(config, dtype, visual), indent=2))
    for name in ("generation_config.json", "preprocessor_config.json"):
        shutil.copy(RELEASE_DIR / name, folder / name)
    copy_tokenizer(folder)
    state = {"model." + key: value for key, value in flamingo_state.items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    keys = list(state)
    weight_map = {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {key: state[key] for key in keys[n::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_deepspeed(model, path: Path, *, prefix: str = "module.", state: dict | None = None) -> Path:
    """DeepSpeed ZeRO-2 `mp_rank_00_model_states.pt`: the Flamingo module's state under `module`, plus the engine's
    bookkeeping (plain data only)."""
    state = flamingo_state_dict(model) if state is None else state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "module": {prefix + key: value for key, value in state.items()},
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [{key: value.shape for key, value in state.items()}],
        "lr_scheduler": {"last_epoch": 10},
        "global_steps": 5000,
        "global_samples": 40000,
        "dp_world_size": 8,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
        "ds_version": "0.12.3",
    }, path)
    return path


def write_openflamingo(model, path: Path) -> Path:
    """OpenFlamingo-style checkpoint: trainable parameters under `model_state_dict` (DDP `module.` prefix) next to
    the optimizer state."""
    state = {"module." + key: value for key, value in trainable_state_dict(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "epoch": 2,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-4}]},
        "lr_scheduler_state_dict": {"last_epoch": 10},
    }, path)
    return path


def write_eva_clip(model, path: Path) -> Path:
    """An EVA-CLIP release file: the whole CLIP model, vision tower under `visual.`, text tower beside it."""
    state = {"visual." + key: value for key, value in eva_clip_state_dict(model.state_dict(), model.config).items()}
    generator = torch.Generator().manual_seed(2)
    state["text.token_embedding.weight"] = torch.randn(100, 24, generator=generator)
    state["text.ln_final.weight"] = torch.ones(24)
    state["logit_scale"] = torch.tensor(4.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_llm(model, folder: Path, *, vocab_size: int | None = None) -> Path:
    """The language model as a stock Hugging Face folder (safetensors), optionally cut to `vocab_size` rows with a
    tokenizer lacking the two media tokens (a bare LLM before InfiMM added them)."""
    lm = model.model.language_model
    if vocab_size is None:
        lm.save_pretrained(folder)
        copy_tokenizer(folder)
        return folder
    from transformers import AutoModelForCausalLM

    config = lm.config.__class__.from_dict({**lm.config.to_dict(), "vocab_size": vocab_size})
    small = AutoModelForCausalLM.from_config(config)
    state = {key: value[:vocab_size] if value.shape[:1] == (lm.config.vocab_size,) else value
             for key, value in lm.state_dict().items()}
    small.load_state_dict(state)
    small.save_pretrained(folder)
    copy_tokenizer(folder, without_media_tokens=True)
    return folder


class CodeInPickle:
    """A pickle payload that would create `marker` when unpickled without `weights_only`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_unsafe_pickle(model, path: Path, marker: Path) -> Path:
    torch.save({"module": flamingo_state_dict(model), "args": argparse.Namespace(lr=1e-4),
                "hook": CodeInPickle(marker)}, path)
    return path
