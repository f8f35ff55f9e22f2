"""Device maps for InfiMM: each gated cross-attention block on its decoder layer's device, the tower never offloaded.

accelerate's `infer_auto_device_map` places modules in registration order, so the blocks
(`model.cross_attention_layers.<i>`, registered after the language model) would land wherever room is left, often
another device than the decoder layer they run before (`model.language_model.model.layers.<i>`), and under a tight
budget it offloads the vision tower, whose weights its hooks would never load (the tower runs through timm's
`forward_intermediates`, not its module call). `infer_device_map` starts from accelerate's map and fixes both.
`InfiMMForConditionalGeneration.from_pretrained(device_map="auto" | "balanced" | ...)` calls it; this file travels
with the remote code, so loading from the Hub plans the same map.
"""

import torch
from torch import nn

from transformers.utils import is_accelerate_available, logging


if is_accelerate_available():
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory


logger = logging.get_logger(__name__)


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


def _device_loads(device_map: dict, sizes: dict) -> dict:
    loads = {}
    for key, device in device_map.items():
        loads[device] = loads.get(device, 0) + sizes.get(key, 0)
    return loads


def meta_model(config, dtype=None, model_class=None) -> nn.Module:
    """An InfiMM model (`model_class`, by default `InfiMMForConditionalGeneration`) with no storage, to plan a device
    map before loading any weight."""
    if model_class is None:
        from .modeling_infimm import InfiMMForConditionalGeneration as model_class
    with torch.device("meta"):
        return model_class._from_config(config, dtype=dtype)


def infer_device_map(
    model: nn.Module, max_memory: dict | None = None, dtype=None, strategy: str = "auto", **kwargs
) -> dict:
    """accelerate's `infer_auto_device_map` with every cross-attention block on its decoder layer's device and the
    vision tower on the main device (never offloaded).

    `model` may live on the meta device (build it with `torch.device("meta")` from the config); `dtype` is the dtype
    the weights will be loaded in. `strategy` is `from_pretrained`'s: `"auto"` / `"balanced"` spread the GPUs
    evenly, `"balanced_low_0"` keeps GPU 0 light (for generation's own buffers), `"sequential"` fills them in order.
    Moving blocks can overfill a device; that device's budget is then shrunk by the excess and the map inferred
    again (a few rounds at most). Extra `kwargs` go to `infer_auto_device_map`.
    """
    if not is_accelerate_available():
        raise ImportError("Planning a device map needs accelerate: `pip install accelerate`.")
    if strategy not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"Unknown device-map strategy {strategy!r}; use 'auto', 'balanced', 'balanced_low_0' or 'sequential', "
            "or pass a dict."
        )
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    if strategy != "sequential" and (max_memory is None or any(isinstance(k, int) for k in max_memory)):
        budget = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
            low_zero=strategy == "balanced_low_0",
        )
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
        loads = _device_loads(device_map, sizes)
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


__all__ = ["infer_device_map", "meta_model", "place_blocks_with_layers", "blocks_follow_layers"]
