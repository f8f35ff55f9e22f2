"""InfiMM models behind transformers' own OpenAI-compatible server (`transformers serve`).

    infimm serve MODEL_OR_FOLDER [options]          (or: python -m infimm.serve MODEL_OR_FOLDER [options])

Every option of `transformers serve` keeps its meaning (`--port`, `--device`, `--dtype`, `--continuous-batching`,
`--api-server-count`, ...) and the requests, streaming, errors and endpoints (`/v1/chat/completions`,
`/v1/responses`, `/v1/models`, ...) are the library's: `InfiMMServe` is transformers' `Serve` command with its model
loader and generation settings swapped for the ones below, and the command line is `Serve`'s own signature (host
defaulting to 127.0.0.1) plus the image limits. What this module adds, and why:

- InfiMM is made known to transformers in every process of the server (`register`): the Auto classes through their
  public `register`, plus two shims where the server reads something no registration reaches (see `register`). The
  server runs the model in a spawned process that inherits none of its parent's registrations, so the loader
  (`InfiMMModelLoader`, pickled into that process) registers again before anything loads there.
- The model, its config and its processor load with this package's classes, never the copies of the code in the
  folder, whatever `--trust-remote-code` says: the folder's `.py` files are not run, and the image limits below
  apply to the code that reads the images (the processor runs in the API server process).
- Images from clients are limited (`ServingLimits`): data URIs and http(s) URLs only (local paths and `file:` URLs
  need `--allow-local-images`), downloads within a deadline and a byte cap and of an `image/*` type, at most
  `--max-image-pixels` pixels per image (Pillow's `MAX_IMAGE_PIXELS`, past which it refuses), and at most
  `--max-images-per-request` images. A refusal is a `ValueError`, which the server answers with a 400 whose
  `detail` says what to change; the server goes on serving.
- `--continuous-batching` batches text-only requests (transformers batches only language models, and its batching
  manager takes token ids alone); a request with images runs `generate()` on the runner's sequential queue, as the
  library serves every request of a vision model (`InfiMMBatchingRunner`).
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import dataclasses
import inspect
import sys
import warnings
from typing import Annotated

import numpy as np
import PIL.Image
import torch
import typer
from packaging import version

import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
)

# The server's layout this module builds on (a model loader, the model in a process of its own, runners) is that of
# transformers 5.25; earlier 5.x releases served from a different design.
SERVE_MIN_TRANSFORMERS = "5.25.0"
if version.parse(transformers.__version__).release < version.parse(SERVE_MIN_TRANSFORMERS).release:
    raise ImportError(
        f"`infimm serve` runs on transformers' server as of transformers {SERVE_MIN_TRANSFORMERS}; this is "
        f"transformers {transformers.__version__}. Upgrade: pip install -U 'infimm[serve]' (or "
        f"'transformers[serving]>={SERVE_MIN_TRANSFORMERS},<6')."
    )

from transformers.cli import serve as _serve_cli  # noqa: E402
from transformers.cli.serving import model_manager as _model_manager  # noqa: E402
from transformers.cli.serving.model_manager import ModelLoader  # noqa: E402
from transformers.cli.serving.utils import (  # noqa: E402
    CBGenerateRunner,
    GenerateRunner,
    GenerationState,
    parse_model_id,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from .configuration_infimm import InfiMMConfig  # noqa: E402
from .image_processing_infimm import (  # noqa: E402
    ImageSourcePolicy,
    InfiMMImageProcessor,
    InfiMMImageProcessorFast,
    set_image_source_policy,
)
from .modeling_infimm import InfiMMForConditionalGeneration  # noqa: E402
from .processing_infimm import InfiMMProcessor, conversation_images  # noqa: E402
from .release_infimm import is_legacy_config  # noqa: E402


# Under `transformers.cli`, whose level `--log-level` sets.
logger = hf_logging.get_logger("transformers.cli.serving.infimm")

DEFAULT_HOST = "127.0.0.1"  # transformers' default is "localhost"; serving to others is a choice, made with --host
ARCHITECTURE = InfiMMForConditionalGeneration.__name__


# ------------------------------------------------------------------------------------------------ registration
def register() -> None:
    """Makes InfiMM known to transformers in this process (idempotent): what a saved folder's `auto_map` declares,
    through the Auto classes' public `register`, and two shims the server needs where no registration reaches.

    - `transformers.InfiMMForConditionalGeneration`: `ModelLoader._load_model` (transformers/cli/serving/
      model_manager.py) finds the model class with `getattr(transformers, config.architectures[0])` and never reads
      the Auto mappings or `auto_map`; without it, loading stops with an `AttributeError`.
    - `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["infimm"]`: `ModelLoader.get_model_modality` decides between a
      language model and a vision-language one from the library's own name mappings, which `register` does not
      extend; without it, every request gets a 400 "Unknown modality". As a vision-language model, the server hands
      the requests' image parts to the processor.
    """
    AutoConfig.register(InfiMMConfig.model_type, InfiMMConfig, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto_class.register(InfiMMConfig, InfiMMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(InfiMMConfig, InfiMMProcessor, exist_ok=True)
    AutoImageProcessor.register(InfiMMConfig, slow_image_processor_class=InfiMMImageProcessor,
                                fast_image_processor_class=InfiMMImageProcessorFast, exist_ok=True)
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(InfiMMConfig.model_type, ARCHITECTURE)
    if ARCHITECTURE not in vars(transformers):  # `transformers` resolves its own names lazily; set ours plainly
        setattr(transformers, ARCHITECTURE, InfiMMForConditionalGeneration)


def check_servable(model: str) -> None:
    """Refuses, with the fix, what `infimm serve` cannot serve: not an InfiMM model, an original release snapshot
    (its layout predates this package's), a GGUF file."""
    repo, revision, gguf_file = parse_model_id(model)
    if gguf_file is not None:
        raise ValueError(f"{model!r} names a GGUF file; InfiMM models are served from their safetensors folder.")
    try:
        config, _ = PretrainedConfig.get_config_dict(repo, revision=revision)
    except OSError as err:
        raise ValueError(f"Could not read the config of {model!r} ({err}). Pass an InfiMM folder or Hub repo.") from err
    if is_legacy_config(config):
        raise ValueError(
            f"{model!r} is an original InfiMM release snapshot, in the release's own layout. Convert it once "
            "(`infimm-convert --input SNAPSHOT_FOLDER --output FOLDER`) and serve FOLDER."
        )
    if config.get("model_type") != InfiMMConfig.model_type:
        raise ValueError(
            f"{model!r} is not an InfiMM model (model_type {config.get('model_type')!r}); serve it with "
            "`transformers serve`."
        )


# ------------------------------------------------------------------------------------------------ image limits
MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; the tower sees 224-336 px, so larger is cost, not detail
MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_BYTES = 20 * 2**20  # OpenAI's own cap on one image
IMAGE_DOWNLOAD_DEADLINE = 30.0


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What a server accepts of its clients' images. `apply` sets it for the process (image source policy, Pillow's
    pixel limit); the serving processor takes the per-request and download limits."""

    allow_local_images: bool = False
    allow_image_urls: bool = True
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    max_image_bytes: int = MAX_IMAGE_BYTES
    image_download_deadline: float = IMAGE_DOWNLOAD_DEADLINE

    def __post_init__(self):
        for name in ("max_image_pixels", "max_images_per_request", "max_image_bytes", "image_download_deadline"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`--{name.replace('_', '-')}` must be a positive number; got {value!r}.")

    def policy(self) -> ImageSourcePolicy:
        """The image source policy of a server with these limits; refusals name the flag that lifts them."""
        return ImageSourcePolicy(
            local_files=self.allow_local_images,
            urls=self.allow_image_urls,
            image_content_types_only=True,
            advice={
                "local_files": "Send the image as a data URI or an http(s) URL (the server's operator can accept "
                               "local files with `infimm serve --allow-local-images`).",
                "urls": "Send the image as a data URI (this server was started with `--no-allow-image-urls`).",
                "image_content_types_only": "Send a URL that serves the picture as image/*, or the image itself as "
                                            "a data URI.",
                "max_download_bytes": f"Send a smaller image (at most {self.max_image_bytes} bytes), or start the "
                                      "server with a larger `--max-image-bytes`.",
                "download_deadline": "Send the image as a data URI or from a faster host, or start the server with a "
                                     "longer `--image-download-deadline`.",
                "max_image_pixels": f"Send a downscaled image (at most {self.max_image_pixels} pixels), or start "
                                    "the server with a larger `--max-image-pixels`.",
            },
        )

    def apply(self) -> None:
        """Sets the limits for this process (every process of the server calls it before its first request)."""
        set_image_source_policy(self.policy())
        PIL.Image.MAX_IMAGE_PIXELS = int(self.max_image_pixels)
        # Pillow only warns between its limit and twice it; here the limit is the limit. The image processing turns
        # the resulting exception into a ValueError (a 400) like Pillow's own error past twice the limit.
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)

    def configure(self, processor: "ServingInfiMMProcessor") -> "ServingInfiMMProcessor":
        """The per-request and download limits on a loaded processor (they override the folder's saved settings)."""
        processor.max_images_per_request = int(self.max_images_per_request)
        images = processor.image_processor
        images.max_download_bytes = int(self.max_image_bytes)
        images.download_deadline = float(self.image_download_deadline)
        # One network read may wait `download_timeout`, checked against the deadline between reads.
        images.download_timeout = min(float(images.download_timeout), float(self.image_download_deadline))
        return processor


class ServingInfiMMProcessor(InfiMMProcessor):
    """The processor as the server uses it: a cap on the images of one request (checked before any is read), and a
    single conversation's token ids as one flat list when no tensors are asked for, which is how the server's
    continuous-batching path takes a prompt (a tokenizer's `apply_chat_template` returns it so)."""

    max_images_per_request = MAX_IMAGES_PER_REQUEST

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        listed = isinstance(conversation, (list, tuple)) and bool(conversation)
        single = listed and isinstance(conversation[0], dict)
        for messages in [conversation] if single else conversation if listed else []:
            count = len(conversation_images(messages))
            if count > self.max_images_per_request:
                raise ValueError(
                    f"The request holds {count} images; this server takes at most {self.max_images_per_request} per "
                    "request. Send fewer images (or split the conversation); the server's operator sets the cap "
                    "with `infimm serve --max-images-per-request`."
                )
        out = super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if single and kwargs.get("return_tensors") is None and kwargs.get("tokenize") and kwargs.get("return_dict"):
            for key in ("input_ids", "attention_mask"):
                if key in out and len(out[key]) == 1:
                    out[key] = list(out[key][0])
        return out


# ---------------------------------------------------------------------------------------- the server's pieces
class InfiMMModelLoader(ModelLoader):
    """transformers' `ModelLoader` for InfiMM: this package's classes (never the folder's copies of the code), the
    serving limits on the processor, and `register` in whichever process it runs; the server pickles it into the
    model's process, which is spawned and so starts without the parent's registrations."""

    limits: ServingLimits = ServingLimits()

    @classmethod
    def from_loader(cls, loader: ModelLoader, limits: ServingLimits) -> "InfiMMModelLoader":
        """The server's loader (device, dtype, attention, quantization as its command line set them) as this class."""
        if isinstance(loader, cls):
            return loader
        new = cls.__new__(cls)
        new.__dict__.update(vars(loader))
        new.trust_remote_code = False  # this package's classes are used: nothing of the folder's code runs
        new.limits = limits
        return new

    def load_config(self, model_id: str):
        register()
        check_servable(model_id)
        return super().load_config(model_id)

    def load_processor(self, model_id: str) -> ServingInfiMMProcessor:
        register()
        repo, revision, _ = parse_model_id(model_id)
        return self.limits.configure(ServingInfiMMProcessor.from_pretrained(repo, revision=revision))

    def load_model_and_processor(self, model_id: str, on_progress=None):
        """In the model's process: the model, and the tokenizer as its processor. Images are read in the API server,
        which sends the model its tensors; here the runners use the processor only as `generate(tokenizer=...)`, for
        stop strings, where `StopStringCriteria` needs a tokenizer (`get_vocab`): a processor fails every request
        with `stop`."""
        register()
        self.limits.apply()
        _use_batching_runner()
        model, processor = super().load_model_and_processor(model_id, on_progress)
        return model, processor.tokenizer


class InfiMMGenerationState(GenerationState):
    """transformers' `GenerationState`, with continuous batching for InfiMM when it is on: the library batches only
    language models, but InfiMM's text-only requests are exactly its language model's (no image, no cross-attention
    block runs), and `InfiMMBatchingRunner` gives the requests with images to `generate()`."""

    @classmethod
    def from_state(cls, state: GenerationState, continuous_batching: bool) -> "InfiMMGenerationState":
        if isinstance(state, cls):
            return state
        new = cls.__new__(cls)
        new.__dict__.update(vars(state))
        new.infimm_continuous_batching = continuous_batching
        return new

    def use_continuous_batching(self, config, processor) -> bool:
        if getattr(config, "model_type", None) == InfiMMConfig.model_type:
            return self.infimm_continuous_batching
        return super().use_continuous_batching(config, processor)


class InfiMMBatchingRunner(CBGenerateRunner):
    """transformers' continuous-batching runner, for InfiMM: a text-only request joins the running batch; a request
    with images runs `model.generate()` on the runner's sequential queue (the library's path for every request of
    a vision model), since the batching manager takes token ids only and would drop the images.

    That `generate()` runs inside the batching manager's `pause()`, the library's way for another thread to use the
    model beside its loop: run at the same time as the batch, `generate()` comes out with wrong tokens (seen with a
    stock Mistral too, transformers 5.25). The batch waits while a request with images generates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The sequential queue reads `self.model` at each request; the batching manager keeps the model itself.
        self.model = _BesideTheBatch(self.model, self.manager)

    def generate(self, request_id: int, inputs: dict, generation_kwargs: dict, stream: bool) -> None:
        if "pixel_values" not in inputs:
            return super().generate(request_id, inputs, generation_kwargs, stream)
        return GenerateRunner.generate(self, request_id, _batch_of_one(inputs), generation_kwargs, stream)


class _BesideTheBatch:
    """The model as the runner's sequential queue uses it: `generate()` with the batching loop paused, everything
    else the model's own."""

    def __init__(self, model, manager):
        self._model, self._manager = model, manager

    def generate(self, *args, **kwargs):
        with self._manager.pause():
            return self._model.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _batch_of_one(inputs: dict) -> dict:
    """A prompt rendered for continuous batching (flat token lists, numpy images) as `generate()` takes it."""
    batch = {}
    for key, value in inputs.items():
        tensor = torch.as_tensor(np.asarray(value))
        batch[key] = tensor.unsqueeze(0) if key in ("input_ids", "attention_mask") and tensor.ndim == 1 else tensor
    return batch


def _use_batching_runner() -> None:
    """Shim, in the model's process only: `EngineClient.run_engine` (transformers/cli/serving/model_manager.py) builds
    its continuous-batching runner from this module-level name and takes no runner class; the library's runner
    would hand the batching manager a request's token ids without its images."""
    _model_manager.CBGenerateRunner = InfiMMBatchingRunner


# ----------------------------------------------------------------------------------------------- the command
_Serve = _serve_cli.Serve


class InfiMMServe(_Serve):
    """`transformers serve` for InfiMM models: the library's command (same options, same server), with the model
    loader and generation settings above, and the image limits of the extra options. The limits are an attribute of
    the instance, so that they travel with it into the API server processes `--api-server-count` spawns."""

    def __init__(self, *args, allow_local_images=False, allow_image_urls=True, max_image_pixels=MAX_IMAGE_PIXELS,
                 max_images_per_request=MAX_IMAGES_PER_REQUEST, max_image_bytes=MAX_IMAGE_BYTES,
                 image_download_deadline=IMAGE_DOWNLOAD_DEADLINE, **kwargs):
        arguments = inspect.signature(_Serve.__init__).bind(self, *args, **kwargs).arguments
        model = arguments.get("force_model")
        if not model:
            raise typer.BadParameter("name the InfiMM folder or Hub repo to serve", param_hint="MODEL_OR_FOLDER")
        try:
            self.infimm_limits = ServingLimits(
                allow_local_images=allow_local_images, allow_image_urls=allow_image_urls,
                max_image_pixels=max_image_pixels, max_images_per_request=max_images_per_request,
                max_image_bytes=max_image_bytes, image_download_deadline=image_download_deadline,
            )
            check_servable(model)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        if arguments.get("continuous_batching") and arguments.get("attn_implementation") == "eager":
            # The batching manager switches eager to its paged kernel for the whole model, which the requests with
            # images (run by `generate()` on a regular cache) cannot use.
            raise typer.BadParameter("--continuous-batching with InfiMM needs `sdpa` (the default) or a flash kernel, "
                                     "not `eager`.", param_hint="--attn-implementation")
        if arguments.get("trust_remote_code"):
            logger.warning("--trust-remote-code is not needed: InfiMM loads with the installed infimm package's "
                           "classes, and the folder's code is not run.")
            kwargs["trust_remote_code"] = False
        self.infimm_continuous_batching = bool(arguments.get("continuous_batching"))
        super().__init__(*args, **kwargs)

    def run(self, socket=None, engine_connection=None) -> None:
        self._prepare_for_infimm()
        super().run(socket, engine_connection)

    def run_api_servers(self, count: int) -> None:
        self._prepare_for_infimm()
        super().run_api_servers(count)

    def _prepare_for_infimm(self) -> None:
        """In each API server process: InfiMM registered, the limits set, the library's loader and generation state
        as InfiMM's (the handlers and the model's process take them from here)."""
        register()
        self.infimm_limits.apply()
        self.loader = InfiMMModelLoader.from_loader(self.loader, self.infimm_limits)
        self.generation_state = InfiMMGenerationState.from_state(self.generation_state,
                                                                 self.infimm_continuous_batching)


def _command_signature() -> inspect.Signature:
    """`Serve`'s options (its typer annotations, so `--help` is the library's) with the model required and shown as
    MODEL_OR_FOLDER, the host defaulting to 127.0.0.1, and the image limits."""
    limits = {
        "allow_local_images": (bool, False, "Accept local paths and file: URLs as images (only for trusted clients: "
                                            "they can read any image file the server can)."),
        "allow_image_urls": (bool, True, "Accept http(s) image URLs (the server downloads them; it can reach "
                                         "addresses its clients cannot)."),
        "max_image_pixels": (int, MAX_IMAGE_PIXELS, "Refuse images with more pixels (decompression bombs; sets "
                                                    "Pillow's MAX_IMAGE_PIXELS)."),
        "max_images_per_request": (int, MAX_IMAGES_PER_REQUEST, "Refuse requests holding more images."),
        "max_image_bytes": (int, MAX_IMAGE_BYTES, "Refuse images (downloads and data URIs) larger than this."),
        "image_download_deadline": (float, IMAGE_DOWNLOAD_DEADLINE, "Seconds an image download may take in all."),
    }
    parameters = []
    for parameter in inspect.signature(_Serve.__init__).parameters.values():
        if parameter.name == "force_model":
            parameter = parameter.replace(
                default=inspect.Parameter.empty,
                annotation=Annotated[str, typer.Argument(
                    metavar="MODEL_OR_FOLDER", show_default=False,
                    help="The InfiMM folder (save_hub_folder or infimm-convert output) or Hub repo to serve.")],
            )
        elif parameter.name == "host":
            parameter = parameter.replace(default=DEFAULT_HOST)
        parameters.append(parameter)
    for name, (kind, default, help_text) in limits.items():
        option = typer.Option(help=help_text, rich_help_panel="Image limits (infimm)")
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[kind, option]))
    return inspect.Signature(parameters[1:])  # without `self`: typer calls the class


InfiMMServe.__signature__ = _command_signature()
InfiMMServe.__doc__ = (
    "Serve an InfiMM model on transformers' OpenAI-compatible server (`transformers serve`), with limits on the "
    "images clients send.\n\n" + (_Serve.__doc__ or "")
)

app = typer.Typer(help="InfiMM command line.", no_args_is_help=True, add_completion=False)
app.command(name="serve")(InfiMMServe)


@app.callback()
def _commands() -> None:
    """InfiMM command line."""  # a callback keeps `serve` a named subcommand while it is the only one


def _serving_installed() -> bool:
    from transformers.utils.import_utils import is_serve_available

    return is_serve_available()


def main(argv=None) -> None:
    """`infimm ...` (the console script)."""
    if not _serving_installed():
        sys.exit("`infimm serve` needs transformers' serving extras (FastAPI, uvicorn, openai): "
                 "pip install 'infimm[serve]'")
    app(args=argv, prog_name="infimm")


def serve_main(argv=None) -> None:
    """`python -m infimm.serve MODEL_OR_FOLDER ...`: the same as `infimm serve ...`."""
    main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    # Through the imported module, not this `__main__` copy of it: the server pickles the loader into the model's
    # process, which must find its class as `infimm.serve.InfiMMModelLoader`.
    from infimm.serve import serve_main as _serve_main

    _serve_main()


__all__ = [
    "InfiMMBatchingRunner",
    "InfiMMGenerationState",
    "InfiMMModelLoader",
    "InfiMMServe",
    "ServingInfiMMProcessor",
    "ServingLimits",
    "check_servable",
    "main",
    "register",
]
