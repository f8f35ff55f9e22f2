"""Property tests: random interleavings of text and images keep every `<image>` token lined up with its image.

Each image is a solid colour used once per sample, so where its pixels land says which image it was. References:
the tokenizer on the prompt text itself, the torchvision transform on each image, and the release's chat-prompt rules
written out below in plain Python.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR
from infimm import InfiMMImageProcessor, InfiMMProcessor
from test_processing import reference_pixels


SIZE = 14
WORDS = ["a", "red", "cat", "sits", "on", "the", "mat.", "What", "is", "this?", "Answer:", "42", "chart", "shows"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 64, 32),
           (10, 200, 90)]
IMAGES = [Image.new("RGB", (9 + 3 * index, 6 + 2 * index), colour) for index, colour in enumerate(COLOURS)]
EXPECTED = [reference_pixels(image, SIZE) for image in IMAGES]
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text_segment = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
# A sample: segments that are either text or an image (by colour index); images of one sample are distinct.
segments = st.lists(st.one_of(st.tuples(st.just("text"), text_segment), st.tuples(st.just("image"), st.integers(0, 7))),
                    max_size=7).map(lambda items: _dedupe_images(items))


def _dedupe_images(items):
    seen, out = set(), []
    for kind, value in items:
        if kind == "image":
            if value in seen:
                continue
            seen.add(value)
        out.append((kind, value))
    return out


@pytest.fixture(scope="module")
def processor():
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return InfiMMProcessor(InfiMMImageProcessor(image_size=SIZE), tokenizer)


def _squash(text: str) -> str:
    return "".join(text.split())


@PROPERTY_SETTINGS
@given(batch=st.lists(segments, min_size=1, max_size=3), nested=st.booleans())
def test_interleaved_text_and_images(processor, batch, nested):
    texts = ["".join("<image>" if kind == "image" else value for kind, value in sample) for sample in batch]
    per_sample = [[value for kind, value in sample if kind == "image"] for sample in batch]
    images = [[IMAGES[i] for i in sample] for sample in per_sample]
    if not nested:
        images = [image for sample in images for image in sample]
    inputs = processor(text=texts, images=images if any(per_sample) else None, return_tensors="pt")

    tokenizer = processor.tokenizer
    max_images = max(len(sample) for sample in per_sample)
    if max_images == 0:
        assert "pixel_values" not in inputs and "image_mask" not in inputs
    else:
        assert inputs["pixel_values"].shape == (len(batch), max_images, 3, SIZE, SIZE)
    for row, (text, sample) in enumerate(zip(texts, per_sample)):
        ids = inputs["input_ids"][row].tolist()
        mask = inputs["attention_mask"][row].tolist()
        reference = tokenizer(text).input_ids
        pad = len(ids) - len(reference)
        assert ids == [tokenizer.pad_token_id] * pad + reference  # left padding, then exactly the text's tokens
        assert mask == [0] * pad + [1] * len(reference)
        assert ids.count(processor.image_token_id) == len(sample)
        # nothing lost or reordered: the visible text (with its placeholders) decodes back
        decoded = tokenizer.decode(reference[1:], skip_special_tokens=False)
        assert _squash(decoded) == _squash(text)
        if max_images:
            assert inputs["image_mask"][row].tolist() == [True] * len(sample) + [False] * (max_images - len(sample))
            for slot, colour in enumerate(sample):
                torch.testing.assert_close(inputs["pixel_values"][row, slot], EXPECTED[colour], atol=1e-6, rtol=0)
            assert not inputs["pixel_values"][row, len(sample):].any()


def _release_prompt(messages, eos="</s>"):
    """The released chat processor's rules: empty system turn first if none, images -> `<|endofchunk|><image>`."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": []}] + messages
    prompt = ""
    for message in messages:
        body = "".join("<|endofchunk|><image>" if kind == "image" else value for kind, value in message["content"])
        prompt += f"<|{message['role']}|>\n{body}{eos}\n"
    return prompt + "<|assistant|>\n"


def _as_transformers_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image", "image": IMAGES[v]} if kind == "image" else
                                              {"type": "text", "text": v} for kind, v in m["content"]]}
            for m in messages]


turn_content = segments.filter(lambda items: any(kind == "text" for kind, _ in items))
conversation = st.lists(turn_content, min_size=1, max_size=3).map(
    lambda turns: [{"role": "user" if i % 2 == 0 else "assistant",
                    "content": turn if i % 2 == 0 else [item for item in turn if item[0] == "text"]}
                   for i, turn in enumerate(turns)]
)


@PROPERTY_SETTINGS
@given(conversations=st.lists(conversation, min_size=1, max_size=2))
def test_chat_batches_match_the_release_prompt(processor, conversations):
    messages = [_as_transformers_messages(conv) for conv in conversations]
    # a sample's images must be distinct colours across turns too
    for conv in conversations:
        seen = [value for m in conv for kind, value in m["content"] if kind == "image"]
        if len(seen) != len(set(seen)):
            return
    inputs = processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    counts = [sum(kind == "image" for m in conv for kind, _ in m["content"]) for conv in conversations]
    for row, conv in enumerate(conversations):
        reference = processor.tokenizer(_release_prompt(conv)).input_ids
        ids = inputs["input_ids"][row].tolist()
        assert ids[len(ids) - len(reference):] == reference
        colours = [value for m in conv for kind, value in m["content"] if kind == "image"]
        for slot, colour in enumerate(colours):
            torch.testing.assert_close(inputs["pixel_values"][row, slot], EXPECTED[colour], atol=1e-6, rtol=0)
        if max(counts):
            assert inputs["image_mask"][row].sum().item() == counts[row]
