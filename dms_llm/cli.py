"""Command line: ``dms-llm prune`` (search, export, perplexity before/after) and ``dms-llm eval`` (perplexity)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

logger = logging.getLogger("dms_llm")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hub id, local folder, .gguf file, or the embedded default 'smollm2-135m'")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="'auto': spread a model larger than one GPU over this process's GPUs (one process only)")


def _add_eval_args(p: argparse.ArgumentParser, default_data: str) -> None:
    p.add_argument("--eval-data", default=default_data,
                   help=f"perplexity data: wikitext2, ptb, c4, pydoc-heldout or a local file (default {default_data})")
    p.add_argument("--eval-seq-len", type=int, default=None, help="window length (default 2048 or the model maximum)")
    p.add_argument("--eval-windows", type=int, default=None, help="score only the first N windows (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dms-llm", description="Differentiable Model Scaling for Llama-family LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="search a smaller structure under a budget, export it, report perplexity",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="fraction of the model's parameters to keep (embeddings included)")
    budget.add_argument("--target-params", type=int, help="absolute parameter budget")
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint")
    p.add_argument("--calib", default="pydoc",
                   help="calibration data: pydoc (built in), wikitext2, c4, a .txt/.jsonl file or a folder")
    p.add_argument("--steps", type=int, default=200, help="maximum search steps")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--uniform", action="store_true",
                   help="equal widths per layer and whole-layer removal: saves a stock checkpoint")
    p.add_argument("--resource", default="params", choices=["params", "macs"], help="what the budget counts")
    p.add_argument("--mlp-unit", type=int, default=8, help="MLP channels per pruning unit")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the pruning ratios")
    p.add_argument("--resource-weight", type=float, default=50.0, help="weight of the resource loss")
    p.add_argument("--lm-loss-weight", type=float, default=1.0, help="weight of the LM loss added to distillation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--fsdp", action="store_true",
                   help="under accelerate launch: shard the frozen weights over the processes (FSDP2, one unit per "
                        "decoder layer) for models that do not fit one device; rank 0 reloads the model to export")
    p.add_argument("--joint", action="store_true",
                   help="joint mode: train LoRA adapters (peft) together with the structure, merge them, export")
    p.add_argument("--joint-lr", type=float, default=1e-4, help="with --joint: learning rate of the LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=16, help="with --joint: LoRA rank")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    _add_eval_args(p, "pydoc-heldout")

    p.add_argument("--push-to-hub", metavar="USER/NAME", default=None, help="also upload the export to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    f = sub.add_parser("finetune", help="recover a pruned export by distillation from the dense model (full or LoRA)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(f)
    f.add_argument("--out", required=True, help="output folder for the recovered checkpoint")
    f.add_argument("--teacher", default=None, help="the dense model (default: the base model the export records)")
    f.add_argument("--no-teacher", action="store_true", help="no distillation: train on the LM loss only")
    f.add_argument("--calib", default="pydoc", help="training text: pydoc, wikitext2, c4, a .txt/.jsonl file or folder")
    f.add_argument("--tokens", type=int, default=200_000, help="training budget in tokens (steps = tokens / batch)")
    f.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    f.add_argument("--batch-size", type=int, default=4)
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 with --lora, else 1e-4)")
    f.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) and merge them, not all weights")
    f.add_argument("--lora-rank", type=int, default=16)
    f.add_argument("--lora-alpha", type=int, default=32)
    f.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(teacher || student)")
    f.add_argument("--lm-loss-weight", type=float, default=0.0, help="weight of the LM loss (1 with --no-teacher)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    f.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --out")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    f.add_argument("--quiet", action="store_true", help="no per-step log lines")
    f.add_argument("--push-to-hub", metavar="USER/NAME", default=None, help="also upload the result to this Hub repo")
    f.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    _add_eval_args(f, "pydoc-heldout")

    u = sub.add_parser("push", help="upload an export (weights, tokenizer, config + code, structure, plot, card) "
                                    "to the Hugging Face Hub",
                       description="Upload a dms-llm export to a Hub model repo. The token comes from HF_TOKEN or "
                                   "`hf auth login` and is never printed. Uploaded: *.safetensors, config.json (+ "
                                   "configuration/modeling_dms_llama.py for per-layer exports), tokenizer and "
                                   "generation config, dms_structure.json, dms_structure.png, logs, and a model card "
                                   "(README.md) with base_model, tags, datasets and perplexity results. The local "
                                   "folder is never changed; a failed upload says what failed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    u.add_argument("folder", help="output folder of dms-llm prune or dms-llm finetune")
    u.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub model repo (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--message", default=None, help="commit message")
    u.add_argument("--dry-run", metavar="DIR", default=None,
                   help="do not upload: write exactly what would be uploaded into DIR and list it")

    e = sub.add_parser("eval", help="perplexity, zero-shot accuracy (lm-eval) and speed of a model or an export",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(e)
    _add_eval_args(e, None)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks; 'default' = boolq,piqa,hellaswag,winogrande,arc_easy,"
                        "arc_challenge,openbookqa; 'dms_example' is a built-in offline task")
    e.add_argument("--include-path", default=None, help="folder of local lm-eval task YAML files (offline tasks)")
    e.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    e.add_argument("--speed", action="store_true", help="measure prefill / decode throughput and memory")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def _device(arg):
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_prune(args) -> int:
    import torch

    from .data import calibration_windows
    from .evaluation import perplexity
    from .exporter import check_output_dir, export, load_structure_file, update_structure_file, write_atomic
    from .loading import load_model
    from .resources import ResourceModel
    from .search import BudgetError, PruneConfig, prune, resolve_target
    from .structure import ModelShape

    t_start = time.perf_counter()
    if args.keep is not None and not 0.0 < args.keep < 1.0:  # the rest of the budget check needs the model's shape
        raise BudgetError(f"--keep must be a fraction strictly between 0 and 1, got {args.keep}")
    if args.target_params is not None and args.target_params <= 0:
        raise BudgetError(f"--target-params must be positive, got {args.target_params}")
    torch.manual_seed(args.seed)
    config = PruneConfig(
        keep=args.keep, target=args.target_params, resource=args.resource, uniform=args.uniform,
        mlp_unit=args.mlp_unit, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        resource_weight=args.resource_weight, lm_loss_weight=args.lm_loss_weight, seed=args.seed,
        mixed_precision=args.mixed_precision, joint=args.joint, joint_lr=args.joint_lr, lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank, fsdp=args.fsdp,
    )
    if args.joint and importlib.util.find_spec("peft") is None:
        raise ImportError("--joint trains LoRA adapters and needs peft: pip install 'dms-llm[peft]'")
    load_device = "cpu" if args.fsdp else _device(args.device)  # FSDP moves each shard to its process's device
    model, tokenizer, source_dir = load_model(args.model, dtype=args.dtype, device=load_device,
                                              trust_remote_code=args.trust_remote_code, device_map=args.device_map)
    out = check_output_dir(args.out, source_dir, args.overwrite or args.resume)
    shape = ModelShape.from_model(model)
    resolve_target(config, ResourceModel(shape, config.resource, config.macs_seq_len))  # fail before heavy work
    config.checkpoint_path = str(out.parent / f".{out.name}.search-state.pt")
    config.resume = args.resume
    calib = calibration_windows(tokenizer, args.calib, args.seq_len, args.num_samples, seed=args.seed)
    logger.info("calibration: %d windows of %d tokens from %s", len(calib), args.seq_len, args.calib)

    from accelerate import PartialState

    # under `accelerate launch` only rank 0 evaluates and writes (cpu=... as in prune(), or CPU ranks see no group)
    main_process = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    dense_ppl = None
    if not args.no_eval and main_process:
        dense_ppl = perplexity(model, tokenizer, args.eval_data, args.eval_seq_len, args.eval_windows)
        logger.info("dense perplexity %.3f on %s (%d windows of %d)", dense_ppl["ppl"], args.eval_data,
                    dense_ppl["windows"], dense_ppl["seq_len"])
    result = prune(model, calib, config, progress=not args.quiet)
    if not main_process:
        return 0
    if args.fsdp and PartialState().num_processes > 1:  # the weights were frozen and sharded: export a fresh copy
        model, _, _ = load_model(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code)
    logger.info("search: %d steps in %.1f s; %s", result.steps_run, result.search_seconds, result.structure.summary())
    metadata = {
        "budget": {"keep": args.keep, "target_params": args.target_params, "resource": args.resource,
                   "target_resource": result.target_resource, "uniform": args.uniform},
        "search": {"steps_run": result.steps_run, "seconds": round(result.search_seconds, 2),
                   "calibration": str(args.calib), "seq_len": args.seq_len, "num_samples": args.num_samples,
                   "config": result.config},
        "base_model": _model_reference(args.model),
        "command": _command_line(args),
    }
    exported = export(model, result.structure, out, tokenizer=tokenizer, source_dir=source_dir,
                      overwrite=args.overwrite or args.resume, metadata=metadata,
                      extra_files={"dms_search_log.jsonl": "\n".join(json.dumps(h) for h in result.history) + "\n"})
    Path(config.checkpoint_path).unlink(missing_ok=True)

    info = load_structure_file(out)  # parameters and MACs as the export recorded them
    pruned_ppl = None
    if not args.no_eval:
        pruned_ppl = perplexity(exported.model, tokenizer, args.eval_data, args.eval_seq_len, args.eval_windows)
        data = str(args.eval_data)
        info = update_structure_file(out, perplexity={"dense": {**dense_ppl, "data": data},
                                                      "pruned": {**pruned_ppl, "data": data}})
    dp, pp = info["params_before"], info["params_after"]
    dm, pm = info["macs_2048_before"], info["macs_2048_after"]
    rows = [
        ("parameters", f"{dp:,}", f"{pp:,}", f"{pp / dp:.3f}"),
        ("MACs per 2048 tokens", f"{dm / 1e9:.1f}G", f"{pm / 1e9:.1f}G", f"{pm / dm:.3f}"),
    ]
    if dense_ppl and pruned_ppl:
        label = f"perplexity ({Path(str(args.eval_data)).name}, {dense_ppl['windows']}x{dense_ppl['seq_len']} tokens)"
        rows.append((label, f"{dense_ppl['ppl']:.3f}", f"{pruned_ppl['ppl']:.3f}",
                     f"{pruned_ppl['ppl'] / dense_ppl['ppl']:.3f}"))
    rows.append(("search time", "", f"{result.search_seconds:.1f} s ({result.steps_run} steps)", ""))
    rows.append(("total time", "", f"{time.perf_counter() - t_start:.1f} s", ""))
    print()
    print(f"DMS prune of {args.model} -> {out}  ({'uniform, stock config' if exported.uniform else 'per-layer, trust_remote_code'})")
    print(result.structure.summary())
    print(_markdown(("", "dense", "pruned", "pruned/dense"), rows))
    summary = {"params": [dp, pp], "macs_2048": [dm, pm], "ppl": [dense_ppl, pruned_ppl],
               "search_seconds": result.search_seconds, "steps_run": result.steps_run}
    write_atomic(out / "dms_summary.json", json.dumps(summary, indent=1))
    if args.push_to_hub:
        _push(out, args.push_to_hub, args.private)
    return 0


def _push(folder: Path, repo: str, private: bool, message: str | None = None) -> None:
    from .hub import push

    url = push(folder, repo, private=private, commit_message=message)
    print(f"uploaded {folder} to {url}")


def _model_reference(name: str) -> str:
    """How an export records its base model: a local path absolute (so a later finetune finds its teacher from any
    folder), a Hub id or the embedded default's name as given."""
    from .loading import EMBEDDED

    path = Path(name).expanduser()
    return str(path.resolve()) if name not in EMBEDDED and path.exists() else name


def _command_line(args) -> str:
    return "dms-llm " + " ".join(shlex.quote(str(a)) for a in args.argv)


def cmd_finetune(args) -> int:
    import math

    import torch
    from accelerate import PartialState

    from .data import calibration_windows
    from .evaluation import perplexity
    from .exporter import check_output_dir, load_structure_file
    from .recovery import FinetuneConfig, FinetuneError, check_teacher, finetune, save_recovered
    from .loading import ModelLoadError, load_model, resolve_source

    t_start = time.perf_counter()
    if args.tokens < args.seq_len:
        raise FinetuneError(f"--tokens {args.tokens} is less than one window of --seq-len {args.seq_len}")
    _, _, source_dir = resolve_source(args.model)
    if source_dir is None:
        raise ModelLoadError(f"{args.model} is not a local folder; download the export first "
                             f"(hf download {args.model} --local-dir DIR) and finetune DIR")
    info = load_structure_file(source_dir)  # fails early on a folder that is not a dms-llm export
    out = check_output_dir(args.out, source_dir, args.overwrite or args.resume)
    teacher_name = None if args.no_teacher else (args.teacher or info.get("base_model"))
    if not args.no_teacher and not teacher_name:
        raise ModelLoadError(f"{source_dir} does not record its base model: pass --teacher DENSE or --no-teacher")
    lm_weight = args.lm_loss_weight if not args.no_teacher else (args.lm_loss_weight or 1.0)
    config = FinetuneConfig(
        tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, lora=args.lora, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, kl_weight=0.0 if args.no_teacher else args.kl_weight, lm_loss_weight=lm_weight,
        seed=args.seed, mixed_precision=args.mixed_precision, resume=args.resume,
        checkpoint_path=str(out.parent / f".{out.name}.recovery-state.pt"),
    )
    if config.lora and importlib.util.find_spec("peft") is None:
        raise ImportError("--lora needs peft: pip install 'dms-llm[peft]'")
    torch.manual_seed(args.seed)
    device = _device(args.device)
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map,
                                     trust_remote_code=args.trust_remote_code, check_supported=False)
    teacher = None
    if teacher_name:
        teacher, _, teacher_dir = load_model(teacher_name, dtype=args.dtype, device=device, device_map=args.device_map,
                                             trust_remote_code=args.trust_remote_code, check_supported=False)
        check_output_dir(args.out, teacher_dir, True)  # never write into the teacher's folder either
        check_teacher(model, teacher)  # before any data is read
    wanted = math.ceil(args.tokens / args.seq_len)
    windows = calibration_windows(tokenizer, args.calib, args.seq_len, wanted, seed=args.seed, allow_fewer=True)
    if len(windows) < wanted:
        logger.info("%s holds %d windows of %d tokens: the %d-token budget reuses them for %.1f epochs", args.calib,
                    len(windows), args.seq_len, args.tokens, args.tokens / (len(windows) * args.seq_len))
    main_process = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    data = str(args.eval_data)
    before = None
    if not args.no_eval and main_process:
        before = perplexity(model, tokenizer, args.eval_data, args.eval_seq_len, args.eval_windows)
        logger.info("perplexity before recovery %.3f on %s", before["ppl"], data)
    result = finetune(model, windows, config, teacher=teacher, progress=not args.quiet)
    if not main_process:
        return 0
    after = None
    if not args.no_eval:
        after = perplexity(model, tokenizer, args.eval_data, args.eval_seq_len, args.eval_windows)
    recovery = {
        "teacher": teacher_name, "calibration": str(args.calib), "tokens": args.tokens,
        "tokens_seen": result.tokens_seen, "steps": result.steps_run, "seq_len": args.seq_len,
        "lora": args.lora, "seconds": round(result.seconds, 2), "config": result.config, "command": _command_line(args),
    }
    ppl = {"pruned": {**before, "data": data}, "recovered": {**after, "data": data}} if after else None
    save_recovered(model, out, source_dir, tokenizer=tokenizer, recovery=recovery, overwrite=args.overwrite or args.resume,
                   perplexity=ppl, extra_files={"dms_recovery_log.jsonl": "".join(json.dumps(h) + "\n"
                                                                                   for h in result.history)})
    Path(config.checkpoint_path).unlink(missing_ok=True)
    print()
    print(f"recovery of {args.model} -> {out}: {result.steps_run} steps, {result.tokens_seen:,} tokens, "
          f"{result.seconds:.1f} s ({'LoRA, merged' if args.lora else 'all weights'}; "
          f"teacher {teacher_name or 'none'})")
    if before and after:
        label = f"perplexity ({Path(data).name}, {after['windows']}x{after['seq_len']} tokens)"
        print(_markdown(("", "before", "after", "after/before"),
                        [(label, f"{before['ppl']:.3f}", f"{after['ppl']:.3f}", f"{after['ppl'] / before['ppl']:.3f}"),
                         ("total time", "", f"{time.perf_counter() - t_start:.1f} s", "")]))
    if args.push_to_hub:
        _push(out, args.push_to_hub, args.private)
    return 0


def cmd_push(args) -> int:
    from .hub import stage

    if args.dry_run:
        staged = stage(args.folder, args.repo, args.dry_run)
        print(f"would upload to {args.repo} ({'private' if args.private else 'public'}) the files in {staged}:")
        for name in sorted(p.name for p in staged.iterdir()):
            print(f"  {name}")
        return 0
    _push(Path(args.folder), args.repo, args.private, args.message)
    return 0


def cmd_eval(args) -> int:
    from .evaluation import perplexity, speed
    from .loading import load_model

    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, device=_device(args.device),
                                     trust_remote_code=args.trust_remote_code, check_supported=False,
                                     device_map=args.device_map)
    results: dict = {"model": args.model}
    eval_data = args.eval_data or (None if (args.tasks or args.speed) else "wikitext2")
    if eval_data:
        r = perplexity(model, tokenizer, eval_data, args.eval_seq_len, args.eval_windows)
        results["perplexity"] = {"data": str(eval_data), **r}
        print(f"perplexity {r['ppl']:.3f} on {eval_data}: {r['windows']} of {r['total_windows']} windows of "
              f"{r['seq_len']} tokens ({r['tokens']} predicted tokens, {r['seconds']:.1f} s)")
    if args.tasks:
        from .zeroshot import DEFAULT_TASKS, zero_shot

        tasks = list(DEFAULT_TASKS) if args.tasks == "default" else [t for t in args.tasks.split(",") if t]
        zs = zero_shot(model, tokenizer, tasks, include_path=args.include_path, batch_size=args.batch_size,
                       limit=args.limit)
        results["zero_shot"] = zs
        rows = [(t, r["metric"], f"{100 * r['value']:.2f}",
                 f"{100 * r['stderr']:.2f}" if r["stderr"] is not None else "n/a", str(r["n"])) for t, r in zs.items()]
        print(_markdown(("task", "metric", "value (%)", "stderr (%)", "n"), rows))
    if args.speed:
        sp = speed(model)
        results["speed"] = sp
        print(f"speed on {sp['device']}: prefill {sp['prefill_tokens_per_s']:.0f} tok/s "
              f"(batch {sp['batch_size']} x {sp['prompt_len']}), decode {sp['decode_tokens_per_s']:.1f} tok/s "
              f"({sp['new_tokens']} tokens), weights {sp['weight_bytes'] / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _markdown(head, rows) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .exporter import ExportError
    from .recovery import FinetuneError
    from .hub import PushError
    from .loading import ModelLoadError
    from .search import BudgetError
    from .structure import UnsupportedModelError
    from .zeroshot import TaskError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the export as the command that made it
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from tqdm.contrib.logging import logging_redirect_tqdm

    import threading

    if threading.current_thread() is threading.main_thread():  # a scheduler's SIGTERM saves the state like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _terminate)
    else:
        previous = None

    try:
        with logging_redirect_tqdm():
            return {"prune": cmd_prune, "finetune": cmd_finetune, "push": cmd_push, "eval": cmd_eval}[args.command](args)
    except (BudgetError, DataError, ExportError, ModelLoadError, UnsupportedModelError, FileNotFoundError,
            TaskError, FloatingPointError, PushError, FinetuneError, ImportError) as e:
        print(f"dms-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dms-llm: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
