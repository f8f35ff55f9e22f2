"""InfiMM as an lmms-eval model: `lmms-eval --model infimm --model_args pretrained=FOLDER_OR_REPO --tasks mme`.

lmms-eval finds the model through the `lmms_eval.models` entry point this package installs (`lmms_eval_manifest`).
The model loads with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`, so any InfiMM
folder or Hub repo works, with or without this package's classes. It is a "simple" lmms-eval model: requests carry
the task's text and a `doc_to_visual` callable that returns the document's images.

Prompts: the task text becomes one user turn of the model's chat template with the images before the text (or, where
the text holds exactly one `<image>` per image, at those places; other `<image>` placeholders are read as the word
"image"); `use_chat_template=False`, or a processor without
a chat template, gives the Flamingo pretraining layout (`<image>...<image>text`) instead. Generation follows the
request's `until`, `max_new_tokens`, `temperature`, `do_sample`, `top_p`, `num_beams`; log-likelihoods score the
continuation after the assistant prompt, for multiple-choice tasks.

This module is part of the installed package only (it imports lmms-eval); it is not copied to Hub folders.
"""

import logging

import torch
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms


logger = logging.getLogger(__name__)

MODEL_NAME = "infimm"
IMAGE_TOKEN = "<image>"

# Request generation keys that are `generate()` arguments; others (`until`, task-specific keys) are handled here or
# ignored.
_GENERATE_KEYS = (
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: registers this module's `InfiMM` class as the simple model `infimm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.InfiMM")


class LoglikelihoodResult(tuple, GenerationResult):
    """`(logprob, is_greedy)`: a plain tuple to every caller, and one the lmms-eval 0.7.3 evaluator keeps whole.

    The evaluator passes every response through `unwrap_generation_output`, which keeps strings and
    `GenerationResult.text` but turns any other object, a `(float, bool)` tuple included, into its `str()`; multiple-
    choice scoring then fails on the string. As a `GenerationResult` whose `text` is the tuple itself, the pair
    reaches the task intact.
    """

    def __new__(cls, logprob: float, is_greedy: bool):
        return tuple.__new__(cls, (float(logprob), bool(is_greedy)))

    def __init__(self, logprob: float, is_greedy: bool):  # the dataclass `__init__` would set fields
        pass

    def __getnewargs__(self):  # pickling and copies (the response cache, multiprocessing)
        return self[0], self[1]

    text = property(lambda self: (self[0], self[1]))
    token_counts = None
    __eq__, __hash__, __repr__ = tuple.__eq__, tuple.__hash__, tuple.__repr__


def _as_bool(value) -> bool:
    """`--model_args` values arrive as strings or as Python literals (`True`, `1`, `"false"`)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
        raise ValueError(f"Expected a boolean, got {value!r}; use True or False.")
    return bool(value)


class InfiMM(lmms):
    """lmms-eval wrapper around an InfiMM checkpoint (`generate_until` and `loglikelihood`, batched).

    Args:
        pretrained: folder or Hub repo id of an InfiMM model (as written by `infimm-convert` or `save_hub_folder`), or
            of an original release (e.g. `Infi-MM/infimm-zephyr`), read directly.
        device: where the model runs when `device_map` is not given (default: CUDA if available, else CPU; under
            `accelerate launch` each process uses its own device).
        batch_size: requests per forward / `generate` call.
        dtype: `auto` (the checkpoint's), `float32`, `float16` or `bfloat16`.
        device_map: passed to `from_pretrained` (e.g. `auto` to spread a large model over the GPUs).
        trust_remote_code: load the folder's own code (default True; InfiMM folders ship it).
        max_new_tokens: generation length when a task does not set one.
        use_chat_template: wrap the task text in the model's chat template (False: Flamingo layout).
        system_prompt: optional system turn (text, or a path to a text file).
        attn_implementation, revision: passed to `from_pretrained`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "auto",
        device_map: str | None = None,
        trust_remote_code: bool | str = True,
        max_new_tokens: int | str = 1024,
        use_chat_template: bool | str = True,
        system_prompt: str | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        max_batch_size: int | str | None = None,  # lmms-eval passes it to every model; batch sizes here are fixed
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown model_args for the infimm model: {sorted(kwargs)}. Known: pretrained, device, batch_size, "
                "dtype, device_map, trust_remote_code, max_new_tokens, use_chat_template, system_prompt, "
                "attn_implementation, revision."
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the infimm model; give a number, e.g. 8.")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}.")
        self.max_new_tokens = int(max_new_tokens)
        self.use_chat_template = _as_bool(use_chat_template)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None

        if dtype not in ("auto", *_DTYPES) and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}.")
        load_kwargs = {"dtype": _DTYPES.get(dtype, dtype), "trust_remote_code": _as_bool(trust_remote_code)}
        if revision is not None:
            load_kwargs["revision"] = revision
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if device_map:
            load_kwargs["device_map"] = device_map
        self._model, self.processor = _load(pretrained, load_kwargs)
        self._model.eval()
        if device_map:
            self._device = self._model.device
        else:
            self._device = torch.device(device) if device else _default_device()
            self._model.to(self._device)
        if self.use_chat_template and getattr(self.processor, "chat_template", None) is None:
            logger.warning("%s has no chat template; prompts use the Flamingo layout (<image>...text).", pretrained)
            self.use_chat_template = False
        self.pretrained = pretrained

    # -------------------------------------------------------------------------------------- lmms-eval interface
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers, batched by identical generation settings; each cut at the first of its `until` strings."""
        tokenizer = self.tokenizer

        def by_length(args):
            # Longest prompts first (as lmms-eval's own models): padding per batch stays small, OOMs come early.
            return -len(tokenizer(args[0], add_special_tokens=False)["input_ids"]), args[0]

        ordered = lmms_utils.Collator([request.args for request in requests], by_length, grouping=True)
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            visuals = [self._visuals(*args) for args in zip(doc_to_visuals, doc_ids, tasks, splits)]
            generate_kwargs, until = self._generate_kwargs(all_gen_kwargs[0])
            inputs = self._encode([self._prompt(context, images) for context, images in zip(contexts, visuals)], visuals)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **generate_kwargs)
            texts = self.processor.batch_decode(output, skip_special_tokens=True, input_ids=inputs["input_ids"])
            for context, text in zip(contexts, texts):
                text = _cut_at(text, until)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
            progress.update(len(chunk))
        progress.close()
        return ordered.get_original(results)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """`(log p(continuation | context, images), continuation is the greedy answer)` per request."""
        prepared = [self._loglikelihood_request(request.args) for request in requests]
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for start in range(0, len(prepared), self.batch_size):
            batch = prepared[start : start + self.batch_size]
            results.extend(self._score(batch))
            progress.update(len(batch))
        progress.close()
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args[:2], result)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("The infimm model does not implement multi-round generation; use single-turn tasks.")

    # ------------------------------------------------------------------------------------------------- helpers
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The document's images; InfiMM reads images only, so videos and audio are refused."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for visual in visuals:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        for visual in flat:
            if isinstance(visual, (str, dict)):
                raise ValueError(
                    f"Task {task!r} gives InfiMM a {type(visual).__name__} visual ({str(visual)[:80]!r}); InfiMM reads "
                    "images only (PIL images), not videos or audio. Choose an image task."
                )
        return flat

    def _prompt(self, context: str, images: list) -> str:
        """The prompt text: one user turn of the chat template (or the Flamingo layout), ready for the processor."""
        count = context.count(IMAGE_TOKEN)
        if count and count != len(images):
            # MMMU's interleaved format, for one, names an image once per mention: the images then go first and
            # the placeholders become plain words (left as they are, each would be read as one more image).
            logger.warning(
                "The task text has %d `<image>` placeholder(s) for %d image(s); the images go before the text and "
                "the placeholders are read as the word 'image'.", count, len(images),
            )
            context, count = context.replace(IMAGE_TOKEN, "image"), 0
        if count:
            pieces = context.split(IMAGE_TOKEN)
        else:
            pieces = [""] * len(images) + [context]
        if not self.use_chat_template:
            prompt = IMAGE_TOKEN.join(pieces)
            return f"{self.system_prompt}\n{prompt}" if self.system_prompt else prompt
        content = []
        for index, piece in enumerate(pieces):
            if index:
                content.append({"type": "image", "image": images[index - 1]})
            if piece:
                content.append({"type": "text", "text": piece})
        if not any(item["type"] == "text" for item in content):
            content.append({"type": "text", "text": ""})
        messages = self._apply_system_prompt([{"role": "user", "content": content}], self.system_prompt)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, prompts: list[str], images: list[list], padding_side: str = "left") -> dict:
        """Model inputs for rendered prompts, on the model's device (the processor's own batching and padding).

        As the processor's `apply_chat_template(tokenize=True)`, a prompt that already starts with the BOS token (the
        Llama-2 template writes it) gets no second one.
        """
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos is not None and prompts[0].startswith(bos))
        inputs = self.processor(
            text=prompts, images=images if any(images) else None, return_tensors="pt",
            add_special_tokens=add_special_tokens, padding_side=padding_side,
        )
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """`generate()` arguments and the stop strings from a request's generation settings."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"`until` must be a string or a list of strings, got {until!r}.")
        until = [stop for stop in until if stop]
        kwargs = {key: gen_kwargs[key] for key in _GENERATE_KEYS if gen_kwargs.get(key) is not None}
        kwargs["max_new_tokens"] = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.get("temperature", 0))
        do_sample = _as_bool(kwargs["do_sample"]) if "do_sample" in kwargs else temperature > 0
        if do_sample:
            kwargs["do_sample"] = True
            if temperature <= 0:
                kwargs.pop("temperature", None)  # sampling at the model's default temperature
        else:
            # Greedy: also clear the checkpoint's sampling defaults (the release samples with top_p=0.5), which
            # `generate` would otherwise warn about.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if until:
            kwargs.update(stop_strings=list(until), tokenizer=self.tokenizer)  # stop early; the text is cut below too
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return kwargs, list(until)

    def _loglikelihood_request(self, args: tuple) -> dict:
        """Prompt, prompt + continuation and images of one request (`(context, continuation)` for unconditional
        requests, `(context, continuation, doc_to_visual, doc_id, task, split)` otherwise)."""
        context, continuation = args[0], args[1]
        images = []
        if len(args) >= 6:
            doc_to_visual, doc_id, task, split = args[2:6]
            if not isinstance(continuation, str):  # `loglikelihood` tasks give `doc_to_target`
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, doc_id, task, split)
        prompt = self._prompt(context, images)
        return {"prompt": prompt, "full": prompt + continuation, "images": images}

    def _score(self, batch: list[dict]) -> list[tuple[float, bool]]:
        """Sums the log-softmax of each continuation token after its prompt, in one right-padded forward.

        As lm-eval-harness, the continuation's tokens are those of `prompt + continuation` past the length of the
        prompt's own tokens, so the continuation is scored as the model reads it joined to the prompt.
        """
        # Right padding keeps every real token at the positions it has alone (the forward takes no position ids).
        inputs = self._encode([item["full"] for item in batch], [item["images"] for item in batch], "right")
        bos = self.tokenizer.bos_token
        prompt_lengths = [
            len(self.tokenizer(item["prompt"], add_special_tokens=not (bos and item["prompt"].startswith(bos)))[
                "input_ids"
            ])
            for item in batch
        ]
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits.float()
        results = []
        for row, prompt_length in enumerate(prompt_lengths):
            length = int(inputs["attention_mask"][row].sum())
            targets = inputs["input_ids"][row, prompt_length:length]
            if targets.numel() == 0:
                results.append(LoglikelihoodResult(0.0, True))
                continue
            # logits at position t predict token t + 1
            row_logits = logits[row, prompt_length - 1 : length - 1]
            log_probs = torch.log_softmax(row_logits, dim=-1)
            total = log_probs.gather(-1, targets[:, None]).sum()
            greedy = bool((row_logits.argmax(-1) == targets).all())
            results.append(LoglikelihoodResult(total, greedy))
        return results


def _load(pretrained: str, load_kwargs: dict):
    """Model and processor: an InfiMM folder or Hub repo through the auto classes, or an original release snapshot
    (`visual` / `language` config) read with this package's classes, its weights renamed as `infimm-convert` would."""
    from infimm.convert_weights.legacy import is_legacy_checkpoint, load_legacy_model

    hub_kwargs = {key: load_kwargs[key] for key in ("trust_remote_code", "revision") if key in load_kwargs}
    if not is_legacy_checkpoint(pretrained, **hub_kwargs):
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs)
        return model, AutoProcessor.from_pretrained(pretrained, **hub_kwargs)
    from transformers import AutoTokenizer

    from .configuration_infimm import InfiMMConfig
    from .modeling_infimm import InfiMMForConditionalGeneration
    from .processing_infimm import InfiMMProcessor

    revision = {"revision": load_kwargs["revision"]} if "revision" in load_kwargs else {}
    config = InfiMMConfig.from_pretrained(pretrained, **revision)
    processor = InfiMMProcessor.from_config(config, AutoTokenizer.from_pretrained(pretrained, **revision))
    model_kwargs = {key: value for key, value in load_kwargs.items() if key != "trust_remote_code"}
    return load_legacy_model(InfiMMForConditionalGeneration, pretrained, config=config, **model_kwargs), processor


def _default_device() -> torch.device:
    """This process's device: under `accelerate launch` / torchrun, the local GPU; else CUDA if present, else CPU."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's convention for `until`)."""
    for stop in until:
        text = text.split(stop)[0]
    return text


__all__ = ["InfiMM", "LoglikelihoodResult", "lmms_eval_manifest"]
