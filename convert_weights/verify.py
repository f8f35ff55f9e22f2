"""Checks on a written folder before it is moved into place.

`verify_structure` re-opens every shard with the safetensors library and checks the index covers every tensor the
model expects, each with the expected shape and dtype, and nothing else. `verify_values` (optional, one more read
of everything) compares every written tensor byte for byte with its source converted to the output dtype.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConversionError
from .reader import SAFETENSORS_DTYPES, SafetensorsFile, TensorRef
from .writer import SAFE_INDEX


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / SAFE_INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConversionError(f"Verification: {folder} has neither {SAFE_INDEX} nor model.safetensors.")
    with safe_open(single, framework="pt") as f:
        return {key: single.name for key in f.keys()}


def verify_structure(folder: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """The folder holds exactly the expected tensors with their shapes and dtypes; raises `ConversionError`."""
    weight_map = _weight_map(folder)
    problems = []
    missing = sorted(set(expected) - set(weight_map))
    extra = sorted(set(weight_map) - set(expected))
    if missing:
        problems.append(f"index lacks {missing[:10]}")
    if extra:
        problems.append(f"index has unexpected {extra[:10]}")
    for filename in sorted(set(weight_map.values())):
        path = folder / filename
        if not path.is_file():
            problems.append(f"{filename} is missing")
            continue
        SafetensorsFile(path)  # complete file: the header's offsets fit its size
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            listed = {key for key, name in weight_map.items() if name == filename}
            if keys != listed:
                problems.append(f"{filename} holds {sorted(keys ^ listed)[:10]} contrary to the index")
            for key in sorted(keys & set(expected)):
                view = f.get_slice(key)
                shape, dtype = tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()]
                if (shape, dtype) != expected[key]:
                    problems.append(f"{key}: written {dtype} {list(shape)}, expected {expected[key][1]} "
                                    f"{list(expected[key][0])}")
    if problems:
        raise ConversionError("Verification of the written folder failed: " + "; ".join(problems))


def verify_values(folder: Path, tensors: dict[str, TensorRef], dtypes: dict[str, torch.dtype]):
    """Every written tensor equals its source cast to the output dtype, bit for bit (NaNs included)."""
    weight_map = _weight_map(folder)
    files = {name: SafetensorsFile(folder / name) for name in set(weight_map.values())}
    for key, ref in tensors.items():
        written = files[weight_map[key]].read(key)
        source = ref.load()
        expected = source.to(dtypes[key]).contiguous()
        same = torch.equal(written.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
        del expected
        ref.release(source)
        if not same:
            raise ConversionError(f"Verification: `{key}` differs from its source `{ref.origin or ref.key}`.")


__all__ = ["verify_structure", "verify_values"]
