"""InfiMM image processing and processor: images plus chat messages or few-shot prompts in, model inputs out.

Images follow the released preprocessing (the open_clip transform the weights were trained with): resize the
shortest edge to the tower's size with PIL bicubic, center-crop a square (offsets rounded as torchvision does),
RGB, scale to [0, 1], normalise with the OpenAI CLIP mean/std. Where the release's result depends on a quirk rather
than on the picture, this module makes a documented choice instead:

- transparent images (RGBA, LA, PA, palette or RGB/L with a transparent colour) are composited onto
  `background_color` (white) before resizing; the release dropped the alpha channel after resizing, which turns
  transparent areas black whatever they looked like;
- palette ("P") and bilevel ("1") images are converted to RGB before resizing, so they are resized bicubically
  like every other image (Pillow resizes them with nearest neighbour);
- files and URLs are opened with their EXIF orientation applied, so photos are upright.

Text uses the Flamingo layout: one `<image>` token where each image goes (`<image>caption<|endofchunk|>...` for
few-shot prompts). The chat templates put `<|endofchunk|><image>` where an image item sits in a message, as the
released chat processor did.
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import base64
import binascii
import inspect
import io
import os
import time
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps
from jinja2 import TemplateError

from transformers import AddedToken, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.utils import is_torchvision_available

from .configuration_infimm import CLIP_MEAN, CLIP_STD
from .release_infimm import HUB_KWARGS


IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"

# Pillow modes the processor turns into RGB itself; anything else (16-bit, 32-bit int, float, LAB, HSV) is refused
# because converting it needs a choice of scale only the caller can make.
_SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")

# Downloads of image URLs: seconds one network read may wait, seconds the whole download may take, and bytes it may
# bring (the largest photos people send are a few tens of MB). The image processors take all three as settings.
DOWNLOAD_TIMEOUT = 10.0
DOWNLOAD_DEADLINE = 60.0
MAX_DOWNLOAD_BYTES = 64 * 2**20
_READ_SIZE = 64 * 2**10


# ------------------------------------------------------------------------------------------------- image input
# Every broken image ends in a `ValueError` that says what is wrong with it and how to fix it, whichever way it came
# in (path, URL, data URI, PIL image, array, tensor): Pillow decodes lazily, so without `_decode` an already-opened
# truncated file would only fail with Pillow's bare `OSError` deep inside the resize.
def _decode(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """Makes Pillow decode `image` now and names the cause if it cannot (truncated or damaged data)."""
    try:
        image.load()
    except (OSError, EOFError, SyntaxError, ValueError) as err:
        if isinstance(err, EOFError) or "truncated" in str(err):
            raise ValueError(
                f"Could not read the image {name}: it is truncated, the data ends before the picture does "
                f"(Pillow: {err}). Re-download or re-save the file; to use the part that is there, set "
                "`PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` first."
            ) from err
        raise ValueError(
            f"Could not read the image {name}: its data is damaged or incomplete (Pillow: {err}). Re-download or "
            "re-save it (e.g. as PNG or JPEG)."
        ) from err
    return image


def _open_bytes(data: bytes, name: str, hint: str = "") -> PIL.Image.Image:
    """Encoded image bytes -> a decoded PIL image, or a `ValueError` saying whether they are empty, not an image,
    too many pixels, truncated or damaged."""
    if not data:
        raise ValueError(f"Could not read the image {name}: it is empty (0 bytes). Re-download or re-export it.")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(
            f"Refused the image {name}: it declares more pixels than Pillow's limit of {PIL.Image.MAX_IMAGE_PIXELS} "
            f"allows (a decompression bomb, or a huge scan): {err}. Downscale it first; if you trust the file, raise "
            "`PIL.Image.MAX_IMAGE_PIXELS`."
        ) from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"Could not read the image {name}: Pillow does not recognise it as an image{hint} ({err}). Check that it "
            "is a picture file, or re-save it (e.g. as PNG or JPEG)."
        ) from err
    return _decode(image, name)


def _download(url: str, timeout: float, deadline: float, max_bytes: int) -> tuple[bytes, str]:
    """The body and content type of `url`, read in chunks so that the whole download, not only each read, has a
    deadline and a size cap: a server that trickles bytes or never stops is cut off with a `ValueError`.

    The deadline is checked between reads and one read waits at most `timeout`, so a call returns within
    `deadline + timeout` seconds.
    """
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        content_type = response.headers.get_content_type()
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _DownloadRefused(f"it is {int(declared)} bytes, over the {max_bytes}-byte cap", "max_download_bytes")
        chunks, size = [], 0
        while True:
            if time.monotonic() - started > deadline:
                raise _DownloadRefused(f"the download took longer than the {deadline:g} s deadline ({size} bytes "
                                       "arrived)", "download_deadline")
            chunk = response.read1(_READ_SIZE)
            if not chunk:
                return b"".join(chunks), content_type
            size += len(chunk)
            if size > max_bytes:
                raise _DownloadRefused(f"it sent more than the {max_bytes}-byte cap", "max_download_bytes")
            chunks.append(chunk)


class _DownloadRefused(Exception):
    def __init__(self, reason: str, setting: str):
        super().__init__(reason)
        self.setting = setting


def load_image(
    source,
    timeout: float = DOWNLOAD_TIMEOUT,
    *,
    deadline: float = DOWNLOAD_DEADLINE,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> PIL.Image.Image:
    """Opens a local path, an http(s) URL or a `data:image/...;base64,` URI; raises `ValueError` saying what failed.

    URLs: each network read waits at most `timeout` seconds, the whole download at most `deadline` seconds, and at
    most `max_bytes` bytes are accepted (also the cap on a data URI's decoded size).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    hint = ""
    if source.startswith(("http://", "https://")):
        try:
            data, content_type = _download(source, timeout, deadline, max_bytes)
        except _DownloadRefused as err:
            raise ValueError(
                f"Refused the image at {source!r}: {err}. Download it yourself and pass the file, or raise the image "
                f"processor's `{err.setting}` (or `load_image(..., {err.setting.replace('download_', '')}=...)`)."
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ValueError(
                f"Could not download the image at {source!r} ({err}). Check the URL and your connection, or "
                "download the file and pass its local path."
            ) from err
        if not content_type.startswith("image/"):
            hint = f" (the server sent {content_type!r})"
        name = repr(source)
    elif source.startswith("data:image/"):
        payload = source.split(",", 1)[1] if "," in source else ""
        if len(payload) * 3 // 4 > max_bytes:
            raise ValueError(
                f"Refused a `data:image/...` URI: it holds about {len(payload) * 3 // 4} bytes, over the "
                f"{max_bytes}-byte cap. Send a smaller image, or raise the image processor's `max_download_bytes`."
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise ValueError(
                "Could not decode a `data:image/...;base64,` image: the base64 payload is invalid. Re-encode the "
                "file with `base64.b64encode(open(path, 'rb').read())`."
            ) from err
        name = "in the data URI"
    else:
        if os.path.isdir(source):
            raise ValueError(
                f"Image path {source!r} is a directory, not an image file. Pass the path of a file inside it."
            )
        if not os.path.isfile(source):
            raise ValueError(
                f"Image file {source!r} does not exist. Pass an existing file path, an http(s) URL, or the image "
                "itself (PIL image, numpy array or torch tensor)."
            )
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except OSError as err:
            raise ValueError(f"Could not read the image file {source!r} ({err}). Check its permissions.") from err
        name = repr(source)
    return PIL.ImageOps.exif_transpose(_open_bytes(data, name, hint))


def _tensor_to_array(tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and str(tensor.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
        tensor = tensor.float()  # bfloat16 / float8 have no numpy dtype; float32 holds their values exactly
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"Unsupported image tensor dtype {tensor.dtype}; pass uint8 (0-255) or float (0-1) data."
        ) from err


def _array_to_pil(array: np.ndarray, channels_first: bool) -> PIL.Image.Image:
    """(H, W), (H, W, C) or (C, H, W) array with C in 1, 3, 4 -> PIL image; floats must lie in [0, 1]."""
    if array.size == 0:
        raise ValueError(
            f"The image is empty: it has zero width or height (array shape {array.shape}); pass a non-empty image."
        )
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"An image array of shape {array.shape} has no channel axis of size 1, 3 or 4. Pass (height, width), "
                "(height, width, channels) or (channels, height, width) with 1 (gray), 3 (RGB) or 4 (RGBA) channels."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(
            f"An image array must have 2 or 3 dimensions; got shape {array.shape}. Pass one image at a time "
            "(or a list of images)."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(
                "A float image holds NaN or infinite values; replace them (e.g. `np.nan_to_num(image)`) and pass "
                "values in [0, 1]."
            )
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"A float image must hold values in [0, 1]; this one spans [{low:g}, {high:g}]. Divide 0-255 data by "
                "255, or pass it as uint8."
            )
        if array.dtype == np.float16:
            array = array.astype(np.float32)  # float16 arithmetic would round x * 255 off the right byte
        array = np.round(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if not (0 <= low and high <= 255):
            raise ValueError(
                f"An integer image must hold 8-bit values (0-255); this one spans [{low}, {high}]. Scale it to 0-255 "
                "and pass it as uint8."
            )
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"Unsupported image array dtype {array.dtype}; pass uint8 (0-255) or float (0-1) data.")
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def to_rgb_image(image, background_color=(255, 255, 255), **download) -> PIL.Image.Image:
    """Any supported image input -> an RGB PIL image, ready for the release's resize and crop.

    Transparent images are composited onto `background_color`; palette and bilevel images become RGB before they
    are resized (see the module docstring for why). `download` goes to `load_image` (`timeout`, `deadline`,
    `max_bytes`) for paths and URLs.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, **download)
    elif type(image).__module__.startswith("torch") and hasattr(image, "detach"):
        image = _array_to_pil(_tensor_to_array(image), channels_first=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, channels_first=False)
    elif isinstance(image, PIL.Image.Image):
        filename = getattr(image, "filename", None)
        _decode(image, f"{filename!r} (given as a PIL image)" if filename else "given as a PIL image")
    else:
        raise ValueError(
            f"Unsupported image type {type(image).__name__}. Pass a PIL image, a numpy array, a torch tensor, a local "
            "file path or an http(s) URL."
        )
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"The image has zero width or height ({width}x{height}); pass a non-empty image.")
    if image.mode not in _SUPPORTED_MODES:
        raise ValueError(
            f"Image mode {image.mode!r} is not supported. Convert the image to 8-bit RGB first, e.g. "
            "`image.convert('RGB')`; scale 16-bit or float data to 0-255 before converting."
        )
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = PIL.Image.new("RGBA", image.size, (*tuple(int(c) for c in background_color), 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _is_single_image(item) -> bool:
    if isinstance(item, (str, os.PathLike, PIL.Image.Image)):
        return True
    return hasattr(item, "ndim") and hasattr(item, "shape") and item.ndim in (2, 3)


def _is_image_batch(item) -> bool:
    """A 4-D array or tensor: several images stacked on the first axis."""
    return hasattr(item, "ndim") and hasattr(item, "shape") and item.ndim == 4


# ------------------------------------------------------------------------------------------- image processors
class _InfiMMImageProcessingMixin:
    """What both backends share: the release's settings, input loading and torchvision's crop offsets."""

    resample = PILImageResampling.BICUBIC
    image_mean = CLIP_MEAN
    image_std = CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    default_to_square = False
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    background_color = (255, 255, 255)
    # Image URLs: seconds per network read, seconds for the whole download, bytes accepted (see `load_image`).
    download_timeout = DOWNLOAD_TIMEOUT
    download_deadline = DOWNLOAD_DEADLINE
    max_download_bytes = MAX_DOWNLOAD_BYTES
    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int | None = None, background_color=None, **kwargs):
        if image_size is not None:
            kwargs["size"] = {"shortest_edge": int(image_size)}
            kwargs["crop_size"] = {"height": int(image_size), "width": int(image_size)}
        if background_color is not None:
            if len(background_color) != 3 or not all(0 <= int(c) <= 255 for c in background_color):
                raise ValueError(f"`background_color` must be three 0-255 values (R, G, B); got {background_color!r}.")
            kwargs["background_color"] = tuple(int(c) for c in background_color)
        for name in ("download_timeout", "download_deadline", "max_download_bytes"):
            if name in kwargs and not (isinstance(kwargs[name], (int, float)) and kwargs[name] > 0):
                raise ValueError(f"`{name}` must be a positive number; got {kwargs[name]!r}.")
        super().__init__(**kwargs)

    def to_dict(self):
        """Saved settings; `auto_map["AutoImageProcessor"]` names both backends as a (PIL, torchvision) pair.

        transformers' `custom_object_save` writes only the class being saved, so `AutoImageProcessor` could never
        reach the other one; with the pair, `use_fast=True` / `backend="torchvision"` load
        `InfiMMImageProcessorFast` and `use_fast=False` / `backend="pil"` load `InfiMMImageProcessor`.
        """
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and auto_map.get("AutoImageProcessor"):
            reference = auto_map["AutoImageProcessor"]
            reference = reference[0] if isinstance(reference, (list, tuple)) else reference
            module = reference.rsplit(".", 1)[0]  # e.g. "processing_infimm" or "owner/repo--processing_infimm"
            output["auto_map"] = {
                **auto_map,
                "AutoImageProcessor": [f"{module}.InfiMMImageProcessor", f"{module}.InfiMMImageProcessorFast"],
            }
        return output

    def fetch_images(self, images):
        """Loads paths and URLs and turns every image into RGB PIL (compositing transparency, checking the mode)."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if _is_image_batch(images):
            return [self.fetch_images(image) for image in images]
        return to_rgb_image(images, self.background_color, timeout=float(self.download_timeout),
                            deadline=float(self.download_deadline), max_bytes=int(self.max_download_bytes))

    def center_crop(self, image, size, **kwargs):
        """Crop offsets rounded like torchvision's `CenterCrop` (the release), not floored: 640x427 -> 84, not 83."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


class InfiMMImageProcessor(_InfiMMImageProcessingMixin, PilBackend):
    r"""
    The released InfiMM image preprocessing, exact (PIL backend): pixel values equal the release's torchvision/PIL
    transform within float rounding.

    Args:
        image_size (`int`, *optional*): side of the square the tower takes (336 for `infimm-zephyr`, 224 for the 13B
            presets); sets `size` (shortest edge) and `crop_size`.
        background_color (`tuple[int, int, int]`, *optional*, defaults to white): what transparent areas are
            composited onto.
    """

    _auto_class = "AutoImageProcessor"


class InfiMMImageProcessorFast(_InfiMMImageProcessingMixin, TorchvisionBackend):
    r"""
    Same steps on torch tensors (torchvision resize, batched, runs on GPU with `device=`). Within about 0.03 of the
    exact [`InfiMMImageProcessor`] after normalisation; use it when throughput matters more than bit parity.
    `AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, use_fast=True)` (or `backend="torchvision"`)
    loads this class, `use_fast=False` (or `backend="pil"`) the exact one.
    """

    _auto_class = "AutoImageProcessor"

    def __init__(self, image_size: int | None = None, background_color=None, **kwargs):
        if not is_torchvision_available():
            raise ImportError("InfiMMImageProcessorFast needs torchvision (`pip install torchvision`); "
                              "InfiMMImageProcessor needs only Pillow.")
        super().__init__(image_size=image_size, background_color=background_color, **kwargs)


_IMAGE_PROCESSOR_CLASSES = {klass.__name__: klass for klass in (InfiMMImageProcessor, InfiMMImageProcessorFast)}


def _wants_fast_image_processor(backend, use_fast) -> bool | None:
    """`backend=` / `use_fast=` as transformers' image-processor loaders take them: True, False, or None (unasked)."""
    if backend is not None:
        if backend not in ("pil", "torchvision"):
            raise ValueError(f"`backend` must be 'pil' (exact, InfiMMImageProcessor) or 'torchvision' "
                             f"(InfiMMImageProcessorFast); got {backend!r}.")
        return backend == "torchvision"
    return None if use_fast is None else bool(use_fast)


def _image_processor_from_dict(config: dict, fast: bool | None):
    """The saved image processor settings as an InfiMM image processor: the saved class unless `fast` says which."""
    config = {key: value for key, value in config.items() if key not in ("auto_map", "processor_class")}
    saved = config.pop("image_processor_type", None)
    if fast is None:
        if saved not in (None, *_IMAGE_PROCESSOR_CLASSES):
            raise ValueError(f"The saved image processor is {saved!r}, not an InfiMM one "
                             f"({', '.join(_IMAGE_PROCESSOR_CLASSES)}); pass `image_processor=` to use another.")
        klass = _IMAGE_PROCESSOR_CLASSES.get(saved, InfiMMImageProcessor)
    else:
        klass = InfiMMImageProcessorFast if fast else InfiMMImageProcessor
    return klass.from_dict(config)


# ---------------------------------------------------------------------------------------------- chat templates
# Each template wraps what the model writes after the generation prompt (the reply and its end-of-turn `</s>`) in
# `{% generation %}` ... `{% endgeneration %}`: `apply_chat_template(..., return_assistant_tokens_mask=True)` then
# marks those tokens, which is how TRL's `SFTTrainer(assistant_only_loss=True)` finds them. The markers render
# nothing; the prompts are the release's, character for character. They must sit outside macros: transformers
# measures their position in the top-level output.
_RENDER_CONTENT = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}
{%- for item in content -%}
{%- if item['type'] == 'image' -%}{{ '<|endofchunk|><image>' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] }}
{%- else -%}{{ raise_exception('InfiMM messages hold text and image items only; got type ' ~ item['type']) }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

# Zephyr (HuggingFaceH4/zephyr-7b-beta, as in the release's tokenizer_config.json), with the released chat
# processor's empty system turn when the conversation has none.
ZEPHYR_CHAT_TEMPLATE = _RENDER_CONTENT + r"""{%- if messages[0]['role'] != 'system' -%}
{{ '<|system|>\n' + eos_token + '\n' }}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{{ '<|assistant|>\n' }}{% generation %}{{ render_content(message['content']) + eos_token }}{% endgeneration %}{{ '\n' }}
{%- else -%}
{{ '<|' + message['role'] + '|>\n' + render_content(message['content']) + eos_token + '\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|assistant|>\n' }}
{%- endif -%}
"""

# Vicuna v1.1 ("USER: ... ASSISTANT: ...</s>"), with Vicuna's default system prompt when none is given.
VICUNA_CHAT_TEMPLATE = _RENDER_CONTENT + r"""{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = render_content(messages[0]['content']) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = "A chat between a curious user and an artificial intelligence assistant. "
    ~ "The assistant gives helpful, detailed, and polite answers to the user's questions." -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system_message -%}{{ system_message + ' ' }}{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{{ 'USER: ' + render_content(message['content']) + ' ' }}
{%- elif message['role'] == 'assistant' -%}
{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + render_content(message['content']) + eos_token }}{% endgeneration %}
{%- else -%}
{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use user or assistant after the optional system message') }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""

# Llama-2 chat ("<s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s>"); no system block unless one is given.
LLAMA2_CHAT_TEMPLATE = _RENDER_CONTENT + r"""{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = render_content(messages[0]['content']) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set content = render_content(message['content']) -%}
{%- if loop.first and system_message -%}
{%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + content -%}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}
{%- elif message['role'] == 'assistant' -%}
{% generation %}{{ ' ' + content | trim + ' ' + eos_token }}{% endgeneration %}
{%- else -%}
{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use user or assistant after the optional system message') }}
{%- endif -%}
{%- endfor -%}
"""

CHAT_TEMPLATES = {
    "zephyr": ZEPHYR_CHAT_TEMPLATE,
    "vicuna": VICUNA_CHAT_TEMPLATE,
    "llama2": LLAMA2_CHAT_TEMPLATE,
    "none": None,  # pretrained (non-chat) models: write the Flamingo-layout prompt yourself
}

_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")


class ChatMessageError(TemplateError, ValueError):
    """A conversation the chat templates cannot render (unknown role, content item or missing text).

    A `ValueError`, like every bad input here, and also jinja's `TemplateError`, which is what a chat template's own
    `raise_exception` raises and what tools probing a template catch: TRL's `supports_tool_calling` renders a
    conversation with a `tool` turn and reads a `TemplateError` as "this template has no tool support".
    """


def _normalize_item(item, where: str) -> dict:
    """One content item (transformers' typed dicts, or the release's `{"image": ...}` dicts and bare strings)."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise ChatMessageError(
            f"{where} has a content item of type {type(item).__name__}; use {{'type': 'text', 'text': ...}} or "
            "{'type': 'image', 'image': ...} items."
        )
    kind = item.get("type")
    if kind is None:
        kind = "image" if any(key in item for key in _IMAGE_SOURCE_KEYS) else "text" if "text" in item else None
    if kind == "image_url":  # OpenAI style
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        return {"type": "image", "image": url}
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise ChatMessageError(
                f"{where} has a text item without a `text` string; give it {{'type': 'text', 'text': ...}}."
            )
        return {"type": "text", "text": item["text"]}
    if kind == "image":
        sources = [key for key in _IMAGE_SOURCE_KEYS if item.get(key) is not None]
        if not sources:
            raise ChatMessageError(
                f"{where} has an image item without an image; give it one of the keys {list(_IMAGE_SOURCE_KEYS)}."
            )
        source = item[sources[0]]
        if sources[0] == "base64" and isinstance(source, str) and not source.startswith("data:"):
            source = "data:image/unknown;base64," + source
        return {"type": "image", "image": source}
    raise ChatMessageError(
        f"{where} has a content item of unknown type {kind!r}; InfiMM understands 'text' and 'image' items "
        "(video and audio are not supported)."
    )


def _normalize_conversation(conversation) -> list[dict]:
    """Validated copy of one conversation with every content list in transformers' typed-item form."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ChatMessageError("A conversation must be a non-empty list of {'role': ..., 'content': ...} messages.")
    normalized = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ChatMessageError(
                f"Message {index} is a {type(message).__name__}; messages are dicts with 'role' and 'content'."
            )
        role = message.get("role")
        where = f"Message {index} ({role!r})"
        if role not in ("system", "user", "assistant"):
            raise ChatMessageError(
                f"{where} has an unknown role; InfiMM's chat formats know 'system', 'user' and 'assistant'."
            )
        content = message.get("content")
        if isinstance(content, str):
            normalized.append({**message, "content": content})
            continue
        if isinstance(content, dict):
            content = [content]
        if not content:
            raise ChatMessageError(
                f"{where} has no content. Give it text, e.g. {{'role': '{role}', 'content': [{{'type': 'text', "
                "'text': '...'}]}."
            )
        items = [_normalize_item(item, where) for item in content]
        if not any(item["type"] == "text" for item in items):
            raise ChatMessageError(
                f"{where} has no text. Add a {{'type': 'text', 'text': ...}} item (an empty string is accepted for an "
                "image-only turn)."
            )
        normalized.append({**message, "content": items})
    return normalized


# ----------------------------------------------------------------------------------------------------- processor
class InfiMMProcessorKwargs(ProcessingKwargs, total=False):
    # Left padding lets `generate` continue every row right after its prompt; pass padding_side="right" for training.
    # transformers up to 5.22 reads defaults only from here; later releases also from the processor's `text_kwargs`.
    _defaults = {"text_kwargs": {"padding": "longest", "padding_side": "left"}}


class InfiMMProcessor(ProcessorMixin):
    r"""
    InfiMM's processor: an [`InfiMMImageProcessor`] and the language model's tokenizer.

    `processor(text=..., images=...)` takes text with one `<image>` placeholder per image (Flamingo layout,
    `<image>caption<|endofchunk|>...`), batched; images may be PIL images, numpy arrays, torch tensors, local paths or
    http(s) URLs, given as one flat list (assigned to the placeholders in order) or as one list per text. It returns
    `input_ids`, `attention_mask`, `pixel_values` `(batch, max_images, 3, size, size)` zero-padded and `image_mask`
    `(batch, max_images)`, True for real images: exactly the model's `forward` arguments.

    `apply_chat_template` takes transformers' messages (`{"type": "image", "image": ...}` and `{"type": "text",
    ...}` items) and the release's form (`{"image": path}` dicts mixed with strings).

    Build one for a model with `InfiMMProcessor.from_config(config, tokenizer)`.

    Args:
        image_processor ([`InfiMMImageProcessor`]): image preprocessing.
        tokenizer ([`PreTrainedTokenizerBase`]): the language model's tokenizer; gains `<|endofchunk|>` and `<image>`
            as special tokens if it lacks them, and `pad = eos` if it has no pad token.
        chat_template (`str`, *optional*): Jinja template; defaults to the one of `chat_format`.
        chat_format (`str`, *optional*, defaults to `"zephyr"`): `zephyr`, `vicuna`, `llama2` or `none`.
        image_token_id, eoc_token_id (`int`): ids the model expects for `<image>` and `<|endofchunk|>` (the config's
            `media_token_id` and `eoc_token_id`).
    """

    _auto_class = "AutoProcessor"
    valid_processor_kwargs = InfiMMProcessorKwargs
    text_kwargs = InfiMMProcessorKwargs._defaults["text_kwargs"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        chat_format: str = "zephyr",
        image_token: str = IMAGE_TOKEN,
        image_token_id: int = 32001,
        eoc_token: str = EOC_TOKEN,
        eoc_token_id: int = 32000,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError(
                "InfiMMProcessor needs an image processor and a tokenizer; for a model config use "
                "`InfiMMProcessor.from_config(config, tokenizer)`."
            )
        if chat_format not in CHAT_TEMPLATES:
            raise ValueError(f"`chat_format` must be one of {sorted(CHAT_TEMPLATES)}; got {chat_format!r}.")
        if chat_template is None:
            chat_template = CHAT_TEMPLATES[chat_format]
        self.chat_format = chat_format
        self.image_token = image_token
        self.image_token_id = int(image_token_id)
        self.eoc_token = eoc_token
        self.eoc_token_id = int(eoc_token_id)
        self._prepare_tokenizer(tokenizer)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def _prepare_tokenizer(self, tokenizer):
        """Adds `<|endofchunk|>` / `<image>` when missing, checks their ids, and makes the tokenizer save faithfully."""
        wanted = sorted([(self.eoc_token_id, self.eoc_token), (self.image_token_id, self.image_token)])
        vocab = tokenizer.get_vocab()
        missing = [token for _, token in wanted if token not in vocab]
        if missing:
            new_tokens = [AddedToken(token, special=True, normalized=False) for token in missing]
            tokenizer.add_tokens(new_tokens, special_tokens=True)
        for token_id, token in wanted:
            actual = tokenizer.convert_tokens_to_ids(token)
            if actual != token_id:
                raise ValueError(
                    f"The tokenizer maps {token!r} to id {actual}, but the model expects {token_id}. Use the tokenizer "
                    "the model was trained with (its vocabulary has 32000 entries before the two InfiMM tokens), or "
                    "set the config's `media_token_id` / `eoc_token_id` to the tokenizer's ids."
                )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # the release pads with </s>
        # transformers 5's LlamaTokenizer takes `legacy` as a named argument and does not write it back when saved;
        # reloaded without it, the tokenizer drops the prefix space after special tokens and the release's ids change.
        if getattr(tokenizer, "legacy", None) is not None and "legacy" not in tokenizer.init_kwargs:
            tokenizer.init_kwargs["legacy"] = tokenizer.legacy

    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None, **kwargs) -> "InfiMMProcessor":
        """The processor matching a model config: the tower's image size, the config's token ids and chat format.

        The tokenizer's `model_max_length` is capped at the language model's `max_position_embeddings`.
        """
        if image_processor is None:
            image_processor = InfiMMImageProcessor(image_size=config.image_size)
        max_positions = getattr(config.text_config, "max_position_embeddings", None)
        if max_positions and tokenizer.model_max_length > max_positions:
            tokenizer.model_max_length = max_positions
        kwargs.setdefault("chat_format", getattr(config, "chat_format", "zephyr"))
        kwargs.setdefault("image_token_id", config.media_token_id)
        kwargs.setdefault("eoc_token_id", config.eoc_token_id)
        return cls(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "InfiMMProcessor":
        """Loads a saved processor with this module's classes: never through the Auto classes, so the installed
        package loads a folder without `trust_remote_code`, and the image processor is the one the folder names.

        The image processor is the class saved in the folder (`InfiMMImageProcessor`, the exact one, unless the
        processor was saved with the fast one); `use_fast=True` / `backend="torchvision"` ask for
        `InfiMMImageProcessorFast` and `use_fast=False` / `backend="pil"` for the exact class. transformers' own
        loaders changed how they resolve sub-processors and which backend they prefer between releases (5.25 builds
        the fast class when neither is asked for), so this choice is made here, the same on every release.
        Hub arguments (`revision`, `token`, `cache_dir`, ...) apply to every file; the processor's own arguments
        (`chat_format`, `chat_template`, token ids) override the saved ones; anything else goes to the tokenizer.
        """
        kwargs.pop("return_unused_kwargs", None)
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        if "trust_remote_code" in kwargs:
            hub_kwargs["trust_remote_code"] = kwargs.pop("trust_remote_code")
        fast = _wants_fast_image_processor(kwargs.pop("backend", None), kwargs.pop("use_fast", None))
        image_processor = kwargs.pop("image_processor", None)
        tokenizer = kwargs.pop("tokenizer", None)
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer"}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in init_names}

        lookup = {key: value for key, value in hub_kwargs.items() if key != "trust_remote_code"}
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **lookup)
        if image_processor is None:
            image_config = processor_dict.get("image_processor")
            if not isinstance(image_config, dict):  # older layout: the image processor in preprocessor_config.json
                image_config, _ = InfiMMImageProcessor.get_image_processor_dict(pretrained_model_name_or_path, **lookup)
            image_processor = _image_processor_from_dict(image_config, fast)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs, **kwargs)
        init_kwargs = {key: value for key, value in processor_dict.items() if key in init_names}
        init_kwargs.update(overrides)
        return cls(image_processor, tokenizer, **init_kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_mask"]

    # ------------------------------------------------------------------------------------------------- call
    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenizes `text` and preprocesses `images`; see the class docstring for the accepted forms.

        `videos`, `audio` and `audios` may be given empty (or None), as generic evaluation harnesses pass every
        modality (lmms-eval's `huggingface` model sends `videos=[]`, `audios=[]`); anything in them is refused.
        A text that starts with `<s>` (the Llama-2 template writes it) gets no second one, unless
        `add_special_tokens` is given.
        """
        media = {"videos": videos, "audio": audio, "audios": kwargs.pop("audios", None)}
        for name, value in media.items():
            if not _is_empty_media(value):
                raise ValueError(
                    f"InfiMM takes images and text only; `{name}` is not empty. Remove it (None or an empty list is "
                    "accepted), or pass video frames as images, one `<image>` placeholder each."
                )
        if text is None:
            raise ValueError(
                "InfiMM needs `text` with one `<image>` placeholder per image, e.g. text='<image>A photo of'. For "
                "chat messages use `processor.apply_chat_template(messages, ...)`."
            )
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings.")

        output_kwargs = self._merge_kwargs(
            InfiMMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
            text_kwargs.pop(key, None)
        bos = self.tokenizer.bos_token
        explicit = "add_special_tokens" in kwargs or "add_special_tokens" in (kwargs.get("text_kwargs") or {})
        if not explicit and bos and all(sample.startswith(bos) for sample in texts):
            text_kwargs["add_special_tokens"] = False  # the text carries its own `<s>`

        per_sample = self._assign_images(images, texts)
        data = dict(self.tokenizer(texts, **text_kwargs))
        self._check_tokens(data, [len(sample) for sample in per_sample], text_kwargs)
        data.update(self._pixel_slots(per_sample, images_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _assign_images(self, images, texts: list[str]) -> list[list]:
        """One list of images per text, checked against that text's `<image>` placeholders."""
        counts = [sample.count(self.image_token) for sample in texts]
        if images is None:
            if any(counts):
                raise ValueError(
                    f"The text has {sum(counts)} `<image>` placeholder(s) (per text: {counts}) but no images were "
                    "given. Pass `images=` with one image per `<image>`, or remove the placeholders."
                )
            return [[] for _ in texts]
        if _is_single_image(images):
            flat = [images]
        elif _is_image_batch(images):
            flat = list(images)
        elif isinstance(images, (list, tuple)):
            nested = [isinstance(item, (list, tuple)) or _is_image_batch(item) for item in images]
            if any(nested):
                if not all(nested):
                    raise ValueError(
                        "`images` mixes single images and lists of images. Pass either one flat list (assigned to the "
                        "`<image>` placeholders in order) or one list of images per text."
                    )
                if len(images) != len(texts):
                    raise ValueError(
                        f"`images` holds {len(images)} lists but there are {len(texts)} texts; pass one list of images "
                        "per text (an empty list for a text without images)."
                    )
                per_sample = [list(item) for item in images]
                for index, (sample, count) in enumerate(zip(per_sample, counts)):
                    if len(sample) != count:
                        raise ValueError(
                            f"Text {index} has {count} `<image>` placeholder(s) but {len(sample)} image(s) were given "
                            "for it. Put exactly one `<image>` in the text for each image, in the order of the images."
                        )
                return per_sample
            flat = list(images)
        else:
            raise ValueError(
                f"Unsupported `images` of type {type(images).__name__}. Pass an image (PIL, numpy, torch, path or "
                "URL), a list of images, or one list of images per text."
            )
        if len(flat) != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} `<image>` placeholder(s) (per text: {counts}) but {len(flat)} image(s) "
                "were given. Put exactly one `<image>` in the text for each image, in the order of the images."
            )
        per_sample, start = [], 0
        for count in counts:
            per_sample.append(flat[start : start + count])
            start += count
        return per_sample

    def _check_tokens(self, data: dict, num_images: list[int], text_kwargs: dict):
        """Every image keeps its `<image>` token, and no sample is longer than the model takes."""
        truncation = text_kwargs.get("truncation") not in (None, False, "do_not_truncate")
        max_length = self.tokenizer.model_max_length
        limit_known = max_length is not None and max_length < 10**12
        for index, ids in enumerate(data["input_ids"]):
            ids = list(ids)
            found = ids.count(self.image_token_id)
            if found != num_images[index]:
                if truncation:
                    raise ValueError(
                        f"Truncating text {index} to {text_kwargs.get('max_length') or max_length} tokens would cut "
                        f"{num_images[index] - found} of its {num_images[index]} `<image>` tokens off from their "
                        "images. "
                        "Raise `max_length`, shorten the text, or pass fewer images (with truncation on the "
                        f"{self.tokenizer.truncation_side}, the chunks on that side go first)."
                    )
                raise ValueError(
                    f"Text {index} has {num_images[index]} `<image>` placeholder(s) but the tokenizer produced {found} "
                    f"`<image>` tokens (id {self.image_token_id}); the tokenizer must treat {self.image_token!r} as a "
                    "special token."
                )
            if not truncation and limit_known:
                length = int(sum(data["attention_mask"][index])) if "attention_mask" in data else len(ids)
                if length > max_length:
                    raise ValueError(
                        f"Text {index} is {length} tokens long but the model takes at most {max_length} "
                        "(`tokenizer.model_max_length`). Shorten it, or pass `truncation=True` (with `max_length`) "
                        "to drop text from the tokenizer's truncation side; an error is raised instead if an `<image>` "
                        "token would be cut."
                    )

    def _pixel_slots(self, per_sample: list[list], images_kwargs: dict) -> dict:
        """`pixel_values` (batch, max_images, 3, H, W) zero-padded and `image_mask` (batch, max_images)."""
        max_images = max(len(sample) for sample in per_sample)
        if max_images == 0:
            return {}
        prepared = []
        for index, sample in enumerate(per_sample):
            for position, image in enumerate(sample):
                try:
                    prepared.append(self.image_processor.fetch_images(image))
                except ValueError as err:
                    raise ValueError(f"Image {position} of text {index}: {err}") from err
        pixels = self.image_processor(prepared, **images_kwargs)["pixel_values"]
        pixels = [pixel.detach().cpu().numpy() if hasattr(pixel, "detach") else np.asarray(pixel) for pixel in pixels]
        pixel_values = np.zeros((len(per_sample), max_images, *pixels[0].shape), dtype=np.float32)
        image_mask = np.zeros((len(per_sample), max_images), dtype=bool)
        flat_index = 0
        for index, sample in enumerate(per_sample):
            for position in range(len(sample)):
                pixel_values[index, position] = pixels[flat_index]
                image_mask[index, position] = True
                flat_index += 1
        return {"pixel_values": pixel_values, "image_mask": image_mask}

    # -------------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `apply_chat_template`, after checking the messages and accepting the release's form.

        `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt")` gives the model inputs; a list of conversations gives a padded batch.

        Tokenized prompts start with exactly one `<s>`, the template's (Llama-2) or the tokenizer's (Zephyr, Vicuna),
        whatever `add_special_tokens` says: TRL's vision collator passes `add_special_tokens=False` on the assumption
        that every template writes `<s>`, which would leave Zephyr and Vicuna prompts without the one they were
        trained with. With `return_assistant_tokens_mask=True`, the `assistant_masks` cover each reply and its
        `</s>` (the templates' `{% generation %}` blocks) but never an `<|endofchunk|><image>` marker.
        """
        if chat_template is None and self.chat_template is None:
            raise ValueError(
                "This processor has no chat template (chat_format 'none'). Write the prompt yourself with `<image>` "
                "placeholders and call the processor, or pass `chat_template=` / build it with another chat_format."
            )
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            conversation = [_normalize_conversation(conv) for conv in conversation]
        elif hasattr(conversation, "messages"):  # the pipeline's Chat wrapper
            conversation = _normalize_conversation(conversation.messages)
        else:
            conversation = _normalize_conversation(conversation)
        if kwargs.get("processor_kwargs"):
            processor_kwargs = dict(kwargs["processor_kwargs"])
            processor_kwargs.pop("add_special_tokens", None)
            kwargs["processor_kwargs"] = processor_kwargs
        kwargs.pop("add_special_tokens", None)
        out = super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if kwargs.get("return_assistant_tokens_mask") and isinstance(out, BatchFeature) and "assistant_masks" in out:
            out["assistant_masks"] = self._unmask_image_markers(out["input_ids"], out["assistant_masks"])
        return out

    def _unmask_image_markers(self, input_ids, masks):
        """An image inside an assistant turn is input, not something the model writes: its tokens leave the mask."""
        markers = (self.image_token_id, self.eoc_token_id)
        if hasattr(masks, "masked_fill"):  # torch
            is_marker = (input_ids == markers[0]) | (input_ids == markers[1])
            return masks.masked_fill(is_marker, 0)
        if isinstance(masks, np.ndarray):
            return np.where(np.isin(input_ids, markers), 0, masks)
        return [[0 if token in markers else flag for token, flag in zip(ids, row)]
                for ids, row in zip(input_ids, masks)]

    # ------------------------------------------------------------------------------------------------ decode
    def batch_decode(self, sequences, skip_special_tokens: bool = True, input_ids=None, **kwargs) -> list[str]:
        """Decodes generated sequences; with `input_ids` (the prompt given to `generate`) only the new tokens."""
        if input_ids is not None:
            prompt_length = input_ids if isinstance(input_ids, int) else len(input_ids[0])
            sequences = [list(sequence)[prompt_length:] for sequence in sequences]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens: bool = True, input_ids=None, **kwargs
    ):
        """Text of `generate`'s output without special tokens (and without the prompt when `input_ids` is given).

        A batch gives a list of strings, one sequence a string.
        """
        if _is_flat_sequence(generated_outputs):
            if input_ids is not None and _is_flat_sequence(input_ids):
                input_ids = [input_ids]
            return self.batch_decode([generated_outputs], skip_special_tokens, input_ids, **kwargs)[0]
        return self.batch_decode(generated_outputs, skip_special_tokens, input_ids, **kwargs)


def _is_empty_media(value) -> bool:
    """None or (nested) empty lists: how callers that pass every modality say "no videos / no audio"."""
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_empty_media(item) for item in value)
    return False


def _is_flat_sequence(ids) -> bool:
    """One sequence of token ids (1-D tensor/array or a list of ints), as opposed to a batch."""
    if hasattr(ids, "ndim"):
        return ids.ndim == 1
    return isinstance(ids, (list, tuple)) and bool(ids) and not isinstance(ids[0], (list, tuple)) and not hasattr(
        ids[0], "ndim"
    )


__all__ = [
    "InfiMMImageProcessor",
    "InfiMMImageProcessorFast",
    "InfiMMProcessor",
    "CHAT_TEMPLATES",
    "ChatMessageError",
    "load_image",
    "DOWNLOAD_TIMEOUT",
    "DOWNLOAD_DEADLINE",
    "MAX_DOWNLOAD_BYTES",
    "to_rgb_image",
]
