"""Scale benchmark: seconds per search step and peak memory of the DMS search against a plain forward+backward
of the same randomly initialised model, plus (on a GPU) the whole SmolLM2-135M search and its perplexity.

    python scripts/benchmark_scale.py                          # GPU: 7B- and 1B-shaped Llamas, seq 2048, bf16
    python scripts/benchmark_scale.py --shapes 1b --seq-len 256 # CPU: what fits 2 cores (fp32)

Each (shape, mode) runs in its own subprocess so peak memory is its own (CUDA: max allocated; CPU: peak RSS).
"plain" = LM loss forward + backward with every weight requiring grad (no optimizer step); "search" = one DMS
search step as `dms_llm.prune` runs it (teacher forward with gates off, gated forward, backward to the masks and
the `a`s, importance update, Adam step on the `a`s). Activation checkpointing is on for both on CUDA, off on CPU.
"reconstruct" = the repair `prune` runs after the search (dms_llm.reconstruct, its default calibration windows) on a
uniform keep-0.8 structure: its whole wall time, and its share of a default-length search.
Writes benchmarks/scale.json and the marked scale section of BENCHMARKS.md.
"""

import argparse
import datetime
import json
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
SHAPES = {  # (hidden, layers, heads, kv heads, MLP, vocab, tied)
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),  # Llama-2-7B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B
}


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(shape: str, mode: str, seq_len: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import dms_llm

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq_len))
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    calib = torch.randint(0, config.vocab_size, (steps + 2, seq_len), generator=torch.Generator().manual_seed(0))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
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
        cfg = dms_llm.PruneConfig(keep=0.8, steps=steps + 1, warmup_steps=1, batch_size=1, patience=10**6)
        result = dms_llm.prune(model, calib, cfg, progress=False)
        seconds = [h["seconds"] for h in result.history[1:]]
    return {"shape": shape, "mode": mode, "params": params, "seq_len": seq_len, "dtype": str(dtype).split(".")[-1],
            "device": torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU",
            "seconds_per_step": statistics.median(seconds), "steps_timed": len(seconds),
            "peak_memory_gib": peak_memory(device) / 2**30}


def smollm2_search(data: Path) -> dict:
    """The real embedded model on a GPU: whole search wall time and perplexity on every wiki.test.raw window."""
    import dms_llm
    from dms_llm.data import evaluation_tokens

    model, tok, _ = dms_llm.load_model("smollm2-135m", device="cuda")
    calib = dms_llm.calibration_windows(tok, data / "wiki.valid.tokens", 256, 64)
    tokens = evaluation_tokens(tok, data / "wiki.test.raw")
    dense = dms_llm.perplexity(model, tokens=tokens)
    t0 = time.perf_counter()
    result = dms_llm.prune(model, calib, dms_llm.PruneConfig(keep=0.8), progress=False)
    wall = time.perf_counter() - t0
    pruned = dms_llm.perplexity(dms_llm.build_pruned_model(model, result.structure), tokens=tokens)
    return {"search_wall_seconds": wall, "steps": result.steps_run, "dense_ppl": dense["ppl"],
            "pruned_ppl": pruned["ppl"], "windows": pruned["windows"], "params": result.pruned_resource}


def dms_llm_default_steps() -> int:
    import dms_llm

    return dms_llm.PruneConfig(keep=0.8).steps


def recon_samples() -> int:
    from dms_llm.reconstruct import ReconstructConfig

    return ReconstructConfig().samples


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="default: 7b 1b on a GPU, 1b on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 on a GPU, 256 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on a GPU, 2 on CPU)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with WikiText-2 wiki.valid.tokens and wiki.test.raw (GPU: also time the SmolLM2 "
                             "search; skipped without it)")
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
    if args.markdown_only:  # re-render the section from the saved measurements
        saved = json.loads(Path(args.out).read_text())
        measured = [r for r in saved["rows"] if "seq_len" in r]
        seq_len = measured[0]["seq_len"] if measured else seq_len
        steps = max((r["steps_timed"] for r in measured), default=steps)
        cuda = any(not r["device"].endswith(" CPU") for r in measured)
        write_markdown(args.markdown, saved["rows"], saved["smollm2"], saved["date"],
                       saved.get("command", "python scripts/benchmark_scale.py"), seq_len, steps, cuda)
        return
    rows = []
    for shape in args.shapes or (["7b", "1b"] if cuda else ["1b"]):
        for mode in ("plain", "search", "reconstruct"):
            cmd = [sys.executable, __file__, "--child", shape, mode, "--seq-len", str(seq_len), "--steps", str(steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append({"shape": shape, "mode": mode, "error": proc.stderr.strip().splitlines()[-1][:300]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    smol = smollm2_search(Path(args.data_dir)) if cuda and args.data_dir else None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/benchmark_scale.py", *map(shlex.quote, sys.argv[1:])])
    out.write_text(json.dumps({"date": stamp, "command": command, "rows": rows, "smollm2": smol}, indent=1))
    md = write_markdown(args.markdown, rows, smol, stamp, command, seq_len, steps, cuda)
    print(f"wrote {out} and {md}")


def write_markdown(markdown: str, rows: list, smol: dict | None, stamp: str, command: str, seq_len: int, steps: int,
                   cuda: bool):
    device = next((r["device"] for r in rows if "device" in r), "?")
    lines = [START, "", f"### Search cost at scale — {device}", "",
             f"Measured {stamp}, torch {torch.__version__}. Randomly initialised Llama-shaped models, batch 1, "
             f"sequence {seq_len}, median of {steps} timed steps after one warm-up. Command: `{command}`.", "",
             "| shape | params | dtype | plain fwd+bwd s/step | search s/step | search / plain | plain peak GiB | "
             "search peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))

    def row(shape: str, mode: str) -> dict:
        return next(r for r in rows if r["shape"] == shape and r["mode"] == mode)

    for shape in shapes:
        plain, search = row(shape, "plain"), row(shape, "search")
        if "error" in plain or "error" in search:
            lines.append(f"| {shape} | | | {plain.get('error', '')} | {search.get('error', '')} | | | |")
            continue
        ratio = search["seconds_per_step"] / plain["seconds_per_step"]
        lines.append(f"| {shape} | {search['params'] / 1e9:.2f}B | {search['dtype']} | "
                     f"{plain['seconds_per_step']:.2f} | {search['seconds_per_step']:.2f} | {ratio:.2f} | "
                     f"{plain['peak_memory_gib']:.1f} | {search['peak_memory_gib']:.1f} |")
    steps_default = dms_llm_default_steps()
    lines += ["", f"Reconstruction (the repair `prune` runs after the search: {recon_samples()} calibration windows of "
                  f"{seq_len} tokens, a uniform keep-0.8 structure, one block at a time), against the default search "
                  f"({steps_default} steps of the search step above):", "",
              "| shape | reconstruction s | peak GiB | / search |", "| --- | --- | --- | --- |"]
    for shape in shapes:
        recon, search = row(shape, "reconstruct"), row(shape, "search")
        if "error" in recon or "error" in search:
            lines.append(f"| {shape} | {recon.get('error', '')} | | |")
            continue
        share = recon["seconds_per_step"] / (steps_default * search["seconds_per_step"])
        lines.append(f"| {shape} | {recon['seconds_per_step']:.1f} | {recon['peak_memory_gib']:.1f} | {share:.1%} |")
    if smol:
        lines += ["", f"SmolLM2-135M, keep 0.8, 200-step default search: {smol['search_wall_seconds']:.1f} s wall "
                      f"({smol['steps']} steps); WikiText-2 perplexity on all {smol['windows']} windows of 2048: dense "
                      f"{smol['dense_ppl']:.2f}, pruned {smol['pruned_ppl']:.2f}."]
    if not cuda:
        lines += ["", "CPU peak memory is the process's peak RSS (model initialisation included). No GPU was lent to "
                      "any session so far (2026-11-27 to 2026-11-30), so the 7B row, seq 2048 and the SmolLM2 "
                      "all-window figures are not measured yet; scripts/gpu_session.sh is the prepared run for a "
                      "session that is lent one.",
                  "", "Reconstruction of a 7B model on one 80 GB GPU, estimated (not measured) for 32 windows of 2048 "
                      "tokens (65,536 tokens), keep 0.8: memory = dense weights in bf16 (13.5 GB) + the pruned copy "
                      "(10.8 GB) + the fp32 stream (65,536 x 4096 x 4 B = 1.1 GB) + one MLP block's kept features in "
                      "bf16 (65,536 x 8,806 x 2 B = 1.2 GB) + its fp64 sums X^T X and X^T Y (8,806 x (8,806 + 4,096) "
                      "x 8 B = 0.9 GB) = about 28 GB; work = one bf16 forward of the dense blocks (2 x 6.5e9 x 65,536 "
                      "= 8.5e14 FLOP), the fp32 sums of the kept features (32 x 2 x 65,536 x (8,806 x 12,902 + 4,096 x "
                      "8,192) = 6.2e14 FLOP) and fp64 Cholesky solves (about 2.3e11 FLOP per MLP block), i.e. well "
                      "under a minute of compute at H100 rates (not yet profiled: the 1B row above is the only "
                      "measured repair at scale)."]
    lines += ["", END]
    return replace_section(markdown, START, END, lines)


if __name__ == "__main__":
    main()
