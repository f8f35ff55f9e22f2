"""Hub-ready folders and the files shipped inside the package.

A folder written by `save_hub_folder` loads anywhere with `trust_remote_code=True`, without this package:
`config.json` maps AutoConfig, AutoModel, AutoModelForCausalLM and AutoModelForImageTextToText to the copied
`configuration_infimm.py` / `modeling_infimm.py`, and `processor_config.json` maps AutoProcessor and
AutoImageProcessor to the copied `processing_infimm.py`. This module is part of the package only; it is not copied.
"""

from pathlib import Path

from transformers import AutoTokenizer


ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Every auto class a user may reach an InfiMM folder through.
AUTO_MAP = {
    "AutoConfig": "configuration_infimm.InfiMMConfig",
    "AutoModel": "modeling_infimm.InfiMMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_infimm.InfiMMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_infimm.InfiMMForConditionalGeneration",
}


def bundled_tokenizer(name: str = "infimm-zephyr"):
    """The released tokenizer shipped in `infimm/assets/<name>/` (works offline)."""
    folder = ASSETS_DIR / name
    if not (folder / "tokenizer.json").is_file():
        available = sorted(path.name for path in ASSETS_DIR.iterdir() if (path / "tokenizer.json").is_file())
        raise ValueError(f"No bundled tokenizer named {name!r}; available: {available}.")
    return AutoTokenizer.from_pretrained(str(folder))


def sample_image_path() -> Path:
    """A small chart from the InfiMM release, the default image of `examples/generate.py`."""
    return ASSETS_DIR / "sample-chart.jpg"


def mark_for_remote_code(model) -> None:
    """Makes `model.save_pretrained` write the full `auto_map` and copy the `.py` files (also for checkpoints
    that Trainer saves), so the folder loads with any InfiMM auto class and `trust_remote_code=True`."""
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForImageTextToText")
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **AUTO_MAP}


def save_hub_folder(model, processor, folder, **save_kwargs) -> Path:
    """Saves `model` and `processor` into `folder` with the remote code and a full `auto_map`.

    `save_kwargs` go to `model.save_pretrained` (e.g. `max_shard_size`). Returns the folder.
    """
    folder = Path(folder)
    mark_for_remote_code(model)
    type(processor).register_for_auto_class()
    type(processor.image_processor).register_for_auto_class("AutoImageProcessor")
    model.save_pretrained(folder, **save_kwargs)
    processor.save_pretrained(folder)
    return folder


__all__ = ["AUTO_MAP", "ASSETS_DIR", "bundled_tokenizer", "mark_for_remote_code", "sample_image_path", "save_hub_folder"]
