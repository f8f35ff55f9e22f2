"""Few-shot prompting in InfiMM's pretraining layout: example images with their texts, then the query images.

    python examples/few_shot.py --model path/or/hub-id \\
        --shot cat.jpg "A cat on a sofa." --shot dog.jpg "A dog in the snow." --query a.jpg b.jpg
    python examples/few_shot.py --model path/or/hub-id --prompt "Question: What colour is it? Answer:" \\
        --shot bus.jpg "Question: What colour is it? Answer: red" --query car.jpg
    python examples/few_shot.py    # no download: a small random-weight InfiMM and coloured squares

Each query becomes one prompt `<image>TEXT<|endofchunk|><image>TEXT<|endofchunk|>...<image>PROMPT` (the Flamingo
layout the models were pretrained on); all queries run as one batch, and each answer ends at the `<|endofchunk|>`
that closes a chunk in that layout (or at end-of-sequence). The demonstrations are computed once: their cache is
expanded to the batch and every query continues it, computing only its own image and tokens (the answers equal
those of the whole prompts run from scratch). Pretrained (non-chat) checkpoints are
the ones this suits; chat models answer better through examples/chat.py.

Loading (Hub folders, repo ids, original release snapshots) and the random model come from `generate.py`, next to
this file.
"""

import argparse

import PIL.Image
import torch
from transformers import DynamicCache

from generate import RANDOM_WEIGHTS_NOTICE, add_model_arguments, generate_overrides, load, model_or_random
from infimm import CACHE_ARGUMENT


def few_shot_prompt(processor, shot_texts: list[str], prompt: str = "") -> str:
    """The pretraining layout: each example image followed by its text and an end-of-chunk, then the query image."""
    image, eoc = processor.image_token, processor.eoc_token
    return "".join(f"{image}{text}{eoc}" for text in shot_texts) + image + prompt


def few_shot(model, processor, shots, queries, prompt: str = "", reuse_shots: bool = True, **generate_kwargs):
    """Answers for `queries` (images) after the `(image, text)` `shots`, generated as one batch.

    With `reuse_shots`, the demonstrations run once and every query continues their cache.
    """
    shot_images = [image for image, _ in shots]
    shot_texts = [text for _, text in shots]
    text = few_shot_prompt(processor, shot_texts, prompt)
    inputs = processor(
        text=[text] * len(queries), images=[[*shot_images, query] for query in queries], return_tensors="pt"
    ).to(model.device, dtype=model.dtype)
    # A chunk ends at <|endofchunk|>: stop there as well as at the tokenizer's end-of-sequence.
    generate_kwargs.setdefault("eos_token_id", [processor.tokenizer.eos_token_id, processor.eoc_token_id])
    generate_kwargs.setdefault("do_sample", False)  # short completions: greedy (or beams) unless asked otherwise
    rows = len(queries) * generate_kwargs.get("num_beams", 1)
    cache = shots_cache(model, processor, shot_images, shot_texts, inputs["input_ids"], rows) if reuse_shots else None
    reuse = {} if cache is None else {CACHE_ARGUMENT: cache}
    with torch.inference_mode():
        output = model.generate(**inputs, **reuse, **generate_kwargs)
    answers = processor.batch_decode(output, input_ids=inputs["input_ids"], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def shots_cache(model, processor, shot_images, shot_texts, prompt_ids, rows: int):
    """The demonstrations' cache, computed once and expanded to `rows` (queries x beams); None when there are no
    shots, or when the prompts do not start with the demonstrations' tokens (then nothing can be reused)."""
    if not shot_images:
        return None
    prefix = processor(
        text=["".join(f"{processor.image_token}{text}{processor.eoc_token}" for text in shot_texts)],
        images=[shot_images], return_tensors="pt",
    ).to(model.device, dtype=model.dtype)
    length = prefix["input_ids"].shape[1]
    if length >= prompt_ids.shape[1] or not bool((prompt_ids[:, :length] == prefix["input_ids"]).all()):
        return None
    cache = DynamicCache(config=model.config.text_config)
    with torch.inference_mode():
        model.model(**prefix, **{CACHE_ARGUMENT: cache})  # the headless model: no logits are needed
    cache.batch_repeat_interleave(rows)
    return cache


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, max_new_tokens_default=20)
    parser.add_argument("--shot", nargs=2, action="append", metavar=("IMAGE", "TEXT"), default=[],
                        help="an example image and its text (repeat for more shots; none: zero-shot)")
    parser.add_argument("--query", nargs="+", default=[], help="images to answer for, as one batch")
    parser.add_argument("--prompt", default="", help="text after each query image, e.g. 'Output:' or a question")
    parser.add_argument("--num-beams", type=int, default=1)
    return parser.parse_args(argv)


def _square(rgb) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (64, 64), rgb)


def main(argv=None):
    args = parse_args(argv)
    if args.model is not None and not args.query:
        raise SystemExit("Pass the images to answer for with --query IMAGE [IMAGE ...].")
    if args.query:
        shots, queries, names = args.shot, args.query, args.query
    else:  # the random model's demonstration, on generated images
        shots = [(_square((220, 30, 30)), "A red square."), (_square((30, 170, 60)), "A green square.")]
        queries, names = [_square((30, 60, 220)), _square((230, 210, 30))], ["a blue square", "a yellow square"]

    model, processor = load(model_or_random(args), args.device, args.dtype)
    if args.model is None:
        print(RANDOM_WEIGHTS_NOTICE)
    print("Prompt:", few_shot_prompt(processor, [text for _, text in shots], args.prompt))
    torch.manual_seed(args.seed)
    answers = few_shot(model, processor, shots, queries, args.prompt, num_beams=args.num_beams,
                       **generate_overrides(args))
    for name, answer in zip(names, answers):
        print(f"{name}: {answer}")
    return answers


if __name__ == "__main__":
    main()
