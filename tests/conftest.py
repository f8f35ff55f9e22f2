"""Shared fixtures: tiny InfiMM configs built from the real presets' layout, scaled down."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# The release's own config.json, generation_config.json and preprocessor_config.json (Infi-MM/infimm-zephyr).
RELEASE_DIR = FIXTURES / "infimm-zephyr"
# The release's tokenizer files, bundled with the package.
TOKENIZER_DIR = REPO / "assets" / "infimm-zephyr"
# Two real images of the release's model card.
IMAGES_DIR = FIXTURES / "images"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine

# The repository root is the `infimm` package; make it importable without installation too.
if "infimm" not in sys.modules:
    try:
        import infimm  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("infimm", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["infimm"] = module
        spec.loader.exec_module(module)


# What a saved folder's config.json must map, written out here as users' tools need it (not read from the package).
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_infimm.InfiMMConfig",
    "AutoModel": "modeling_infimm.InfiMMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_infimm.InfiMMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_infimm.InfiMMForConditionalGeneration",
}


def tiny_config(preset: str = "infimm-zephyr", **overrides):
    """A few-hundred-k-parameter InfiMM with the preset's layout (real vocab and token ids)."""
    from infimm import InfiMMConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512}
    vision = {"model_args": {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    base = dict(
        vision_config=vision, text_config=text, resampler_depth=2, resampler_num_latents=4, resampler_heads=2,
        resampler_head_dim=8, cross_attn_heads=2, cross_attn_head_dim=8,
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return InfiMMConfig.from_preset(preset, **base)


def open_gates(model, value: float = 1.0):
    """Gates start at 0 (the block is then an identity); tests open them so the cross-attention path counts."""
    for block in model.model.cross_attention_layers.values() if hasattr(model, "model") else model.cross_attention_layers.values():
        block.attn_gate.data.fill_(value)
        block.ff_gate.data.fill_(value)
    return model


def tiny_model(preset: str = "infimm-zephyr", seed: int = 0, gates: float | None = 0.7, **overrides):
    from infimm import InfiMMForConditionalGeneration

    torch.manual_seed(seed)
    model = InfiMMForConditionalGeneration(tiny_config(preset, **overrides)).eval()
    if gates is not None:
        open_gates(model, gates)
    return model


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model()


def save_tiny_hub_folder(folder, **model_kwargs):
    """`tiny_model(**model_kwargs)` with the bundled release tokenizer, saved as a Hub folder (remote code included)."""
    from infimm import InfiMMProcessor
    from infimm.hub_infimm import bundled_tokenizer, save_hub_folder

    model = tiny_model(**model_kwargs)
    return save_hub_folder(model, InfiMMProcessor.from_config(model.config, bundled_tokenizer()), folder)


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory):
    """`tiny_model()` saved by the product's own save path (`save_hub_folder`), as users produce folders. Shared by the
    tests that load it: treat it as read-only (copy it to change it)."""
    return save_tiny_hub_folder(tmp_path_factory.mktemp("hub") / "tiny-infimm")


# The paths users touch (listed in user_path_tests.txt, which CI reads too): marked `user_path`.
USER_PATH_MODULES = {
    line.split("#", 1)[0].strip()
    for line in (Path(__file__).parent / "user_path_tests.txt").read_text().splitlines()
} - {""}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in USER_PATH_MODULES:
            item.add_marker(pytest.mark.user_path)
