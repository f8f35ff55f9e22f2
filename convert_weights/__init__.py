"""Conversion of InfiMM checkpoints into Hub-ready folders of sharded safetensors.

`python -m infimm.convert_weights --help` (or `infimm-convert --help`) lists the inputs it recognises. From Python:
`convert(Options(input=..., output=...))`; `load_legacy_model` builds a model straight from a release snapshot;
`verify_checksums(folder)` checks a converted folder's shards against the SHA-256 recorded when they were written.
"""

from .convert import Options, Result, convert
from .errors import ConversionError
from .legacy import is_legacy_checkpoint, load_legacy_model
from .verify import verify_checksums


__all__ = ["Options", "Result", "convert", "ConversionError", "is_legacy_checkpoint", "load_legacy_model",
           "verify_checksums"]
