"""References and fixtures-in-code shared by the modeling tests.

- `reference_eva` / `eva_last_block_tokens`: timm's EVA built on its own and a hand-written block loop, the
  independent reference for the vision features (last block, before the final norm, CLS first);
- `standalone_lm`: the language model as a plain library class holding the same weights;
- `perturb_norms`: norm scales and biases away from their init, so a misplaced norm changes the outputs;
- `one_torch_thread`: an autouse fixture for the modules that import it;
- `save_remote_code_folder` / `place_in_hub_cache`: a model saved by the package's own save path, and the same
  files arranged as `huggingface_hub` arranges a downloaded snapshot.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from transformers import AutoModelForCausalLM

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy CPU OpenMP's spinning threads make
    them many times slower; each module that imports this fixture runs on one thread and restores the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------- vision
def reference_eva(config, state_dict=None) -> torch.nn.Module:
    """timm's own `Eva` for `config.vision_config`, built by `timm.create_model` (no transformers wrapper)."""
    vision = config.vision_config
    eva = timm.create_model(vision.architecture, pretrained=False, num_classes=0, **vision.model_args)
    if state_dict is not None:
        eva.load_state_dict(state_dict, strict=True)
    return eva.eval()


def eva_hidden_states(eva, images: torch.Tensor) -> list[torch.Tensor]:
    """(n, 3, H, W) -> the embeddings and each block's output, every one (n, 1 + patches, dim), block by block."""
    x = eva.patch_embed(images)
    x, rope = eva._pos_embed(x)
    x = eva.norm_pre(x)
    states = [x]
    for block in eva.blocks:
        x = block(x, rope=rope)
        states.append(x)
    return states


def eva_last_block_tokens(eva, images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1 + patches, dim): every token after the last block, final norm NOT applied."""
    return eva_hidden_states(eva, images)[-1]


class ForwardCalls:
    """Counts the forward calls of `modules` and the rows (first-dimension entries) they took; use as a context
    manager, or call `remove()`."""

    def __init__(self, modules):
        self.calls = 0
        self.rows = 0
        self.handles = [module.register_forward_hook(self._hook) for module in modules]

    def _hook(self, module, args, output):
        self.calls += 1
        self.rows += args[0].shape[0]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def tower_calls(model) -> ForwardCalls:
    """Counts the images that reach the vision tower (`rows`) and its calls."""
    return ForwardCalls([model.model.vision_tower.timm_model.patch_embed])


def perturb_norms(model, seed: int = 0, spread: float = 0.2):
    """Moves every LayerNorm / RMSNorm scale (and bias) away from 1 (and 0).

    At their default init two norms in a row act as one, so swapping or skipping a norm would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                module.weight.add_(spread * torch.randn(module.weight.shape, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(spread * torch.randn(module.bias.shape, generator=g))
    return model


# --------------------------------------------------------------------------------------------- language
def standalone_lm(model) -> torch.nn.Module:
    """A separately built `MistralForCausalLM` / `LlamaForCausalLM` loaded (strictly) with `model`'s LM weights."""
    lm = AutoModelForCausalLM.from_config(model.config.text_config)
    lm.load_state_dict(model.model.language_model.state_dict(), strict=True)
    return lm.eval()


# ------------------------------------------------------------------------------------------------ the Hub
def save_remote_code_folder(model, folder, **save_kwargs) -> Path:
    """`model` saved as users save it, by the package's `save_hub_folder` (remote code, full `auto_map`, the
    processor with the bundled release tokenizer); `save_kwargs` go to `save_pretrained`."""
    from infimm import InfiMMProcessor
    from infimm.hub_infimm import bundled_tokenizer, save_hub_folder

    return save_hub_folder(model, InfiMMProcessor.from_config(model.config, bundled_tokenizer()), folder, **save_kwargs)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def place_in_hub_cache(folder, cache_dir, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lays `folder` out as `huggingface_hub` lays out a downloaded snapshot of `repo_id`.

    `<cache>/models--<org>--<name>/blobs/<hash>` hold the bytes (sha256 for LFS files such as safetensors, the git
    blob sha1 otherwise), `snapshots/<commit>/<path>` are relative symlinks to them and `refs/main` holds the commit.
    Returns the snapshot folder.
    """
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(folder).rglob("*")):
        if not source.is_file():
            continue
        relative = source.relative_to(folder)
        data = source.read_bytes()
        is_lfs = source.suffix in (".safetensors", ".bin", ".pt") or len(data) > 10 * 1024 * 1024
        blob = blobs / (hashlib.sha256(data).hexdigest() if is_lfs else _git_blob_sha1(data))
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def read_json(path):
    return json.loads(Path(path).read_text())
