"""InfiMM's processor: chat messages or few-shot prompts plus images in, the model's inputs out.

Text uses the Flamingo layout: one `<image>` token where each image goes (`<image>caption<|endofchunk|>...` for
few-shot prompts). The chat templates (`assets/chat_templates/*.jinja`) put `<|endofchunk|><image>` where an image
item sits in a message, as the released chat processor did. Images go through `image_processing_infimm`.
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import inspect
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from transformers import AddedToken, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_infimm import (  # the image processors and loaders are also importable from here, as before
    InfiMMImageProcessor,
    InfiMMImageProcessorFast,
    image_processor_from_dict,
    is_image_batch,
    is_single_image,
    load_image,
    pad_image_slots,
    to_rgb_image,
    wants_fast_image_processor,
)
from .release_infimm import HUB_KWARGS


IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"


# ---------------------------------------------------------------------------------------------- chat templates
# The templates are `assets/chat_templates/<format>.jinja`, each preceded by `render_content.jinja` (the macro that
# writes a message's text and image items). Each wraps what the model writes after the generation prompt (the reply
# and its end-of-turn `</s>`) in `{% generation %}` ... `{% endgeneration %}`, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks those tokens (how TRL's
# `SFTTrainer(assistant_only_loss=True)` finds them); the markers render nothing and must sit outside macros, since
# transformers measures their position in the top-level output. The prompts are the release's, character for
# character: Zephyr's (HuggingFaceH4/zephyr-7b-beta, with the released chat processor's empty system turn when there
# is none), Vicuna v1.1's ("USER: ... ASSISTANT: ...</s>", its default system prompt when none is given) and Llama-2
# chat's ("<s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s>").
CHAT_FORMATS = ("zephyr", "vicuna", "llama2", "none")  # "none": pretrained models, Flamingo-layout prompts only
_TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "chat_templates"


def chat_template_for(chat_format: str) -> str | None:
    """The Jinja chat template of `chat_format` (None for "none"), read from the files shipped with the package.

    A saved folder carries its own `chat_template.jinja`, so loading one never needs these files; only building a
    processor for a chat format does (`InfiMMProcessor(..., chat_format=...)`, `from_config`).
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"`chat_format` must be one of {list(CHAT_FORMATS)}; got {chat_format!r}.")
    if chat_format == "none":
        return None
    try:
        return (_TEMPLATES_DIR / "render_content.jinja").read_text() + (_TEMPLATES_DIR / f"{chat_format}.jinja").read_text()
    except OSError as err:
        raise ValueError(
            f"The {chat_format!r} chat template ships with the infimm package ({_TEMPLATES_DIR} is not readable: "
            f"{err}). Install the package (`pip install infimm`), or pass `chat_template=` with the template text."
        ) from err


# ---------------------------------------------------------------------------------------- conversation items
# The one walker of a conversation's content items, used by the processor, the collator and the training helpers.
# An image item is transformers' `{"type": "image", "image"|"url"|"path"|"base64": ...}`, OpenAI's
# `{"type": "image_url", "image_url": {"url": ...}}` or the release's untyped `{"image": ...}`; keys holding None
# count as absent (a `datasets` table fills every column of every row).
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")


def item_kind(item: dict) -> str | None:
    """"image", "text", another declared type, or None when an untyped item names neither."""
    kind = item.get("type")
    if kind is None:
        if any(item.get(key) is not None for key in IMAGE_SOURCE_KEYS):
            return "image"
        return "text" if "text" in item else None
    return "image" if kind == "image_url" else kind


def image_source(item: dict):
    """The picture an image item names, or None for a placeholder (TRL's `{"type": "image"}`, filled from the row's
    `images`). Bare base64 becomes a data URI."""
    if item.get("type") == "image_url":
        url = item.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    key = next((key for key in IMAGE_SOURCE_KEYS if item.get(key) is not None), None)
    if key is None:
        return None
    source = item[key]
    if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
        source = "data:image/unknown;base64," + source
    return source


def message_items(message) -> list:
    """A message's content as a list of items ([] for string content or what is not a message)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, dict):
        return [content]
    return list(content) if isinstance(content, (list, tuple)) else []


def conversation_images(messages) -> list:
    """Each image item's picture (None for a placeholder), in the order the chat template writes `<image>`.

    Lenient: what is not a message or an item is passed over here; `normalize_conversation` is the strict check.
    """
    return [image_source(item) for message in messages for item in message_items(message)
            if isinstance(item, dict) and item_kind(item) == "image"]


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
    kind = item_kind(item)
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise ChatMessageError(
                f"{where} has a text item without a `text` string; give it {{'type': 'text', 'text': ...}}."
            )
        return {"type": "text", "text": item["text"]}
    if kind == "image":
        source = image_source(item)
        if source is None:
            raise ChatMessageError(
                f"{where} has an image item without an image; give it one of the keys {list(IMAGE_SOURCE_KEYS)} "
                "(or, in OpenAI's form, {'type': 'image_url', 'image_url': {'url': ...}})."
            )
        return {"type": "image", "image": source}
    raise ChatMessageError(
        f"{where} has a content item of unknown type {kind!r}; InfiMM understands 'text' and 'image' items "
        "(video and audio are not supported)."
    )


def normalize_conversation(conversation) -> list[dict]:
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
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"`chat_format` must be one of {list(CHAT_FORMATS)}; got {chat_format!r}.")
        if chat_template is None:
            chat_template = chat_template_for(chat_format)
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
        fast = wants_fast_image_processor(kwargs.pop("backend", None), kwargs.pop("use_fast", None))
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
            image_processor = image_processor_from_dict(image_config, fast)
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
        if is_single_image(images):
            flat = [images]
        elif is_image_batch(images):
            flat = list(images)
        elif isinstance(images, (list, tuple)):
            nested = [isinstance(item, (list, tuple)) or is_image_batch(item) for item in images]
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
        return pad_image_slots(np.stack(pixels).astype(np.float32), [len(sample) for sample in per_sample])

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
            conversation = [normalize_conversation(conv) for conv in conversation]
        elif hasattr(conversation, "messages"):  # the pipeline's Chat wrapper
            conversation = normalize_conversation(conversation.messages)
        else:
            conversation = normalize_conversation(conversation)
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


def __getattr__(name):
    # `CHAT_TEMPLATES` (format -> template text) as earlier releases exposed it, read from the files when asked for.
    if name == "CHAT_TEMPLATES":
        return {chat_format: chat_template_for(chat_format) for chat_format in CHAT_FORMATS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "InfiMMProcessor",
    "InfiMMImageProcessor",
    "InfiMMImageProcessorFast",
    "load_image",
    "to_rgb_image",
    "CHAT_FORMATS",
    "ChatMessageError",
    "chat_template_for",
    "conversation_images",
    "image_source",
    "item_kind",
    "message_items",
    "normalize_conversation",
    "IMAGE_SOURCE_KEYS",
]
