"""The pruned models where people run models: GGUF files in llama.cpp (llama-cpp-python), against the dense model
written the same way and against the dense model quantized harder.

    python scripts/benchmark_gguf.py                                   # SmolLM2-135M, WikiText-2 from the Hub
    python scripts/benchmark_gguf.py --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw
    python scripts/benchmark_gguf.py --main-export smollm2-dms          # also: the README main job's export, f32/f16

Models: dense; DMS per-layer + reconstruction at each --keeps; DMS uniform + reconstruction at --uniform-keep (the
peer table's calibration and search; MLP widths in multiples of --channel-multiple, 32 = every tensor quantizes).
Each is written as GGUF of each --types (dense also of each --dense-types) by ``dms_llm.gguf_export.write_gguf``,
which checks it in llama.cpp; then llama.cpp measures the file: perplexity on the first --windows windows of 2048
tokens of --eval-data (the peer table's windows and scoring), prefill and decode tokens/s at batch 1 (128-token
prompt, 64 greedy tokens, best of 5, f16 KV cache) with --threads threads. Run it alone on the machine: the speeds
are timings.
Writes benchmarks/gguf<tag>.json, benchmarks/gguf<tag>_ppl_vs_size.png and the marked section of BENCHMARKS.md.
Exported folders and GGUF files go to --work-dir (kept, so a rerun measures without writing again).
"""

import argparse
import datetime
import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from bench_common import (  # a sibling module
    Methods,
    add_protocol_args,
    eval_windows,
    machine_name,
    protocol_windows,
    replace_section,
)

import dms_llm
from dms_llm.data import evaluation_tokens
from dms_llm.gguf_export import llama_cpp_has_amx, llama_cpp_perplexity, llama_cpp_speed, write_gguf
from dms_llm.training import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5], help="DMS per-layer budgets")
parser.add_argument("--uniform-keep", type=float, nargs="*", default=[0.8], help="DMS uniform budgets")
parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
parser.add_argument("--dense-types", nargs="*", default=["q6_k", "q5_k_m", "q3_k_m", "q2_k"],
                    help="further types for the dense model only (the harder-quantization curve)")
parser.add_argument("--channel-multiple", type=int, default=32)
add_protocol_args(parser)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--main-export", default=None,
                    help="an export folder (the README main job's) to check at f32 and f16: HF vs llama.cpp perplexity "
                         "and greedy tokens")
parser.add_argument("--speed-only", action="store_true",
                    help="keep the perplexities (and --main-export check) of an earlier run's gguf<tag>.json, same "
                         "windows, and time the files again")
parser.add_argument("--tag", default="", help="a name for this run's outputs (gguf<tag>.json, its BENCHMARKS section)")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
parser.add_argument("--work-dir", default=str(ROOT / ".bench-gguf"))
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
START, END = f"<!-- gguf{args.tag}:start -->", f"<!-- gguf{args.tag}:end -->"
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()
torch.set_num_threads(args.threads)

work = Path(args.work_dir)
work.mkdir(parents=True, exist_ok=True)
windows = eval_windows(args.windows, "cpu")
model, tokenizer, source = dms_llm.load_model(args.model)
tokens = evaluation_tokens(tokenizer, args.eval_data)
calib, held_out = protocol_windows(tokenizer, args.calib, args.seq_len, args.num_samples, args.repair_check)
methods = Methods(model, calib, args.calib, args.steps, cache_dir=args.cache_dir,
                  channel_multiple=args.channel_multiple, held_out=held_out)


def folder_of(name: str, keep: float | None) -> tuple[Path, float | None]:
    """The export folder of a model (written once), and its Hugging Face perplexity on the windows."""
    folder = work / (f"{name}-keep{keep}-cm{args.channel_multiple}" if keep else name)
    record = folder.with_name(folder.name + ".hf.json")
    if not (folder / "config.json").is_file():
        if keep is None:  # the dense model, as a plain Hugging Face folder (its GGUFs copy the source tokenizer)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            pruned = model
        else:
            pruned, structure, _, _ = methods.pruned(f"{name}+recon", keep)
            dms_llm.export(model, structure, folder, tokenizer=tokenizer, source_dir=source, pruned=pruned,
                           overwrite=True, metadata={"base_model": args.model})
        ppl = dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows, progress=False)["ppl"]
        record.write_text(json.dumps({"ppl": ppl}))
    return folder, json.loads(record.read_text())["ppl"]


def gguf_of(folder: Path, gguf_type: str) -> Path:
    path = work / f"{folder.name}-{gguf_type}.gguf"
    if not path.exists():
        tok = args.model if folder.name == "dense" else None  # dense: copy the source GGUF's tokenizer
        write_gguf(folder, path, gguf_type, tokenizer_gguf=tok, threads=args.threads)
    return path


earlier = {}
if args.speed_only:  # perplexity does not depend on what else runs; timings do
    saved = json.loads((Path(args.out_dir) / f"gguf{args.tag}.json").read_text())
    earlier = {(r["model"], r["keep"], r["type"]): r for r in saved["rows"] if r["windows"] == windows}
models = [("dense", None)] + [("dms_per_layer", k) for k in args.keeps]
models += [("dms_uniform", k) for k in args.uniform_keep]
rows = []
for name, keep in models:
    folder, hf_ppl = folder_of(name, keep)
    types = args.types + (args.dense_types if keep is None else [])
    for gguf_type in types:
        path = gguf_of(folder, gguf_type)
        before = earlier.get((name, keep or 1.0, gguf_type))
        ppl = {"ppl": before["ppl_llama_cpp"], "windows": before["windows"]} if before else \
            llama_cpp_perplexity(path, tokens, max_windows=windows, threads=args.threads)
        sp = llama_cpp_speed(path, threads=args.threads)
        row = {"model": name, "keep": keep or 1.0, "type": gguf_type, "file_bytes": path.stat().st_size,
               "ppl_llama_cpp": ppl["ppl"], "ppl_hf_fp32": hf_ppl, "windows": ppl["windows"],
               "prefill_tokens_per_s": sp["prefill_tokens_per_s"], "decode_tokens_per_s": sp["decode_tokens_per_s"]}
        rows.append(row)
        print(f"{name:14s} keep {row['keep']} {gguf_type:7s} {row['file_bytes'] / 2**20:7.1f} MiB  ppl "
              f"{ppl['ppl']:8.2f} (HF fp32 {hf_ppl:.2f})  prefill {row['prefill_tokens_per_s']:7.1f}  decode "
              f"{row['decode_tokens_per_s']:6.1f} tok/s", flush=True)

main_rows = saved["main_export"] if args.speed_only else []
if args.main_export and not main_rows:
    from dms_llm.gguf_export import open_llama

    folder = Path(args.main_export).resolve()
    pruned, _, _ = dms_llm.load_model(str(folder), trust_remote_code=True, check_supported=False)
    hf_ppl = dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows, progress=False)["ppl"]
    prompt = tokenizer("The capital of France is").input_ids
    hf_greedy = pruned.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    for gguf_type in ("f32", "f16"):
        path = work / f"main-export-{gguf_type}.gguf"
        write_gguf(folder, path, gguf_type, overwrite=True, threads=args.threads)
        ppl = llama_cpp_perplexity(path, tokens, max_windows=windows, threads=args.threads)["ppl"]
        llm = open_llama(path, n_ctx=64, threads=args.threads, logits_all=False)
        cpp_greedy = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            cpp_greedy.append(int(token))
            if len(cpp_greedy) == len(hf_greedy):
                break
        llm.close()
        same = next((i for i, (a, b) in enumerate(zip(cpp_greedy, hf_greedy)) if a != b), len(hf_greedy))
        main_rows.append({"type": gguf_type, "ppl_llama_cpp": ppl, "ppl_hf_fp32": hf_ppl,
                          "ppl_ratio": ppl / hf_ppl, "greedy_tokens_equal": same, "greedy_tokens": len(hf_greedy),
                          "greedy_text_llama_cpp": tokenizer.decode(cpp_greedy),
                          "file_bytes": path.stat().st_size})
        print(f"main export {gguf_type}: llama.cpp {ppl:.3f} vs HF {hf_ppl:.3f} ({ppl / hf_ppl:.4f}x), first {same} of "
              f"{len(hf_greedy)} greedy tokens equal", flush=True)

machine = machine_name("cpu").replace(f"{torch.get_num_threads()} threads", f"llama.cpp {args.threads} threads")
if llama_cpp_has_amx():  # open_llama turns llama.cpp's weight repacking off there (it segfaults on AMX)
    machine += ", weight repacking off (AMX)"
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
record = {"date": stamp, "machine": machine, "channel_multiple": args.channel_multiple, "rows": rows,
          "main_export": main_rows}
(out / f"gguf{args.tag}.json").write_text(json.dumps(record, indent=1))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7.5, 4.8))
for (name, keep) in models:
    pts = sorted((r["file_bytes"] / 2**20, r["ppl_llama_cpp"], r["type"]) for r in rows
                 if r["model"] == name and r["keep"] == (keep or 1.0))
    label = "dense, quantized" if keep is None else f"{name.replace('dms_', 'DMS ')} keep {keep}, + quantized"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for x, y, t in pts:
        ax.annotate(t, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("GGUF file size (MiB)")
ax.set_ylabel(f"llama.cpp perplexity ({windows} x 2048 tokens)")
ax.set_yscale("log")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
ax.set_title(f"{args.model} in llama.cpp: prune then quantize vs quantize harder", fontsize=9)
fig.tight_layout()
fig.savefig(out / f"gguf{args.tag}_ppl_vs_size.png", dpi=110)

dense = {r["type"]: r for r in rows if r["model"] == "dense"}
command = " ".join(["python scripts/benchmark_gguf.py", *map(shlex.quote, sys.argv[1:])])
title = f"### In llama.cpp — {args.model} as GGUF" + (f" ({args.tag.strip('-_')})" if args.tag else "")
lines = [START, "", title, "",
         f"Measured {stamp} on {machine}. DMS models: the peer table's calibration (`{Path(args.calib).name}`, "
         f"{args.num_samples} x {args.seq_len}), {args.steps} search steps, MLP widths in multiples of "
         f"{args.channel_multiple}, + reconstruction. Perplexity in llama.cpp on the first {windows} windows of 2048 "
         f"tokens of `{Path(args.eval_data).name}` (same token ids and scoring as the peer table); HF fp32 = the same "
         f"model in transformers. Speed: llama.cpp, batch 1, 128-token prompt, 64 greedy tokens, best of 5, f16 KV "
         f"cache. "
         f"Command: `{command}`.", "",
         "| model | keep | type | file MiB | ppl llama.cpp | ppl HF fp32 | prefill tok/s | decode tok/s | "
         "decode x dense | bytes x dense |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    ref = dense.get(r["type"])
    dx = f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}" if ref else ""
    bx = f"{ref['file_bytes'] / r['file_bytes']:.2f}" if ref else ""
    lines.append(f"| {r['model']} | {r['keep']} | {r['type']} | {r['file_bytes'] / 2**20:.1f} | "
                 f"{r['ppl_llama_cpp']:.2f} | {r['ppl_hf_fp32']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                 f"{r['decode_tokens_per_s']:.1f} | {dx} | {bx} |")
if main_rows:
    lines += ["", f"The README main job's export (`{Path(args.main_export).name}`, per-layer): HF fp32 perplexity "
                  f"{main_rows[0]['ppl_hf_fp32']:.3f} on the same windows."]
    lines += [f"- {m['type']}: llama.cpp {m['ppl_llama_cpp']:.3f} ({m['ppl_ratio']:.4f}x), greedy from \"The capital "
              f"of France is\": first {m['greedy_tokens_equal']} of {m['greedy_tokens']} tokens equal to "
              f"transformers' ({json.dumps(m['greedy_text_llama_cpp'])})" for m in main_rows]
lines += ["", f"![perplexity vs file size](benchmarks/gguf{args.tag}_ppl_vs_size.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out / f'gguf{args.tag}.json'}, {out / f'gguf{args.tag}_ppl_vs_size.png'} and {md}")
