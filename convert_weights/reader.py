"""Lazy access to the tensors of a checkpoint, one tensor at a time.

- PyTorch pickles (`pytorch_model.bin`, DeepSpeed `mp_rank_00_model_states.pt`, ...) are opened with
  `torch.load(mmap=True, weights_only=True)`: tensors are views on a private memory map of the file. Once a tensor has
  been copied, `TensorRef.release` hands its pages back to the kernel (`madvise(MADV_DONTNEED)`); otherwise every page
  read stays in the process's resident set and a 20 GB checkpoint ends up "resident" in full.
- safetensors files are read with positioned reads at the offsets of their header, so no mapping grows either.
- Folders: a `*.index.json` with its shards, or a single weights file.

Nothing here unpickles code: a pickle that needs anything beyond tensors and plain containers is refused.
"""

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import ConversionError


# safetensors dtype names (https://github.com/huggingface/safetensors, "Format").
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# Weights files of a folder, most preferred first (safetensors over pickles, as transformers does).
FOLDER_WEIGHTS = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)

# Wrapper entries under which training code stores the model's state dict, outermost first.
CONTAINER_KEYS = {
    "module": "DeepSpeed model states (`module`)",
    "model_state_dict": "OpenFlamingo-style checkpoint (`model_state_dict`)",
    "state_dict": "training checkpoint (`state_dict`)",
    "model": "training checkpoint (`model`)",
}

_MAX_READ = 1 << 30  # bytes per read call (Linux caps a single read near 2 GiB)


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint, not read yet.

    `load()` returns it (possibly a view on a memory map); `release(tensor)` tells the reader it is no longer needed.
    Two refs with the same non-None `identity` hold the same bytes (a storage shared in the pickle).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    releaser: Callable[[torch.Tensor], None] | None = field(default=None, repr=False, compare=False)
    identity: tuple | None = field(default=None, compare=False)
    origin: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        tensor = self.loader()
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ConversionError(
                f"{self.origin or self.key}: expected {self.dtype} {list(self.shape)}, read {tensor.dtype} "
                f"{list(tensor.shape)}."
            )
        return tensor

    def release(self, tensor: torch.Tensor):
        if self.releaser is not None:
            self.releaser(tensor)


# ------------------------------------------------------------------------------------------------ page release
def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()
_MADV_DONTNEED = 4


def release_mapped_pages(tensor: torch.Tensor):
    """Drops the resident pages under `tensor`'s storage (a read-only private file mapping: they are re-read from
    the file if touched again). Only whole pages inside the storage are dropped."""
    if _MADVISE is None:
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + size) // page * page
    if last > first:
        _MADVISE(first, last - first, _MADV_DONTNEED)


# ------------------------------------------------------------------------------------------------ pickles
def _refusal(path: Path, error: Exception) -> ConversionError:
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global:? GLOBAL) ([\w.]+)", str(error))
    culprit = f" (it references `{found.group(1)}`)" if found else ""
    return ConversionError(
        f"{path} is a pickle that holds more than tensors{culprit}; loading it would run code from the file, so it "
        "is refused (`torch.load(weights_only=True)` failed). If you trust its origin, extract the weights in a "
        "separate step, e.g. `sd = torch.load(path, weights_only=False)['module']; torch.save(sd, 'weights.pt')`, "
        "and convert `weights.pt`."
    )


def _load_pickle(path: Path):
    """Returns (object, mapped) for a PyTorch pickle, refusing anything that is not weights only."""
    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if magic == b"PK\x03\x04" and not is_zip:
        raise ConversionError(f"{path} is a truncated or corrupt PyTorch zip checkpoint (no central directory).")
    try:
        if is_zip:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
        # Pre-1.6 pickles cannot be memory mapped: they are read whole (still weights only).
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise _refusal(path, error) from None
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, path: Path) -> tuple[dict, str]:
    """Finds the state dict in what `torch.load` returned; says which container held it."""
    if _is_state_dict(obj):
        return obj, "state dict"
    if isinstance(obj, dict):
        for key, description in CONTAINER_KEYS.items():
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                non_tensors = [k for k, v in inner.items() if not isinstance(v, torch.Tensor)]
                if non_tensors:
                    raise ConversionError(
                        f"{path}: `{key}` holds entries that are not tensors: {non_tensors[:10]}."
                    )
                return inner, description
    kind = type(obj).__name__
    keys = sorted(obj)[:10] if isinstance(obj, dict) else []
    raise ConversionError(
        f"{path} holds no state dict: a {kind} with keys {keys}; expected tensors, or a dict with one of "
        f"{sorted(CONTAINER_KEYS)} holding them."
    )


def _pickle_refs(path: Path) -> tuple[dict[str, TensorRef], str]:
    obj, mapped = _load_pickle(path)
    state_dict, container = unwrap_state_dict(obj, path)
    refs = {}
    for key, tensor in state_dict.items():
        storage = tensor.untyped_storage()
        refs[key] = TensorRef(
            key=key,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            loader=(lambda t=tensor: t),
            releaser=release_mapped_pages if mapped else None,
            identity=(str(path), storage.data_ptr(), tensor.storage_offset(), tuple(tensor.stride()), tensor.dtype,
                      tuple(tensor.shape)),
            origin=f"{path.name}:{key}",
        )
    return refs, container


# ------------------------------------------------------------------------------------------------ safetensors
def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without `__metadata__`, byte offset where the data starts); checks the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is truncated: {size} bytes, no safetensors header.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ConversionError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes).")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"{path} is not a safetensors file: {error}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise ConversionError(
            f"{path} is truncated: its header describes {data_start + end} bytes, the file has {size}."
        )
    return header, data_start


def read_exact(fd: int, buffer: memoryview, offset: int, origin: str):
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:done + _MAX_READ]], offset + done)
        if n <= 0:
            raise ConversionError(f"{origin}: the file ended early (truncated?).")
        done += n


class SafetensorsFile:
    """Positioned reads of one safetensors file; the descriptor stays open while refs to it are alive."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = read_safetensors_header(path)
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def read(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            read_exact(self.fd, memoryview(raw.numpy()).cast("B"), self.data_start + begin, f"{self.path}:{key}")
        return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _safetensors_refs(path: Path) -> dict[str, TensorRef]:
    file = SafetensorsFile(path)
    refs = {}
    for key, entry in file.header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}:{key} has dtype {entry['dtype']}, which this converter does not handle.")
        refs[key] = TensorRef(
            key=key,
            shape=tuple(entry["shape"]),
            dtype=SAFETENSORS_DTYPES[entry["dtype"]],
            loader=(lambda k=key: file.read(k)),
            identity=(str(path), *entry["data_offsets"]),
            origin=f"{path.name}:{key}",
        )
    return refs


# ------------------------------------------------------------------------------------------------ JSON files
def read_json(path: Path):
    """The parsed content of a JSON file (a config, an index); `ConversionError` naming the file, where it breaks
    and what to do, rather than a bare `JSONDecodeError` from somewhere inside the conversion."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConversionError(f"Cannot read {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path} is not a JSON file: it is not UTF-8 text (byte {error.start} cannot be "
                              "decoded). Check that it is the file you meant, or restore it from the original "
                              "download.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. Fix the file "
            f"there (`python -m json.tool {path}` points at the same place), or restore it from the original "
            "download."
        ) from None
    except RecursionError:
        raise ConversionError(f"{path} nests its JSON too deeply to be read; it is not a model file. Restore it "
                              "from the original download.") from None


# ------------------------------------------------------------------------------------------------ entry points
@dataclass
class Checkpoint:
    """The tensors of a file or folder, by key, plus where they came from."""

    path: Path
    tensors: dict[str, TensorRef]
    container: str
    files: list[Path]

    @property
    def nbytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())


def _looks_like_pickle(path: Path) -> bool:
    """A zip archive (`torch.save` since 1.6) or a raw pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def open_file(path: Path) -> Checkpoint:
    """A single weights file, recognised by its content (a safetensors header, else a PyTorch pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file.")
    try:
        return Checkpoint(path, _safetensors_refs(path), "safetensors", [path])
    except ConversionError:
        if not _looks_like_pickle(path):
            raise
    refs, container = _pickle_refs(path)
    return Checkpoint(path, refs, container, [path])


def weights_files(folder: Path) -> list[Path]:
    """The weights files of a model folder: the shards named by its index, or its single weights file."""
    for name in FOLDER_WEIGHTS:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(candidate)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{candidate} has no `weight_map` object (tensor name -> shard file name); "
                                      "restore the index from the original download.")
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise ConversionError(f"{candidate} names shards that are not in {folder}: {missing}.")
            return [folder / shard for shard in shards]
        return [candidate]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    raise ConversionError(
        f"No weights found in {folder}: expected one of {list(FOLDER_WEIGHTS)}"
        + (f"; found {found}." if found else ".")
    )


def open_folder(folder: Path) -> Checkpoint:
    folder = Path(folder)
    files = weights_files(folder)
    tensors, containers = {}, set()
    for path in files:
        part = open_file(path)
        duplicated = sorted(set(part.tensors) & set(tensors))
        if duplicated:
            raise ConversionError(f"{path} repeats keys of another shard: {duplicated[:10]}.")
        tensors.update(part.tensors)
        containers.add(part.container)
    return Checkpoint(folder, tensors, ", ".join(sorted(containers)), files)


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    return open_folder(path) if path.is_dir() else open_file(path)


__all__ = [
    "TensorRef", "Checkpoint", "SafetensorsFile", "open_checkpoint", "open_file", "open_folder",
    "read_safetensors_header", "read_json", "release_mapped_pages", "SAFETENSORS_DTYPES", "SAFETENSORS_NAMES",
]
