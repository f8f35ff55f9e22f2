"""Convert an InfiMM checkpoint into a Hub-ready folder, then check the folder the way it will be used.

    python examples/convert.py --input ./infimm-zephyr --output ./infimm-zephyr-hf
    python examples/convert.py --input ckpt/mp_rank_00_model_states.pt --preset infimm-zephyr \\
        --tokenizer ./infimm-zephyr --output ./my-infimm --dtype bfloat16

The conversion is `infimm-convert` with the same options (listed below this text). Then the output folder is loaded
through `AutoModelForImageTextToText` / `AutoProcessor` with `trust_remote_code=True`, so the model code comes from
the folder's own files, and one image with a prompt (`--image`, `--prompt`) runs through it. When the input is a
release snapshot, the snapshot itself is read directly (`InfiMMForConditionalGeneration.from_pretrained`) and given
the same input: the largest difference between the two last-token logits is printed, and the script exits with 1 if
they differ beyond the dtype's rounding. The two models are loaded one after the other, never together.
"""

import argparse
import gc
import sys

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from infimm.convert_weights import is_legacy_checkpoint
from infimm.convert_weights.__main__ import build_parser
from infimm.convert_weights.__main__ import main as convert_main
from generate import prompt_inputs
from infimm import InfiMMForConditionalGeneration
from infimm.hub_infimm import sample_image_path


def _check_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--image", nargs="+", help="image(s) for the check (default: the bundled sample chart)")
    parser.add_argument("--prompt", default="Please explain this image to me.")
    return parser


@torch.inference_mode()
def last_token_logits(model, processor, images, prompt: str) -> torch.Tensor:
    inputs = prompt_inputs(processor, images, prompt).to(model.device, dtype=model.dtype)
    return model(**inputs).logits[:, -1].float().cpu()


def check_output(output, source, images, prompt: str) -> int:
    """Loads `output` as Hub remote code and, for a release snapshot `source`, compares it with the snapshot."""
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    print(f"Loaded {output} as {type(model).__module__}.{type(model).__name__} ({model.dtype})")
    converted, dtype = last_token_logits(model, processor, images, prompt), model.dtype
    del model
    gc.collect()
    if source is None or not is_legacy_checkpoint(source):
        print("The input is not a release snapshot, so there is no model to compare with; the folder loads and runs.")
        return 0
    original = InfiMMForConditionalGeneration.from_pretrained(source, dtype=dtype).eval()
    expected = last_token_logits(original, processor, images, prompt)
    print(f"Largest last-token logit difference against the snapshot read directly: "
          f"{(converted - expected).abs().max().item():.3g}")
    try:
        torch.testing.assert_close(converted, expected, **_tolerance(dtype))
    except AssertionError as error:
        print(f"The converted folder does not compute what the snapshot does:\n{error}", file=sys.stderr)
        return 1
    print("The converted folder computes what the snapshot computes.")
    return 0


def _tolerance(dtype: torch.dtype) -> dict:
    """Rounding of the logits' dtype: the two paths run the same operations, so only that may differ."""
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": 4 * eps}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        _check_options().print_help()
        build_parser().print_help()
        return 0
    check, convert_argv = _check_options().parse_known_args(argv)
    status = convert_main(convert_argv)
    if status:
        return status
    args = build_parser().parse_args(convert_argv)
    images = check.image or [str(sample_image_path())]
    return check_output(args.output, args.input, images, check.prompt)


if __name__ == "__main__":
    sys.exit(main())
