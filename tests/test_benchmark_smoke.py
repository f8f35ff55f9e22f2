"""Smoke test of `benchmarks/decode.py`: a tiny config end to end, every system and case in the table (no timings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "decode.py"

SYSTEMS = ("infimm", "bare", "idefics", "llava")
LABELS = ("InfiMM (this package)", "bare LM (Mistral)", "IDEFICS (transformers)", "LLaVA-style (transformers)")
CASES = [(0, 1), (1, 1), (2, 1), (4, 1), (8, 1), (1, 4)]  # (images, batch)


@pytest.mark.slow
def test_decode_benchmark_tiny_runs_every_system_and_case(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--quick", "--threads", "1", "--out-dir", str(tmp_path),
         "--json", str(tmp_path / "results.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

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
        table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| system")]
        cells = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in table}
        assert cells == {(label, str(n), str(b)) for label in LABELS for n, b in CASES}
    assert "- CPU: " in markdown and "## Targets" in markdown
    assert (tmp_path / "decode.png").stat().st_size > 1000
