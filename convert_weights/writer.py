"""Output side: a staging folder renamed into place when complete, and safetensors shards written one tensor at a time.

Shards are planned by huggingface_hub (`split_torch_state_dict_into_shards`, on shape-only tensors) so names and the
index are the Hub's; each shard is then written directly in the safetensors format (8-byte header length, JSON
header, raw little-endian data). `safetensors.torch.save_file` would need the whole shard in memory plus a bytes copy
of it; here at most one tensor (and its dtype-converted copy) is held at a time. Each shard's SHA-256 is taken from
the very bytes handed to the file, so recording it costs no second read.

Every finished folder carries a small marker file (`MARKER`: what wrote it, from what, when, and the shards'
checksums); `--overwrite` replaces only a folder with that marker, or an empty one.
"""

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from .errors import ConversionError
from .reader import SAFETENSORS_NAMES, TensorRef


SAFE_INDEX = "model.safetensors.index.json"
# A dot-file: transformers ignores it, and huggingface_hub uploads it with the folder (its default ignore patterns
# cover only `.git` and `.cache/huggingface`), so a downloaded copy can be checked with the same checksums.
MARKER = ".infimm-conversion.json"
TOOL = "infimm-convert"
# Room for everything besides the shards (safetensors headers, config, code, tokenizer, model card): a few MB for
# the released variants, with a wide margin.
OTHER_FILES_BYTES = 32 << 20


def plan_shards(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size):
    """huggingface_hub's shard plan for tensors of these shapes and output dtypes (in this order)."""
    probes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in shapes.items()}
    try:
        return split_torch_state_dict_into_shards(probes, max_shard_size=max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size {max_shard_size!r}: {error}") from None


def _write_hashed(f, digest, chunk):
    """Writes `chunk` and adds the same bytes to `digest`: the checksum is of what was handed to the file."""
    f.write(chunk)
    digest.update(chunk)


def write_safetensors(path: Path, items: list[tuple[str, TensorRef, torch.dtype]], progress=None) -> str:
    """Writes `items` (key, source, output dtype) to one safetensors file, loading one tensor at a time; returns the
    file's SHA-256 (hex), computed from the bytes as they are written."""
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
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            _write_hashed(f, digest, chunk)
        for key, ref, dtype in items:
            tensor = ref.load()
            data = tensor.to(dtype).contiguous()
            chunk = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            _write_hashed(f, digest, chunk)
            del chunk, data
            ref.release(tensor)
            del tensor
            if progress is not None:
                progress.update(header[key]["data_offsets"][1] - header[key]["data_offsets"][0])
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def write_shards(folder: Path, tensors: dict[str, TensorRef], dtypes: dict[str, torch.dtype], split,
                 progress=None) -> dict[str, str]:
    """Writes every shard of `split`, then the index when there is more than one shard (its metadata records each
    shard's SHA-256 under `sha256`); returns {shard file name: SHA-256}."""
    checksums = {}
    for filename, keys in split.filename_to_tensors.items():
        checksums[filename] = write_safetensors(folder / filename, [(key, tensors[key], dtypes[key]) for key in keys],
                                                progress)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "sha256": checksums},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return checksums


def write_marker(folder: Path, *, version: str, source: str, checksums: dict[str, str]):
    """The marker that says this folder is a conversion's output (see `MARKER`); also the one place a single,
    unsharded `model.safetensors` has its checksum recorded (a sharded folder has them in the index too)."""
    record = {
        "written_by": TOOL,
        "version": version,
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": checksums,
    }
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The folder's marker record, or None when it has none this converter wrote."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):  # absent, unreadable, not JSON: not ours
        return None
    return record if isinstance(record, dict) and record.get("written_by") == TOOL else None


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


def _listing(folder: Path, shown: int = 3) -> str:
    """What a folder holds, for a message: folders first (with a slash), then files, e.g. `.git/, src/, a.csv and 3
    more`."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: (not entry.is_dir(follow_symlinks=False), entry.name))
    names = [entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "") for entry in entries]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_output(output: Path, overwrite: bool):
    """`output` may be created, or replaced: only with `overwrite`, and only when a conversion wrote it or it is
    empty. Anything else (a project, a dataset, a mistyped path) is refused, and nothing is deleted."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder.")
    if not output.exists():
        return
    if not overwrite:
        raise ConversionError(f"{output} already exists; pass --overwrite to replace it.")
    if read_marker(output) is not None or not any(output.iterdir()):
        return
    raise ConversionError(
        f"--overwrite refused: {output} was not written by {TOOL} (no valid {MARKER} in it) and is not empty: it holds "
        f"{_listing(output)}. --overwrite replaces only an earlier conversion's output or an empty folder, so "
        f"nothing was deleted. Choose another --output, or delete {output} yourself if it really is to go."
    )


def _existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest existing parent: where the staging folder's creation will land."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(output: Path):
    """The folder that will receive `output` (its nearest existing parent) accepts new entries."""
    parent = _existing_ancestor(Path(output).absolute().parent)
    if not parent.is_dir():
        raise ConversionError(f"--output {output} cannot be created: {parent} is a file, not a folder.")
    # `os.access` answers for this user, as the kernel will: root passes the permission bits (so a chmod does not
    # stop it), a read-only mount fails everyone. Effective ids, as the writes will use them.
    effective = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise ConversionError(
            f"--output {output} cannot be written: {parent} is not writable by this user (permissions or a "
            f"read-only file system). Choose an --output in a folder you can write to, or make {parent} "
            "writable (e.g. `chmod u+w`)."
        )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def check_free_space(output: Path, weights_bytes: int):
    """The file system of `output` has room for the shards and the small files. The whole new folder counts: with
    --overwrite the old one stays until the new one is complete."""
    parent = _existing_ancestor(Path(output).absolute().parent)
    needed = weights_bytes + OTHER_FILES_BYTES
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConversionError(
            f"Not enough free space for --output {output}: the conversion needs {needed:,} bytes "
            f"({_size(needed)}: {_size(weights_bytes)} of weights plus room for the other files) in {parent}, "
            f"which has {free:,} bytes ({_size(free)}) free. Free {_size(needed - free)} there, or choose an "
            "--output on another disk."
        )


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


__all__ = [
    "plan_shards", "write_safetensors", "write_shards", "write_marker", "read_marker", "staged_folder",
    "check_output", "check_writable", "check_free_space", "SAFE_INDEX", "MARKER",
]
