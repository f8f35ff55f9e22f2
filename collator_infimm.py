"""Training batches for InfiMM: examples in, `input_ids`, `attention_mask`, `pixel_values`, `image_mask`, `labels` out.

Three kinds of example are recognised by their keys:

- chat: `{"messages": [...]}` in transformers' convention (`{"type": "image", "image": ...}` and
  `{"type": "text", "text": ...}` items; the release's `{"image": ...}` items are accepted too), or in TRL's vision
  layout: `{"type": "image"}` placeholders in the messages and the images, in order, in an `images` column. The
  prompt is the processor's chat template; the loss covers the assistant turns only (their text and the
  end-of-turn token).
- interleaved document: `{"text": "<image>caption<|endofchunk|><image>...", "images": [...]}`, the Flamingo
  pretraining layout. The loss covers every token after the first `<image>`, except `<image>` tokens.
- image-caption pair: `{"image": ..., "caption": "..."}`, written as `<image>caption<|endofchunk|>`.

Images may be paths (relative ones are resolved against `image_root`), URLs, PIL images, arrays or tensors.

Every problem with an example (wrong types, missing keys, a missing, unreadable or damaged image, a count of `<image>`
tokens that differs from the count of images) raises a `ValueError` (an `OSError` for a file that cannot be read)
that says what is wrong and how to fix it. `check_example` runs the same encoding and image loading as a batch
without building one, so a dataset can be checked before training (`training_infimm.validate_dataset`).

Choices that keep each `<image>` token with its image:

- at most `max_images` images per sample (6 in the InfiMM recipe). With `image_overflow="truncate"` (default) the
  sample is cut right before its first surplus `<image>` token (in a chat, before that image's `<|endofchunk|><image>`
  marker), so the first `max_images` images and the text they govern are kept; `"error"` raises instead.
- `max_length` truncates on `truncation_side` (right by default: the first images and the text around them are
  kept); images whose `<image>` token is cut off are dropped with it. After a left truncation the tokens before the
  first remaining `<image>` of an interleaved document lose their labels, as at the start of any document.
- padding to the longest sample (optionally to a multiple of `pad_to_multiple_of`) on `padding_side` (right by
  default). Padding is recognised by position, never by id: the pad token is `</s>`, which is also a real
  end-of-turn token that carries loss in chats.
"""

import os
from dataclasses import dataclass, field

import torch

from transformers.utils import logging

from .image_processing_infimm import pad_image_slots
from .processing_infimm import conversation_images, image_source, item_kind, message_items


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

@dataclass
class EncodedExample:
    """One example before padding: token ids, labels (`-100` = no loss) and its images in `<image>` order."""

    input_ids: list[int]
    labels: list[int]
    images: list = field(default_factory=list)


def _is_placeholder(item) -> bool:
    """TRL's `{"type": "image"}` without a picture: it takes the next of the row's `images`."""
    return isinstance(item, dict) and item.get("type") == "image" and image_source(item) is None


def fill_image_placeholders(messages, images):
    """TRL's vision layout -> self-contained messages: `{"type": "image"}` items without a source take the row's
    `images`, in order.

    As in TRL's `prepare_multimodal_messages`, a conversation without any image item whose first user message is a
    plain string gets the images in front of that text. Items that carry their own image are left alone.
    """
    if images is None:
        return messages
    images = _as_image_list(images, "images")
    if not isinstance(messages, (list, tuple)):
        return messages  # `_encode_chat` explains what a conversation must be

    placeholders = sum(1 for message in messages for item in message_items(message) if _is_placeholder(item))
    if placeholders == 0 and images:
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        has_image_items = any(isinstance(item, dict) and item_kind(item) == "image"
                              for message in messages for item in message_items(message))
        if first_user is not None and isinstance(first_user.get("content"), str) and not has_image_items:
            index = messages.index(first_user)
            content = [*({"type": "image"} for _ in images), {"type": "text", "text": first_user["content"]}]
            messages = [*messages[:index], {**first_user, "content": content}, *messages[index + 1 :]]
            placeholders = len(images)
    if placeholders != len(images):
        raise ValueError(
            f"The conversation has {placeholders} image placeholder(s) (`{{'type': 'image'}}` items without an image) "
            f"but its `images` holds {len(images)}. Give one placeholder per image, in the order of `images`."
        )
    remaining = iter(images)
    filled = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, dict):
            content = [content]
        if isinstance(content, (list, tuple)):
            content = [{**item, "image": next(remaining)} if _is_placeholder(item) else item for item in content]
            message = {**message, "content": content}
        filled.append(message)
    return filled


def _as_image_list(value, key: str) -> list:
    """A column of images as a list: a list or tuple, or a 4-D array / tensor of stacked images.

    Anything else is refused rather than iterated: a string would become one image per character, a dict its keys.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if getattr(value, "ndim", None) == 4:
        return list(value)
    raise ValueError(
        f"`{key}` must be a list of images (paths, URLs, PIL images, arrays or tensors); got "
        f"{type(value).__name__}. Wrap a single image in a list, or give it as `image`."
    )


def _image_list(example: dict, key: str) -> list | None:
    value = example.get(key)
    return None if value is None else _as_image_list(value, key)


def _text_field(example: dict, key: str) -> str:
    value = example[key]
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be a string; got {type(value).__name__}. Give the text as a string.")
    return value


def _check_contents(messages) -> None:
    """Message contents the chat template can iterate (the processor checks roles, item types and texts)."""
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, (str, dict, list, tuple)):
            raise ValueError(
                f"Message {index} has content of type {type(content).__name__}. Give a string, or a list of "
                "{'type': 'text', 'text': ...} and {'type': 'image', 'image': ...} items."
            )


class InfiMMDataCollator:
    r"""
    Turns chat examples, interleaved documents and image-caption pairs into a padded InfiMM training batch.

    Args:
        processor ([`InfiMMProcessor`]): gives the tokenizer, the image processor, the chat template and the
            `<image>` / `<|endofchunk|>` ids.
        max_length (`int`, *optional*): longest sample in tokens; `None` keeps every sample whole.
        max_images (`int`, *optional*, defaults to 6): most images per sample; `None` for no limit.
        image_overflow (`str`, *optional*, defaults to `"truncate"`): past `max_images`, `"truncate"` cuts the sample
            before its first surplus `<image>`; `"error"` raises a `ValueError`.
        truncation_side (`str`, *optional*, defaults to `"right"`): which end `max_length` cuts.
        padding_side (`str`, *optional*, defaults to `"right"`): where padding goes.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
        image_root (`str`, *optional*): folder that relative image paths are resolved against.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        max_images: int | None = 6,
        image_overflow: str = "truncate",
        truncation_side: str = "right",
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        image_root: str | os.PathLike | None = None,
    ):
        if image_overflow not in ("truncate", "error"):
            raise ValueError(f"`image_overflow` must be 'truncate' or 'error'; got {image_overflow!r}.")
        for name, value in (("truncation_side", truncation_side), ("padding_side", padding_side)):
            if value not in ("left", "right"):
                raise ValueError(f"`{name}` must be 'left' or 'right'; got {value!r}.")
        if max_images is not None and max_images < 1:
            raise ValueError(f"`max_images` must be at least 1 (or None for no limit); got {max_images}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 tokens (or None); got {max_length}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = int(processor.image_token_id)
        self.eoc_token_id = int(processor.eoc_token_id)
        self.image_token = processor.image_token
        self.eoc_token = processor.eoc_token
        self.max_length = max_length
        self.max_images = max_images
        self.image_overflow = image_overflow
        self.truncation_side = truncation_side
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_root = os.fspath(image_root) if image_root is not None else None
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad_id if pad_id is not None else self.tokenizer.eos_token_id)

    # --------------------------------------------------------------------------------------------- batching
    def __call__(self, examples) -> dict[str, torch.Tensor]:
        encoded = [self.encode(example) for example in examples]
        longest = max(len(sample.input_ids) for sample in encoded)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(encoded)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, sample in enumerate(encoded):
            n = len(sample.input_ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
            attention_mask[row, cols] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(self._pixel_batch([sample.images for sample in encoded]))
        return batch

    def _pixel_batch(self, per_sample: list[list]) -> dict[str, torch.Tensor]:
        """`pixel_values` (batch, max_images, 3, H, W), zero slots for missing images, and `image_mask`; {} if none."""
        max_images = max(len(images) for images in per_sample)
        if max_images == 0:
            return {}
        flat = [self._load_image(image) for images in per_sample for image in images]
        pixels = self.image_processor(flat, return_tensors="pt")["pixel_values"]
        return pad_image_slots(pixels, [len(images) for images in per_sample])

    def _load_image(self, image):
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, (list, tuple)) or getattr(image, "ndim", None) == 4:
            # The image processor would take it as several images, which no longer line up with the `<image>` tokens.
            raise ValueError(
                f"An image reference is a {type(image).__name__} of several images, not one image. Give each image as "
                "one path, URL, PIL image, or 2-D/3-D array or tensor, and list several of them in `images`."
            )
        if isinstance(image, str) and not image.startswith(("http://", "https://", "data:image/")):
            return self._load_local_image(image)
        return self.image_processor.fetch_images(image)

    def _load_local_image(self, image: str):
        """A path from the data, relative ones under `image_root`; the image processor's errors (missing file,
        directory, damaged image) then also say which path the data gave and where it was looked for."""
        if not image.strip():
            raise ValueError("An image path is empty. Give the image's file name (or drop the image and its `<image>`).")
        if self.image_root is None or os.path.isabs(image):
            return self.image_processor.fetch_images(image)
        try:
            return self.image_processor.fetch_images(os.path.join(self.image_root, image))
        except ValueError as err:
            raise ValueError(
                f"{err} (The data gives the image as {image!r}; relative paths are read from `image_root`, "
                f"{self.image_root!r}.)"
            ) from err

    # --------------------------------------------------------------------------------------------- one example
    def encode(self, example: dict) -> EncodedExample:
        """Tokens, labels and images of one example, after the image cap and truncation (not padded)."""
        if not isinstance(example, dict):
            raise ValueError(f"An example must be a dict; got {type(example).__name__}.")
        # A key holding None counts as absent: a `datasets.Dataset` of mixed kinds gives every row every column.
        keys = {key for key, value in example.items() if value is not None}
        if "messages" in keys:
            images = _image_list(example, "images")
            if images is None and "image" in keys:
                images = [example["image"]]
            messages = fill_image_placeholders(example["messages"], images)
            sample, is_chat = self._encode_chat(messages), True
        elif "caption" in keys and "image" in keys:
            caption = _text_field(example, "caption")
            text = f"{self.image_token}{caption}{self.eoc_token}"
            sample, is_chat = self._encode_document(text, [example["image"]]), False
        elif "text" in keys:
            images = _image_list(example, "images")
            if images is None:
                images = [example["image"]] if "image" in keys else []
            sample, is_chat = self._encode_document(_text_field(example, "text"), images), False
        else:
            raise ValueError(
                f"Cannot tell what kind of example has the keys {sorted(map(str, keys))} (keys holding None do not "
                "count). Give `messages` (a chat), `text` with `images` (an interleaved document with one `<image>` "
                "per image) or `image` with `caption`."
            )
        sample = self._cap_images(sample, is_chat)
        sample = self._truncate(sample)
        if not is_chat:
            sample.labels = self._document_labels(sample.input_ids)
        if all(label == IGNORE_INDEX for label in sample.labels):
            logger.warning_once(
                "A training sample has no token that carries loss (no assistant turn, no text after its first image, "
                "or everything was truncated away); it contributes nothing to the gradient."
            )
        return sample

    def check_example(self, example: dict) -> EncodedExample:
        """`encode` plus loading and decoding the images it keeps: everything a batch does with one example that can
        fail on bad data. Raises what a training step would raise (a `ValueError`, or an `OSError` for a file that
        cannot be read); returns the encoded example."""
        sample = self.encode(example)
        for image in sample.images:
            self._load_image(image)
        return sample

    def _tokenize(self, text: str, offsets: bool = False) -> dict:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            # The tokenizer would fail with a bare TypeError; lone surrogates come from broken `\ud800`-style escapes.
            raise ValueError(
                f"The text holds a character that is not valid Unicode ({err.reason} at position {err.start}), "
                "usually a lone surrogate from a broken `\\uXXXX` escape. Fix the text's encoding."
            ) from err
        bos = self.tokenizer.bos_token
        # Same rule as the processor's chat path: a template that writes `<s>` itself gets no second one.
        add_special_tokens = not (bos is not None and text.startswith(bos))
        return self.tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets, verbose=False
        )

    def _check_image_count(self, input_ids: list[int], images: list, where: str):
        found = input_ids.count(self.image_token_id)
        if found != len(images):
            raise ValueError(
                f"{where} has {found} `<image>` tokens but {len(images)} images. Put exactly one `<image>` in the text "
                "for each image, in order."
            )

    def _encode_document(self, text: str, images: list) -> EncodedExample:
        input_ids = list(self._tokenize(text)["input_ids"])
        self._check_image_count(input_ids, images, "An interleaved document")
        return EncodedExample(input_ids, list(input_ids), images)

    def _document_labels(self, input_ids: list[int]) -> list[int]:
        """Loss on every token after the first `<image>`, never on an `<image>` token."""
        labels, seen_image = [], False
        for token in input_ids:
            seen_image = seen_image or token == self.image_token_id
            labels.append(token if seen_image and token != self.image_token_id else IGNORE_INDEX)
        return labels

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_chat(self, messages) -> EncodedExample:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("`messages` must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        _check_contents(messages)
        text = self._render(messages, add_generation_prompt=False)
        # Character spans of the assistant turns: what the template adds for message j after the prompt that asks
        # for it (the rendered messages[:j] with the generation prompt), trailing whitespace excluded.
        spans = []
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            if j == 0:
                raise ValueError("A conversation must start with a system or user message, not an assistant turn.")
            prompt = self._render(messages[:j], add_generation_prompt=True)
            upto = self._render(messages[: j + 1], add_generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(prompt)):
                raise ValueError(
                    "The chat template does not render a conversation as the concatenation of its turns, so the "
                    "assistant turns cannot be located; use a template where each turn only appends text."
                )
            spans.append((len(prompt), len(upto.rstrip())))
        encoding = self._tokenize(text, offsets=True)
        input_ids = list(encoding["input_ids"])
        labels = []
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"]):
            in_reply = any(start < span_end and end > span_start for span_start, span_end in spans)
            # `<|endofchunk|><image>` is the chat's image marker, never a target.
            keep = in_reply and token not in (self.image_token_id, self.eoc_token_id)
            labels.append(token if keep else IGNORE_INDEX)
        images = conversation_images(messages)
        self._check_image_count(input_ids, images, "A conversation")
        return EncodedExample(input_ids, labels, images)

    # --------------------------------------------------------------------------------------------- limits
    def _image_positions(self, input_ids: list[int]) -> list[int]:
        return [i for i, token in enumerate(input_ids) if token == self.image_token_id]

    def _cap_images(self, sample: EncodedExample, is_chat: bool) -> EncodedExample:
        if self.max_images is None or len(sample.images) <= self.max_images:
            return sample
        if self.image_overflow == "error":
            raise ValueError(
                f"A sample has {len(sample.images)} images but at most {self.max_images} are allowed (`max_images`). "
                "Split it, raise `max_images`, or use `image_overflow='truncate'` to keep the first ones."
            )
        cut = self._image_positions(sample.input_ids)[self.max_images]
        if is_chat and cut > 0 and sample.input_ids[cut - 1] == self.eoc_token_id:
            cut -= 1  # drop the whole `<|endofchunk|><image>` marker
        return EncodedExample(sample.input_ids[:cut], sample.labels[:cut], sample.images[: self.max_images])

    def _truncate(self, sample: EncodedExample) -> EncodedExample:
        if self.max_length is None or len(sample.input_ids) <= self.max_length:
            return sample
        if self.truncation_side == "right":
            window = slice(0, self.max_length)
            input_ids = sample.input_ids[window]
            images = sample.images[: input_ids.count(self.image_token_id)]
        else:
            window = slice(len(sample.input_ids) - self.max_length, None)
            input_ids = sample.input_ids[window]
            kept = input_ids.count(self.image_token_id)
            images = sample.images[len(sample.images) - kept :] if kept else []
        return EncodedExample(input_ids, sample.labels[window], images)


__all__ = ["InfiMMDataCollator", "EncodedExample", "IGNORE_INDEX", "conversation_images", "fill_image_placeholders"]
