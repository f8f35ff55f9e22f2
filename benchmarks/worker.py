"""The decode benchmark's worker: one process per system, holding that system and the bare LM.

A fresh process per system keeps one model's allocations, threads and compiled graphs away from the next; inside
it, every case runs the system's and the bare LM's `generate()` in turns (`timing.measure_pair`).
"""

from __future__ import annotations

import gc
import multiprocessing
import traceback

from .models import BUILDERS, build_bare, make_inputs, model_info
from .probes import measure_compiled, profile_decode_step, vision_prefill_check
from .timing import generation_config, measure_pair, median, paired_ratio


def summarise(system, num_images, batch, prompt_tokens, runs):
    """One table row from the runs of a case: medians over the repeats, ratios of the per-repeat pairs."""
    bare_prefill, bare_decode, _ = zip(*runs["bare"])
    row = {
        "system": system, "images": num_images, "batch": batch, "prompt_tokens": prompt_tokens,
        "bare_prefill_ms": median(bare_prefill), "bare_decode_ms": median(bare_decode),
    }
    if runs["system"]:
        prefill, decode, _ = zip(*runs["system"])
        row.update(
            prefill_ms=median(prefill), decode_ms=median(decode),
            decode_ratio=paired_ratio(decode, bare_decode),
            prefill_ratio=paired_ratio(prefill, bare_prefill),
            raw=runs["system"], raw_bare=runs["bare"],
        )
    else:
        row.update(prefill_ms=row["bare_prefill_ms"], decode_ms=row["bare_decode_ms"], decode_ratio=1.0,
                   prefill_ratio=1.0, raw=runs["bare"], raw_bare=runs["bare"])
    return row


def worker(job, conn=None):
    """Runs in its own process: one system and the bare LM, every case, stepping in turns."""
    try:
        result = measure_system(job)
    except Exception:
        result = {"system": job["system"], "error": traceback.format_exc()}
    if conn is None:
        return result
    conn.send(result)
    conn.close()


def measure_system(job):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    dims, system = job["dims"], job["system"]
    settings = {"repeats": job["repeats"], "warmup": job["warmup"], "new_tokens": job["new_tokens"]}
    gen = generation_config(job["new_tokens"])

    bare = build_bare(dims).to(device)
    model = None if system == "bare" else BUILDERS[system](dims).to(device)
    # Everything alive now (modules, models) lives for the whole process: keep it out of the collector's scans
    # so the `gc.collect()` before each timed run stays cheap.
    gc.collect()
    gc.freeze()
    out = {"system": system, "rows": [], "profiles": {}}
    out["models"] = {name: model_info(m) for name, m in (("bare", bare), (system, model)) if m is not None}

    for num_images, batch in job["cases"]:
        try:
            bare_inputs = make_inputs("bare", dims, num_images, batch, device)
            inputs = bare_inputs if model is None else make_inputs(system, dims, num_images, batch, device)
            runs = measure_pair(model, bare, inputs, bare_inputs, gen, device, job["repeats"], job["warmup"])
        except Exception:  # one failing case must not cost the others
            error = traceback.format_exc()
            out["rows"].append({"system": system, "images": num_images, "batch": batch, "error": error})
            print(f"  [{system}] images={num_images} batch={batch}: failed\n{error}", flush=True)
            continue
        row = summarise(system, num_images, batch, inputs["input_ids"].shape[1], runs)
        out["rows"].append(row)
        if job.get("verbose"):
            print(f"  [{system}] images={num_images} batch={batch}: prefill {row['prefill_ms']:.1f} ms, "
                  f"decode {row['decode_ms']:.2f} ms/token, x{row['decode_ratio']:.3f} bare", flush=True)
        if job.get("profile") and batch == 1 and num_images in job["profile_images"]:
            if model is not None:
                out["profiles"][f"{system}, {num_images} images"] = profile_decode_step(model, inputs, device)
            if system in ("infimm", "bare") and "bare" not in out["profiles"]:
                out["profiles"]["bare"] = profile_decode_step(bare, bare_inputs, device)

    extras = []
    if system == "infimm" and job.get("vision_check"):
        extras.append(("vision_check", lambda: vision_prefill_check(
            model, device, job["vision_repeats"], max(1, job["warmup"]))))
    if system == "infimm" and job.get("compile"):
        extras.append(("compile", lambda: measure_compiled(model, bare, dims, device, settings)))
    for name, fn in extras:
        try:
            out[name] = fn()
        except Exception:
            out.setdefault("extra_errors", {})[name] = traceback.format_exc()
    return out


def run_worker(job, start_method):
    """Runs `worker(job)` in a fresh process and returns its result."""
    ctx = multiprocessing.get_context(start_method)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker, args=(job, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"system": job["system"], "error": "worker process died without a result"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"worker exited with code {proc.exitcode}"
    return result


def collect(results: dict, systems, cases, dims) -> dict:
    """The workers' results merged into one results dict: rows of every system (the bare LM's from the first worker
    that produced rows, the InfiMM one when it ran), models, errors, the vision check and the compile probe."""
    from .models import SYSTEMS

    errors = {s: r["error"] for s, r in results.items() if "error" in r}
    for system, res in results.items():
        for row in res.get("rows", []):
            if "error" in row:
                errors[f"{system}, {row['images']} images, batch {row['batch']}"] = row["error"]
        for name, err in res.get("extra_errors", {}).items():
            errors[f"{system}, {name}"] = err

    rows, bare_source = [], None
    if "bare" in systems:
        bare_source = next((s for s in results if "rows" in results[s]), None)
        for r in results[bare_source]["rows"] if bare_source else []:
            if "error" in r:
                rows.append({**r, "system": "bare"})
                continue
            rows.append({**r, "system": "bare", "prompt_tokens": dims["prompt_tokens"],
                         "prefill_ms": r["bare_prefill_ms"], "decode_ms": r["bare_decode_ms"],
                         "decode_ratio": 1.0, "prefill_ratio": 1.0})
    for system, res in results.items():
        if system == "bare":
            continue
        if "rows" not in res:
            rows += [{"system": system, "images": n, "batch": b, "error": res["error"]} for n, b in cases]
        else:
            rows += res["rows"]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(key=lambda r: (order[r["system"]], r["batch"], r["images"]))

    models = {}
    for res in results.values():
        models.update(res.get("models", {}))
    return {
        "rows": rows,
        "bare_source": bare_source,
        "models": {name: models[name] for name in SYSTEMS if name in models},
        "vision_check": results.get("infimm", {}).get("vision_check"),
        "compile": results.get("infimm", {}).get("compile"),
        "profiles": {name: table for res in results.values() for name, table in res.get("profiles", {}).items()},
        "errors": errors,
    }
