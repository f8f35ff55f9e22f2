"""The chat and few-shot examples reuse what is already computed, and answer exactly as the full prompts do.

References: the whole prompt built by hand through the processor and `generate()` without any cache; the images
reaching the vision tower are counted with a hook.
"""

import sys

import PIL.Image
import pytest
from transformers import AutoTokenizer

from conftest import REPO, tiny_model
from helpers_modeling import tower_calls

from infimm import InfiMMProcessor

EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import chat  # noqa: E402
import few_shot  # noqa: E402

sys.path.remove(str(EXAMPLES))

RED, GREEN, BLUE, GREY = (
    PIL.Image.new("RGB", (32, 32), rgb) for rgb in [(220, 30, 30), (30, 170, 60), (30, 60, 220), (128, 128, 128)]
)
GENERATE = dict(max_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def model_and_processor():
    model = tiny_model(seed=11, gates=1.0)
    processor = InfiMMProcessor.from_config(model.config, AutoTokenizer.from_pretrained(REPO / "assets" / "infimm-zephyr"))
    return model, processor


def _reference_answer(model, processor, messages):
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, **GENERATE)
    return processor.post_process_image_text_to_text(out, input_ids=inputs["input_ids"])[0].strip()


@pytest.mark.parametrize("first_turn_images", [[RED], []], ids=["image-first", "text-first"])
def test_chat_turns_reuse_the_conversation_and_answer_as_the_full_prompt(model_and_processor, first_turn_images):
    model, processor = model_and_processor
    conversation = chat.Chat(model, processor, **GENERATE)
    turns = [(first_turn_images, "What is this?"), ([], "And its colour?"), ([GREEN, BLUE], "Compare them.")]
    tower = tower_calls(model)
    try:
        for number, (images, text) in enumerate(turns):
            history = list(conversation.messages)
            conversation.attach(*images)
            tower.rows = 0
            answer = conversation.send(text)
            encoded = tower.rows
            user = {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                                {"type": "text", "text": text}]}
            assert answer == _reference_answer(model, processor, [*history, user]), number
            # A turn encodes only its own images, except when the conversation's first image comes after a
            # text-only start: InfiMM's per-sample flag then changes the earlier text, which is recomputed.
            late_first_image = number > 0 and images and not any(i for i, _ in turns[:number])
            want = sum(len(i) for i, _ in turns[: number + 1]) if late_first_image else len(images)
            assert encoded == want, number
            assert conversation.cache is not None and conversation.cache.get_seq_length() > 0
    finally:
        tower.remove()


def test_few_shot_demonstrations_are_encoded_once(model_and_processor):
    model, processor = model_and_processor
    shots = [(RED, "A red square."), (GREEN, "A green square.")]
    queries = [BLUE, GREY, RED]
    tower = tower_calls(model)
    try:
        reused = few_shot.few_shot(model, processor, shots, queries, **GENERATE)
        encoded_with_reuse = tower.rows
        tower.rows = 0
        fresh = few_shot.few_shot(model, processor, shots, queries, reuse_shots=False, **GENERATE)
        encoded_without = tower.rows
    finally:
        tower.remove()
    assert reused == fresh
    assert encoded_with_reuse == len(shots) + len(queries)  # the shots once, then one image per query
    assert encoded_without == (len(shots) + 1) * len(queries)
    # Independent of the helper: the first query's whole prompt by hand.
    inputs = processor(text="<image>A red square.<|endofchunk|><image>A green square.<|endofchunk|><image>",
                       images=[[RED, GREEN, BLUE]], return_tensors="pt")
    out = model.generate(**inputs, **GENERATE, eos_token_id=[processor.tokenizer.eos_token_id, processor.eoc_token_id])
    assert processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == reused[0]


def test_few_shot_with_beams_reuses_the_demonstrations(model_and_processor):
    model, processor = model_and_processor
    shots = [(RED, "A red square.")]
    with_reuse = few_shot.few_shot(model, processor, shots, [BLUE, GREEN], num_beams=3, max_new_tokens=4)
    without = few_shot.few_shot(model, processor, shots, [BLUE, GREEN], reuse_shots=False, num_beams=3, max_new_tokens=4)
    assert with_reuse == without
