"""InfiMM image processing: any image input in, the released preprocessing's pixel values out.

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

`InfiMMImageProcessor` (PIL) is exact; `InfiMMImageProcessorFast` (torchvision) is within 0.035 of it.

Which image sources are opened at all is the process-wide `ImageSourcePolicy` (`set_image_source_policy`). Library
users get everything documented (paths, http(s) URLs, data URIs); a server taking images from clients it does not
trust sets a stricter one (`infimm serve` does: data URIs and http(s) URLs of image content types only).
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import base64
import binascii
import dataclasses
import io
import os
import time
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps

from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import PILImageResampling
from transformers.utils import is_torchvision_available

from .configuration_infimm import CLIP_MEAN, CLIP_STD


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


# ------------------------------------------------------------------------------------------------ image sources
@dataclasses.dataclass(frozen=True)
class ImageSourcePolicy:
    """Which image sources `load_image` opens, for the whole process. The default opens everything the library
    documents, as it always has; code that passes on image references from people it does not trust (a server)
    sets a stricter policy once, at startup, with `set_image_source_policy`, before any image is read.

    - `local_files`: paths on this machine (and anything that is neither an http(s) URL nor a `data:image/` URI,
      `file:` URLs included). Off, they are refused before the file system is touched.
    - `urls`: http(s) URLs, downloaded within the image processor's `download_timeout`, `download_deadline` and
      `max_download_bytes`. Data URIs are always accepted (bounded by `max_download_bytes`).
    - `image_content_types_only`: refuse a download whose `Content-Type` is not `image/*`, before its body is read
      (by default the content type only explains why Pillow could not read the data).
    - `advice`: what a refusal tells the reader to change, by the setting that refused: "local_files", "urls",
      "image_content_types_only", "max_download_bytes", "download_deadline", "max_image_pixels". A server names its
      own flags there; without an entry, the message names the library setting.

    Pixel counts are Pillow's: `PIL.Image.MAX_IMAGE_PIXELS` (a warning past it, an error past twice it). A server
    that wants every image past it refused makes the warning an error
    (`warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)`); both are refused with a `ValueError`.
    """

    local_files: bool = True
    urls: bool = True
    image_content_types_only: bool = False
    advice: dict = dataclasses.field(default_factory=dict)


_image_source_policy = ImageSourcePolicy()


def image_source_policy() -> ImageSourcePolicy:
    """The image source policy in effect in this process."""
    return _image_source_policy


def set_image_source_policy(policy: ImageSourcePolicy) -> ImageSourcePolicy:
    """Makes `policy` the process's image source policy; returns the previous one (to restore it)."""
    global _image_source_policy
    if not isinstance(policy, ImageSourcePolicy):
        raise ValueError(f"Pass an `ImageSourcePolicy`; got {type(policy).__name__}.")
    previous, _image_source_policy = _image_source_policy, policy
    return previous


def _advice(setting: str, default: str) -> str:
    """How a refusal by `setting` can be lifted: the policy's advice if it has some, else `default`."""
    return _image_source_policy.advice.get(setting) or default


def _short(source: str, limit: int = 80) -> str:
    """`source` quoted for a message, cut to `limit` characters (it came from someone else and may be huge)."""
    return repr(source if len(source) <= limit else source[:limit] + "...")


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
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
        # The warning arrives here only where the process turned it into an error (see `ImageSourcePolicy`).
        fix = _advice("max_image_pixels",
                      "Downscale it first; if you trust the file, raise `PIL.Image.MAX_IMAGE_PIXELS`.")
        raise ValueError(
            f"Refused the image {name}: it declares more pixels than Pillow's limit of {PIL.Image.MAX_IMAGE_PIXELS} "
            f"allows (a decompression bomb, or a huge scan): {err}. {fix}"
        ) from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"Could not read the image {name}: Pillow does not recognise it as an image{hint} ({err}). Check that it "
            "is a picture file, or re-save it (e.g. as PNG or JPEG)."
        ) from err
    return _decode(image, name)


def _download(url: str, timeout: float, deadline: float, max_bytes: int,
              image_types_only: bool = False) -> tuple[bytes, str]:
    """The body and content type of `url`, read in chunks so that the whole download, not only each read, has a
    deadline and a size cap: a server that trickles bytes or never stops is cut off with a `ValueError`.
    With `image_types_only`, a content type other than `image/*` is refused before the body is read.

    The deadline is checked between reads and one read waits at most `timeout`, so a call returns within
    `deadline + timeout` seconds.
    """
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        content_type = response.headers.get_content_type()
        if image_types_only and not content_type.startswith("image/"):
            raise _DownloadRefused(f"the server sent it as {content_type!r}, not as an image (image/*)",
                                   "image_content_types_only")
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
    most `max_bytes` bytes are accepted (also the cap on a data URI's decoded size). The process's
    `ImageSourcePolicy` may refuse local paths, URLs or non-image content types first.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    policy = _image_source_policy
    hint = ""
    if source.startswith(("http://", "https://")):
        if not policy.urls:
            raise ValueError(
                f"Refused the image at {_short(source)}: image URLs are not accepted here. "
                + _advice("urls", "Pass the image itself, or allow URLs in the `ImageSourcePolicy`.")
            )
        try:
            data, content_type = _download(source, timeout, deadline, max_bytes, policy.image_content_types_only)
        except _DownloadRefused as err:
            if err.setting == "image_content_types_only":
                default = "Pass a URL that serves an image, or allow other types in the `ImageSourcePolicy`."
            else:
                default = (f"Download it yourself and pass the file, or raise the image processor's `{err.setting}` "
                           f"(or `load_image(..., {err.setting.replace('download_', '')}=...)`).")
            raise ValueError(f"Refused the image at {source!r}: {err}. {_advice(err.setting, default)}") from None
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
            fix = _advice("max_download_bytes", "Send a smaller image, or raise the image processor's "
                                                "`max_download_bytes`.")
            raise ValueError(
                f"Refused a `data:image/...` URI: it holds about {len(payload) * 3 // 4} bytes, over the "
                f"{max_bytes}-byte cap. {fix}"
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
        if not policy.local_files:
            # Before any file-system call: a refused path must not tell its sender whether it exists.
            raise ValueError(
                f"Refused the image {_short(source)}: local paths and `file:` URLs are not accepted here, only "
                "`data:image/...;base64,` URIs and http(s) URLs. "
                + _advice("local_files", "Pass the image itself, or allow local files in the `ImageSourcePolicy`.")
            )
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


def is_single_image(item) -> bool:
    if isinstance(item, (str, os.PathLike, PIL.Image.Image)):
        return True
    return hasattr(item, "ndim") and hasattr(item, "shape") and item.ndim in (2, 3)


def is_image_batch(item) -> bool:
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
        if is_image_batch(images):
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


def pad_image_slots(pixels, counts: list[int]) -> dict:
    """The model's image layout from the pixels of a batch's images: `pixels` `(sum(counts), 3, H, W)` (numpy array
    or torch tensor), `counts` the number of images of each sample, in order. Returns `pixel_values`
    `(batch, max(counts), 3, H, W)` with all-zero slots after a sample's images and `image_mask` `(batch,
    max(counts))` True for real images, in the library of `pixels`; {} when no sample has an image.

    The one place that lays images into slots: the processor, the training collator and the batching pipeline use it.
    """
    slots = max(counts, default=0)
    if slots == 0:
        return {}
    if len(pixels) != sum(counts):
        raise ValueError(f"{len(pixels)} images for samples holding {sum(counts)} ({counts}).")
    shape = (len(counts), slots, *pixels.shape[1:])
    if isinstance(pixels, np.ndarray):
        pixel_values, image_mask = np.zeros(shape, dtype=pixels.dtype), np.zeros(shape[:2], dtype=bool)
    else:
        pixel_values = pixels.new_zeros(shape)
        image_mask = pixels.new_zeros(shape[:2], dtype=bool)
    start = 0
    for row, count in enumerate(counts):
        pixel_values[row, :count] = pixels[start : start + count]
        image_mask[row, :count] = True
        start += count
    return {"pixel_values": pixel_values, "image_mask": image_mask}


_IMAGE_PROCESSOR_CLASSES = {klass.__name__: klass for klass in (InfiMMImageProcessor, InfiMMImageProcessorFast)}


def wants_fast_image_processor(backend, use_fast) -> bool | None:
    """`backend=` / `use_fast=` as transformers' image-processor loaders take them: True, False, or None (unasked)."""
    if backend is not None:
        if backend not in ("pil", "torchvision"):
            raise ValueError(f"`backend` must be 'pil' (exact, InfiMMImageProcessor) or 'torchvision' "
                             f"(InfiMMImageProcessorFast); got {backend!r}.")
        return backend == "torchvision"
    return None if use_fast is None else bool(use_fast)


def image_processor_from_dict(config: dict, fast: bool | None):
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


__all__ = [
    "ImageSourcePolicy",
    "InfiMMImageProcessor",
    "InfiMMImageProcessorFast",
    "image_source_policy",
    "set_image_source_policy",
    "load_image",
    "pad_image_slots",
    "to_rgb_image",
    "DOWNLOAD_TIMEOUT",
    "DOWNLOAD_DEADLINE",
    "MAX_DOWNLOAD_BYTES",
]
