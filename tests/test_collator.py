"""InfiMMDataCollator on hand-built examples: exact ids and labels written out by hand (real tokenizer)."""

import PIL.Image
import pytest
import torch

from conftest import REPO, tiny_config

I, E, X = 32001, 32000, -100  # <image>, <|endofchunk|>, no loss

# The release's chat processor on one image + "Please explain this image to me.", generation prompt, real tokenizer.
ZEPHYR_PROMPT = [1, 523, 28766, 6574, 28766, 28767, 13, 2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 32000, 32001,
                 5919, 7282, 456, 3469, 298, 528, 28723, 2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]
IT_IS_A_CHART = [1313, 349, 264, 10968, 28723]  # "It is a chart." right after "<|assistant|>\n"
A_CAT, A_DOG = [330, 5255, 28723], [330, 3914, 28723]  # "A cat." / "A dog." right after a special token


def _image(color, size=(30, 40)):
    return PIL.Image.new("RGB", size, color)


RED, GREEN, BLUE = _image((200, 0, 0)), _image((0, 200, 0)), _image((0, 0, 200))


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "assets" / "infimm-zephyr")


@pytest.fixture(scope="module")
def processor():
    from infimm import InfiMMProcessor

    return InfiMMProcessor.from_config(tiny_config(), _tokenizer())


def _collator(processor, **kwargs):
    from infimm.collator_infimm import InfiMMDataCollator

    return InfiMMDataCollator(processor, **kwargs)


def _chat(*images, question="Please explain this image to me.", answer="It is a chart."):
    return {"messages": [
        {"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]}


def test_chat_loss_on_assistant_turn_only(processor):
    sample = _collator(processor).encode(_chat(RED))
    assert sample.input_ids == ZEPHYR_PROMPT + IT_IS_A_CHART + [2, 28705, 13]
    # the reply and its end-of-turn `</s>`; not the prompt, not the newline the template adds after the turn
    assert sample.labels == [X] * len(ZEPHYR_PROMPT) + IT_IS_A_CHART + [2, X, X]
    assert sample.images == [RED]


def test_chat_ids_match_the_processor(processor):
    example = _chat(RED, GREEN, question="Compare.", answer="Red, then green.")
    sample = _collator(processor).encode(example)
    expected = processor.apply_chat_template(example["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert sample.input_ids == list(expected[0] if isinstance(expected[0], list) else expected)


def test_chat_two_turns_and_an_image_in_the_second(processor):
    messages = _chat(RED, answer="Red.")["messages"] + [
        {"role": "user", "content": [{"type": "image", "image": BLUE}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "Blue."},
    ]
    sample = _collator(processor).encode({"messages": messages})
    assert all(label in (X, token) for label, token in zip(sample.labels, sample.input_ids))
    kept = processor.tokenizer.convert_ids_to_tokens([label for label in sample.labels if label != X])
    assert kept == ["Red", ".", "</s>", "Blue", ".", "</s>"]  # both replies, each with its end-of-turn token
    assert sample.input_ids.count(I) == 2 and sample.images == [RED, BLUE]


@pytest.mark.parametrize("chat_format, replies", [
    ("llama2", [330, 10968, 28723, 28705, 2, 5592, 28723, 28705, 2]),  # "▁A▁chart.▁</s>" "▁Yes.▁</s>"
    ("vicuna", [330, 10968, 28723, 2, 5592, 28723, 2]),  # "▁A▁chart.</s>" "▁Yes.</s>"
])
def test_chat_formats_of_the_13b_presets(chat_format, replies):
    from infimm import InfiMMProcessor

    processor = InfiMMProcessor.from_config(tiny_config(), _tokenizer(), chat_format=chat_format)
    messages = _chat(RED, question="What is it?", answer="A chart.")["messages"] + [
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    sample = _collator(processor).encode({"messages": messages})
    assert [label for label in sample.labels if label != X] == replies
    assert all(label in (X, token) for label, token in zip(sample.labels, sample.input_ids))
    expected = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert sample.input_ids == list(expected[0] if isinstance(expected[0], list) else expected)


def test_interleaved_document_loss_after_first_image(processor):
    collator = _collator(processor)
    doc = collator.encode({"text": "Intro <image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>", "images": [RED, BLUE]})
    assert doc.input_ids == [1, 4666, 311, 28705, I, *A_CAT, E, I, *A_DOG, E]
    assert doc.labels == [X, X, X, X, X, *A_CAT, E, X, *A_DOG, E]
    pair = collator.encode({"image": RED, "caption": "A cat."})
    assert pair.input_ids == [1, I, *A_CAT, E]
    assert pair.labels == [X, X, *A_CAT, E]


def test_padding_pixels_and_image_mask(processor):
    batch = _collator(processor)([
        {"image": RED, "caption": "A cat."},
        {"text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>", "images": [RED, BLUE]},
    ])
    pad = 2  # </s>
    assert batch["input_ids"].tolist() == [[1, I, *A_CAT, E] + [pad] * 5, [1, I, *A_CAT, E, I, *A_DOG, E]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 5, [1] * 11]
    assert batch["labels"].tolist() == [[X, X, *A_CAT, E] + [X] * 5, [X, X, *A_CAT, E, X, *A_DOG, E]]
    assert batch["image_mask"].tolist() == [[True, False], [True, True]]
    pixels = processor.image_processor([RED, BLUE], return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (2, 2, 3, 28, 28)
    torch.testing.assert_close(batch["pixel_values"][0, 0], pixels[0])
    assert not batch["pixel_values"][0, 1].any()
    torch.testing.assert_close(batch["pixel_values"][1], pixels)


def test_left_padding_and_text_only_batch(processor):
    batch = _collator(processor, padding_side="left")([{"text": "Hi"}, {"image": RED, "caption": "A cat."}])
    assert batch["input_ids"][0, :2].tolist() == [2, 2] and batch["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch["labels"][0].tolist() == [X] * 6  # a text-only document has no text after an image
    assert batch["image_mask"].tolist() == [[False], [True]]
    text_only = _collator(processor)([{"text": "Hi"}])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_max_images_truncates_before_the_first_surplus_image(processor):
    doc = {"text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|><image>A cat.<|endofchunk|>",
           "images": [RED, GREEN, BLUE]}
    sample = _collator(processor, max_images=2).encode(doc)
    assert sample.input_ids == [1, I, *A_CAT, E, I, *A_DOG, E]
    assert sample.labels == [X, X, *A_CAT, E, X, *A_DOG, E]
    assert sample.images == [RED, GREEN]
    chat = _collator(processor, max_images=1).encode(_chat(RED, GREEN))
    # cut before the second `<|endofchunk|><image>` marker: the prompt up to the first image, no reply left
    assert chat.input_ids == ZEPHYR_PROMPT[:18] and chat.images == [RED] and set(chat.labels) == {X}
    with pytest.raises(ValueError, match="3 images but at most 2"):
        _collator(processor, max_images=2, image_overflow="error").encode(doc)


def test_truncation_keeps_images_with_their_tokens(processor):
    doc = {"text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>", "images": [RED, BLUE]}
    cut_after_second_image = _collator(processor, max_length=8).encode(doc)
    assert cut_after_second_image.input_ids == [1, I, *A_CAT, E, I, 330]
    assert cut_after_second_image.labels == [X, X, *A_CAT, E, X, 330]
    assert cut_after_second_image.images == [RED, BLUE]
    cut_before_second_image = _collator(processor, max_length=6).encode(doc)
    assert cut_before_second_image.input_ids == [1, I, *A_CAT, E]
    assert cut_before_second_image.images == [RED]
    left = _collator(processor, max_length=7, truncation_side="left").encode(doc)
    assert left.input_ids == [28723, E, I, *A_DOG, E]
    assert left.labels == [X, X, X, *A_DOG, E]  # nothing before the first image that is left carries loss
    assert left.images == [BLUE]


def test_relative_image_paths_and_count_errors(processor, tmp_path):
    RED.save(tmp_path / "red.png")
    collator = _collator(processor, image_root=tmp_path)
    batch = collator([{"image": "red.png", "caption": "A cat."}])
    torch.testing.assert_close(
        batch["pixel_values"][0, 0], processor.image_processor([RED], return_tensors="pt")["pixel_values"][0]
    )
    with pytest.raises(ValueError, match="2 `<image>` tokens but 1 images"):
        collator.encode({"text": "<image><image>A cat.", "images": ["red.png"]})
    with pytest.raises(ValueError, match="Cannot tell what kind of example"):
        collator.encode({"caption": "A cat."})
    with pytest.raises(ValueError, match="start with a system or user message"):
        collator.encode({"messages": [{"role": "assistant", "content": "Hi"}]})


@pytest.mark.parametrize("example, says", [
    ({"text": "<image>A cat.", "images": "red.png"}, r"`images` must be a list of images .*; got str"),  # not 7 images
    ({"text": "<image>A cat.", "images": 3}, r"`images` must be a list of images .*; got int"),
    ({"text": "<image>A cat.", "images": {"red.png": 1}}, r"`images` must be a list of images .*; got dict"),
    ({"text": 5}, "`text` must be a string; got int"),
    ({"image": "red.png", "caption": ["A cat."]}, "`caption` must be a string; got list"),
    ({"messages": [{"role": "user", "content": 5}]}, "Message 0 has content of type int"),
    ({"text": "<image>A cat.", "images": [["red.png"]]}, "a list of several images, not one image"),
    ({"text": "A broken escape \ud800."}, "not valid Unicode"),
    ({"text": "<image>A cat.", "images": [""]}, "An image path is empty"),
])
def test_malformed_fields_are_value_errors(processor, tmp_path, example, says):
    RED.save(tmp_path / "red.png")
    with pytest.raises(ValueError, match=says):
        _collator(processor, image_root=tmp_path)([example])


def test_image_path_errors_say_where_a_relative_path_was_read(processor, tmp_path):
    (tmp_path / "photos").mkdir()
    collator = _collator(processor, image_root=tmp_path)
    with pytest.raises(ValueError, match=r"photos' is a directory.*\(The data gives the image as 'photos'; relative "
                                         r"paths are read from `image_root`, '.*'\.\)"):
        collator([{"image": "photos", "caption": "A cat."}])
    with pytest.raises(ValueError, match=r"cat.png' does not exist.*as 'cat.png'; relative paths are read from"):
        collator([{"image": "cat.png", "caption": "A cat."}])


def test_columns_holding_none_do_not_count(processor):
    """A `datasets.Dataset` of mixed kinds gives every row every column, None where the row has no value."""
    collator = _collator(processor)
    pair = collator.encode({"image": RED, "caption": "A cat.", "text": None, "images": None, "messages": None})
    document = collator.encode({"text": "<image>A cat.<|endofchunk|>", "images": [RED], "image": None, "caption": None})
    assert pair.input_ids == document.input_ids == [1, I, *A_CAT, E]
    chat = collator.encode({**_chat(RED), "images": None, "image": None, "text": None})
    assert chat.input_ids == ZEPHYR_PROMPT + IT_IS_A_CHART + [2, 28705, 13]
