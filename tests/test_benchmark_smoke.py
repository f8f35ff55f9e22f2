"""Smoke tests of the benchmarks on a tiny config, end to end (structure, not timings): `benchmarks/decode.py` (every
system and case in the table) and `benchmarks/prefix_reuse.py` (every chat turn and few-shot case); each report
is written again from its results JSON alone and must come out the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `benchmarks` package, for the scripted texts of the prefix-reuse prompts

from benchmarks.reuse import CAPTIONS, QUESTIONS  # noqa: E402
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

SYSTEMS = ("infimm", "bare", "idefics", "llava")
LABELS = ("InfiMM (this package)", "bare LM (Mistral)", "IDEFICS (transformers)", "LLaVA-style (transformers)")
CASES = [(0, 1), (1, 1), (2, 1), (4, 1), (8, 1), (1, 4)]  # (images, batch)


def _run(command, tmp_path, timeout):
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _table_lines(text, first_header):
    """The body lines of the markdown table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def _rewritten_from_json(script, tmp_path, stem):
    """The report written again from the run's JSON (no run): the same markdown."""
    again = tmp_path / "again"
    _run([script, "--from-json", str(tmp_path / "results.json"), "--out-dir", str(again)], tmp_path, 120)
    assert (again / f"{stem}.md").read_text() == (tmp_path / f"{stem}.md").read_text()
    assert (again / f"{stem}.png").stat().st_size > 1000


@pytest.mark.slow
def test_decode_benchmark_tiny_runs_every_system_and_case(tmp_path):
    proc = _run(["benchmarks/decode.py", "--tiny", "--quick", "--threads", "1", "--out-dir", str(tmp_path),
                 "--json", str(tmp_path / "results.json")], tmp_path, 300)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == {}
    rows = {(r["system"], r["images"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {(s, n, b) for s in SYSTEMS for n, b in CASES}
    for key, row in rows.items():
        assert "error" not in row, key
        for field in ("prefill_ms", "decode_ms", "decode_ratio", "bare_decode_ms"):
            assert row[field] > 0, (key, field, row[field])
    # LLaVA spends one LM token per vision patch (2 x 2 patches in the tiny config); the others one per image.
    assert rows[("llava", 8, 1)]["prompt_tokens"] == rows[("infimm", 8, 1)]["prompt_tokens"] + 8 * (4 - 1)
    assert rows[("infimm", 8, 1)]["prompt_tokens"] == rows[("bare", 8, 1)]["prompt_tokens"]
    assert results["vision_check"]["timm_eva_ms"] > 0

    # The printed table and the markdown file hold one line per system and case.
    markdown = (tmp_path / "decode.md").read_text()
    for text in (proc.stdout, markdown):
        cells = {tuple(row[:3]) for row in _table_lines(text, "system")}
        assert cells == {(label, str(n), str(b)) for label in LABELS for n, b in CASES}
    assert "- CPU: " in markdown and "## Targets" in markdown
    assert "python benchmarks/decode.py --tiny --quick --threads 1    # this table and plot" in markdown
    assert (tmp_path / "decode.png").stat().st_size > 1000
    _rewritten_from_json("benchmarks/decode.py", tmp_path, "decode")


@pytest.mark.slow
def test_prefix_reuse_benchmark_tiny_runs_every_turn_and_case(tmp_path):
    from transformers import AutoTokenizer

    from conftest import TOKENIZER_DIR

    _run(["-m", "benchmarks.prefix_reuse", "--tiny", "--quick", "--out-dir", str(tmp_path),
          "--json", str(tmp_path / "results.json")], tmp_path, 600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == {}
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)

    chat = results["chat"]
    assert [r["turn"] for r in chat] == list(range(1, 9)) and [r["images"] for r in chat] == list(range(1, 9))
    # Turn 1 by hand in Zephyr's template (the release's), an image marked `<|endofchunk|><image>`.
    turn1 = f"<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>{QUESTIONS[0]}</s>\n<|assistant|>\n"
    assert chat[0]["prompt_tokens"] == len(tokenizer(turn1)["input_ids"])
    assert chat[0]["cached_tokens"] == 0
    for before, row in zip(chat, chat[1:]):
        # The cache a turn starts from holds the previous prompt and its answer (but the answer's last token).
        assert before["prompt_tokens"] < row["cached_tokens"] < row["prompt_tokens"]
        assert row["new_tokens"] == row["prompt_tokens"] - row["cached_tokens"]
    assert chat[-1]["new_tokens"] < chat[-1]["prompt_tokens"] / 4
    for row in chat:
        assert row["with_ms"] > 0 and row["without_ms"] > 0 and row["turn1_ms"] > 0
        # With reuse, the first token's logits are those of the whole prompt run without a cache.
        assert row["logit_diff"] <= 1e-4, row

    few = {r["shots"]: r for r in results["few_shot"]}
    assert set(few) == {8, 32}
    for shots, row in few.items():
        assert row["queries"] == 16 and row["images_per_prompt"] == shots + 1
        assert row["logit_diff"] <= 1e-4, row
        for field in ("with_query_ms", "without_query_ms", "zero_query_ms", "prefix_ms", "with_ratio"):
            assert row[field] > 0, (shots, field)
    # Demonstrations `<image>caption<|endofchunk|>` (BOS first), then the query's `<image>` alone.
    for shots, row in few.items():
        demos = "".join(f"<image>{CAPTIONS[i % len(CAPTIONS)]}<|endofchunk|>" for i in range(shots))
        assert row["prefix_tokens"] == len(tokenizer(demos)["input_ids"])
        assert row["new_tokens"] == 1 and row["prompt_tokens"] == row["prefix_tokens"] + 1

    markdown = (tmp_path / "prefix_reuse.md").read_text()
    assert [row[0] for row in _table_lines(markdown, "turn")] == [str(t) for t in range(1, 9)]
    assert [row[0] for row in _table_lines(markdown, "shots")] == ["8", "32"]
    assert "## Targets" in markdown and "- CPU: " in markdown
    _rewritten_from_json("benchmarks/prefix_reuse.py", tmp_path, "prefix_reuse")
