"""The `image-text-to-text` pipeline for InfiMM, batched over samples with different numbers of images.

transformers' pipeline collates a batch by concatenating `pixel_values` along the first dimension and left-padding
every other 2-D tensor, which breaks on InfiMM's `(1, images, 3, H, W)` slots as soon as two samples hold different
numbers of images (and on a sample without images, whose inputs have no pixel keys at all). This subclass pads the
image slots on the right with zeros, marks them False in `image_mask` (what the processor does for a batch), and pads
the prompts on the left for generation. Everything else is the stock pipeline.

A saved InfiMM folder names this class in its config's `custom_pipelines`, so
`pipeline("image-text-to-text", model=folder, trust_remote_code=True, batch_size=N)` uses it. For a model object
pass it yourself: `pipeline("image-text-to-text", model=model, processor=processor,
pipeline_class=InfiMMImageTextToTextPipeline)`.
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import collections.abc
import os

import torch
from torch.utils.data import DataLoader

from transformers.pipelines.base import no_collate_fn, pad_collate_fn
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .image_processing_infimm import pad_image_slots


PIPELINE_TASK = "image-text-to-text"
# The entry a saved config carries in `custom_pipelines` (the form `Pipeline.save_pretrained` writes).
CUSTOM_PIPELINE_ENTRY = {
    "impl": "pipeline_infimm.InfiMMImageTextToTextPipeline",
    "pt": ["AutoModelForImageTextToText"],
    "type": "multimodal",
}

_TEXT_KEYS = ("input_ids", "attention_mask")
_IMAGE_KEYS = ("pixel_values", "image_mask")


class InfiMMImageTextToTextPipeline(ImageTextToTextPipeline):
    """`ImageTextToTextPipeline` whose batches may mix samples with 0, 1 or more images."""

    def _sanitize_parameters(self, max_new_tokens=None, generate_kwargs=None, **kwargs):
        # transformers up to 5.23 writes `max_new_tokens` into the caller's `generate_kwargs` dict, so a dict reused
        # for a second call fails with "'max_new_tokens' is defined twice"; the base class gets a copy instead.
        if generate_kwargs is not None:
            generate_kwargs = dict(generate_kwargs)
        return super()._sanitize_parameters(max_new_tokens=max_new_tokens, generate_kwargs=generate_kwargs, **kwargs)

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        # `Pipeline.get_iterator` with only the collate function changed: the base class builds its collate inside
        # the method, so there is no hook to override it alone.
        if isinstance(inputs, collections.abc.Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            num_workers = min(num_workers, 1)  # as the base class: an iterable cannot be split between workers
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the base class: the DataLoader has the threads
        collate_fn = no_collate_fn if batch_size == 1 else self._collate
        dataloader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate_fn)
        model_iterator = PipelineIterator(dataloader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list) -> dict:
        """One batch from preprocessed samples: prompts left-padded, image slots zero-padded, `image_mask` False there."""
        batch = dict(
            self.tokenizer.pad(
                [{key: item[key][0].tolist() for key in _TEXT_KEYS if key in item} for item in items],
                padding_side="left",  # generation continues each row right after its prompt
                return_tensors="pt",
            )
        )
        batch.update(_image_slots(items))
        rest = [{key: value for key, value in item.items() if key not in _TEXT_KEYS + _IMAGE_KEYS} for item in items]
        if rest[0]:
            # `text` (the prompt, or the chat) and any other key: the library's own collation.
            image_processor = self.feature_extractor if self.feature_extractor is not None else self.image_processor
            batch.update(pad_collate_fn(self.tokenizer, image_processor)(rest))
        return batch


def _image_slots(items: list) -> dict:
    """`pixel_values` (batch, max_images, 3, H, W) and `image_mask` (batch, max_images) of preprocessed samples (each
    `(1, its images, 3, H, W)`, or no pixel keys), laid out by the package's one slot padder."""
    with_images = [item for item in items if "pixel_values" in item]
    if not with_images:
        return {}
    reference = with_images[0]["pixel_values"].shape[2:]
    images, counts = [], []
    for row, item in enumerate(items):
        if "pixel_values" not in item:
            counts.append(0)
            continue
        if item["pixel_values"].shape[2:] != reference:
            raise ValueError(
                f"Sample {row} of the batch has images of shape {tuple(item['pixel_values'].shape[2:])} but another "
                f"has {tuple(reference)}; preprocess every sample with the same image processor settings."
            )
        mask = item.get("image_mask")
        real = item["pixel_values"][0] if mask is None else item["pixel_values"][0][mask[0].to(torch.bool)]
        images.append(real)
        counts.append(len(real))
    return pad_image_slots(torch.cat(images), counts)


__all__ = ["CUSTOM_PIPELINE_ENTRY", "InfiMMImageTextToTextPipeline", "PIPELINE_TASK"]
