"""The rules of the original InfiMM release (`Infi-MM/infimm-*` on the Hub), in one place.

The release ships a `config.json` with a `visual` block (the fields of EVA-CLIP's `CLIPVisionCfg`, from which the
release builds its vision tower with EVA-CLIP's `EVAVisionTransformer`) and a `language` block (the LLM's own
config), and one `pytorch_model.bin` of its Flamingo module. This module says how each of them becomes this
package's:

- `legacy_config_to_dict`: every key of the release's config is used, dropped with the reason written next to it,
  or refused with a `ValueError` that names it; a value the timm tower cannot express is refused, never replaced
  by a default of whichever timm architecture `eva_model_name` suggests;
- `RELEASE_KEY_PREFIX` / `RELEASE_KEY_RULES`: the `^`-anchored table from the release's checkpoint keys to this
  package's keys (the converter compiles it; see `convert_weights/formats.py`), with the alias lists;
- `HUB_KWARGS`, `RELEASE_FILE_PATTERNS`, `RELEASE_GENERATION`: how a snapshot is located and what it holds.

It travels with the remote code (`configuration_infimm.py` imports it), so it imports only the standard library,
torch and transformers (and huggingface_hub, which transformers itself requires).
"""

import copy
import inspect
import math
import numbers
from dataclasses import dataclass

import torch
from transformers import AutoConfig


try:  # transformers' configs check their fields' types with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: the configs raise built-in errors only

    class StrictDataclassError(Exception):
        """Never raised: stands in for the strict-dataclass error of a newer huggingface_hub."""


# ================================================================================================ config.json
LEGACY_BLOCKS = ("visual", "language")
NEW_FORMAT_BLOCKS = ("vision_config", "text_config")


def is_legacy_config(config_dict) -> bool:
    """True for the release's `config.json` layout: a `visual` or a `language` block.

    One block alone is the release's layout too, only incomplete: it is routed here so that
    `legacy_config_to_dict` refuses it by name, rather than the other block's shapes being filled in with the
    defaults of a full-size model."""
    return isinstance(config_dict, dict) and any(block in config_dict for block in LEGACY_BLOCKS)


def check_base_fields(values: dict, where: str = ""):
    """Refuses, naming `{where}{field}`, a wrong kind of value in the fields every transformers config reads in its
    base class without checking them (they would fail later as an AttributeError or IndexError naming nothing)."""
    for key in ("id2label", "label2id"):
        value = values.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"`{where}{key}` must be a JSON object (label id -> name) or null; got {value!r}.")
    labels = values.get("id2label") or {}
    if not all(isinstance(key, int) or (isinstance(key, str) and key.strip().lstrip("-").isdigit()) for key in labels):
        raise ValueError(f"`{where}id2label` keys must be integer label ids; got {sorted(map(str, labels))[:5]}.")
    for key in ("dtype", "torch_dtype"):
        value = values.get(key)
        if value is not None and not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
            raise ValueError(f"`{where}{key}` must name a torch dtype (e.g. \"bfloat16\", \"float32\") or be null; "
                             f"got {value!r}.")
    if "model_type" in values and not isinstance(values["model_type"], str):
        raise ValueError(f"`{where}model_type` must be a string; got {values['model_type']!r}.")


# `visual.eva_model_name` -> the timm architecture whose factory builds the tower. The label only picks the
# factory: every argument that shapes the tower is then passed explicitly from the other fields.
LEGACY_EVA_NAMES = {
    "eva-clip-l-14-336": "eva02_large_patch14_clip_336",
    "eva02-clip-l-14-336": "eva02_large_patch14_clip_336",
    "eva-clip-l-14": "eva02_large_patch14_clip_224",
    "eva02-clip-l-14": "eva02_large_patch14_clip_224",
    "vit-g-224": "eva_giant_patch14_clip_224",
    "eva-clip-g-14": "eva_giant_patch14_clip_224",
    "eva01-clip-g-14": "eva_giant_patch14_clip_224",
    "vit-e-224": "eva02_enormous_patch14_clip_224",
    "eva02-clip-bige-14": "eva02_enormous_patch14_clip_224",
    "eva-clip-4b-14-x": "eva02_enormous_patch14_clip_224",
}

# Shapes of the tower: required (a missing one is refused rather than guessed).
VISUAL_SHAPE_FIELDS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")

# Switches with the value EVA-CLIP's `CLIPVisionCfg` gives them when the field is absent (the release's own
# defaults, not timm's).
VISUAL_DEFAULTS = {
    "qkv_bias": True,
    "ls_init_value": None,
    "rope": False,
    "pt_hw_seq_len": 16,
    "intp_freq": False,
    "postnorm": False,
    "naiveswiglu": False,
    "subln": False,
    "global_average_pool": False,
    "timm_model_name": None,
}

# Fields that do not change what the tower computes at inference: read, and deliberately not carried over.
VISUAL_WITHOUT_EFFECT = {
    "xattn": "xformers memory-efficient attention instead of the plain softmax attention: a kernel, the same math",
    "fusedLN": "apex FusedLayerNorm instead of torch's LayerNorm (both eps 1e-6): a kernel, the same math",
    "drop_path_rate": "stochastic depth, active in training only",
    "patch_dropout": "drops patch tokens in training only",
    "embed_dim": "width of the CLIP projection head, which InfiMM never runs (the resampler reads the last block's "
                 "tokens)",
    "eva_model_name": "a label: it picks the timm factory (`LEGACY_EVA_NAMES`), and the fields decide the tower",
    "timm_model_pretrained": "setting of a tower built by `timm_model_name`, which is refused",
    "timm_pool": "setting of a tower built by `timm_model_name`, which is refused",
    "timm_proj": "setting of a tower built by `timm_model_name`, which is refused",
    "timm_proj_bias": "setting of a tower built by `timm_model_name`, which is refused",
}

VISUAL_FIELDS = frozenset(VISUAL_SHAPE_FIELDS) | frozenset(VISUAL_DEFAULTS) | frozenset(VISUAL_WITHOUT_EFFECT)


def _visual_error(key, value, supported: str) -> ValueError:
    return ValueError(f"Release config `visual.{key}` = {value!r} is not supported: {supported}.")


def _positive_int(visual: dict, key: str) -> int:
    value = visual[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _visual_error(key, value, "it must be a positive integer")
    return value


def _flag(visual: dict, key: str) -> bool:
    value = visual[key]
    if not isinstance(value, bool):
        raise _visual_error(key, value, "it must be true or false")
    return value


def visual_to_vision_config(visual) -> dict:
    """The release's `visual` block as this package's `vision_config` (timm architecture + `model_args`).

    Each field -> the argument of `timm.models.eva.Eva` that computes what EVA-CLIP's `EVAVisionTransformer` does
    with it: `image_size` -> img_size; `patch_size` -> patch_size; `width` -> embed_dim; `layers` -> depth;
    `head_width` -> num_heads = width / head_width; `mlp_ratio` -> mlp_ratio (both take int(width * mlp_ratio)
    as the hidden width); `qkv_bias` -> qkv_bias (q and v biases, no k bias, in both); `ls_init_value` ->
    init_values (layer scale gamma_1 / gamma_2, only for a value above 0 as in EVA-CLIP's blocks); `rope` ->
    use_rot_pos_emb; `pt_hw_seq_len` and `intp_freq` -> ref_feat_shape; `postnorm` -> use_post_norm;
    `naiveswiglu` -> swiglu_mlp; `subln` -> scale_mlp and scale_attn_inner (the LayerNorms before the MLP's and
    the attention's output projections) and qkv_fused=False (EVA-CLIP keeps separate q/k/v projections exactly
    when `subln`, one fused qkv otherwise: the layout decides the checkpoint's key names). Every argument is set,
    so no default of the named architecture leaks in.
    """
    if not isinstance(visual, dict):
        raise ValueError(f"Release config `visual` must be a JSON object; got {type(visual).__name__}.")
    unknown = sorted(set(visual) - VISUAL_FIELDS)
    if unknown:
        raise ValueError(
            f"Release config `visual` has key(s) {unknown} this package does not know, so it cannot tell whether "
            f"they change the tower. Known keys: {sorted(VISUAL_FIELDS)}. Remove them, or write a new-format config "
            "with `vision_config`."
        )
    missing = [key for key in VISUAL_SHAPE_FIELDS if key not in visual]
    if missing:
        raise ValueError(
            f"Release config `visual` lacks {missing}; the tower's shape needs {list(VISUAL_SHAPE_FIELDS)}."
        )
    fields = {**VISUAL_DEFAULTS, **visual}

    name = fields.get("eva_model_name")
    architecture = LEGACY_EVA_NAMES.get(str(name).lower()) if name else None
    if architecture is None:
        raise _visual_error("eva_model_name", name, f"known EVA-CLIP names are {sorted(LEGACY_EVA_NAMES)} (without "
                            "one the release builds no EVA tower); or write a new-format config with "
                            "`vision_config.architecture`")
    if fields["timm_model_name"]:
        raise _visual_error("timm_model_name", fields["timm_model_name"], "only EVA-CLIP towers (`eva_model_name`) "
                            "are supported; set it to null")
    if _flag(fields, "global_average_pool"):
        raise _visual_error("global_average_pool", True, "InfiMM reads the tokens of the last block, and a mean-pooled "
                            "EVA-CLIP tower swaps its final norm for `fc_norm`, a layout this package does not build; "
                            "only false is supported")

    image_size, patch_size = _positive_int(fields, "image_size"), _positive_int(fields, "patch_size")
    width, layers, head_width = (_positive_int(fields, key) for key in ("width", "layers", "head_width"))
    mlp_ratio = fields["mlp_ratio"]
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not 0 < mlp_ratio < math.inf:
        raise _visual_error("mlp_ratio", mlp_ratio, "it must be a positive number")
    if image_size % patch_size:
        raise _visual_error("image_size", image_size, f"it must be a multiple of `patch_size` ({patch_size})")
    if width % head_width:
        raise _visual_error("head_width", head_width, f"`width` ({width}) must be a whole number of heads of this "
                            "width (heads = width / head_width)")
    qkv_bias, rope, intp_freq, postnorm, naiveswiglu, subln = (
        _flag(fields, key) for key in ("qkv_bias", "rope", "intp_freq", "postnorm", "naiveswiglu", "subln")
    )

    grid = image_size // patch_size
    pt_hw_seq_len = _positive_int(fields, "pt_hw_seq_len")
    if rope:
        # EVA-CLIP's `VisionRotaryEmbeddingFast` computes its frequencies on t = arange(ft) / ft * pt_hw_seq_len
        # with ft = grid when `intp_freq`, else ft = pt_hw_seq_len; timm computes t = arange(grid) / grid * ref
        # for ref_feat_shape = (ref, ref). The two agree when ref = pt_hw_seq_len, except that without
        # `intp_freq` the release's table has pt_hw_seq_len**2 rows and only fits a grid of that side.
        if not intp_freq and grid != pt_hw_seq_len:
            raise _visual_error("pt_hw_seq_len", pt_hw_seq_len, f"with `intp_freq` false the release's rotary table "
                                f"covers a {pt_hw_seq_len}x{pt_hw_seq_len} grid, but the image has "
                                f"{grid}x{grid} patches ({image_size} / {patch_size}); set `intp_freq` true to "
                                f"interpolate, or `pt_hw_seq_len` to {grid}")
        if head_width % 4:
            raise _visual_error("head_width", head_width, "the 2-D rotary embedding splits each head into two axes "
                                "of sin/cos pairs, so it must be a multiple of 4")
    else:
        # Both only configure the rotary embedding; a value that asks for one where there is none contradicts.
        if intp_freq:
            raise _visual_error("intp_freq", True, "it interpolates the rotary embedding's frequencies, and `rope` "
                                "is false (no rotary embedding); set `rope` true or `intp_freq` false")
        if pt_hw_seq_len != VISUAL_DEFAULTS["pt_hw_seq_len"]:
            raise _visual_error("pt_hw_seq_len", pt_hw_seq_len, "it sets the rotary embedding's reference grid, and "
                                "`rope` is false (no rotary embedding); set `rope` true or remove the field")

    ls_init_value = fields["ls_init_value"]
    if ls_init_value is not None:
        if (isinstance(ls_init_value, bool) or not isinstance(ls_init_value, numbers.Real)
                or not math.isfinite(ls_init_value)):
            raise _visual_error("ls_init_value", ls_init_value, "it must be a number, or null for no layer scale")
        # EVA-CLIP's blocks get layer scale (gamma_1 / gamma_2) only for a value above 0.
        ls_init_value = ls_init_value if ls_init_value > 0 else None
    if ls_init_value is not None and postnorm:
        raise _visual_error("ls_init_value", ls_init_value, "timm's post-norm EVA block has no layer scale, so a "
                            "`postnorm` tower must have null (or 0) here")
    if postnorm and naiveswiglu and not subln:
        raise _visual_error("naiveswiglu", True, "with `postnorm` true and `subln` false timm packs the SwiGLU input "
                            "projections into one matrix, which the release's separate w1 / w2 cannot be renamed "
                            "into; such a tower is not supported")

    model_args = {
        "img_size": image_size,
        "patch_size": patch_size,
        "embed_dim": width,
        "depth": layers,
        "num_heads": width // head_width,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": qkv_bias,
        "qkv_fused": not subln,
        "swiglu_mlp": naiveswiglu,
        # timm builds a SwiGLU without an inner norm as one packed fc1 unless an alignment is asked for; 1 changes
        # no width and keeps w1 / w2 as the release's two matrices (`fc1_g` / `fc1_x`).
        "swiglu_align_to": 1 if naiveswiglu and not subln else 0,
        "scale_mlp": subln,
        "scale_attn_inner": subln,
        "use_rot_pos_emb": rope,
        "ref_feat_shape": [pt_hw_seq_len, pt_hw_seq_len] if rope else None,
        "use_post_norm": postnorm,
        "init_values": ls_init_value,
    }
    return {"architecture": architecture, "model_args": model_args}


# Keys of the `language` block that are read but not kept in the text config (reason beside each).
LANGUAGE_DROPPED = {
    "_name_or_path": "the LLM's Hub name; read only to pick the chat format",
    "architectures": "the LLM's head class; InfiMM builds the causal LM from `model_type`",
    "transformers_version": "the version that wrote the file",
    "torch_dtype": "the top-level `torch_dtype` sets the model's dtype (the two must agree)",
}
# Older spellings the config classes still accept and standardise (into `rope_parameters`).
LANGUAGE_ALIASES = ("rope_theta", "rope_scaling")
LANGUAGE_MODEL_TYPES = ("mistral", "llama")


def _config_fields(config_class) -> set:
    """The keys a transformers config class reads: its serialised fields and its constructor's parameters."""
    fields = set(config_class().to_dict())
    parameters = inspect.signature(config_class.__init__).parameters.values()
    return fields | {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}


def language_to_text_config(language) -> dict:
    """The release's `language` block (the LLM's own config) as `text_config`; unknown keys are refused."""
    if not isinstance(language, dict):
        raise ValueError(f"Release config `language` must be a JSON object; got {type(language).__name__}.")
    model_type = language.get("model_type")
    if model_type not in LANGUAGE_MODEL_TYPES:
        raise ValueError(
            f"Release config `language.model_type` = {model_type!r} is not supported: the release was built on "
            f"{list(LANGUAGE_MODEL_TYPES)}. For another LLM write a new-format config with `text_config`."
        )
    config_class = type(AutoConfig.for_model(model_type))
    unknown = sorted(set(language) - _config_fields(config_class) - set(LANGUAGE_DROPPED) - set(LANGUAGE_ALIASES))
    if unknown:
        raise ValueError(
            f"Release config `language` has key(s) {unknown} that a {model_type} config does not read; remove them "
            "or fix their spelling."
        )
    check_base_fields(language, "language.")
    text_config = {key: copy.deepcopy(value) for key, value in language.items() if key not in LANGUAGE_DROPPED}
    _check_builds(config_class, text_config, "language")
    return text_config


def _check_builds(config_class, values: dict, where: str):
    """Builds the config once, so a value of the wrong type is refused here, as a `ValueError` about `where`,
    instead of surfacing from deep inside the model's config as another kind of error."""
    try:
        config_class(**copy.deepcopy(values))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, StrictDataclassError) as error:
        raise ValueError(f"Release config `{where}` is not a valid {config_class.model_type} config: {error}") from None


def legacy_chat_format(language: dict) -> str:
    """The released chat models follow their LLM's format: Zephyr (Mistral), Vicuna v1.1, Llama-2 chat."""
    name = str(language.get("_name_or_path", "")).lower()
    if language.get("model_type") == "mistral" or "zephyr" in name:
        return "zephyr"
    return "vicuna" if "vicuna" in name else "llama2"


# Top-level keys read into `InfiMMConfig` (release key -> field). All three are required: the variants differ in
# them (Vicuna-13B has a block every 4 layers, Zephyr every 2), so none may be guessed.
TOP_LEVEL_FIELDS = {
    "cross_attn_every_n_layers": "cross_attn_every_n_layers",
    "image_token_id": "media_token_id",
    "eoc_token_id": "eoc_token_id",
}
# `InfiMMConfig`'s own connector fields, accepted at the top level under their own names (the release hard-codes
# its resampler and cross-attention sizes; a config of another size names them).
PACKAGE_FIELDS = (
    "resampler_depth", "resampler_num_latents", "resampler_heads", "resampler_head_dim", "resampler_ff_mult",
    "cross_attn_heads", "cross_attn_head_dim", "cross_attn_ff_mult", "chat_format",
)
# Top-level keys read and deliberately not carried over (reason beside each).
TOP_LEVEL_DROPPED = {
    "_name_or_path": "where the release was saved from; transformers records the path it loads from itself",
    "architectures": "the release's remote-code class (`InfiMMZephyrModel`); this package's config names its own",
    "auto_map": "the release's remote-code modules; this package's config names its own",
    "model_type": "the release's label (`infimm-zephyr`); this package's config is `infimm`",
    "transformers_version": "the version that wrote the file",
    "_commit_hash": "added by older transformers 5.x while reading: the Hub revision the file came from",
    "seq_length": "the training sequence length; at inference the LLM's `max_position_embeddings` is the bound",
    "tokenizer_type": "the class the training scripts loaded the tokenizer with; the tokenizer files decide",
    "use_flash_attn": "an attention kernel, the same math; choose one with `attn_implementation` when loading",
    "use_grad_checkpoint": "a training memory switch; call `gradient_checkpointing_enable()` to train with it",
    "freeze_llm": "training policy (which weights train), not architecture; the training code decides",
}
# Read: `visual`, `language`, `torch_dtype` (-> dtype), `use_cache` (-> text_config.use_cache, where the
# language model reads it).
TOP_LEVEL_READ = ("visual", "language", "torch_dtype", "use_cache")


# What each release block holds, for the message when one is missing.
LEGACY_BLOCK_CONTENTS = {
    "language": ("the language model's own config.json, e.g. the Mistral or Llama config the variant was built on "
                 "(with its vocabulary grown by the two media tokens)"),
    "visual": ("EVA-CLIP's `CLIPVisionCfg` fields of the vision tower: image_size, patch_size, width, layers, "
               "head_width, mlp_ratio, ..."),
}


def _check_layout(legacy):
    """Both release blocks, and nothing of the new format beside them."""
    if not isinstance(legacy, dict):
        raise ValueError(f"A release config must be a JSON object; got {type(legacy).__name__}.")
    mixed = [block for block in NEW_FORMAT_BLOCKS if block in legacy]
    if mixed:
        raise ValueError(
            f"The config mixes the release's layout (`visual` / `language` blocks) with the new format's {mixed}; "
            "keep one: either the release's two blocks, or `vision_config` and `text_config`."
        )
    for block, holds in LEGACY_BLOCK_CONTENTS.items():
        if block not in legacy:
            other = next(b for b in LEGACY_BLOCKS if b != block)
            raise ValueError(
                f"Release config has a `{other}` block but no `{block}` block, so the shape of the model is unknown "
                f"(it is not guessed). The release's config.json carries both; `{block}` holds {holds}. Add the "
                f"`{block}` block from the original config.json, or write a new-format config with "
                "`vision_config` and `text_config`."
            )


def legacy_config_to_dict(legacy: dict) -> dict:
    """Maps the release's `config.json` (`visual` / `language` blocks) onto `InfiMMConfig` fields.

    Raises `ValueError` naming the key for anything that is neither used nor deliberately dropped, and for any
    value the tower or the model cannot express.
    """
    _check_layout(legacy)
    known = set(TOP_LEVEL_FIELDS) | set(PACKAGE_FIELDS) | set(TOP_LEVEL_DROPPED) | set(TOP_LEVEL_READ)
    unknown = sorted(set(legacy) - known)
    if unknown:
        raise ValueError(
            f"Release config has top-level key(s) {unknown} this package does not know, so it cannot tell whether "
            f"they change the model. Known keys: {sorted(known)}. Remove them, or write a new-format config."
        )
    missing = [key for key in TOP_LEVEL_FIELDS if key not in legacy]
    if missing:
        raise ValueError(f"Release config lacks {missing}; the released variants differ in them, so they are required.")
    for key in TOP_LEVEL_FIELDS:
        value = legacy[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Release config `{key}` must be an integer; got {value!r}.")

    text_config = language_to_text_config(legacy["language"])
    check_base_fields(legacy)
    dtype = legacy.get("torch_dtype", legacy["language"].get("torch_dtype"))
    if "torch_dtype" in legacy["language"] and legacy["language"]["torch_dtype"] != dtype:
        raise ValueError(
            f"Release config `torch_dtype` ({legacy['torch_dtype']!r}) and `language.torch_dtype` "
            f"({legacy['language']['torch_dtype']!r}) differ; one model has one dtype, make them agree."
        )
    if "use_cache" in legacy:
        if not isinstance(legacy["use_cache"], bool):
            raise ValueError(f"Release config `use_cache` must be true or false; got {legacy['use_cache']!r}.")
        if "use_cache" in text_config and text_config["use_cache"] != legacy["use_cache"]:
            raise ValueError(
                f"Release config `use_cache` ({legacy['use_cache']!r}) and `language.use_cache` "
                f"({text_config['use_cache']!r}) differ; make them agree."
            )
        text_config["use_cache"] = legacy["use_cache"]

    new = {field: legacy[key] for key, field in TOP_LEVEL_FIELDS.items()}
    new["chat_format"] = legacy_chat_format(legacy["language"])
    new.update({key: legacy[key] for key in PACKAGE_FIELDS if key in legacy})
    new["vision_config"] = visual_to_vision_config(legacy["visual"])
    new["text_config"] = text_config
    if dtype is not None:
        new["dtype"] = dtype
    return new


# ================================================================================================ checkpoints
@dataclass(frozen=True)
class Drop:
    """A key deliberately not converted; the reason is reported."""

    reason: str


@dataclass(frozen=True)
class Alias:
    """The same tensor stored a second time under another name: checked identical to `primary` and dropped (or used
    in its place when the primary is absent)."""

    primary: str
    listing: str  # the alias list's name, for the report
    # The release's `gated_cross_attn_layers` list has one slot per decoder layer (None where there is no block), so
    # its index is the layer index; a list holding the blocks only would be indexed by block order. Which one a
    # checkpoint uses is read off the indices it holds.
    block_indexed: bool = False


@dataclass(frozen=True)
class Vision:
    """The rest of the key is an EVA-CLIP key (original or timm naming), renamed by timm's checkpoint filter."""


ROTARY_TABLE = "rotary table (a buffer the model recomputes)"
VISION_HEAD = "EVA-CLIP projection head (InfiMM feeds the resampler the tower's tokens, not its CLIP embedding)"

# The release's `lang_encoder` stores every decoder layer and every cross-attention block twice: inside its wrapped
# layers (`model.layers.N.decoder_layer` / `.gated_cross_attn_layer`) and again in these two lists.
DECODER_ALIASES = "lang_encoder.old_decoder_blocks"
CROSS_ATTENTION_ALIASES = "lang_encoder.gated_cross_attn_layers"

# Wrapper prefixes in front of the Flamingo module's own keys: `model.` in the release, `module.` in DeepSpeed /
# DDP checkpoints, `_orig_mod.` after torch.compile.
RELEASE_KEY_PREFIX = r"^(?:(?:module|model|_orig_mod)\.)*?(?=(?:vision_encoder|perceiver|lang_encoder)\.)"

# Release key (prefix removed) -> this package's key; the first matching rule decides. Targets are `str.format`
# templates over the named groups.
RELEASE_KEY_RULES = (
    (r"^vision_encoder\.head\.(?:weight|bias)$", Drop(VISION_HEAD)),
    (r"^vision_encoder\.(?P<eva>.+)$", Vision()),
    (r"^perceiver\.latents$", "model.resampler.latents"),
    (r"^perceiver\.layers\.(?P<i>\d+)\.0\.(?P<rest>.+)$", "model.resampler.layers.{i}.attn.{rest}"),
    (r"^perceiver\.layers\.(?P<i>\d+)\.1\.(?P<rest>.+)$", "model.resampler.layers.{i}.ff.{rest}"),
    (r"^perceiver\.norm\.(?P<rest>.+)$", "model.resampler.norm.{rest}"),
    (r"^lang_encoder\..*\.rotary_emb\.inv_freq$", Drop(ROTARY_TABLE)),
    (r"^lang_encoder\.model\.layers\.(?P<i>\d+)\.decoder_layer\.(?P<rest>.+)$",
     "model.language_model.model.layers.{i}.{rest}"),
    (r"^lang_encoder\.model\.layers\.(?P<i>\d+)\.gated_cross_attn_layer\.(?P<rest>.+)$",
     "model.cross_attention_layers.{i}.{rest}"),
    (r"^lang_encoder\.model\.(?P<rest>(?:embed_tokens|norm)\..+)$", "model.language_model.model.{rest}"),
    (r"^lang_encoder\.lm_head\.(?P<rest>.+)$", "model.language_model.lm_head.{rest}"),
    (r"^lang_encoder\.old_decoder_blocks\.(?P<i>\d+)\.(?P<rest>.+)$",
     Alias("lang_encoder.model.layers.{i}.decoder_layer.{rest}", DECODER_ALIASES)),
    (r"^lang_encoder\.gated_cross_attn_layers\.(?P<i>\d+)\.(?P<rest>.+)$",
     Alias("lang_encoder.model.layers.{i}.gated_cross_attn_layer.{rest}", CROSS_ATTENTION_ALIASES,
           block_indexed=True)),
)


# ================================================================================================ snapshots
# `from_pretrained` keyword arguments that locate files rather than configure the model.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# What a release snapshot download needs: configs, weights (pickle or safetensors), the sentencepiece tokenizer.
RELEASE_FILE_PATTERNS = ("*.json", "*.bin", "*.safetensors", "*.model")
# The release's `generation_config.json`.
RELEASE_GENERATION = {"do_sample": True, "top_p": 0.5, "top_k": 0, "max_new_tokens": 512}


__all__ = [
    "is_legacy_config", "check_base_fields", "legacy_config_to_dict", "visual_to_vision_config",
    "language_to_text_config", "legacy_chat_format", "LEGACY_BLOCKS", "NEW_FORMAT_BLOCKS", "LEGACY_EVA_NAMES",
    "VISUAL_DEFAULTS", "VISUAL_WITHOUT_EFFECT", "TOP_LEVEL_DROPPED",
    "LANGUAGE_DROPPED", "Drop", "Alias", "Vision", "ROTARY_TABLE", "VISION_HEAD", "DECODER_ALIASES",
    "CROSS_ATTENTION_ALIASES", "RELEASE_KEY_PREFIX", "RELEASE_KEY_RULES", "HUB_KWARGS", "RELEASE_FILE_PATTERNS",
    "RELEASE_GENERATION",
]
