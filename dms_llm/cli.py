"""Command line: parse the flags into a job (flag names = its field names), run it with :mod:`dms_llm.pipeline`,
print what it did: ``prune``, ``finetune``, ``push``, ``eval``, ``tasks``, ``gguf``, ``cache``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .errors import FlagFormatter, as_flags
from .report import evaluation_report, finetune_report, gguf_report, prune_report
from .search import REPAIR_EVERY


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not for on/off flags, not when the help already states it, not for None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hub id, local folder, .gguf file, or the embedded default 'smollm2-135m'")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="'auto': spread a model larger than one GPU over this process's GPUs (one process only)")


def _add_eval_args(p: argparse.ArgumentParser, default_data: str | None) -> None:
    p.add_argument("--eval-data", default=default_data,
                   help="perplexity data: wikitext2, ptb, c4, pydoc-heldout or a local file")
    p.add_argument("--eval-seq-len", type=int, default=None, help="window length (default 2048 or the model maximum)")
    p.add_argument("--eval-windows", type=int, default=None, help="score only the first N windows (default: all)")


def _add_run_args(p: argparse.ArgumentParser, what: str, seq_len: int, batch_size: int, precision: str) -> None:
    p.add_argument("--calib", default="pydoc",
                   help="calibration / training text: pydoc (built in), wikitext2, ptb, c4, a .txt/.jsonl file or a "
                        "folder")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration / training window")
    p.add_argument("--batch-size", type=int, default=batch_size, help="windows per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default=precision, choices=["auto", "no", "bf16", "fp16"],
                   help=f"autocast of the {what}; auto: bf16 on a GPU or CPU that multiplies in bf16 natively "
                        f"(AVX512-BF16, AMX, compute capability 8+), else fp32 (default: {precision})")
    p.add_argument("--resume", action="store_true", help=f"continue an interrupted {what} of the same --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    p.add_argument("--gguf", metavar="TYPE", default=None, type=str.lower,
                   help="also write <out>-<TYPE>.gguf for llama.cpp (f32, f16, bf16, q8_0, q4_k_m, ...; needs the "
                        "[llamacpp] extra), checked by llama.cpp before it is moved into place")
    p.add_argument("--push-to-hub", metavar="USER/NAME", default=None, help="also upload the result to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    _add_eval_args(p, "pydoc-heldout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dms-llm", description="Differentiable Model Scaling for Llama-family LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", formatter_class=DefaultsOnce,
                       help="search a smaller structure under a budget, export it, report perplexity")
    _add_model_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="fraction of the model's parameters to keep (embeddings included)")
    budget.add_argument("--target-params", type=int, help="absolute parameter budget")
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint")
    p.add_argument("--steps", type=int, default=200, help="maximum search steps")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--format", default="auto", choices=["auto", "per-layer", "uniform"],
                   help="per-layer: each layer its own widths (custom model code); uniform: equal widths and "
                        "whole-layer removal, a stock checkpoint; auto: searches per layer, then uniformly at the "
                        "same budget, and ships the stock format unless per-layer scores more than 1%% better on "
                        "held-out calibration windows after the repair")
    p.add_argument("--uniform-steps", type=int, default=None,
                   help="with --format auto: steps of the uniform search (default: as many as --steps)")
    p.add_argument("--uniform", action="store_true", help="the same as --format uniform")
    p.add_argument("--no-search-depth", dest="search_depth", action="store_false",
                   help="keep every layer (--uniform) or block (per-layer): search the widths only")
    p.add_argument("--depth-check", type=int, default=16,
                   help="calibration windows on which the searched depth is scored against removing fewer layers / "
                        "blocks at the same budget (the best is kept; 0 = off)")
    p.add_argument("--resource", default="params", choices=["params", "macs"], help="what the budget counts")
    p.add_argument("--mlp-unit", type=int, default=1, help="MLP channels ranked together (1: each on its own)")
    p.add_argument("--channel-multiple", type=int, default=None,
                   help="kept MLP widths are multiples of this (default 8; 32 with a quantized --gguf type, so that "
                        "every tensor quantizes)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="round every layer's widths so that vLLM's tensor parallelism over N GPUs splits them (MLP "
                        "widths to multiples of N, KV heads to counts N shards or replicates; default 1: no rounding)")
    p.add_argument("--repair-every", type=int, default=None, metavar="N",
                   help="once the budget is reached, repair the current structure every N search steps and search "
                        f"on the repaired model (default {REPAIR_EVERY or 'off'}; 0: off; off with --no-reconstruct; "
                        "not with --fsdp / --joint)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the pruning ratios")
    p.add_argument("--resource-weight", type=float, default=50.0, help="weight of the resource loss")
    p.add_argument("--lm-loss-weight", type=float, default=1.0, help="weight of the LM loss added to distillation")
    p.add_argument("--fsdp", action="store_true",
                   help="under accelerate launch: shard the frozen weights over the processes (FSDP2, one unit per "
                        "decoder layer) for models that do not fit one device; rank 0 reloads the model to export")
    p.add_argument("--joint", action="store_true", help="train LoRA adapters (peft) with the structure, then merge")
    p.add_argument("--joint-lr", type=float, default=1e-4, help="with --joint: learning rate of the LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=16, help="with --joint: LoRA rank (alpha = 2 x rank)")
    p.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="export the sliced weights as they are (no least-squares repair of the output projections)")
    p.add_argument("--recon-samples", type=int, default=32, help="calibration windows the reconstruction reads")
    p.add_argument("--recon-ridge", type=float, default=1e-2, help="relative ridge term of the reconstruction")
    p.add_argument("--repair-check", type=int, default=4,
                   help="held-out calibration windows on which the depth check's candidates are compared once "
                        "repaired (the closest to the dense model is kept; 0 = the pre-repair choice stands)")
    p.add_argument("--repair-check-len", type=int, default=2048,
                   help="tokens per held-out window of --repair-check (capped at the model's context)")
    _add_run_args(p, "search", seq_len=256, batch_size=1, precision="auto")

    f = sub.add_parser("finetune", formatter_class=DefaultsOnce,
                       help="recover a pruned export by distillation from the dense model (full or LoRA)")
    _add_model_args(f)
    f.add_argument("--out", required=True, help="output folder for the recovered checkpoint")
    f.add_argument("--teacher", default=None, help="the dense model (default: the base model the export records)")
    f.add_argument("--no-teacher", action="store_true", help="no distillation: train on the LM loss only")
    f.add_argument("--tokens", type=int, default=200_000, help="training budget in tokens (steps = tokens / batch)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 with --lora, else 1e-4)")
    f.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) and merge them, not all weights")
    f.add_argument("--lora-rank", type=int, default=16)
    f.add_argument("--lora-alpha", type=int, default=32)
    f.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(teacher || student)")
    f.add_argument("--lm-loss-weight", type=float, default=0.0, help="weight of the LM loss (1 with --no-teacher)")
    _add_run_args(f, "run", seq_len=512, batch_size=4, precision="no")

    u = sub.add_parser("push", formatter_class=DefaultsOnce, help="upload an export to a Hub model repo",
                       description="Upload a dms-llm export (weights, config + code, tokenizer, structure, plot, logs, "
                                   "a model card) to a Hub model repo. The token comes from HF_TOKEN or `hf auth "
                                   "login` and is never printed; the local folder is never changed.")
    u.add_argument("folder", help="output folder of dms-llm prune or dms-llm finetune")
    u.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub model repo (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--message", default=None, help="commit message")
    u.add_argument("--dry-run", metavar="DIR", default=None,
                   help="do not upload: write exactly what would be uploaded into DIR and list it")

    e = sub.add_parser("eval", formatter_class=DefaultsOnce,
                       help="perplexity, zero-shot accuracy (lm-eval) and speed of a model or an export")
    _add_model_args(e)
    _add_eval_args(e, None)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks; 'default' = boolq,piqa,hellaswag,winogrande,arc_easy,"
                        "arc_challenge,openbookqa; 'dms_example' is a built-in offline task")
    e.add_argument("--zeroshot-data", default=None,
                   help="folder of local data for the seven stock tasks (<task>/<split>.jsonl.gz, the Hub datasets' "
                        "fields); default $DMS_LLM_ZEROSHOT_DATA, else the Hub")
    e.add_argument("--include-path", default=None, help="folder of local lm-eval task YAML files (offline tasks)")
    e.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    e.add_argument("--batch-size", default="8", help="lm-eval batch size ('auto' on a GPU)")
    e.add_argument("--request-cache", default=None, metavar="DIR",
                   help="keep every zero-shot answer in lm-eval's request cache in DIR (keyed by the model's "
                        "weights): run the same command again after an interruption and it resumes where it stopped")
    e.add_argument("--speed", action="store_true", help="measure prefill / decode throughput and memory")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    t = sub.add_parser("tasks", help="write lm-eval task files that read the seven stock tasks from local data")
    t.add_argument("zeroshot_data", help="folder with <task>/<split>.jsonl.gz in the Hub datasets' layout")
    t.add_argument("--out", required=True, help="folder for the task YAML files (pass it as lm_eval --include_path)")

    g = sub.add_parser("gguf", formatter_class=DefaultsOnce, help="write an export as a GGUF file for llama.cpp",
                       description="Write a dms-llm export (per-layer: llama.cpp's deci architecture; uniform: "
                                   "llama, qwen3 or gemma3) or a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 3"
                                   " folder as a GGUF file, checked by llama.cpp itself (same tokenization, same "
                                   "logits) before it is moved into place.")
    g.add_argument("folder", help="output folder of dms-llm prune / finetune, or a Hugging Face Llama, Mistral, "
                                  "Qwen2, Qwen3 or Gemma 3 text folder")
    g.add_argument("--out", default=None, help="the .gguf file to write (default: <folder>-<type>.gguf beside it)")
    g.add_argument("--type", dest="gguf_type", default="f16", type=str.lower,
                   help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m, q2_k, ... (non-float types through "
                        "llama.cpp's quantizer)")
    g.add_argument("--tokenizer-gguf", default=None,
                   help="copy the tokenizer from this GGUF (default: the export's source GGUF if it came from one, "
                        "else built from the folder's tokenizer)")
    g.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    c = sub.add_parser("cache", help="where converted GGUF models are cached; --clear deletes them")
    c.add_argument("--clear", action="store_true", help="delete the cache (the next GGUF load converts again)")
    return parser


def flag_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/cli.md: every command's arguments, defaults and help, as Markdown, read off the parser itself (a test
    compares the file with it, so the two cannot drift; ``python scripts/flag_reference.py`` rewrites it)."""
    parser = parser or build_parser()
    lines = ["# Command-line reference", "",
             "Every `dms-llm` command, its arguments, their defaults and what they do. This file is generated from the",
             "argument parser (`python scripts/flag_reference.py > docs/cli.md`); `tests/test_docs.py` fails when they",
             "differ. `dms-llm COMMAND --help` prints the same.", ""]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    for name, sub in commands.choices.items():
        about = sub.description or helps.get(name, "").capitalize() + "."
        lines += [f"## `dms-llm {name}`", "", about, "",
                  "| argument | default | what it does |", "| --- | --- | --- |"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                arg = ", ".join(action.option_strings)
                if action.nargs != 0:
                    arg += " " + (action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                                     else action.dest.upper()))
            else:
                arg = action.metavar or action.dest
            if action.nargs == 0:
                default = "a switch"
            elif action.required:
                default = "required"
            else:
                default = "—" if action.default is None else f"`{action.default}`"
            text = (action.help or "").replace("%%", "%").replace("|", "/")
            lines.append(f"| `{arg}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


def _from_args(cls, args, **given):
    """``cls`` (a job or config dataclass) from the flags named like its fields: the flags are its settings."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **given)


def cmd_prune(args) -> int:
    from .gguf_export import channel_multiple_for
    from .pipeline import PruneJob, prune_checkpoint
    from .search import PruneConfig

    if args.channel_multiple is None:
        args.channel_multiple = channel_multiple_for(args.gguf)
    if not args.reconstruct and args.repair_every is None:
        args.repair_every = 0  # nothing ships repaired: the search aims at the sliced model
    config = _from_args(PruneConfig, args, target=args.target_params)
    job = _from_args(PruneJob, args, config=config, eval_data=None if args.no_eval else args.eval_data)
    run = prune_checkpoint(job, progress=not args.quiet)
    if run is not None:  # None: another rank of accelerate launch
        print("\n" + prune_report(run, args.model))
        if run.url:
            print(f"uploaded {run.out} to {run.url}")
    return 0


def cmd_finetune(args) -> int:
    from .pipeline import FinetuneJob, finetune_checkpoint
    from .recovery import FinetuneConfig

    config = _from_args(FinetuneConfig, args)
    job = _from_args(FinetuneJob, args, config=config, eval_data=None if args.no_eval else args.eval_data)
    run = finetune_checkpoint(job, progress=not args.quiet)
    if run is not None:
        print("\n" + finetune_report(run, args.model))
        if run.url:
            print(f"uploaded {run.out} to {run.url}")
    return 0


def cmd_push(args) -> int:
    from .hub import push, stage

    if args.dry_run:
        staged = stage(args.folder, args.repo, args.dry_run)
        names = "".join(f"\n  {p.name}" for p in sorted(staged.iterdir()))
        print(f"would upload to {args.repo} ({'private' if args.private else 'public'}) the files in {staged}:{names}")
        return 0
    url = push(args.folder, args.repo, private=args.private, commit_message=args.message)
    print(f"uploaded {args.folder} to {url}")
    return 0


def cmd_gguf(args) -> int:
    from .gguf_export import write_gguf

    result = write_gguf(args.folder, args.out, args.gguf_type, overwrite=args.overwrite,
                        tokenizer_gguf=args.tokenizer_gguf, threads=args.threads)
    print(gguf_report(result))
    return 0


def cmd_eval(args) -> int:
    from .pipeline import EvalJob, evaluate_checkpoint

    results = evaluate_checkpoint(_from_args(EvalJob, args))
    print(evaluation_report(results))
    for data, r in results.pop("perplexity", {}).items():  # one source on the command line
        results["perplexity"] = {"data": data, **r}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def cmd_tasks(args) -> int:
    from .zeroshot import DEFAULT_TASKS, write_local_tasks

    out = write_local_tasks(args.zeroshot_data, args.out)
    print(f"wrote {len(DEFAULT_TASKS)} task files to {out}; run lm-eval's stock tasks on this data with\n"
          f"  lm_eval run --model hf --model_args pretrained=MODEL_DIR,trust_remote_code=True "
          f"--tasks {','.join(DEFAULT_TASKS)} --include_path {out}")
    return 0


def cmd_cache(args) -> int:
    from .loading import clear_cache, describe_cache

    print(clear_cache() if args.clear else describe_cache())
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .errors import DMSError
    from .training import reuse_freed_memory

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    reuse_freed_memory()
    if not logging.getLogger().handlers:  # library messages name parameters; this handler shows them as flags
        handler = logging.StreamHandler()
        handler.setFormatter(FlagFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                            handlers=[handler])
    main_thread = threading.current_thread() is threading.main_thread()  # SIGTERM saves the state like Ctrl-C
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with logging_redirect_tqdm():
            return COMMANDS[args.command](args)
    except (DMSError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"dms-llm: error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dms-llm: interrupted; run the same command again to continue with --resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


COMMANDS = {"prune": cmd_prune, "finetune": cmd_finetune, "push": cmd_push, "eval": cmd_eval, "tasks": cmd_tasks,
            "gguf": cmd_gguf, "cache": cmd_cache}

if __name__ == "__main__":
    sys.exit(main())
