"""Chat with InfiMM in the terminal: several turns, images attached to any of them, answers streamed.

    python examples/chat.py --model path/or/hub-id --image photo.jpg
    python examples/chat.py --model path/or/hub-id --system "Answer in one sentence."
    python examples/chat.py    # no download: a small random-weight InfiMM (its answers are noise)

Type a message and press Enter. `/image PATH [PATH ...]` attaches images to your next message, `/reset` forgets the
conversation, `/quit` (or the end of the input) leaves. Every turn's prompt is the whole conversation through the
model's chat template, so earlier images and answers stay in view; but the conversation's cache is kept between
turns, so a turn computes only its own tokens and encodes only its own images (the answers equal those of the whole
prompt run from scratch). A conversation longer than the model's context is refused with a message, and `/reset`
starts over.

Loading (Hub folders, repo ids, original release snapshots) and the random model come from `generate.py`, next to
this file.
"""

import argparse
import os

import torch
from transformers import TextStreamer

from generate import RANDOM_WEIGHTS_NOTICE, add_model_arguments, generate_overrides, load, model_or_random
from infimm import CACHE_ARGUMENT
from infimm.image_state_infimm import image_state
from infimm.image_processing_infimm import load_image


class Chat:
    """One conversation: its messages so far, the images waiting for the next user message, and its cache.

    `send()` appends the user's message (with the waiting images), generates, and appends the answer as the
    assistant's message, so the next turn's prompt holds the whole exchange. The cache `generate()` returned
    (which also carries the conversation's image state) continues the next turn's prompt from the longest run of
    tokens it shares with it, the standard transformers pattern of passing the full prompt with a cache.
    """

    def __init__(self, model, processor, system: str | None = None, **generate_kwargs):
        if processor.chat_template is None:
            raise ValueError(
                "This model has no chat template (a pretrained, non-chat checkpoint). Use examples/few_shot.py or "
                "examples/generate.py with it, or pass a chat model to --model."
            )
        self.model, self.processor = model, processor
        self.system = system
        self.generate_kwargs = generate_kwargs
        self.reset()

    def reset(self):
        self.messages = [] if self.system is None else [
            {"role": "system", "content": [{"type": "text", "text": self.system}]}
        ]
        self.pending_images = []
        self.cache, self.cached_ids = None, None

    def attach(self, *images):
        """Images for the next message; paths and URLs are read now, so a bad one fails here and not mid-turn.

        All or nothing: if one of them cannot be read, none is attached.
        """
        loaded = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        self.pending_images.extend(loaded)

    def inputs(self, messages=None):
        """Model inputs for `messages` (default: the conversation so far) with the assistant's turn opened."""
        return self.processor.apply_chat_template(
            self.messages if messages is None else messages,
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        ).to(self.model.device, dtype=self.model.dtype)

    def send(self, text: str, streamer=None) -> str:
        content = [*({"type": "image", "image": image} for image in self.pending_images), {"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        inputs = self.inputs(messages)  # raises (and keeps the conversation as it was) if it no longer fits
        cache, self.cache = self._reusable_cache(inputs), None
        reuse = {} if cache is None else {CACHE_ARGUMENT: cache}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, **reuse, streamer=streamer, **self.generate_kwargs, return_dict_in_generate=True
            )
        sequences = output.sequences
        answer = self.processor.post_process_image_text_to_text(sequences, input_ids=inputs["input_ids"])[0].strip()
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.pending_images = []
        self.cache = output[CACHE_ARGUMENT]
        self.cached_ids = sequences[0, : self.cache.get_seq_length()] if self.cache is not None else None
        return answer

    def _reusable_cache(self, inputs):
        """The previous turn's cache cut back to the tokens this prompt starts with, or None to start afresh.

        The previous answer comes back re-tokenized from its text, so the shared run usually ends inside it. A cut
        that would drop an image, or a first image after a text-only start (InfiMM's per-sample flag changes the
        text before a sample's first image), means a fresh start.
        """
        if self.cache is None:
            return None
        ids = inputs["input_ids"][0].to(self.cached_ids.device)
        length = min(len(ids) - 1, len(self.cached_ids))  # generate() needs at least one new token
        same = (ids[:length] == self.cached_ids[:length]).int().cumprod(0)
        shared = int(same.sum())
        state = image_state(self.cache)
        cached_images = int(state.num_images[0]) if state is not None else 0
        media = self.processor.image_token_id
        if shared == 0 or int((ids[:shared] == media).sum()) != cached_images:
            return None
        if cached_images == 0 and bool((ids[shared:] == media).any()):
            return None
        try:
            if shared < self.cache.get_seq_length():
                self.cache.crop(shared - self.cache.get_seq_length())  # a negative count: tokens to drop
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window cannot roll back
            return None
        return self.cache


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", nargs="+", default=[], help="images attached to the first message")
    parser.add_argument("--system", help="a system message opening the conversation")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, processor = load(model_or_random(args), args.device, args.dtype)
    chat = Chat(model, processor, system=args.system, **generate_overrides(args))
    if args.image:
        chat.attach(*args.image)
    torch.manual_seed(args.seed)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    if args.model is None:
        print(RANDOM_WEIGHTS_NOTICE)
    print("Commands: /image PATH [PATH ...], /reset, /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            chat.reset()
            print("(conversation cleared)")
            continue
        if command == "/image":
            try:
                chat.attach(*rest.split())
            except (OSError, ValueError) as err:
                print(f"(could not load an image, so none of these was attached: {err})")
                continue
            print(f"({len(chat.pending_images)} image(s) attached to your next message)")
            continue
        print("infimm> ", end="", flush=True)
        try:
            chat.send(line, streamer=streamer)
        except ValueError as err:  # e.g. the conversation outgrew the model's context
            print(f"\n({err} Type /reset to start over.)")
    return chat


if __name__ == "__main__":
    main()
