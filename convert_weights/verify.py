"""Checks on a written folder before it is moved into place.

`verify_structure` re-opens every shard with the safetensors library and checks the index covers every tensor the
model expects, each with the expected shape and dtype, and nothing else. `verify_values` (optional, one more read
of everything) compares every written tensor byte for byte with its source converted to the output dtype.

`verify_checksums` checks a finished folder, at any time later (after a copy, a download, years on a disk): each
shard's SHA-256 against the one recorded while it was written, in the index's metadata (`sha256`) or, for a single
`model.safetensors`, in the converter's marker file. `infimm-convert verify FOLDER` runs it from the command line.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConversionError
from .reader import SAFETENSORS_DTYPES, SafetensorsFile, TensorRef
from .writer import MARKER, SAFE_INDEX, read_marker


_HASH_CHUNK = 16 << 20  # bytes per read while hashing: large enough for full speed, small enough for any machine


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_index(folder: Path) -> dict | None:
    index = folder / SAFE_INDEX
    if not index.is_file():
        return None
    try:
        content = json.loads(index.read_text())
    except ValueError as error:  # not JSON (or not UTF-8)
        raise ConversionError(f"{index} is not readable JSON ({error}); the folder is damaged: re-download or "
                              "re-convert it.") from None
    if not isinstance(content, dict) or not isinstance(content.get("weight_map"), dict):
        raise ConversionError(f"{index} has no `weight_map` object; the folder is damaged: re-download or "
                              "re-convert it.")
    return content


def recorded_checksums(folder: Path) -> dict[str, str]:
    """{shard file name: SHA-256} as recorded at conversion: the index's metadata, else the marker file."""
    index = _read_index(folder) or {}
    metadata = index.get("metadata")
    recorded = (metadata.get("sha256") if isinstance(metadata, dict) else None) or (
        (read_marker(folder) or {}).get("sha256"))
    if not isinstance(recorded, dict) or not recorded:
        raise ConversionError(
            f"{folder} has no SHA-256 checksums recorded (neither in {SAFE_INDEX} nor in {MARKER}), so there is "
            "nothing to check the shards against: it was not written by infimm-convert, or by a version that did "
            "not record them. Convert it again to get them."
        )
    return recorded


def _shard_names(folder: Path) -> set[str]:
    """The weight files the folder loads from: the shards its index names, or its single `model.safetensors`."""
    index = _read_index(folder)
    if index is not None:
        return {name for name in index["weight_map"].values() if isinstance(name, str)}
    return {"model.safetensors"} if (folder / "model.safetensors").is_file() else set()


def _checksum_problem(folder: Path, name, expected) -> str | None:
    if not isinstance(name, str) or Path(name).name != name or not isinstance(expected, str):
        return f"the record {name!r}: {expected!r} is not a shard file name with its checksum"  # never leave folder
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    actual = file_sha256(path)
    if actual != expected.lower():
        return f"{name} is corrupted (SHA-256 {actual}, recorded {expected})"
    return None


def verify_checksums(folder) -> dict[str, str]:
    """Checks every shard of a converted folder against the SHA-256 recorded when it was written; returns the
    checked {file name: SHA-256}. Raises `ConversionError` (a `ValueError`) naming each corrupted or missing shard.

    Off by default (loading does not call it): call it before `from_pretrained` when a folder was copied or
    downloaded, e.g. `convert_weights.verify_checksums("./infimm-zephyr-hf")`. It reads every shard once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder; pass the folder a conversion wrote.")
    recorded = recorded_checksums(folder)
    problems = [problem for name, expected in sorted(recorded.items())
                if (problem := _checksum_problem(folder, name, expected))]
    problems += [f"{name} has no recorded checksum" for name in sorted(_shard_names(folder) - set(recorded))]
    if problems:
        raise ConversionError(f"{folder} failed the checksum check: " + "; ".join(problems)
                              + ". Do not load it: re-download or re-convert the file(s) named.")
    return recorded


__all__ = ["verify_structure", "verify_values", "verify_checksums", "recorded_checksums", "file_sha256"]
