"""infimm: InfiMM vision-language models for transformers.

Some of the `*_infimm.py` modules are also the remote code of every saved folder: `hub_infimm.remote_code_files()`
lists them (the configuration, modeling, processing and pipeline modules and what they import relatively); the
others (hub, training, collator, lmms-eval) belong to the package only. The converter is `infimm.convert_weights`.
"""

from .configuration_infimm import PRESETS, InfiMMConfig
from .modeling_infimm import CACHE_ARGUMENT, InfiMMForConditionalGeneration, InfiMMModel, InfiMMPreTrainedModel
from .image_processing_infimm import InfiMMImageProcessor, InfiMMImageProcessorFast
from .processing_infimm import InfiMMProcessor
from .collator_infimm import InfiMMDataCollator

__version__ = "0.1.0"

__all__ = [
    "CACHE_ARGUMENT",
    "PRESETS",
    "InfiMMConfig",
    "InfiMMModel",
    "InfiMMForConditionalGeneration",
    "InfiMMPreTrainedModel",
    "InfiMMProcessor",
    "InfiMMImageProcessor",
    "InfiMMImageProcessorFast",
    "InfiMMDataCollator",
    "InfiMMImageTextToTextPipeline",
]


def __getattr__(name):
    # The pipeline class imports `transformers.pipelines` (over a second); load it only when asked for.
    if name == "InfiMMImageTextToTextPipeline":
        from .pipeline_infimm import InfiMMImageTextToTextPipeline

        return InfiMMImageTextToTextPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
