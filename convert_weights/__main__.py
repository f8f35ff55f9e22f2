"""Command line: `python -m infimm.convert_weights ...` or `infimm-convert ...`; `... verify FOLDER` checks a finished folder's
shards against their recorded SHA-256."""

import argparse
import logging
import signal
import sys
from pathlib import Path

from .convert import DTYPES, Options, convert
from .errors import ConversionError
from .verify import verify_checksums


EXAMPLES = """\
inputs (recognised by their content, not their names):

  a released InfiMM snapshot (legacy config.json with `visual`/`language` blocks, pytorch_model.bin or its shards,
  tokenizer files); config and tokenizer come from the folder:
    infimm-convert --input ./infimm-zephyr --output ./infimm-zephyr-hf

  a DeepSpeed training checkpoint (weights under "module", keys with or without `module.` / `model.`):
    infimm-convert --input ckpt/global_step5000/mp_rank_00_model_states.pt --config ./infimm-zephyr/config.json \\
        --tokenizer ./infimm-zephyr --output ./my-infimm

  an OpenFlamingo-style checkpoint ("model_state_dict") or a plain state dict (.pt, .bin or .safetensors):
    infimm-convert --input checkpoint.pt --preset infimm-zephyr --tokenizer ./infimm-zephyr --output ./my-infimm

  parts: a Hugging Face LLM folder, an EVA-CLIP checkpoint (original or timm naming) and a connector checkpoint
  holding only the resampler and cross-attention (as OpenFlamingo saves trainable parameters); <|endofchunk|> and
  <image> are added to the LLM's vocabulary when missing:
    infimm-convert --llm ./zephyr-7b-beta --vision EVA02_CLIP_L_336_psz14_s6B.pt --connector connector.pt \\
        --preset infimm-zephyr --output ./my-infimm
  or, to start pretraining from a fresh connector:
    infimm-convert --llm ./zephyr-7b-beta --vision EVA02_CLIP_L_336_psz14_s6B.pt --init-connector \\
        --preset infimm-zephyr --output ./infimm-zephyr-init

The output folder loads with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) and can be pushed
to the Hub as it is. It is written beside the target and renamed into place only when complete and verified.
--overwrite replaces only a folder an earlier conversion wrote (it holds .infimm-conversion.json) or an empty one.

checking a converted folder later (after a copy or a download): every shard against the SHA-256 recorded while it
was written; exit status 2 and the corrupted shards named when one differs:
    infimm-convert verify FOLDER
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infimm-convert",
        description="Convert InfiMM checkpoints into a Hub-ready folder of sharded safetensors, exactly and in "
                    "bounded memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("input (either --input, or the parts)")
    source.add_argument("--input", type=Path, help="release snapshot folder or checkpoint file")
    source.add_argument("--llm", type=Path, help="parts: Hugging Face LLM folder")
    source.add_argument("--vision", type=Path, help="parts: EVA-CLIP checkpoint file (original or timm naming)")
    source.add_argument("--connector", type=Path, help="parts: resampler + cross-attention checkpoint")
    source.add_argument("--init-connector", action="store_true",
                        help="initialise the resampler and cross-attention afresh (gates at 0) instead of loading "
                             "them; the input must not hold them")
    arch = parser.add_argument_group("architecture and tokenizer")
    arch.add_argument("--config", type=Path, help="config.json (legacy or new format) describing the checkpoint")
    arch.add_argument("--preset", help="released variant: infimm-zephyr, infimm-llama13b, infimm-vicuna13b")
    arch.add_argument("--tokenizer", type=Path, help="folder with tokenizer files (default: the input folder)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, required=True, help="folder to create")
    out.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep each tensor's)")
    out.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing output folder that an earlier conversion wrote (or an empty one)")
    out.add_argument("--check-values", action="store_true",
                     help="re-read every written tensor and compare it with its source, bit for bit")
    out.add_argument("--seed", type=int, default=0, help="seed for new token rows and a fresh connector")
    out.add_argument("--license", help="model card license (default cc-by-nc-4.0, the release's; 'other' for parts)")
    out.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub repository afterwards")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    return parser


def build_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infimm-convert verify",
        description="Check every shard of a converted folder against the SHA-256 recorded when it was written.",
    )
    parser.add_argument("folder", type=Path, help="a folder written by infimm-convert")
    return parser


def verify_main(argv) -> int:
    folder = build_verify_parser().parse_args(argv).folder
    try:
        checked = verify_checksums(folder)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{folder}: all {len(checked)} shard(s) match their recorded SHA-256.")
    return 0


def push_to_hub(folder: Path, repo_id: str, private: bool):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                      commit_message="Add InfiMM weights converted by infimm-convert")
    return f"https://huggingface.co/{repo_id}"


def _terminate(signum, frame):
    # Turn SIGTERM / SIGHUP into an exception so the staging folder is removed on the way out.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = Options(
        output=args.output, input=args.input, config=args.config, preset=args.preset, tokenizer=args.tokenizer,
        llm=args.llm, vision=args.vision, connector=args.connector, init_connector=args.init_connector,
        dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        check_values=args.check_values, seed=args.seed, license=args.license, repo_id=args.push_to_hub,
    )
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = convert(options)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(result.summary())
    if args.push_to_hub:
        print(f"Pushed to {push_to_hub(result.output, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
