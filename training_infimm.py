"""Training policy for InfiMM: what each stage trains, the paper's optimiser settings, LoRA, and device maps.

The recipe (InfiMM paper, Table 7, and the model card; see the README's fine-tuning section):

| stage | trains | AdamW lr | betas | eps | sequence length |
|---|---|---|---|---|---|
| `pt` (pretraining) | resampler + gated cross-attention | 1e-4 | 0.9 / 0.95 | 1e-8 | 32 (pairs) / 384 (interleaved) |
| `mtt` (multi-task) | resampler + gated cross-attention | 1e-5 | 0.9 / 0.999 | 1e-5 | 128 |
| `ift` (instructions) | + the LLM for Llama-2, not for the chat LLMs | 5e-6 | 0.9 / 0.999 | 1e-5 | 512 |

All stages: vision tower frozen, cosine decay, weight decay 0.1, gradient clip 1.0, bf16, at most 6 images per
sample. Freezing lives here, never in the model.

Whether IFT trains the LLM is read from the config (`llm_trains_in_ift`): the LLM trains when it is the base
Llama-2 (`chat_format == "llama2"`, the `infimm-llama13b` preset, or a Llama text model with `chat_format == "none"`);
chat-tuned LLMs (Zephyr, Vicuna: `chat_format` `zephyr` / `vicuna`) stay frozen unless `train_llm=True` is asked for.

FSDP2 (`accelerate launch --config_file examples/fsdp.yaml`): `InfiMMTrainer` (`shard_blocks_with_layers`) makes each
decoder layer and its gated cross-attention block one FSDP unit before accelerate shards the rest of the model.

Device maps: `infer_device_map` (from `device_map_infimm`, which ships with the remote code) runs accelerate's
`infer_auto_device_map`, then places every gated cross-attention block on its decoder layer's device and keeps the
vision tower on the main device. `meta_model` builds the storage-free model to plan on.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .collator_infimm import conversation_images
from .device_map_infimm import blocks_follow_layers, infer_device_map, place_blocks_with_layers
from .device_map_infimm import meta_model as _meta_model
from .hub_infimm import mark_for_remote_code as _mark_for_remote_code


logger = logging.get_logger(__name__)

STAGES = ("pt", "mtt", "ift")

# Parts of `InfiMMForConditionalGeneration` by state-dict prefix.
PARTS = {
    "vision_tower": "model.vision_tower.",
    "resampler": "model.resampler.",
    "cross_attention_layers": "model.cross_attention_layers.",
    "language_model": "model.language_model.",
}
CONNECTOR_PARTS = ("resampler", "cross_attention_layers")

CONNECTOR_WEIGHTS_NAME = "connector.safetensors"

# LoRA goes on the language model's attention and MLP projections only (names of a stock Mistral / Llama layer).
LORA_TARGET_MODULES = (
    r"model\.language_model\.model\.layers\.\d+\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


# --------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class StageRecipe:
    """The paper's optimiser settings and sequence length for one stage (TrainingArguments field names)."""

    stage: str
    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_length: int
    weight_decay: float = 0.1
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0

    def training_arguments(self) -> dict:
        """Defaults for `TrainingArguments`; bf16 only where the hardware has it."""
        return {
            "learning_rate": self.learning_rate,
            "adam_beta1": self.adam_beta1,
            "adam_beta2": self.adam_beta2,
            "adam_epsilon": self.adam_epsilon,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler_type,
            "max_grad_norm": self.max_grad_norm,
            "bf16": bf16_available(),
        }


# PT's 384 is the interleaved length; image-caption pairs are short anyway (32 in the paper) and batches are padded
# only to their longest sample.
RECIPES = {
    "pt": StageRecipe("pt", 1e-4, 0.9, 0.95, 1e-8, max_length=384),
    "mtt": StageRecipe("mtt", 1e-5, 0.9, 0.999, 1e-5, max_length=128),
    "ift": StageRecipe("ift", 5e-6, 0.9, 0.999, 1e-5, max_length=512),
}


def recipe(stage: str) -> StageRecipe:
    if stage not in RECIPES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {list(STAGES)}.")
    return RECIPES[stage]


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------------- policy
def llm_trains_in_ift(config) -> bool:
    """True when instruction fine-tuning trains the language model: the base Llama-2, not a chat-tuned LLM."""
    chat_format = getattr(config, "chat_format", "none")
    text_type = getattr(config.text_config, "model_type", None)
    return chat_format == "llama2" or (chat_format == "none" and text_type == "llama")


def trainable_parts(config, stage: str, train_llm: bool | None = None) -> tuple[str, ...]:
    """Names (keys of `PARTS`) of what `stage` trains. `train_llm` overrides the IFT rule; the tower never trains."""
    recipe(stage)
    parts = CONNECTOR_PARTS
    if train_llm is None:
        train_llm = stage == "ift" and llm_trains_in_ift(config)
    if train_llm:
        parts = parts + ("language_model",)
    return parts


def _base_model(model) -> nn.Module:
    """The `InfiMMForConditionalGeneration` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_stage(model, stage: str, train_llm: bool | None = None) -> tuple[str, ...]:
    """Sets `requires_grad` for `stage` on an `InfiMMForConditionalGeneration`; returns the trained parts."""
    parts = trainable_parts(model.config, stage, train_llm)
    prefixes = tuple(PARTS[part] for part in parts)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    return parts


@dataclass
class ParameterCount:
    trainable: int
    total: int
    by_part: dict

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        lines = [f"trainable parameters: {self.trainable:,} / {self.total:,} ({share:.2f}%)"]
        for part, (trainable, total) in self.by_part.items():
            lines.append(f"  {part:<24} {trainable:>15,} / {total:,}")
        return "\n".join(lines)


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters (shared tensors counted once), also per part (`lora` = adapter weights)."""
    seen, trainable, total = set(), 0, 0
    by_part = {part: [0, 0] for part in (*PARTS, "lora")}
    for name, param in _base_model(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        part = "lora" if "lora_" in name else next((p for p, prefix in PARTS.items() if name.startswith(prefix)), None)
        total += count
        trainable += count if param.requires_grad else 0
        if part is not None:
            by_part[part][0] += count if param.requires_grad else 0
            by_part[part][1] += count
    return ParameterCount(trainable, total, {part: tuple(v) for part, v in by_part.items() if v[1]})


def weights_checksum(model, trainable_only: bool = True) -> str:
    """sha256 over parameter names and float32 bytes, in name order: equal on every rank of a correct DDP run.

    FSDP2 shards (DTensors) are gathered first, so it is a collective there: every rank must call it.
    """
    digest = hashlib.sha256()
    named = sorted(_base_model(model).named_parameters(), key=lambda item: item[0])
    for name, param in named:
        if trainable_only and not param.requires_grad:
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def mark_for_remote_code(model) -> None:
    """`hub_infimm.mark_for_remote_code` on the InfiMM model inside a PEFT wrapper, if any."""
    _mark_for_remote_code(_base_model(model))


# ------------------------------------------------------------------------------------------------------ LoRA
def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=LORA_TARGET_MODULES, **kwargs):
    """LoRA adapters on the language model's projections (PEFT); the connector keeps training fully, in place.

    The connector trains in place rather than as PEFT `modules_to_save` copies (which work too, named per module:
    `resampler`, `cross_attention_layers.<i>`), so it is held once; `save_lora` writes it beside the adapter.
    Returns the `PeftModel`; the vision tower and the LLM's own weights are frozen.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, **kwargs)
    peft_model = get_peft_model(model, config)
    set_connector_trainable(peft_model)
    return peft_model


def set_connector_trainable(model, trainable: bool = True) -> None:
    prefixes = tuple(PARTS[part] for part in CONNECTOR_PARTS)
    for name, param in _base_model(model).named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(trainable)


def connector_state_dict(model) -> dict[str, torch.Tensor]:
    """Resampler and cross-attention weights under their full names (`model.resampler.*`, ...)."""
    prefixes = tuple(PARTS[part] for part in CONNECTOR_PARTS)
    return {
        name: tensor.detach().contiguous()
        for name, tensor in _base_model(model).state_dict().items()
        if name.startswith(prefixes)
    }


def save_connector(model, folder) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / CONNECTOR_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in connector_state_dict(model).items()}, str(path), metadata={"format": "pt"})
    return path


def load_connector(model, folder) -> None:
    """Loads `connector.safetensors` from `folder` into the model; every connector weight must be there."""
    from safetensors.torch import load_file

    path = Path(folder) / CONNECTOR_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: a LoRA folder saved by `save_lora` (or a LoRA training checkpoint) holds the "
            "trained connector there."
        )
    weights = load_file(str(path))
    expected = set(connector_state_dict(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    base = _base_model(model)
    with torch.no_grad():
        for name, param in list(base.named_parameters()) + list(base.named_buffers()):
            if name in weights:
                param.copy_(weights[name].to(param.dtype))


def save_lora(peft_model, folder) -> Path:
    """The PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) plus `connector.safetensors`."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    save_connector(peft_model, folder)
    return folder


def load_lora(model, folder, is_trainable: bool = False):
    """`PeftModel` over `model` with the adapter and connector saved by `save_lora`; `.merge_and_unload()` merges."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    load_connector(peft_model, folder)
    if is_trainable:
        set_connector_trainable(peft_model)
    return peft_model


class ConnectorCheckpointCallback(TrainerCallback):
    """Writes `connector.safetensors` into every Trainer checkpoint of a LoRA run (PEFT saves only the adapter).

    Resume with `load_connector(model, checkpoint_dir)` before `trainer.train(resume_from_checkpoint=...)`.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            save_connector(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control


# ------------------------------------------------------------------------------------------------------ FSDP2
def fsdp_units(model) -> list[list[nn.Module]]:
    """Decoder layer i with its cross-attention block (where it has one): the modules that run together.

    Block i runs from a forward pre-hook on decoder layer i, so one FSDP unit holding both gathers their weights
    with one all-gather, just before the layer runs, and frees them after it.
    """
    inner = _base_model(model).model
    blocks = inner.cross_attention_layers
    units = []
    for index, layer in enumerate(inner.language_model.model.layers):
        units.append([layer, blocks[str(index)]] if str(index) in blocks else [layer])
    return units


def shard_blocks_with_layers(model, accelerator) -> int:
    """FSDP2: `fully_shard([decoder layer i, its cross-attention block])` for every layer; returns the unit count.

    `InfiMMTrainer` calls it (before `accelerator.prepare`). accelerate's own FSDP2 auto-wrap (`fsdp2_prepare_model`)
    shards one module per matched class, so it would make each block a unit apart from its layer; it skips modules
    that are already sharded, and wraps the rest (tower, resampler, embeddings, head, root) as the plugin says
    (the classes named in `fsdp_transformer_layer_cls_to_wrap`, by default the model's `_no_split_modules`). The
    `fully_shard` settings here are the ones accelerate derives from the same plugin, so all units agree.
    Frozen and trainable weights may share a unit: FSDP2 gathers both and reduce-scatters gradients only for
    parameters that have them.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "shard_blocks_with_layers needs FSDP2: launch with `accelerate launch --config_file examples/fsdp.yaml` "
            "(fsdp_version: 2)."
        )
    if plugin.cpu_ram_efficient_loading:
        # accelerate would then move the model to the meta device and broadcast rank 0's full weights into it,
        # which it cannot do for units that are already sharded.
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading is not supported with the layer + cross-attention units; set it to "
            "false in the accelerate config (examples/fsdp.yaml does)."
        )
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    if accelerator.mixed_precision != "no":
        # As accelerate does before sharding: FSDP2 wants one dtype per unit for trainable weights, kept in fp32
        # (the policy's param_dtype is the compute dtype).
        for param in _base_model(model).parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    count = 0
    for unit in fsdp_units(model):
        if not any(isinstance(module, FSDPModule) for module in unit):
            fully_shard(unit if len(unit) > 1 else unit[0], **kwargs)
            count += 1
    _drop_sharded_classes_from_auto_wrap(model, plugin)
    return count


class InfiMMTrainer(Trainer):
    """`Trainer` that, under FSDP2, makes each decoder layer one FSDP unit with its cross-attention block.

    The units are sharded (`shard_blocks_with_layers`) when the optimizer is created, which for FSDP2 is just before
    accelerate shards the rest of the model. Without FSDP2 it is `Trainer`.

    accelerate then re-points the optimizer at the sharded parameters, matching them by data pointer; a shard with no
    elements (a 1-element gate split over two ranks leaves one rank nothing) has pointer 0 on every such parameter,
    so those slots would all get one of them. The weights still train right (an empty shard's step is a no-op), but
    the optimizer state differs across ranks, and saving or loading a checkpoint's optimizer then mismatches its
    collectives. The parameters sharded here are not re-created by accelerate, so their slots are put back.
    """

    fsdp_units = 0
    _presharded_slots = None

    def _is_fsdp2(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2

    def create_optimizer(self, model=None):
        if self._is_fsdp2() and self.optimizer is None:
            self.fsdp_units += shard_blocks_with_layers(self.model, self.accelerator)
            logger.info("FSDP2: %d units of a decoder layer with its cross-attention block (if any)", self.fsdp_units)
            optimizer = super().create_optimizer(model)
            from torch.distributed.tensor import DTensor

            self._presharded_slots = [
                [param if isinstance(param, DTensor) else None for param in group["params"]]
                for group in optimizer.param_groups
            ]
            return optimizer
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Called after accelerate's prepare and before a checkpoint's optimizer state is loaded.
        if self._presharded_slots is not None:
            for group, slots in zip(self.optimizer.param_groups, self._presharded_slots):
                group["params"] = [own if own is not None else param for param, own in zip(group["params"], slots)]
            self._presharded_slots = None
        return super().create_scheduler(num_training_steps, optimizer)


def _drop_sharded_classes_from_auto_wrap(model, plugin) -> None:
    """accelerate looks the auto-wrap classes up by class name, and `fully_shard` renames a module's class (to
    `FSDP<name>`): names left with no unsharded module would fail that lookup, and their modules are units already."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return
    names = plugin.transformer_cls_names_to_wrap
    if names is None:
        names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in names if name in present]


# ---------------------------------------------------------------------------------------------------- data
def load_jsonl(path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err}).") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: each line must be a JSON object; got {type(row).__name__}.")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


def has_text_only_examples(rows) -> bool:
    """Whether some example has no image (then the connector is idle on some batches; DDP must allow that)."""
    for row in rows:
        images = conversation_images(row["messages"]) if "messages" in row else row.get("images") or row.get("image")
        if not images:
            return True
    return False


def meta_model(config, dtype=None) -> nn.Module:
    """An `InfiMMForConditionalGeneration` with no storage, to plan a device map before loading any weight."""
    from .modeling_infimm import InfiMMForConditionalGeneration

    return _meta_model(InfiMMForConditionalGeneration, config, dtype=dtype)


__all__ = [
    "STAGES",
    "RECIPES",
    "StageRecipe",
    "recipe",
    "llm_trains_in_ift",
    "trainable_parts",
    "apply_stage",
    "count_parameters",
    "weights_checksum",
    "mark_for_remote_code",
    "apply_lora",
    "save_lora",
    "load_lora",
    "save_connector",
    "load_connector",
    "ConnectorCheckpointCallback",
    "fsdp_units",
    "shard_blocks_with_layers",
    "InfiMMTrainer",
    "load_jsonl",
    "has_text_only_examples",
    "infer_device_map",
    "place_blocks_with_layers",
    "blocks_follow_layers",
    "meta_model",
]
