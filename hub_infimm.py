"""Hub-ready folders and the files shipped inside the package.

A folder written by `save_hub_folder` loads anywhere with `trust_remote_code=True`, without this package:
`config.json` maps AutoConfig, AutoModel, AutoModelForCausalLM and AutoModelForImageTextToText to the copied
`configuration_infimm.py` / `modeling_infimm.py`, `processor_config.json` maps AutoProcessor and
AutoImageProcessor to the copied `processing_infimm.py`, and `config.json`'s `custom_pipelines` points the
`image-text-to-text` pipeline at the copied `pipeline_infimm.py` (batches mixing numbers of images). This module is
part of the package only; it is not copied.
"""

import shutil
import sys
from pathlib import Path

import timm
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from .pipeline_infimm import CUSTOM_PIPELINE_ENTRY, PIPELINE_TASK, InfiMMImageTextToTextPipeline
from .versions_infimm import SKIP_CHECK_VARIABLE, TRANSFORMERS_REQUIREMENT


ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# The modules a saved folder names as its code (config.json's `auto_map` and `custom_pipelines`,
# processor_config.json's `auto_map`); with their relative imports (`remote_code_files`) they are what travels to
# the Hub. The other `*_infimm.py` modules (this one, training, collator, lmms-eval) are the package's only.
REMOTE_CODE_ENTRY_POINTS = ("configuration_infimm.py", "modeling_infimm.py", "processing_infimm.py", "pipeline_infimm.py")
PACKAGE_DIR = Path(__file__).resolve().parent


def remote_code_files() -> list[str]:
    """Every module a saved InfiMM folder carries: the entry points and, transitively, their relative imports."""
    files = {PACKAGE_DIR / name for name in REMOTE_CODE_ENTRY_POINTS}
    for entry in list(files):
        files.update(Path(dependency) for dependency in get_relative_import_files(str(entry)))
    return sorted(file.name for file in files)


def copy_remote_code(folder) -> list[str]:
    """Copies `remote_code_files()` into `folder` (for folders not written by `save_pretrained`, e.g. conversions)."""
    names = remote_code_files()
    for name in names:
        shutil.copy(PACKAGE_DIR / name, Path(folder) / name)
    return names


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
    that Trainer saves), so the folder loads with any InfiMM auto class and `trust_remote_code=True`. A PEFT
    wrapper is looked through: its InfiMM model is marked.

    The config names the batching pipeline only if `pipeline_infimm.py` is among the files `save_pretrained` copies
    (the model code's relative imports): a config pointing at a file the folder lacks would break `pipeline()`.
    """
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForImageTextToText")
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **AUTO_MAP}
    _set_custom_pipeline(model.config, _pipeline_travels_with(model))


def _pipeline_travels_with(model) -> bool:
    """Whether `model.save_pretrained` copies `pipeline_infimm.py` (a relative import of the model's code)."""
    module_file = getattr(sys.modules.get(type(model).__module__), "__file__", None)
    if module_file is None:
        return False
    return any(Path(name).name == "pipeline_infimm.py" for name in get_relative_import_files(module_file))


def _set_custom_pipeline(config, present: bool) -> None:
    """Adds (or removes) this package's `image-text-to-text` entry in `config.custom_pipelines`; others stay."""
    pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    if present:
        pipelines[PIPELINE_TASK] = {**CUSTOM_PIPELINE_ENTRY, "pt": list(CUSTOM_PIPELINE_ENTRY["pt"])}
    elif (pipelines.get(PIPELINE_TASK) or {}).get("impl") == CUSTOM_PIPELINE_ENTRY["impl"]:
        del pipelines[PIPELINE_TASK]
    if pipelines:
        config.custom_pipelines = pipelines
    elif hasattr(config, "custom_pipelines"):
        del config.custom_pipelines


def compatibility_section() -> str:
    """The model card's statement of which transformers the folder's code runs on, and what it was written with."""
    return (
        "## Compatibility\n\n"
        f"The model code in this folder supports transformers `{TRANSFORMERS_REQUIREMENT}`; every minor release in "
        "that range is tested. Under a transformers outside it, loading stops at once with an `ImportError` naming "
        f"both versions (set `{SKIP_CHECK_VARIABLE}=1` to try anyway). Written with transformers "
        f"{transformers.__version__}, timm {timm.__version__} and torch {torch.__version__.split('+')[0]}.\n"
    )


def _write_model_card(folder: Path) -> None:
    """A short `README.md` (Hub metadata, usage, compatibility) unless the folder already has one."""
    path = folder / "README.md"
    if path.exists():
        return
    data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TASK,
                         tags=["infimm", "flamingo", "vision-language", "custom_code"])
    body = (
        f"\n# {folder.name}\n\nAn InfiMM vision-language model (Flamingo-style). Load it with\n"
        "`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` and "
        "`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.\n\n" + compatibility_section()
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)


def save_hub_folder(model, processor, folder, **save_kwargs) -> Path:
    """Saves `model` and `processor` into `folder` with the remote code and a full `auto_map`.

    `save_kwargs` go to `model.save_pretrained` (e.g. `max_shard_size`). A `README.md` model card stating the
    supported transformers range is written unless the folder has one. Returns the folder.
    """
    folder = Path(folder)
    mark_for_remote_code(model)
    # The folder always gets the batching pipeline: its file is copied below. The in-memory config is restored so
    # that a later plain `save_pretrained`, which may not copy that file, does not point at it.
    travels = _pipeline_travels_with(model)
    _set_custom_pipeline(model.config, True)
    try:
        model.save_pretrained(folder, **save_kwargs)
    finally:
        _set_custom_pipeline(model.config, travels)
    custom_object_save(InfiMMImageTextToTextPipeline, folder)

    type(processor).register_for_auto_class()
    type(processor.image_processor).register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(folder)
    # transformers copied the modules of the classes it saved and their relative imports; the declared list must be
    # exactly that, so a folder never names code it lacks.
    saved = sorted(path.name for path in folder.glob("*_infimm.py"))
    if saved != remote_code_files():
        raise RuntimeError(f"The folder holds the modules {saved}, not the declared {remote_code_files()}: "
                           "update REMOTE_CODE_ENTRY_POINTS in hub_infimm.py.")
    _write_model_card(folder)
    return folder


__all__ = ["AUTO_MAP", "ASSETS_DIR", "REMOTE_CODE_ENTRY_POINTS", "bundled_tokenizer", "compatibility_section",
           "copy_remote_code", "remote_code_files", "mark_for_remote_code", "sample_image_path", "save_hub_folder"]
