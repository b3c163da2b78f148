"""Seed spread of a `dms-llm prune` command: the same command with several `--seed`s, one after the other, each a
subprocess whose peak RSS is its own; resumable (a finished run is kept, an interrupted one resumes its search).

    python scripts/benchmark_seeds.py --label after -- smollm2-135m --keep 0.8
    python scripts/benchmark_seeds.py --label before --library OLD_CHECKOUT -- smollm2-135m --keep 0.8

Records per run: the search's seconds and steps, the whole command's wall seconds and peak RSS, the dense and pruned
perplexity, the parameters kept and the structure, in ``--out`` (rows keyed by label, arguments and seed); the marked
section of BENCHMARKS.md shows each label's runs with the median and the spread (max / min) of the pruned perplexity
and of the search time. Run it alone on the machine: the times are the point.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import replace_section  # a sibling module of this script

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- seeds:start -->", "<!-- seeds:end -->"


def run_one(prune_args: list[str], seed: int, out: Path, env: dict) -> dict:
    """One `dms-llm prune ... --seed SEED --out OUT` (resumed when its search state is there); its record."""
    out = out.resolve()
    resume = (out.parent / f".{out.name}.search-state.pt").exists()
    cmd = [sys.executable, "-m", "dms_llm", "prune", *prune_args, "--seed", str(seed), "--out", str(out), "--quiet",
           "--resume" if resume else "--overwrite"]
    t0 = time.perf_counter()
    # run from the output's parent: from the repository root `python -m` would import the working tree first,
    # whatever PYTHONPATH (--library) says
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out.parent)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"seed {seed} failed:\n{output[-3000:]}")
    info = json.loads((out / "dms_structure.json").read_text())
    ppl = info.get("perplexity") or {}
    return {"seed": seed, "search_seconds": info["search"]["seconds"], "steps": info["search"]["steps_run"],
            "wall_seconds": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "resumed": resume, "params": info["params_after"], "params_before": info["params_before"],
            "dense_ppl": (ppl.get("dense") or {}).get("ppl"), "pruned_ppl": (ppl.get("pruned") or {}).get("ppl"),
            "format": info.get("format"), "structure": {k: info.get(k) for k in (
                "kept_query_heads", "kept_mlp_channels", "attention_blocks_kept", "mlp_blocks_kept",
                "num_layers_after")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label", required=True, help="name of this set of runs (e.g. the code measured)")
    parser.add_argument("--library", default=None, help="a dms-llm checkout to run instead of this one")
    parser.add_argument("--work-dir", default="/tmp/dms-llm-seeds", help="where the pruned folders go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "seeds.json"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--markdown-only", action="store_true", help="re-write the section from --out, run nothing")
    parser.add_argument("prune_args", nargs=argparse.REMAINDER, help="-- then the arguments of `dms-llm prune`")
    args = parser.parse_args()
    prune_args = [a for a in args.prune_args if a != "--"]
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if not args.markdown_only:
        if not prune_args:
            parser.error("give the arguments of `dms-llm prune` after --")
        env = dict(os.environ)
        if args.library:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.library).resolve()), env.get("PYTHONPATH", "")])
        command = " ".join(map(shlex.quote, prune_args))
        for seed in args.seeds:
            if any(r["label"] == args.label and r["command"] == command and r["seed"] == seed for r in saved["rows"]):
                print(f"{args.label} seed {seed}: already measured", flush=True)
                continue
            folder = Path(args.work_dir) / f"{args.label}-seed{seed}"
            folder.parent.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            row = {"label": args.label, "command": command, "date": stamp,
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   **run_one(prune_args, seed, folder, env)}
            saved["rows"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(saved, indent=1))  # after every run: an interrupted series keeps what it did
            print(json.dumps(row), flush=True)
    print(f"wrote {write_markdown(args.markdown, saved)}")


def write_markdown(markdown: str, saved: dict):
    lines = [START, "", "### Seed spread of `dms-llm prune`", "",
             "Each row: `python scripts/benchmark_seeds.py --label LABEL [--library CHECKOUT] -- COMMAND` runs "
             "`dms-llm prune COMMAND --seed S` for S = 0, 1, 2 one after the other, alone on the machine. Spread = "
             "max / min over the seeds.", "",
             "| label | command | machine | seeds | pruned ppl median (spread) | search s median (spread) | "
             "whole command s median | peak RSS GiB max | dates |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict = {}
    for r in saved["rows"]:
        groups.setdefault((r["label"], r["command"]), []).append(r)
    for (label, command), rows in groups.items():
        ppl = [r["pruned_ppl"] for r in rows if r["pruned_ppl"]]
        search = [r["search_seconds"] for r in rows]
        cells = [label, f"`{command}`", rows[0]["machine"], ", ".join(str(r["seed"]) for r in rows),
                 f"{statistics.median(ppl):.3f} ({max(ppl) / min(ppl):.3f})" if ppl else "",
                 f"{statistics.median(search):.1f} ({max(search) / min(search):.3f})",
                 f"{statistics.median(r['wall_seconds'] for r in rows):.0f}",
                 f"{max(r['peak_rss_gib'] for r in rows):.2f}", f"{rows[0]['date']} – {rows[-1]['date']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run (perplexity on the command's evaluation data):", "",
              "| label | seed | pruned ppl | dense ppl | params kept | search s | steps | whole s | peak RSS GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in saved["rows"]:
        lines.append(f"| {r['label']} | {r['seed']} | {r['pruned_ppl'] or 0:.3f} | {r['dense_ppl'] or 0:.3f} | "
                     f"{r['params']:,} ({r['params'] / r['params_before']:.3f}) | {r['search_seconds']:.1f} | "
                     f"{r['steps']} | {r['wall_seconds']:.0f} | {r['peak_rss_gib']:.2f} |")
    lines += ["", END]
    return replace_section(markdown, START, END, lines)


if __name__ == "__main__":
    main()
