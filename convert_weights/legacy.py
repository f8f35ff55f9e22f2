"""Loading a legacy InfiMM release snapshot directly, through the converter's own key mapping.

The snapshot's `config.json` (`visual` / `language` blocks) is read by `InfiMMConfig`; its weights are opened lazily
(memory-mapped pickle or safetensors), renamed by the same table as `infimm-convert`, checked strictly against the
model, and handed to `from_pretrained` as a state dict, so the numbers equal those of the converted folder.
"""

import json
from pathlib import Path

from huggingface_hub.errors import EntryNotFoundError

from infimm.release_infimm import HUB_KWARGS, RELEASE_FILE_PATTERNS, is_legacy_config

from .convert import check_fit, expected_state
from .formats import FLAMINGO, map_keys
from .reader import open_folder


def _snapshot(name_or_path, hub_kwargs: dict) -> Path:
    """The local folder of a snapshot: `name_or_path` itself, or its Hub download (config, weights, tokenizer)."""
    hub_kwargs = dict(hub_kwargs)
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/{p}" if subfolder else p for p in RELEASE_FILE_PATTERNS]
        path = Path(snapshot_download(str(name_or_path), allow_patterns=patterns, **hub_kwargs))
    return path / subfolder


def is_legacy_checkpoint(name_or_path, **hub_kwargs) -> bool:
    """True when `name_or_path` (folder or Hub repo id) has a release-style `config.json` (`visual` / `language`).

    Accepts (and ignores) any `from_pretrained` keyword; only the file-locating ones are used."""
    hub_kwargs = {key: value for key, value in hub_kwargs.items() if key in HUB_KWARGS}
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    try:
        path = Path(name_or_path)
        if path.is_dir():
            config_file = path / subfolder / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(str(name_or_path), "config.json", subfolder=subfolder or None,
                                               **hub_kwargs))
        config = json.loads(config_file.read_text())
    except (OSError, ValueError, EntryNotFoundError):  # no such folder or repo, no config, unreadable config
        return False
    return is_legacy_config(config)


def legacy_state_dict(folder: Path, config) -> dict:
    """The snapshot's tensors under this package's keys (memory-mapped where the files allow), checked strictly."""
    checkpoint = open_folder(folder)
    expected, tower = expected_state(config)
    mapping = map_keys(checkpoint.tensors, FLAMINGO, vision_tower=tower,
                       cross_attention_layers=config.cross_attention_layers)
    check_fit(mapping.targets, expected, mapping.unmatched)
    return {key: mapping.targets[key].load() for key in expected}


def load_legacy_model(model_cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
    """`model_cls.from_pretrained` for a legacy release snapshot (local folder or Hub repo id).

    Example: `load_legacy_model(InfiMMForConditionalGeneration, "path/to/infimm-zephyr", dtype=torch.bfloat16)`.
    Other keyword arguments go to `from_pretrained` (dtype, device_map, attn_implementation, ...).
    """
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    folder = _snapshot(pretrained_model_name_or_path, hub_kwargs)
    if config is None or isinstance(config, (str, Path)):
        config = model_cls.config_class.from_pretrained(folder if config is None else config)
    state_dict = legacy_state_dict(folder, config)
    return model_cls.from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)


__all__ = ["is_legacy_checkpoint", "load_legacy_model", "legacy_state_dict"]
