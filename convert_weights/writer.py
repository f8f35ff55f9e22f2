"""Output side: a staging folder renamed into place when complete, and safetensors shards written one tensor at a time.

Shards are planned by huggingface_hub (`split_torch_state_dict_into_shards`, on shape-only tensors) so names and the
index are the Hub's; each shard is then written directly in the safetensors format (8-byte header length, JSON
header, raw little-endian data). `safetensors.torch.save_file` would need the whole shard in memory plus a bytes copy
of it; here at most one tensor (and its dtype-converted copy) is held at a time.
"""

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from .errors import ConversionError
from .reader import SAFETENSORS_NAMES, TensorRef


SAFE_INDEX = "model.safetensors.index.json"


def plan_shards(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size):
    """huggingface_hub's shard plan for tensors of these shapes and output dtypes (in this order)."""
    probes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in shapes.items()}
    try:
        return split_torch_state_dict_into_shards(probes, max_shard_size=max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size {max_shard_size!r}: {error}") from None


def write_safetensors(path: Path, items: list[tuple[str, TensorRef, torch.dtype]], progress=None):
    """Writes `items` (key, source, output dtype) to one safetensors file, loading one tensor at a time."""
    if sys.byteorder != "little":
        raise ConversionError("safetensors data is little-endian; writing it from this machine is not supported.")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, ref, dtype in items:
        size = math.prod(ref.shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(ref.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, ref, dtype in items:
            tensor = ref.load()
            data = tensor.to(dtype).contiguous()
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            del data
            ref.release(tensor)
            del tensor
            if progress is not None:
                progress.update(header[key]["data_offsets"][1] - header[key]["data_offsets"][0])
        f.flush()
        os.fsync(f.fileno())


def write_shards(folder: Path, tensors: dict[str, TensorRef], dtypes: dict[str, torch.dtype], split, progress=None):
    """Writes every shard of `split`, then the index when there is more than one shard."""
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(folder / filename, [(key, tensors[key], dtypes[key]) for key in keys], progress)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ staging folder
def _partial_prefix(output: Path) -> str:
    return f".{output.name}.partial-"


def _remove_stale_partials(output: Path):
    """Staging folders of earlier runs that were killed outright (SIGKILL, power loss): their owner is gone."""
    for candidate in output.parent.glob(_partial_prefix(output) + "*"):
        pid = candidate.name[len(_partial_prefix(output)):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def check_output(output: Path, overwrite: bool):
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder.")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; pass --overwrite to replace it.")


@contextmanager
def staged_folder(output: Path, overwrite: bool):
    """Yields an empty folder beside `output`; on success it becomes `output` (replacing it only with `overwrite`),
    on any failure or interruption it is removed, so `output` is either untouched or complete."""
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    staging = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(output)}{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield staging
        check_output(output, overwrite)
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["plan_shards", "write_safetensors", "write_shards", "staged_folder", "check_output", "SAFE_INDEX"]
