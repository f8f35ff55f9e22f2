"""Tensors the converter makes rather than copies, each as a lazy `TensorRef`.

- `grow_rows`: an embedding or LM-head matrix given rows for tokens the LLM lacks (`<|endofchunk|>`, `<image>`),
  drawn from N(mean, 1e-5 * covariance) of the existing rows, as transformers' own checkpoint converters (LLaVA,
  IDEFICS) initialise added tokens: new tokens start near the average token, not at random.
- `FreshConnector`: a newly initialised resampler and cross-attention blocks, for assembling a model to pretrain.
  Each module is built and initialised on its own (by the model's `_init_weights`, so exactly as `from_pretrained`
  would initialise missing weights, gates at 0), seeded by its position so the result does not depend on write order.
"""

import types

import torch

from .formats import CONNECTOR_PREFIXES
from .reader import TensorRef


def _new_rows(weight: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    rows = weight.to(torch.float32, copy=True)
    mean = rows.mean(0)
    rows -= mean
    covariance = rows.T @ rows / rows.shape[0]
    del rows
    covariance *= 1e-5
    noise = torch.randn(count, weight.shape[1], generator=generator)
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        samples = noise @ factor.T
    else:  # rank-deficient covariance (fewer rows than dims): use its non-negative eigen-part
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        samples = (noise * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    return (mean + samples).to(weight.dtype)


def grow_rows(ref: TensorRef, rows: int, seed: int = 0) -> TensorRef:
    """`ref` (vocab, dim) extended to (rows, dim); the first rows are the original bytes."""
    if rows < ref.shape[0] or len(ref.shape) != 2:
        raise ValueError(f"Cannot grow {ref.key} {list(ref.shape)} to {rows} rows.")

    def load():
        weight = ref.load()
        generator = torch.Generator().manual_seed(seed)
        grown = torch.cat([weight, _new_rows(weight, rows - weight.shape[0], generator)])
        ref.release(weight)
        return grown

    return TensorRef(
        key=ref.key, shape=(rows, ref.shape[1]), dtype=ref.dtype, loader=load,
        origin=f"{ref.origin or ref.key} + {rows - ref.shape[0]} new rows",
    )


class FreshConnector:
    """Resampler and cross-attention weights from the model's own initialisation, one module at a time."""

    def __init__(self, config, seed: int = 0):
        from infimm.modeling_infimm import (
            InfiMMGatedCrossAttentionBlock,
            InfiMMPerceiverResampler,
            InfiMMPreTrainedModel,
        )

        self.config = config
        self.seed = seed
        self._init_weights = InfiMMPreTrainedModel._init_weights
        self._builders = {"model.resampler": lambda: InfiMMPerceiverResampler(config)}
        for i in config.cross_attention_layers:
            self._builders[f"model.cross_attention_layers.{i}"] = (
                lambda i=i: InfiMMGatedCrossAttentionBlock(config, i)
            )
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def _module_state(self, name: str) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # free the previous module first
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + list(self._builders).index(name))
                module = self._builders[name]()
                shim = types.SimpleNamespace(config=self.config)
                for submodule in module.modules():
                    self._init_weights(shim, submodule)
            self._cached = (name, {key: value.detach() for key, value in module.state_dict().items()})
        return self._cached[1]

    def refs(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, TensorRef]:
        """A ref for every expected connector key."""
        refs = {}
        for key, (shape, _) in expected.items():
            if not key.startswith(CONNECTOR_PREFIXES):
                continue
            name = next(prefix for prefix in self._builders if key.startswith(prefix + "."))
            rest = key[len(name) + 1:]
            refs[key] = TensorRef(
                key=key, shape=shape, dtype=torch.float32,
                loader=(lambda name=name, rest=rest: self._module_state(name)[rest]),
                origin="freshly initialised",
            )
        return refs


__all__ = ["grow_rows", "FreshConnector"]
