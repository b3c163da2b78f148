"""Scale benchmark: seconds per search step and peak memory of the DMS search against a plain forward+backward
of the same randomly initialised model, plus the repair.

    python scripts/benchmark_scale.py                                 # GPU: 8B, 1B, Gemma 3 270M shapes, seq 2048, bf16
    python scripts/benchmark_scale.py --shapes gemma3-270m 1b         # CPU (fp32, seq 256)
    python scripts/benchmark_scale.py --library OLD_CHECKOUT --label before  # the same with another dms-llm

Each (shape, mode) runs in its own subprocess so peak memory is its own (CUDA: max allocated; CPU: peak RSS, model
initialisation and imports included). "plain" = a stock training step: the model's logits, LM loss, backward with
every weight requiring grad (no optimizer step). "search" = DMS search steps as `dms_llm.prune` runs them, on few
calibration windows so that most steps find the dense teacher's outputs cached: "s/step" is the median of those,
"first-epoch s/step" the median of the steps that also computed the teacher for their window. Activation
checkpointing is on for both on CUDA, off on CPU. "reconstruct" = the repair `prune` runs after the search
(dms_llm.reconstruct, its default calibration windows) on a uniform keep-0.8 structure: its whole wall time.
``--library`` runs the children with another dms-llm checkout first on the path (rows labelled ``--label``), so a
change is measured against the code before it with the same script. Rows accumulate in ``--out`` (a row replaces
the one of the same device, shape, mode, label and length); the marked scale section of BENCHMARKS.md shows them all.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import replace_section  # a sibling module of this script

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- scale:start -->", "<!-- scale:end -->"
LLAMA = dict(model_type="llama", max_position_embeddings=8192)
SHAPES = {
    "8b": dict(LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),  # Llama-3-8B
    "7b": dict(LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),  # Llama-2-7B
    "1b": dict(LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, intermediate_size=2048, vocab_size=262144,
                        tie_word_embeddings=True, sliding_window=512, max_position_embeddings=32768),  # Gemma 3 270M
}
SEARCH_WINDOWS = 2  # calibration windows of the search rows: steps after the first two find the teacher cached


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build(shape: str, seq_len: int, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(SHAPES[shape])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    return model, config


def child(shape: str, mode: str, seq_len: int, steps: int) -> dict:
    import dms_llm

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        from dms_llm.training import reuse_freed_memory

        reuse_freed_memory()  # as the command line does
    model, config = build(shape, seq_len, device, dtype)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    calib = torch.randint(0, config.vocab_size, (steps + 2, seq_len), generator=torch.Generator().manual_seed(0))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = None
    if mode == "plain":
        if cuda:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        times = []
        for i in range(steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = calib[i : i + 1].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            loss.backward()
            model.zero_grad(set_to_none=True)
            del logits, loss
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = times[1:]
    elif mode == "reconstruct":  # the whole repair of a uniform keep-0.8 structure, as `prune` runs it by default
        from dms_llm.baselines import random_uniform
        from dms_llm.reconstruct import ReconstructConfig, reconstruct
        from dms_llm.resources import ResourceModel
        from dms_llm.structure import ModelShape

        recon = ReconstructConfig()
        windows = torch.randint(0, config.vocab_size, (recon.samples, seq_len),
                                generator=torch.Generator().manual_seed(0))
        target = dms_llm.PruneConfig(keep=0.8).resolve_target(ResourceModel(ModelShape.from_model(model)))
        structure = random_uniform(model, target)
        pruned = dms_llm.build_pruned_model(model, structure)
        if cuda:
            torch.cuda.synchronize()
        report = reconstruct(pruned, model, structure, windows.to(device), recon, progress=False)
        seconds = [report["seconds"]]  # one whole run: "seconds_per_step" is its wall time
    else:
        # few windows, so that the steps after the first epoch find the teacher's outputs cached
        cfg = dms_llm.PruneConfig(keep=0.8, steps=steps + SEARCH_WINDOWS, warmup_steps=1, batch_size=1,
                                  patience=10**6, depth_check=0)
        result = dms_llm.prune(model, calib[:SEARCH_WINDOWS], cfg, progress=False)
        all_steps = [h["seconds"] for h in result.history]
        seconds = all_steps[SEARCH_WINDOWS:]
        first = statistics.median(all_steps[1:SEARCH_WINDOWS]) if SEARCH_WINDOWS > 1 else all_steps[0]
    return {"shape": shape, "mode": mode, "params": params, "seq_len": seq_len, "dtype": str(dtype).split(".")[-1],
            "device": torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU",
            "seconds_per_step": statistics.median(seconds), "first_epoch_seconds_per_step": first,
            "steps_timed": len(seconds), "peak_memory_gib": peak_memory(device) / 2**30}


def dms_llm_default_steps() -> int:
    import dms_llm

    return dms_llm.PruneConfig(keep=0.8).steps


def recon_samples() -> int:
    from dms_llm.reconstruct import ReconstructConfig

    return ReconstructConfig().samples


def library_label(path: str | None) -> str:
    """The commit of the dms-llm that the children import (the working tree's, unless ``--library``)."""
    where = Path(path) if path else ROOT
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "dms_llm"], capture_output=True,
                               text=True).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="default: 8b 1b gemma3-270m on a GPU, gemma3-270m 1b on CPU")
    parser.add_argument("--modes", nargs="+", default=["plain", "search", "reconstruct"],
                        choices=["plain", "search", "reconstruct"])
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 on a GPU, 256 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on a GPU, 2 on CPU)")
    parser.add_argument("--library", default=None, help="a dms-llm checkout to measure instead of this one")
    parser.add_argument("--label", default=None, help="name of the code measured (default: its commit)")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "scale.json"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--markdown-only", action="store_true", help="re-write the section from --out, measure nothing")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    seq_len = args.seq_len or (2048 if cuda else 256)
    steps = args.steps or (5 if cuda else 2)
    if args.child:
        print(json.dumps(child(*args.child, seq_len, steps)))
        return
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"runs": [], "rows": []}
    if args.markdown_only:
        print(f"wrote {write_markdown(args.markdown, saved)}")
        return
    label = args.label or library_label(args.library)
    env = dict(os.environ)
    if args.library:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.library).resolve()), env.get("PYTHONPATH", "")])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for shape in args.shapes or (["8b", "1b", "gemma3-270m"] if cuda else ["gemma3-270m", "1b"]):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", shape, mode, "--seq-len", str(seq_len), "--steps", str(steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                lines = proc.stderr.strip().splitlines() or ["failed"]
                row = {"shape": shape, "mode": mode, "seq_len": seq_len, "error": lines[-1][:300]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({**row, "code": label, "date": stamp})
            print(rows[-1], flush=True)
    key = ("device", "shape", "mode", "code", "seq_len")
    fresh = {tuple(r.get(k) for k in key) for r in rows}
    saved["rows"] = [r for r in saved["rows"] if tuple(r.get(k) for k in key) not in fresh] + rows
    command = " ".join(["python scripts/benchmark_scale.py", *map(shlex.quote, sys.argv[1:])])
    saved["runs"] = saved.get("runs", []) + [{"date": stamp, "command": command, "code": label,
                                              "torch": torch.__version__}]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1))
    print(f"wrote {out} and {write_markdown(args.markdown, saved)}")


def write_markdown(markdown: str, saved: dict):
    for r in saved["rows"] + saved.get("runs", []):  # rows from before runs were labelled
        r.setdefault("code", "unlabelled")
        r.setdefault("torch", "?")
    rows = saved["rows"]
    lines = [START, "", "### Search cost at scale", "",
             "Randomly initialised models of each shape, batch 1, median of the timed steps after one warm-up (fp32 "
             "weights on CPU, bf16 weights with activation checkpointing on a GPU; the search under its "
             "default autocast, bf16 where the device multiplies in bf16, for code that has it). `code` is the "
             "dms-llm measured (`before` = the commit before the teacher cache and the chunked loss). Peak "
             "memory: the process's peak RSS on CPU (model initialisation and imports included), "
             "`torch.cuda.max_memory_allocated` on a GPU. Runs:", ""]
    lines += [f"- {r['date']}: `{r['command']}` (code {r['code']}, torch {r['torch']})" for r in saved.get("runs", [])]
    lines += ["", "| device | shape | params | seq | code | plain fwd+bwd s | search s/step (first epoch) | "
                  "search / plain | plain peak GiB | search peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | "
                                                                          "--- | --- | --- |"]

    def find(device, shape, mode, code, seq_len):
        return next((r for r in rows if (r.get("device"), r["shape"], r["mode"], r["code"], r["seq_len"]) ==
                     (device, shape, mode, code, seq_len) and "error" not in r), None)

    searches = [r for r in rows if r["mode"] == "search"]
    for r in searches:
        if "error" in r:
            lines.append(f"| | {r['shape']} | | {r['seq_len']} | {r['code']} | | {r['error']} | | | |")
            continue
        plains = [p for p in rows if p["mode"] == "plain" and "error" not in p and
                  (p.get("device"), p["shape"], p["seq_len"]) == (r["device"], r["shape"], r["seq_len"])]
        # stock either way: the same code's, else the latest measured
        plain = next((p for p in plains if p["code"] == r["code"]), plains[-1] if plains else None)
        first = r.get("first_epoch_seconds_per_step")
        cells = [r["device"], r["shape"], f"{r['params'] / 1e9:.2f}B", r["seq_len"], r["code"],
                 f"{plain['seconds_per_step']:.2f}" if plain else "",
                 f"{r['seconds_per_step']:.2f}" + (f" ({first:.2f})" if first else ""),
                 f"{r['seconds_per_step'] / plain['seconds_per_step']:.2f}" if plain else "",
                 f"{plain['peak_memory_gib']:.1f}" if plain else "", f"{r['peak_memory_gib']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    recons = [r for r in rows if r["mode"] == "reconstruct" and "error" not in r]
    if recons:
        steps_default = dms_llm_default_steps()
        lines += ["", f"Reconstruction (the repair `prune` runs after the search: {recon_samples()} calibration "
                      f"windows, a uniform keep-0.8 structure, one block at a time), against a default search "
                      f"({steps_default} steps of the search step above):", "",
                  "| device | shape | seq | code | reconstruction s | peak GiB | / search |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in recons:
            search = find(r["device"], r["shape"], "search", r["code"], r["seq_len"])
            share = f"{r['seconds_per_step'] / (steps_default * search['seconds_per_step']):.1%}" if search else ""
            lines.append(f"| {r['device']} | {r['shape']} | {r['seq_len']} | {r['code']} | "
                         f"{r['seconds_per_step']:.1f} | {r['peak_memory_gib']:.1f} | {share} |")
    lines += ["", END]
    return replace_section(markdown, START, END, lines)


if __name__ == "__main__":
    main()
