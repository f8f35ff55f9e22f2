"""InfiMMProcessor / InfiMMImageProcessor against independent references.

References used here, never the code's own output alone:
- the token ids the release's own chat processor gives for its example prompt (real release tokenizer);
- prompts written out by hand per chat format, tokenized by the tokenizer directly;
- the release's image transform rebuilt from torchvision (`Resize(bicubic)`, `CenterCrop`, RGB, `ToTensor`,
  `Normalize(CLIP)`), applied to PIL images (transparent ones composited with numpy first).
"""

import copy
import hashlib
import functools
import http.server
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import AutoTokenizer, CLIPImageProcessorPil, PreTrainedTokenizerFast

from conftest import IMAGES_DIR, REPO, TOKENIZER_DIR
from infimm import InfiMMConfig, InfiMMImageProcessor, InfiMMProcessor
from infimm.image_processing_infimm import InfiMMImageProcessorFast


# The release's chat processor (Infi-MM/infimm-zephyr) on one image + "Please explain this image to me.".
RELEASE_IDS = [1, 523, 28766, 6574, 28766, 28767, 13, 2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 32000, 32001,
               5919, 7282, 456, 3469, 298, 528, 28723, 2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]
RELEASE_PROMPT = "<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>Please explain this image to me.</s>\n<|assistant|>\n"
QUESTION = "Please explain this image to me."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOGO = IMAGES_DIR / "infimm-logo.webp"
CHART = IMAGES_DIR / "mmmu-val-chart.jpeg"


def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The release's transform (open_clip style), built from torchvision."""
    transform = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return transform(image)


def composite(rgba: np.ndarray, background=(255, 255, 255)) -> Image.Image:
    """Alpha compositing in numpy, rounded to uint8."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    out = rgba[..., :3] * alpha + np.asarray(background, np.float64) * (1.0 - alpha)
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def noise(height, width, channels=3, seed=0):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def user_turn(*items):
    content = [{"type": "image", "image": item} if not isinstance(item, str) or item.startswith("/") else
               {"type": "text", "text": item} for item in items]
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return InfiMMProcessor.from_config(InfiMMConfig.from_preset("infimm-zephyr"), tokenizer)


@pytest.fixture(scope="module")
def small_processor(tokenizer):
    """A 28 px processor (as the tiny test models use): fast, same code paths."""
    config = InfiMMConfig.from_preset("infimm-zephyr", vision_config={"model_args": {"img_size": 28}})
    return InfiMMProcessor.from_config(config, copy.deepcopy(tokenizer))


@pytest.fixture(scope="module")
def logo():
    return Image.open(LOGO)


@pytest.fixture(scope="module")
def chart():
    return Image.open(CHART)


# ------------------------------------------------------------------------------------------- release prompt
def test_chat_prompt_reproduces_release_ids_and_pixels(processor, logo):
    messages = [user_turn(logo, QUESTION)]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert sorted(inputs.keys()) == ["attention_mask", "image_mask", "input_ids", "pixel_values"]
    assert inputs["input_ids"].tolist() == [RELEASE_IDS]
    assert inputs["attention_mask"].tolist() == [[1] * len(RELEASE_IDS)]
    assert inputs["pixel_values"].shape == (1, 1, 3, 336, 336)
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["image_mask"].tolist() == [[True]]
    torch.testing.assert_close(inputs["pixel_values"][0, 0], reference_pixels(logo, 336), atol=1e-6, rtol=0)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == RELEASE_PROMPT


def test_release_message_form_is_accepted(processor, logo):
    """The release's own messages: `{"image": path}` dicts mixed with plain strings."""
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"image": str(LOGO)}, QUESTION]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    assert inputs["input_ids"].tolist() == [RELEASE_IDS]
    torch.testing.assert_close(inputs["pixel_values"][0, 0], reference_pixels(logo, 336), atol=1e-6, rtol=0)


# SHA-256 of the tokenizer files published in Infi-MM/infimm-zephyr.
RELEASE_TOKENIZER_SHA256 = {
    "tokenizer.json": "fe682818dc96d5dad9cb385a82088f2b11b6114c08e1088960c2aa28f95847b1",
    "tokenizer_config.json": "a1859bae5ae948cd89a85c861a83245e35ac5a456306715b81d639762158c0af",
    "special_tokens_map.json": "3b2c4ed75abd8d515236f00e92e8dd6c6717d380c5933609e4003a7f14a02204",
    "added_tokens.json": "d31a886161b174ad69ed7b28f0f4eb10e1e41d2f8a34d85dc9618694d4e11b95",
}


def test_bundled_tokenizer_is_the_release_one(tokenizer):
    from infimm.hub_infimm import ASSETS_DIR, bundled_tokenizer

    for name, digest in RELEASE_TOKENIZER_SHA256.items():
        assert hashlib.sha256((ASSETS_DIR / "infimm-zephyr" / name).read_bytes()).hexdigest() == digest, name
    assert bundled_tokenizer()(RELEASE_PROMPT).input_ids == RELEASE_IDS


# ------------------------------------------------------------------------------------------- chat formats
def test_zephyr_multi_turn_and_system(processor, logo, chart):
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        user_turn(logo, "What is this?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A logo."}]},
        user_turn("Compare it with", chart, "please."),
    ]
    expected = ("<|system|>\nYou are a careful assistant.</s>\n<|user|>\n<|endofchunk|><image>What is this?</s>\n"
                "<|assistant|>\nA logo.</s>\n<|user|>\nCompare it with<|endofchunk|><image>please.</s>\n<|assistant|>\n")
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["input_ids"] == [processor.tokenizer(expected).input_ids]
    assert inputs["image_mask"].tolist() == [[True, True]]


@pytest.mark.parametrize(
    "chat_format, expected",
    [
        ("vicuna", "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions. USER: <|endofchunk|><image>What is "
                   "this? ASSISTANT: A logo.</s>USER: Sure? ASSISTANT:"),
        ("llama2", "<s>[INST] <|endofchunk|><image>What is this? [/INST] A logo. </s><s>[INST] Sure? [/INST]"),
    ],
)
def test_13b_chat_formats(tokenizer, logo, chat_format, expected):
    processor = InfiMMProcessor.from_config(
        InfiMMConfig.from_preset("infimm-llama13b", chat_format=chat_format), copy.deepcopy(tokenizer)
    )
    assert processor.image_processor.crop_size.height == 224
    messages = [user_turn(logo, "What is this?"), {"role": "assistant", "content": "A logo."},
                {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    # the llama-2 prompt carries its own <s>; it must not be doubled
    reference = tokenizer(expected, add_special_tokens=chat_format != "llama2").input_ids
    assert inputs["input_ids"] == [reference]
    assert reference.count(1) == (2 if chat_format == "llama2" else 1)


def test_system_prompts_of_13b_formats(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    vicuna = InfiMMProcessor(InfiMMImageProcessor(image_size=224), copy.deepcopy(tokenizer), chat_format="vicuna")
    llama2 = InfiMMProcessor(InfiMMImageProcessor(image_size=224), copy.deepcopy(tokenizer), chat_format="llama2")
    assert vicuna.apply_chat_template(messages, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"
    assert llama2.apply_chat_template(messages) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_batch_of_conversations_with_different_image_counts(processor, logo, chart):
    conversations = [
        [user_turn(logo, "First", chart, "second.")],
        [{"role": "user", "content": "No image here, just a fairly long question to force padding."}],
        [user_turn(chart, "One image.")],
    ]
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (3, 2, 3, 336, 336)
    assert batch["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
    width = batch["input_ids"].shape[1]
    for row, conversation in enumerate(conversations):
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        ids = processor.tokenizer(prompt).input_ids
        pad = width - len(ids)
        assert batch["input_ids"][row].tolist() == [processor.tokenizer.pad_token_id] * pad + ids  # left padding
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    expected = {(0, 0): logo, (0, 1): chart, (2, 0): chart}
    for (row, slot), image in expected.items():
        torch.testing.assert_close(batch["pixel_values"][row, slot], reference_pixels(image, 336), atol=1e-6, rtol=0)
    assert not batch["pixel_values"][1].any() and not batch["pixel_values"][2, 1].any()


# -------------------------------------------------------------------------------------------- text + images
def test_few_shot_interleaving(small_processor, tokenizer):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (40, 30), colour) for colour in colours]
    text = "<image>A red square.<|endofchunk|><image>A green square.<|endofchunk|><image>A"
    inputs = small_processor(text=text, images=images, return_tensors="pt")
    assert inputs["input_ids"].tolist() == [tokenizer(text).input_ids]
    ids = inputs["input_ids"][0].tolist()
    assert [i for i, token in enumerate(ids) if token == 32001] == [1, ids.index(32000) + 1, len(ids) - 2]
    for slot, image in enumerate(images):
        torch.testing.assert_close(inputs["pixel_values"][0, slot], reference_pixels(image, 28), atol=1e-6, rtol=0)


def test_flat_and_nested_images_are_assigned_in_order(small_processor, logo, chart):
    texts = ["<image>one<image>two", "three", "<image>four"]
    flat = small_processor(text=texts, images=[logo, chart, logo], return_tensors="pt")
    nested = small_processor(text=texts, images=[[logo, chart], [], [logo]], return_tensors="pt")
    for key in flat:
        torch.testing.assert_close(flat[key], nested[key])
    assert flat["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(flat["pixel_values"][0, 1], reference_pixels(chart, 28), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat["pixel_values"][2, 0], reference_pixels(logo, 28), atol=1e-6, rtol=0)


def test_text_only_and_padding_side(small_processor, tokenizer):
    inputs = small_processor(text=["short", "a much longer text"], return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["attention_mask"][0, 0] == 0  # left by default, for generation
    right = small_processor(text=["short", "a much longer text"], padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, -1] == 0
    short = tokenizer("short").input_ids
    assert right["input_ids"][0].tolist()[: len(short)] == short
    lists = small_processor(text="<image>hi", images=Image.new("RGB", (5, 5)))
    assert isinstance(lists["input_ids"], list) and lists["pixel_values"].shape == (1, 1, 3, 28, 28)


def test_decoding_strips_prompt_and_special_tokens(small_processor, tokenizer):
    inputs = small_processor(text=["<image>A", "<|endofchunk|><image>Longer prompt"], images=[Image.new("RGB", (4, 4))] * 2,
                             return_tensors="pt")
    answer = tokenizer("Hello world", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    generated = torch.cat([inputs["input_ids"], torch.tensor([answer, answer])], dim=1)
    assert small_processor.batch_decode(generated, input_ids=inputs["input_ids"]) == ["Hello world"] * 2
    assert small_processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"]) == ["Hello world"] * 2
    full = small_processor.post_process_image_text_to_text(generated)
    assert full[1] == "Longer prompt Hello world" or full[1] == "Longer promptHello world"
    assert "<image>" not in "".join(full) and "</s>" not in "".join(full)
    assert small_processor.post_process_image_text_to_text(generated[1], input_ids=inputs["input_ids"][1]) == "Hello world"


# ------------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("name", ["infimm-logo.webp", "mmmu-val-chart.jpeg"])
def test_pixels_of_real_images(name):
    image = Image.open(IMAGES_DIR / name)
    out = InfiMMImageProcessor(image_size=336)(image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 336, 336)
    torch.testing.assert_close(out[0], reference_pixels(image, 336), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [336, 224])
@pytest.mark.parametrize("width, height", [(640, 427), (427, 640), (37, 901), (901, 37), (337, 336), (2, 3)])
def test_pixels_of_odd_sizes(width, height, size):
    image = Image.fromarray(noise(height, width, seed=width * height))
    out = InfiMMImageProcessor(image_size=size)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(image, size), atol=1e-6, rtol=0)


def test_odd_crop_margin_is_rounded_like_torchvision():
    """640x427 leaves an odd margin: a floored offset (stock CLIP processor) is visibly off, ours is exact."""
    image = Image.fromarray(noise(427, 640, seed=1))
    reference = reference_pixels(image, 336)
    floored = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)(image, return_tensors="pt")["pixel_values"][0]
    assert (floored - reference).abs().max() > 0.5
    ours = InfiMMImageProcessor(image_size=336)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_gray_opaque_and_array_inputs():
    processor = InfiMMImageProcessor(image_size=224)
    gray = Image.fromarray(noise(300, 500, channels=1, seed=2), "L")
    torch.testing.assert_close(processor(gray, return_tensors="pt")["pixel_values"][0], reference_pixels(gray, 224),
                               atol=1e-6, rtol=0)
    rgb = noise(250, 180, seed=3)
    opaque = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    expected = reference_pixels(Image.fromarray(rgb), 224)
    for image in (opaque, rgb, torch.from_numpy(rgb).permute(2, 0, 1), rgb.astype(np.float32) / 255.0,
                  rgb.transpose(2, 0, 1).copy()):
        out = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    gray_array = np.asarray(gray)
    torch.testing.assert_close(processor(gray_array, return_tensors="pt")["pixel_values"][0], reference_pixels(gray, 224),
                               atol=1e-6, rtol=0)


def test_transparent_images_are_composited_on_white():
    """Documented choice: transparency is flattened onto white before resizing (the release dropped alpha)."""
    processor = InfiMMImageProcessor(image_size=224)
    rgba = noise(260, 300, channels=4, seed=4)
    rgba[..., 3] = np.where(np.random.default_rng(5).random(rgba.shape[:2]) < 0.5, 0, 255)
    out = processor(Image.fromarray(rgba, "RGBA"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(composite(rgba), 224), atol=1e-6, rtol=0)
    # The release (resize RGBA, then drop alpha) would see black where the picture is transparent.
    release = reference_pixels(Image.fromarray(rgba, "RGBA"), 224)
    assert (release - out).abs().max() > 1.0

    half = np.zeros((50, 60, 4), np.uint8)
    half[...] = (200, 40, 10, 128)
    out = processor(Image.fromarray(half, "RGBA"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(composite(half), 224), atol=1.5 / 255 / min(CLIP_STD), rtol=0)

    black = InfiMMImageProcessor(image_size=224, background_color=(0, 0, 0))
    out = black(Image.fromarray(rgba, "RGBA"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(composite(rgba, (0, 0, 0)), 224), atol=1e-6, rtol=0)

    gray_alpha = np.dstack([noise(40, 70, channels=1, seed=6), rgba[:40, :70, 3]])
    out = processor(Image.fromarray(gray_alpha, "LA"), return_tensors="pt")["pixel_values"][0]
    expected = composite(np.dstack([gray_alpha[..., :1]] * 3 + [gray_alpha[..., 1:]]))
    torch.testing.assert_close(out, reference_pixels(expected, 224), atol=1e-6, rtol=0)


def test_palette_images_are_converted_before_resizing():
    """Documented choice: palette images are resized bicubically as RGB (Pillow would use nearest neighbour)."""
    processor = InfiMMImageProcessor(image_size=224)
    palette = Image.fromarray(noise(150, 230, seed=7)).quantize(colors=16)
    out = processor(palette, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(palette.convert("RGB"), 224), atol=1e-6, rtol=0)
    assert (reference_pixels(palette, 224) - out).abs().max() > 0.5  # what resizing the palette image would give

    transparent = palette.copy()
    transparent.info["transparency"] = 0
    rgba = np.asarray(transparent.convert("RGBA"))
    out = processor(transparent, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, reference_pixels(composite(rgba), 224), atol=1e-6, rtol=0)


def test_exif_orientation_and_cmyk(small_processor, tmp_path):
    """Files are read upright (EXIF orientation applied); CMYK becomes RGB before resizing."""
    upright = Image.fromarray(noise(30, 50, seed=11))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    assert Image.open(path).getexif().get(0x0112) == 6
    inputs = small_processor(text="<image>", images=str(path), return_tensors="pt")
    rotated_back = Image.open(path).transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(inputs["pixel_values"][0, 0], reference_pixels(rotated_back, 28), atol=1e-6, rtol=0)
    assert np.array_equal(np.asarray(rotated_back), np.asarray(upright))
    cmyk = upright.convert("CMYK")
    inputs = small_processor(text="<image>", images=cmyk, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"][0, 0], reference_pixels(cmyk.convert("RGB"), 28), atol=1e-6, rtol=0)


@pytest.mark.parametrize("width, height", [(1024, 1024), (640, 427), (37, 901)])
def test_fast_backend_stays_close(width, height, logo):
    image = logo if width == 1024 else Image.fromarray(noise(height, width, seed=8))
    exact = InfiMMImageProcessor(image_size=336)(image, return_tensors="pt")["pixel_values"]
    fast = InfiMMImageProcessorFast(image_size=336)(image, return_tensors="pt")["pixel_values"]
    assert fast.shape == exact.shape
    assert (fast - exact).abs().max() <= 0.035


# ---------------------------------------------------------------------------------------------- image sources
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A local HTTP server (127.0.0.1 only) serving a PNG and a JPEG."""
    folder = tmp_path_factory.mktemp("served")
    Image.fromarray(noise(60, 90, seed=9)).save(folder / "noise.png")
    Image.open(CHART).save(folder / "chart.jpg")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_paths_urls_and_data_uris(small_processor, image_server):
    import base64

    url, folder = image_server
    png = folder / "noise.png"
    expected = reference_pixels(Image.open(png), 28)
    data_uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    sources = [str(png), Path(png), f"{url}/noise.png", data_uri]
    inputs = small_processor(text="<image>" * len(sources), images=sources, return_tensors="pt")
    for slot in range(len(sources)):
        torch.testing.assert_close(inputs["pixel_values"][0, slot], expected, atol=1e-6, rtol=0)
    chat = small_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "url": f"{url}/chart.jpg"}, {"type": "text", "text": "Hi"}]}],
        tokenize=True, return_dict=True, return_tensors="pt",
    )
    torch.testing.assert_close(chat["pixel_values"][0, 0], reference_pixels(Image.open(folder / "chart.jpg"), 28),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Could not download"):
        small_processor(text="<image>", images=f"{url}/missing.png")


# ---------------------------------------------------------------------------------------------------- errors
def test_image_count_errors_name_both_counts(small_processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"2 `<image>` placeholder\(s\).*1 image\(s\)"):
        small_processor(text="<image>a<image>b", images=[image])
    with pytest.raises(ValueError, match=r"1 `<image>` placeholder\(s\).*2 image\(s\)"):
        small_processor(text="<image>a", images=[image, image])
    with pytest.raises(ValueError, match=r"Text 1 has 0 `<image>` placeholder\(s\) but 1 image\(s\)"):
        small_processor(text=["<image>a", "b"], images=[[image], [image]])
    with pytest.raises(ValueError, match=r"3 `<image>` placeholder\(s\).*but no images"):
        small_processor(text=["<image>a", "<image><image>"])
    with pytest.raises(ValueError, match="one list of images per text"):
        small_processor(text=["<image>a"], images=[[image], [image]])
    with pytest.raises(ValueError, match="mixes single images and lists"):
        small_processor(text=["<image>a<image>"], images=[image, [image]])


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(200, 200, seed=10)).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


TRUNCATED = r"is truncated.*Re-download or re-save.*LOAD_TRUNCATED_IMAGES"
EMPTY = r"is empty"
NOT_AN_IMAGE = r"does not recognise it as an image.*re-save"


@pytest.fixture(scope="module")
def broken_files(image_server):
    """The same broken files on disk and behind the local HTTP server."""
    url, folder = image_server
    (folder / "truncated.jpg").write_bytes(_truncated_jpeg())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"not an image at all" * 10)
    return url, folder


BROKEN = {"truncated.jpg": TRUNCATED, "empty.jpg": EMPTY, "garbage.png": NOT_AN_IMAGE}


# A PIL image exists only for the truncated file: Pillow cannot open an empty or non-image file at all.
@pytest.mark.parametrize("way_in, name", [(way, name) for way in ("path", "url", "data_uri") for name in BROKEN]
                         + [("pil", "truncated.jpg")])
def test_broken_files_give_one_clear_error_however_they_arrive(small_processor, broken_files, way_in, name):
    import base64

    url, folder = broken_files
    message = BROKEN[name]
    if way_in == "pil":
        image = Image.open(folder / name)  # opens (the header is fine); Pillow decodes later
    else:
        data = (folder / name).read_bytes()
        image = {"path": str(folder / name), "url": f"{url}/{name}",
                 "data_uri": "data:image/jpeg;base64," + base64.b64encode(data).decode()}[way_in]
    with pytest.raises(ValueError, match=rf"Image 0 of text 0: Could not read the image .*{message}"):
        small_processor(text="<image>", images=[image])
    with pytest.raises(ValueError, match=message):  # the image processor alone says the same
        small_processor.image_processor(image)


def test_truncated_image_fix_named_in_the_error_works(small_processor, broken_files, monkeypatch):
    import PIL.ImageFile

    _, folder = broken_files
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    partial = Image.open(folder / "truncated.jpg")
    partial.load()
    out = small_processor(text="<image>", images=[Image.open(folder / "truncated.jpg")], return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"][0, 0], reference_pixels(partial, 28), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: np.zeros((0,), np.uint8), "is empty: it has zero width or height"),
    (lambda: torch.zeros(3, 0, 5), "is empty: it has zero width or height"),
    (lambda: np.zeros((5, 6, 2), np.uint8), "no channel axis of size 1, 3 or 4"),
    (lambda: torch.zeros(2, 5, 6), "no channel axis of size 1, 3 or 4"),
    (lambda: np.zeros((5, 6, 3), np.complex64), "Unsupported image array dtype complex64"),
    (lambda: torch.zeros(3, 5, 6, dtype=torch.complex64), "Unsupported image array dtype complex64"),
    (lambda: np.array([[["a"] * 3] * 4] * 4), "Unsupported image array dtype <U1"),
    (lambda: np.full((5, 6, 3), np.nan, np.float32), "NaN or infinite"),
    (lambda: torch.full((3, 5, 6), float("inf")), "NaN or infinite"),
    (lambda: np.full((5, 6, 3), 300, np.uint16), "8-bit values"),
])
def test_bad_arrays_and_tensors_name_the_problem(small_processor, make, message):
    with pytest.raises(ValueError, match=rf"Image 0 of text 0: .*{re.escape(message)}"):
        small_processor(text="<image>", images=[make()])


def test_low_precision_tensors_are_accepted():
    """bfloat16 has no numpy dtype; such tensors are read as float32 (which holds their values exactly)."""
    processor = InfiMMImageProcessor(image_size=28)
    image = torch.rand(3, 40, 30).to(torch.bfloat16)
    as_uint8 = np.round(image.float().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    for tensor in (image, image.to(torch.float16)):
        out = processor(tensor, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out, reference_pixels(Image.fromarray(as_uint8), 28), atol=1e-6, rtol=0)


def test_url_that_is_not_an_image_says_what_the_server_sent(small_processor, broken_files):
    url, folder = broken_files
    (folder / "page.html").write_text("<html>moved</html>")
    with pytest.raises(ValueError, match=r"does not recognise it as an image \(the server sent 'text/html'\)"):
        small_processor(text="<image>", images=[f"{url}/page.html"])


def _lmms_eval_generate_until_inputs(processor, docs, system_prompt=None):
    """What lmms-eval 0.7.3's generic chat model (`lmms_eval/models/chat/huggingface.py`, `generate_until`) does with
    the processor, call for call: messages in the form of `ChatMessages.to_hf_messages()`, the system prompt as
    `_apply_system_prompt` adds it, one `apply_chat_template(msg, tokenize=False, add_generation_prompt=True)` per
    doc, then one processor call with the batch's images flattened and `videos` / `audios` as empty lists."""
    batched_messages, images = [], []
    for doc_images, question in docs:
        messages = [{"role": "user", "content": [*({"type": "image", "image": image} for image in doc_images),
                                                 {"type": "text", "text": question}]}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        batched_messages.append(messages)
        images.extend(doc_images)
    texts = [processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) for msg in batched_messages]
    kwargs = {"images": images, "videos": [], "audios": []}
    return texts, processor(text=texts, padding=True, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("chat_format", ["zephyr", "llama2"])
def test_lmms_eval_generic_model_call_shape(tokenizer, logo, chart, chat_format):
    config = InfiMMConfig.from_preset("infimm-zephyr", chat_format=chat_format,
                                      vision_config={"model_args": {"img_size": 28}})
    processor = InfiMMProcessor.from_config(config, copy.deepcopy(tokenizer))
    docs = [([logo], "What is this?"), ([], "No image, just text."), ([chart, logo], "Compare.")]
    texts, inputs = _lmms_eval_generate_until_inputs(processor, docs, system_prompt="Be brief.")
    hand = {
        "zephyr": ["<|system|>\nBe brief.</s>\n<|user|>\n<|endofchunk|><image>What is this?</s>\n<|assistant|>\n",
                   "<|system|>\nBe brief.</s>\n<|user|>\nNo image, just text.</s>\n<|assistant|>\n",
                   "<|system|>\nBe brief.</s>\n<|user|>\n<|endofchunk|><image><|endofchunk|><image>Compare.</s>\n"
                   "<|assistant|>\n"],
        "llama2": ["<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<|endofchunk|><image>What is this? [/INST]",
                   "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nNo image, just text. [/INST]",
                   "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<|endofchunk|><image><|endofchunk|><image>Compare. [/INST]"],
    }[chat_format]
    assert texts == hand
    width = inputs["input_ids"].shape[1]
    for row, prompt in enumerate(hand):
        # one `<s>`: the Llama-2 prompt writes its own, so the tokenizer must not add a second
        ids = tokenizer(prompt, add_special_tokens=chat_format != "llama2").input_ids
        assert ids.count(1) == 1
        assert inputs["input_ids"][row].tolist() == [tokenizer.pad_token_id] * (width - len(ids)) + ids
    assert inputs["image_mask"].tolist() == [[True, False], [False, False], [True, True]]
    for (row, slot), image in {(0, 0): logo, (2, 0): chart, (2, 1): logo}.items():
        torch.testing.assert_close(inputs["pixel_values"][row, slot], reference_pixels(image, 28), atol=1e-6, rtol=0)
    # lmms-eval then decodes the new tokens like this
    answer = tokenizer("Hello world", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert processor.batch_decode([answer], skip_special_tokens=True, clean_up_tokenization_spaces=False) == [
        "Hello world"]


def test_empty_videos_and_audio_are_accepted_and_others_refused(small_processor):
    image = Image.new("RGB", (8, 8))
    plain = small_processor(text="<image>hi", images=[image], return_tensors="pt")
    for empty in ({"videos": [], "audio": []}, {"videos": [], "audios": []}, {"videos": None, "audio": None},
                  {"videos": [[]], "audios": [[], []]}):
        out = small_processor(text="<image>hi", images=[image], return_tensors="pt", **empty)
        assert out.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(out[key], plain[key])
    for name, value in (("videos", [np.zeros((2, 4, 4, 3))]), ("audio", [np.zeros(16000)]),
                        ("audios", [np.zeros(16000)])):
        with pytest.raises(ValueError, match=rf"images and text only; `{name}` is not empty.*video frames as images"):
            small_processor(text="hi", **{name: value})


def test_unreadable_truncated_and_missing_files(small_processor, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all" * 10)
    buffer = io.BytesIO()
    Image.fromarray(noise(200, 200, seed=10)).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=rf"Image 0 of text 0: Could not read the image '{path}'.*re-save"):
            small_processor(text="<image>", images=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        small_processor(text="<image>", images=str(tmp_path / "nope.jpg"))


def test_zero_size_and_unsupported_images(small_processor):
    bad = {
        "zero width or height": [Image.new("RGB", (0, 5)), np.zeros((4, 0, 3), np.uint8)],
        "mode 'I;16' is not supported": [Image.fromarray(np.zeros((4, 4), np.uint16))],
        "mode 'F' is not supported": [Image.fromarray(np.zeros((4, 4), np.float32))],
        "no channel axis": [np.zeros((5, 6, 2), np.uint8)],
        r"values in \[0, 1\]": [np.full((5, 6, 3), 2.0, np.float32)],
        "8-bit values": [np.full((5, 6, 3), 300, np.int32)],
        "Unsupported image type": [{"not": "an image"}],
    }
    for message, images in bad.items():
        for image in images:
            with pytest.raises(ValueError, match=message):
                small_processor(text="<image>", images=[image])


def test_bad_messages(small_processor):
    image = Image.new("RGB", (8, 8))
    cases = {
        "has no text": [{"role": "user", "content": [{"type": "image", "image": image}]}],
        "has no content": [{"role": "user"}],
        "unknown type 'video'": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "x"}]}],
        "text item without a `text` string": [{"role": "user", "content": [{"type": "text"}]}],
        "image item without an image": [{"role": "user", "content": [{"type": "image"}, "x"]}],
        "unknown role": [{"role": "robot", "content": "x"}],
    }
    for message, conversation in cases.items():
        with pytest.raises(ValueError, match=message):
            small_processor.apply_chat_template(conversation, tokenize=True)
    # an empty text item is the explicit way to send an image-only turn
    inputs = small_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": ""}]}], tokenize=True,
        return_dict=True,
    )
    assert inputs["image_mask"].tolist() == [[True]]


def test_length_limit_and_truncation(tokenizer):
    processor = InfiMMProcessor.from_config(InfiMMConfig.from_preset("infimm-zephyr"), copy.deepcopy(tokenizer))
    processor.tokenizer.model_max_length = 20
    image = Image.new("RGB", (8, 8))
    messages = [user_turn(image, QUESTION)]
    with pytest.raises(ValueError, match=r"35 tokens long but the model takes at most 20"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # Left truncation that keeps `<|endofchunk|><image>`: the image stays, the oldest text goes.
    kept = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         processor_kwargs={"truncation": True, "max_length": 20})
    assert kept["input_ids"] == [[1] + RELEASE_IDS[16:]]
    assert kept["image_mask"].tolist() == [[True]]
    with pytest.raises(ValueError, match=r"would cut 1 of its 1 `<image>` tokens off from their images.*max_length"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      processor_kwargs={"truncation": True, "max_length": 12})


def test_other_call_errors(small_processor, tokenizer):
    with pytest.raises(ValueError, match="needs `text`"):
        small_processor(images=Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="images and text only"):
        small_processor(text="hi", videos=[np.zeros((2, 4, 4, 3))])
    with pytest.raises(ValueError, match="maps '<image>' to id 32001, but the model expects 5"):
        InfiMMProcessor(InfiMMImageProcessor(image_size=28), copy.deepcopy(tokenizer), image_token_id=5, eoc_token_id=6)
    plain = InfiMMProcessor(InfiMMImageProcessor(image_size=28), copy.deepcopy(tokenizer), chat_format="none")
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat_format"):
        InfiMMProcessor(InfiMMImageProcessor(image_size=28), copy.deepcopy(tokenizer), chat_format="chatml")


def test_tokenizer_without_infimm_tokens_gains_them():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(["<unk>", "<s>", "</s>", "a", "cat", "dog"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    processor = InfiMMProcessor(InfiMMImageProcessor(image_size=28), tokenizer, eoc_token_id=6, image_token_id=7)
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == [6, 7]
    assert tokenizer.pad_token == "</s>"
    inputs = processor(text="<image>a cat<|endofchunk|>", images=Image.new("RGB", (4, 4)))
    assert inputs["input_ids"] == [[7, 3, 4, 6]]
    assert tokenizer.decode([7, 3, 4, 6], skip_special_tokens=True) == "a cat"


@pytest.mark.parametrize("image_processor_class, hops", [(InfiMMImageProcessor, 2), (InfiMMImageProcessorFast, 1)])
def test_save_load_round_trips_keep_settings_and_ids(tokenizer, tmp_path, image_processor_class, hops):
    """Through save/load (twice: a reloaded tokenizer must save faithfully too): settings and the release's ids hold."""
    processor = InfiMMProcessor(image_processor_class(image_size=224, background_color=(0, 0, 0)),
                                copy.deepcopy(tokenizer), chat_format="vicuna")
    for hop in range(hops):
        folder = tmp_path / f"hop{hop}"
        processor.save_pretrained(folder)
        processor = InfiMMProcessor.from_pretrained(folder)
    assert type(processor.image_processor) is image_processor_class
    assert processor.image_processor.crop_size.height == 224 and processor.image_processor.size.shortest_edge == 224
    assert tuple(processor.image_processor.background_color) == (0, 0, 0)
    assert processor.chat_format == "vicuna"
    assert processor.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]) == "USER: Hi "
    assert (folder / "chat_template.jinja").is_file()
    assert AutoTokenizer.from_pretrained(str(folder))(RELEASE_PROMPT).input_ids == RELEASE_IDS
    assert processor.tokenizer(RELEASE_PROMPT).input_ids == RELEASE_IDS


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_image_slots_are_laid_out_by_hand(library):
    from infimm.image_processing_infimm import pad_image_slots

    flat = np.arange(3 * 3 * 2 * 2, dtype=np.float32).reshape(3, 3, 2, 2) + 1  # three images, no zero pixel
    pixels = flat if library == "numpy" else torch.from_numpy(flat)
    out = pad_image_slots(pixels, [2, 0, 1])
    assert type(out["pixel_values"]) is type(pixels) and out["pixel_values"].shape == (3, 2, 3, 2, 2)
    assert np.asarray(out["image_mask"]).tolist() == [[True, True], [False, False], [True, False]]
    values = np.asarray(out["pixel_values"])
    np.testing.assert_array_equal(values[0], flat[:2])
    np.testing.assert_array_equal(values[2, 0], flat[2])
    assert not values[1].any() and not values[2, 1].any()
    assert pad_image_slots(pixels[:0], [0, 0]) == {}
    with pytest.raises(ValueError, match=r"3 images for samples holding 2"):
        pad_image_slots(pixels, [1, 1])


def test_chat_templates_come_from_the_package_files():
    from infimm.processing_infimm import CHAT_FORMATS, CHAT_TEMPLATES, chat_template_for

    templates = REPO / "assets" / "chat_templates"
    macro = (templates / "render_content.jinja").read_text()
    for chat_format in ("zephyr", "vicuna", "llama2"):
        assert chat_template_for(chat_format) == macro + (templates / f"{chat_format}.jinja").read_text()
    assert CHAT_TEMPLATES == {name: chat_template_for(name) for name in CHAT_FORMATS} and CHAT_TEMPLATES["none"] is None
    with pytest.raises(ValueError, match="`chat_format` must be one of"):
        chat_template_for("chatml")
