"""Source checkpoint layouts and how their keys become the keys of `InfiMMForConditionalGeneration`.

Each layout is ONE table of `^`-anchored rules, applied to a key once its wrapper prefix (`module.`, `model.`, ...)
is removed; the first matching rule decides. A rule's action is one of:

- a target template (`str.format` over the pattern's named groups);
- `Drop(reason)`: deliberately not converted, and reported as such;
- `Alias(template, listing)`: the same tensor stored a second time under another name; it is checked identical to
  the primary key named by the template and dropped (or used in its place when the primary is absent);
- `Vision()`: the rest of the key is an EVA-CLIP (original or timm naming) key; the vision keys are renamed
  together by timm's own `timm.models.eva.checkpoint_filter_fn`, which recognises the original naming by its
  sentinel keys (`q_bias` / `v_bias`, `mlp.w1` ... `w3`, `ffn_ln`, `inner_attn_ln`) and drops the rope tables.

Target layout (see `modeling_infimm.py`): `model.vision_tower.timm_model.<timm key>`, `model.resampler.*`,
`model.cross_attention_layers.<decoder layer index>.*`, `model.language_model.{model.*, lm_head.weight}`.
"""

import re
from dataclasses import dataclass, field

import torch
from timm.models.eva import checkpoint_filter_fn

from infimm.release_infimm import RELEASE_KEY_PREFIX, RELEASE_KEY_RULES, ROTARY_TABLE, VISION_HEAD, Alias, Drop, Vision

from .errors import ConversionError
from .reader import TensorRef


VISION_PREFIX = "model.vision_tower.timm_model."
CONNECTOR_PREFIXES = ("model.resampler.", "model.cross_attention_layers.")

NOT_VISION = "not part of the vision tower (e.g. the CLIP text tower or logit scale)"


@dataclass(frozen=True)
class SourceFormat:
    name: str
    description: str
    prefix: re.Pattern  # matches the wrapper prefix in front of the layout's own keys
    rules: tuple = field(repr=False)

    def strip(self, key: str) -> str | None:
        match = self.prefix.match(key)
        return None if match is None else key[match.end():]


def _table(*rows) -> tuple:
    return tuple((re.compile(pattern), action) for pattern, action in rows)


# The released InfiMM checkpoints and its training checkpoints (DeepSpeed `module`, OpenFlamingo
# `model_state_dict`): the inner Flamingo module's keys. The table is the release's, kept in `release_infimm`.
FLAMINGO = SourceFormat(
    name="flamingo",
    description="InfiMM release / training layout (`vision_encoder.`, `perceiver.`, `lang_encoder.`)",
    prefix=re.compile(RELEASE_KEY_PREFIX),
    rules=_table(*RELEASE_KEY_RULES),
)

# This package's own layout (a state dict of `InfiMMForConditionalGeneration`, e.g. from `torch.save`).
INFIMM = SourceFormat(
    name="infimm",
    description="this package's layout (`model.vision_tower.`, `model.resampler.`, ...)",
    prefix=re.compile(
        r"^(?:(?:module|_orig_mod)\.)*?(?=model\.(?:vision_tower|resampler|language_model|cross_attention_layers)\.)"
    ),
    rules=_table(
        (r"^(?P<key>model\..+)$", "{key}"),
    ),
)

# A Hugging Face causal LM folder (`--llm`): Mistral / Llama keys.
CAUSAL_LM = SourceFormat(
    name="causal_lm",
    description="Hugging Face causal LM (`model.`, `lm_head.`)",
    prefix=re.compile(r"^(?:(?:module|_orig_mod)\.)*?(?=(?:model|lm_head)\.)"),
    rules=_table(
        (r"^model\..*\.rotary_emb\.inv_freq$", Drop(ROTARY_TABLE)),
        (r"^(?P<key>(?:model|lm_head)\..+)$", "model.language_model.{key}"),
    ),
)

# An EVA-CLIP checkpoint (`--vision`): original naming (a whole CLIP model under `visual.` or the tower alone) or
# timm naming; timm's filter handles the `visual.` / `visual.trunk.` prefixes and both namings.
EVA_CLIP = SourceFormat(
    name="eva_clip",
    description="EVA-CLIP vision tower (original or timm naming)",
    prefix=re.compile(r"^(?:module\.)*"),
    rules=_table(
        (r"^(?P<eva>.+)$", Vision()),
    ),
)

INPUT_FORMATS = (FLAMINGO, INFIMM)


def detect_format(keys, candidates=INPUT_FORMATS) -> SourceFormat:
    """The layout most keys belong to (content, not file names, decides)."""
    keys = list(keys)
    scores = {fmt.name: sum(fmt.prefix.match(key) is not None for key in keys) for fmt in candidates}
    best = max(candidates, key=lambda fmt: scores[fmt.name])
    if scores[best.name] == 0:
        known = "; ".join(fmt.description for fmt in candidates)
        raise ConversionError(f"Unrecognised checkpoint layout (first keys: {keys[:8]}). Known layouts: {known}.")
    return best


# ------------------------------------------------------------------------------------------------------ mapping
@dataclass
class KeyMapping:
    """Where each source tensor goes: `targets[target key] = source ref`, or why it was left out."""

    targets: dict[str, TensorRef] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    unmatched: list[str] = field(default_factory=list)  # source keys no rule accepts

    def add(self, target: str, ref: TensorRef):
        if target in self.targets:
            raise ConversionError(
                f"Two source tensors map to `{target}`: `{self.targets[target].key}` and `{ref.key}`."
            )
        self.targets[target] = ref


def timm_eva_names(refs: dict[str, TensorRef], tower: torch.nn.Module) -> dict[str, str | None]:
    """EVA key -> timm key (None where timm's filter drops it), by running timm's checkpoint filter on shape-only
    (meta) tensors: the filter may only rename. Where it would resample a tensor (another image or patch size), the
    checkpoint does not fit the config and the conversion stops rather than interpolate."""
    probes = {key: torch.empty(ref.shape, dtype=ref.dtype, device="meta") for key, ref in refs.items()}
    source_of = {id(probe): key for key, probe in probes.items()}
    try:
        filtered = checkpoint_filter_fn(probes, tower)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:  # timm resampling meta tensors
        raise ConversionError(f"The vision checkpoint does not fit the configured tower: {error}") from None
    names = dict.fromkeys(probes)
    for timm_key, probe in filtered.items():
        source = source_of.get(id(probe))
        if source is None:
            raise ConversionError(
                f"Vision tensor `{timm_key}` has shape {list(probe.shape)} after timm's filter resampled it: the "
                "checkpoint was trained for another image or patch size than the config's "
                f"(`vision_config.model_args`). Converting would interpolate, not copy; fix the config instead."
            )
        names[source] = timm_key
    return names


def _alias_index_map(matches, cross_attention_layers) -> dict[int, int]:
    """Block-order or layer-index aliases: returns index -> decoder layer index."""
    indices = {int(match["i"]) for match in matches}
    layers = list(cross_attention_layers)
    if indices <= set(layers):
        return {i: i for i in indices}
    if indices <= set(range(len(layers))):
        return {i: layers[i] for i in indices}
    raise ConversionError(
        f"`gated_cross_attn_layers` indices {sorted(indices)} fit neither the cross-attention layers {layers} nor "
        f"their block order 0..{len(layers) - 1}: the checkpoint does not match the config's layout."
    )


def _identical(a: TensorRef, b: TensorRef) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.identity is not None and a.identity == b.identity:
        return True
    ta, tb = a.load(), b.load()
    try:
        return torch.equal(ta, tb)
    finally:
        a.release(ta)
        b.release(tb)


def map_keys(tensors: dict[str, TensorRef], fmt: SourceFormat, *, vision_tower=None, cross_attention_layers=()):
    """Applies `fmt`'s table to every key; returns a `KeyMapping` (target -> source, dropped, unmatched)."""
    mapping = KeyMapping()
    stripped: dict[str, TensorRef] = {}
    vision: dict[str, TensorRef] = {}
    aliases: list[tuple[TensorRef, re.Match, Alias]] = []

    def route(name: str, ref: TensorRef, allow_alias: bool = True):
        for pattern, action in fmt.rules:
            match = pattern.match(name)
            if match is None:
                continue
            if isinstance(action, str):
                mapping.add(action.format(**match.groupdict()), ref)
            elif isinstance(action, Drop):
                mapping.dropped.append((ref.key, action.reason))
            elif isinstance(action, Vision):
                vision[match["eva"]] = ref
            elif allow_alias:
                aliases.append((ref, match, action))
            return
        mapping.unmatched.append(ref.key)

    for key, ref in tensors.items():
        name = fmt.strip(key)
        if name is None:
            mapping.unmatched.append(key)
            continue
        stripped[name] = ref
        route(name, ref)

    index_maps = {}
    for action in {action for _, _, action in aliases if action.block_indexed}:
        index_maps[action] = _alias_index_map([m for _, m, a in aliases if a is action], cross_attention_layers)
    for ref, match, action in aliases:
        groups = match.groupdict()
        if action in index_maps:
            groups["i"] = index_maps[action][int(groups["i"])]
        primary_name = action.primary.format(**groups)
        primary = stripped.get(primary_name)
        if primary is None:
            stripped[primary_name] = ref
            route(primary_name, ref, allow_alias=False)
        elif _identical(ref, primary):
            mapping.dropped.append((ref.key, f"alias duplicate in `{action.listing}` (checked identical to the kept "
                                             "tensor)"))
        else:
            raise ConversionError(
                f"`{ref.key}` and `{primary.key}` should be two names of one tensor but differ: the checkpoint is "
                "inconsistent (it was edited after saving?)."
            )

    if vision:
        if vision_tower is None:
            raise ConversionError(f"Vision keys found where none were expected: {sorted(vision)[:5]}.")
        for eva_key, timm_key in timm_eva_names(vision, vision_tower).items():
            ref = vision[eva_key]
            if timm_key is None:
                mapping.dropped.append((ref.key, ROTARY_TABLE if "rope" in eva_key else NOT_VISION))
            elif timm_key.startswith("head."):
                mapping.dropped.append((ref.key, VISION_HEAD))
            else:
                mapping.add(VISION_PREFIX + timm_key, ref)
    return mapping


__all__ = [
    "SourceFormat", "FLAMINGO", "INFIMM", "CAUSAL_LM", "EVA_CLIP", "INPUT_FORMATS", "VISION_PREFIX",
    "CONNECTOR_PREFIXES", "KeyMapping", "detect_format", "map_keys", "timm_eva_names",
]
