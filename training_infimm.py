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

Device maps: `infer_device_map` runs accelerate's `infer_auto_device_map` and then places every gated
cross-attention block (`model.cross_attention_layers.<i>`) on the device of the decoder layer it runs before
(`model.language_model.model.layers.<i>`) and keeps the vision tower on the main device, shrinking a device's budget
and inferring again when that overfills it. Pass the result as `device_map=` to `from_pretrained`.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transformers import TrainerCallback
from transformers.utils import logging

from .collator_infimm import conversation_images
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
    """sha256 over parameter names and float32 bytes, in name order: equal on every rank of a correct DDP run."""
    digest = hashlib.sha256()
    named = sorted(_base_model(model).named_parameters(), key=lambda item: item[0])
    for name, param in named:
        if trainable_only and not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
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


# ----------------------------------------------------------------------------------------------- device map
def _owner(device_map: dict, name: str) -> str | None:
    """The device-map key that places module or tensor `name` (itself or its closest listed ancestor)."""
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def _split_entry(model: nn.Module, device_map: dict, key: str) -> None:
    """Replaces `key` by one entry per child module and direct tensor of that module, on the same device."""
    device = device_map.pop(key)
    module = model.get_submodule(key) if key else model
    prefix = f"{key}." if key else ""
    for child, _ in module.named_children():
        device_map[prefix + child] = device
    for tensor_name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        device_map[prefix + tensor_name] = device


def _assign(model: nn.Module, device_map: dict, name: str, device) -> None:
    """Places module `name` whole on `device`: entries inside it go, listed ancestors are split open around it."""
    for key in [k for k in device_map if k.startswith(name + ".")]:
        device_map.pop(key)
    while (owner := _owner(device_map, name)) is not None and owner != name:
        _split_entry(model, device_map, owner)
    device_map[name] = device


def place_blocks_with_layers(model: nn.Module, device_map: dict) -> dict:
    """Puts each `model.cross_attention_layers.<i>` on the device of `model.language_model.model.layers.<i>`."""
    device_map = dict(device_map)
    for index in model.config.cross_attention_layers:
        layer = f"model.language_model.model.layers.{index}"
        layer_key = _owner(device_map, layer)
        if layer_key is None:
            raise ValueError(f"The device map places no ancestor of {layer!r}: {device_map}.")
        _assign(model, device_map, f"model.cross_attention_layers.{index}", device_map[layer_key])
    return device_map


def _device_loads(model: nn.Module, device_map: dict, sizes: dict) -> dict:
    loads = {}
    for key, device in device_map.items():
        loads[device] = loads.get(device, 0) + sizes.get(key, 0)
    return loads


def infer_device_map(model: nn.Module, max_memory: dict | None = None, dtype=None, **kwargs) -> dict:
    """accelerate's `infer_auto_device_map` with every cross-attention block on its decoder layer's device and the
    vision tower on the main device (never offloaded).

    `model` may live on the meta device (build it with `torch.device("meta")` from the config); `dtype` is the dtype
    the weights will be loaded in. Moving blocks can overfill a device; that device's budget is then shrunk by the
    excess and the map inferred again (a few rounds at most). Extra `kwargs` go to `infer_auto_device_map`.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    if max_memory is None or any(isinstance(k, int) for k in max_memory):
        budget = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    else:
        budget = get_max_memory(max_memory)
    budget = {device: int(limit) for device, limit in budget.items()}
    gpus = sorted(device for device in budget if isinstance(device, int))
    main_device = gpus[0] if gpus else next(device for device in budget if device != "disk")
    for _ in range(8):
        device_map = infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype, **kwargs
        )
        device_map = place_blocks_with_layers(model, device_map)
        # The tower is run through `forward_intermediates`, not its module call, so accelerate's offload hooks would
        # never load its weights: it stays on the main device.
        _assign(model, device_map, "model.vision_tower", main_device)
        loads = _device_loads(model, device_map, sizes)
        over = {d: loads.get(d, 0) - budget[d] for d in budget if d != "disk" and loads.get(d, 0) > budget[d]}
        if not over:
            return device_map
        for device, excess in over.items():
            budget[device] = max(budget[device] - excess, 0)
    logger.warning(
        "Placing each cross-attention block with its decoder layer (and the vision tower on %s) exceeds the memory "
        "budget of %s; the map keeps that placement anyway.", main_device, sorted(over, key=str)
    )
    return device_map


def blocks_follow_layers(model: nn.Module, device_map: dict) -> bool:
    """Whether every cross-attention block sits on its decoder layer's device in `device_map`."""
    for index in model.config.cross_attention_layers:
        block_key = _owner(device_map, f"model.cross_attention_layers.{index}")
        layer_key = _owner(device_map, f"model.language_model.model.layers.{index}")
        if block_key is None or layer_key is None or device_map[block_key] != device_map[layer_key]:
            return False
    return True


def meta_model(config, dtype=None) -> nn.Module:
    """An `InfiMMForConditionalGeneration` with no storage, to plan a device map before loading any weight."""
    from .modeling_infimm import InfiMMForConditionalGeneration

    with torch.device("meta"):
        return InfiMMForConditionalGeneration._from_config(config, dtype=dtype)


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
    "load_jsonl",
    "has_text_only_examples",
    "infer_device_map",
    "place_blocks_with_layers",
    "blocks_follow_layers",
    "meta_model",
]
