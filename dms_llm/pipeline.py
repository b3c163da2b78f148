"""The whole jobs in one call each, as ``dms-llm prune`` and ``dms-llm finetune`` run them:

    run = prune_checkpoint(PruneJob("smollm2-135m", "smollm2-dms", PruneConfig(keep=0.8)))
    run = finetune_checkpoint(FinetuneJob("smollm2-dms", "smollm2-dms-ft", FinetuneConfig(tokens=200_000)))

``prune_checkpoint``: load -> calibration windows -> DMS search -> slice -> reconstruction (least-squares repair of
the kept output projections, docs/DESIGN.md §6) -> perplexity before/after -> write the folder (temporary folder,
reload and logit check, rename) with its record, card, plot and search log -> remove the search state -> optionally
push. ``finetune_checkpoint`` does the same for recovery. The command line
only parses its flags into these jobs and prints the result, so both write the same folder; the record holds the
equivalent ``dms-llm`` command line of the job (:func:`command_line`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import calibration_windows, check_source, evaluation_tokens, held_out_windows
from .errors import DMSError, flag
from .evaluation import perplexity
from .exporter import ExportResult, build_pruned_model, check_per_layer_support, export
from .folder import announce_saved_state, check_output_dir, load_structure_file, save_recovered, state_path
from .gguf_export import (
    GGUFResult,
    channel_multiple_for,
    check_gguf_family,
    check_gguf_output,
    check_per_layer_gguf,
    write_gguf,
)
from .loading import EMBEDDED, ModelLoadError, default_device, load_model, resolve_source
from .reconstruct import ReconstructConfig, reconstruct
from .recovery import FinetuneConfig, FinetuneResult, check_budget, check_teacher, finetune
from .report import blocks_kept
from .resources import ResourceModel, count_parameters
from .search import PruneConfig, PruneResult, prune, uniform_state_path
from .structure import ModelShape
from .training import is_dispatched, release_freed_memory

logger = logging.getLogger("dms_llm")

@dataclass(kw_only=True)
class ModelSettings:
    """How a job loads its model (shared by every job)."""

    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None  # "auto": spread a model over this process's GPUs
    trust_remote_code: bool = False


@dataclass(kw_only=True)
class OutputSettings(ModelSettings):
    """What a job that writes a folder shares: the perplexity it reports, how it writes, where it publishes.
    ``eval_data=None`` skips the evaluation (``--no-eval``)."""

    eval_data: str | None = "pydoc-heldout"
    eval_seq_len: int | None = None
    eval_windows: int | None = None
    gguf: str | None = None  # also write <out>-<gguf>.gguf for llama.cpp (f16, q8_0, ...), checked by llama.cpp
    overwrite: bool = False
    resume: bool = False
    push_to_hub: str | None = None
    private: bool = False


@dataclass
class PruneJob(OutputSettings):
    """What ``dms-llm prune`` does, as settings: the model, the output folder, the search, the data, the repair.
    ``reconstruct=False`` exports the sliced weights as they are (``--no-reconstruct``)."""

    model: str  # Hub id, local folder, .gguf file or the embedded default "smollm2-135m"
    out: str
    config: PruneConfig
    calib: str = "pydoc"
    seq_len: int = 256
    num_samples: int = 64
    reconstruct: bool = True
    recon_samples: int = 32  # calibration windows the reconstruction reads
    recon_ridge: float = 1e-2
    # held-out calibration windows (of repair_check_len tokens, capped at the model's context) on which the depth
    # check's candidates are compared after their repair (0: the search's pre-repair choice stands)
    repair_check: int = 4
    repair_check_len: int = 2048


@dataclass
class FinetuneJob(OutputSettings):
    """What ``dms-llm finetune`` does: recover the export ``model`` into ``out`` by distillation from ``teacher``
    (default: the base model the export records; ``no_teacher``: LM loss only)."""

    model: str  # a dms-llm export folder
    out: str
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    teacher: str | None = None
    no_teacher: bool = False
    calib: str = "pydoc"
    seq_len: int = 512


@dataclass
class EvalJob(ModelSettings):
    """What ``dms-llm eval`` does: perplexity on ``eval_data``, zero-shot accuracy on lm-eval ``tasks`` (the stock
    tasks on local data from ``zeroshot_data``, else ``$DMS_LLM_ZEROSHOT_DATA``, else the Hub), speed."""

    model: str
    eval_data: str | None = None
    eval_seq_len: int | None = None
    eval_windows: int | None = None
    tasks: str | None = None  # comma-separated; "default" = the seven tasks of the table
    zeroshot_data: str | None = None
    include_path: str | None = None
    limit: int | None = None
    batch_size: str = "8"  # lm-eval batch size, or "auto"
    request_cache: str | None = None  # folder of lm-eval's request cache: an interrupted zero-shot run resumes
    speed: bool = False


@dataclass
class PruneRun:
    """What :func:`prune_checkpoint` did: the folder, the search, the export, the perplexities, the record."""

    out: Path
    search: PruneResult
    export: ExportResult
    reconstruction: dict | None  # what the repair did (None when it was off)
    perplexity: dict | None  # {"dense": {...}, "pruned": {...}} or None without evaluation
    info: dict  # the contents of dms_structure.json
    seconds: float
    url: str | None = None  # the Hub repo, when pushed
    gguf: GGUFResult | None = None  # the GGUF file, when asked for


@dataclass
class FinetuneRun:
    out: Path
    result: FinetuneResult
    teacher: str | None
    perplexity: dict | None  # {"pruned": {...}, "recovered": {...}}
    seconds: float
    url: str | None = None
    gguf: GGUFResult | None = None


def command_line(verb: str, job, config_flags: tuple[str, ...]) -> str:
    """The ``dms-llm`` command that runs ``job``: its settings that differ from the defaults, as flags."""
    parts = ["dms-llm", verb, job.model]
    defaults = {f.name: f.default for f in dataclasses.fields(job) if f.default is not dataclasses.MISSING}
    # the config's defaults as it resolves them (e.g. `repair_every=None` -> REPAIR_EVERY), at the job's budget
    budget = ("keep", "target")
    fields = {f.name: f.default for f in dataclasses.fields(job.config)}
    resolved = vars(dataclasses.replace(job.config, **{n: d for n, d in fields.items()
                                                       if d is not dataclasses.MISSING and n not in budget}))
    config_defaults = {n: fields[n] if n in budget else resolved[n] for n in fields}
    settings = [(n, getattr(job, n), defaults.get(n)) for n in defaults]
    settings += [(n, getattr(job.config, n), config_defaults[n]) for n in config_flags]
    for name, value, default in [("out", job.out, None)] + settings:
        if value == default:
            continue
        if name == "eval_data" and value is None:
            parts.append("--no-eval")
        elif value is True:
            parts.append(flag(name))
        elif value is False and default is True:  # an on-by-default setting turned off: --no-<name>
            parts.append("--no-" + flag(name).removeprefix("--"))
        elif value is not False and value is not None:  # 0 is a value (`--depth-check 0`), not a switch off
            parts += [flag(name), shlex.quote(str(value))]
    return " ".join(parts)


PRUNE_FLAGS = ("keep", "target", "resource", "format", "search_depth", "depth_check", "mlp_unit", "channel_multiple",
               "tensor_parallel", "steps", "uniform_steps", "repair_every", "batch_size", "lr", "resource_weight",
               "lm_loss_weight", "seed", "mixed_precision", "fsdp", "joint", "joint_lr", "lora_rank")
FINETUNE_FLAGS = ("tokens", "batch_size", "lr", "lora", "lora_rank", "lora_alpha", "kl_weight", "lm_loss_weight",
                  "seed", "mixed_precision")


def base_model_reference(name: str) -> str:
    """How an export records its base model: a local path absolute (so a later finetune finds its teacher from any
    folder), a Hub id or the embedded default's name as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name not in EMBEDDED and path.exists() else name


def _needs_peft(needed: bool, setting: str) -> None:
    if needed and importlib.util.find_spec("peft") is None:
        raise ImportError(f"`{setting}` trains LoRA adapters and needs peft: pip install 'dms-llm[peft]'")


def _check_data(job) -> None:
    """The job's data sources and GGUF output, checked before any model loads (seconds, not minutes, to learn of a
    typo)."""
    for source in (job.calib, job.eval_data):
        if source is not None:
            check_source(source)
    if job.gguf is not None:
        check_gguf_output(job.out, job.gguf, job.overwrite or job.resume)


def _write_gguf(out: Path, job) -> GGUFResult | None:
    return write_gguf(out, None, job.gguf, overwrite=job.overwrite or job.resume) if job.gguf else None


def _is_main_process() -> bool:
    """Under ``accelerate launch`` only rank 0 evaluates and writes."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _perplexities(models: dict, tokens: torch.Tensor, job) -> dict:
    """Perplexity of each model on the job's evaluation tokens."""
    results = {}
    for label, model in models.items():
        r = perplexity(model, tokens=tokens, seq_len=job.eval_seq_len, max_windows=job.eval_windows)
        logger.info("%s perplexity %.3f on %s (%d windows of %d)", label, r["ppl"], job.eval_data, r["windows"],
                    r["seq_len"])
        results[label] = {**r, "data": str(job.eval_data)}
    return results


QUALITY_RATIO = 3.0  # pruned / dense perplexity above which a prune warns (keep 0.8 of SmolLM2: 1.3 on pydoc-heldout)


BLOCKS_WARNING = 0.5  # kept fraction of the non-embedding parameters below which a prune warns


def blocks_warning(info: dict) -> str | None:
    """A warning when the budget leaves the transformer blocks less than :data:`BLOCKS_WARNING` of their
    parameters: `--keep` counts the embeddings, which are never pruned, so a model whose embeddings are a large
    share of it pays the whole cut in its blocks."""
    kept = blocks_kept(info)
    if kept is None or kept >= BLOCKS_WARNING:
        return None
    share = info["embedding_params"] / info["params_before"]
    half = math.ceil(100 * (share + (1 - share) * BLOCKS_WARNING)) / 100  # the keep that leaves the blocks half
    return (f"the budget keeps {info['params_after'] / info['params_before']:.0%} of all parameters but only "
            f"{kept:.0%} of the transformer blocks' parameters: the embeddings are {share:.0%} of this model and "
            f"are never pruned, so the whole cut falls on the blocks. Expect a large loss; choose a larger --keep "
            f"(keep {half:.2f} leaves the blocks half of theirs).")


def quality_warning(ppl: dict) -> str | None:
    """A warning when the pruned model's perplexity is more than :data:`QUALITY_RATIO` times the dense model's on
    the job's evaluation data (held-out calibration text by default), with what to try; None otherwise."""
    dense, pruned = (ppl.get("dense") or {}).get("ppl"), (ppl.get("pruned") or {}).get("ppl")
    if not dense or not pruned or pruned <= QUALITY_RATIO * dense:
        return None
    return (f"perplexity {pruned:.2f} is {pruned / dense:.1f}x the dense model's {dense:.2f} on "
            f"{Path(str(ppl['pruned'].get('data'))).name} (above {QUALITY_RATIO:g}x): this model is far from the dense "
            f"one. Try a larger keep, recovery (`dms-llm finetune`), or more calibration windows (--num-samples).")


def plain_step_seconds(model, ids: torch.Tensor) -> float | None:
    """Seconds of one plain training step of ``model`` (forward, LM loss with the head applied a few positions at a
    time, backward into every weight) on ``ids``: the yardstick the search step is reported against, so its cost
    reads the same on any machine. Each weight's gradient is dropped as soon as it is complete (a hook), so the
    yardstick never holds a model's worth of gradients; a model spread over devices is not timed (None)."""
    from .logits import OutputHead, final_hidden, next_token_loss
    from .training import input_device

    if is_dispatched(model):
        return None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    ids = ids.to(input_device(model))

    def step():
        next_token_loss(final_hidden(model, ids), OutputHead(model), ids, lm_weight=1.0)[0].backward()

    drop = []
    try:
        model.requires_grad_(True)
        drop = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p, _ in flags]
        step()  # warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        return time.perf_counter() - t0
    finally:
        for handle in drop:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)


def _step_cost(result: PruneResult, reference: float | None) -> dict | None:
    """The search step's median seconds and its ratio to a plain forward+backward of the same model."""
    seconds = sorted(h["seconds"] for h in result.history[1:] or result.history)
    if reference is None or not seconds:
        return None
    median = seconds[len(seconds) // 2]
    return {"search_step_seconds": round(median, 4), "plain_step_seconds": round(reference, 4),
            "ratio": round(median / reference, 3)}


def _evaluation_tokens(tokenizer, job) -> torch.Tensor | None:
    """The job's evaluation text, tokenized once (None when this process does not evaluate)."""
    return evaluation_tokens(tokenizer, job.eval_data) if job.eval_data is not None and _is_main_process() else None


def _repair_check_windows(tokenizer, job: PruneJob, recon, model) -> torch.Tensor | None:
    """The held-out calibration windows of the check after the repair, or None when it does not run (no repair, no
    ``repair_check``, or no text beyond the calibration windows)."""
    if recon is None or job.repair_check < 1:
        return None
    context = getattr(model.config, "max_position_embeddings", None) or job.repair_check_len
    held_out = held_out_windows(tokenizer, job.calib, job.seq_len, job.num_samples, job.repair_check,
                                seed=job.config.seed, length=min(job.repair_check_len, context))
    if held_out is None:
        logger.warning("%s holds no text beyond the %d calibration windows: the depth check's pre-repair choice "
                       "stands", job.calib, job.num_samples)
    return held_out


def prune_checkpoint(job: PruneJob, progress: bool = True) -> PruneRun | None:
    """Run the whole ``dms-llm prune`` job; returns what it did (None on the other ranks of ``accelerate launch``).

    The model's folder is never written to; the output appears only once it is complete and checked."""
    t0 = time.perf_counter()
    config = job.config
    _needs_peft(config.joint, "joint")
    recon = ReconstructConfig(samples=job.recon_samples, ridge=job.recon_ridge) if job.reconstruct else None
    _check_data(job)
    if job.gguf and channel_multiple_for(job.gguf, config.channel_multiple) != config.channel_multiple:
        logger.warning("MLP widths that are multiples of %d do not all quantize to %s: those ffn_down tensors stay in "
                       "f16 in the GGUF. `channel_multiple=%d` avoids it.", config.channel_multiple, job.gguf,
                       channel_multiple_for(job.gguf, config.channel_multiple))
    out = check_output_dir(job.out, resolve_source(job.model)[2], job.overwrite or job.resume)
    config = dataclasses.replace(config, checkpoint_path=str(state_path(out, "search")), resume=job.resume)
    announce_saved_state(state_path(out, "search"), "search", job.resume)
    torch.manual_seed(config.seed)
    load_device = "cpu" if config.fsdp else default_device(job.device)  # FSDP moves each shard to its process's device
    model, tokenizer, source_dir = load_model(job.model, dtype=job.dtype, device=load_device,
                                              trust_remote_code=job.trust_remote_code, device_map=job.device_map)
    if job.gguf is not None:  # before the search: a family llama.cpp cannot run stops now, not after an hour
        check_gguf_family(model.config.to_dict(), job.model)
    if config.format != "uniform":
        try:
            check_per_layer_support(model)
            if job.gguf is not None:
                check_per_layer_gguf(model.config.model_type, f"--gguf {job.gguf}")
        except DMSError as e:
            if config.format == "per-layer":
                raise
            logger.info("%s: --format auto searches the uniform (stock) format only", str(e).split(";")[0])
            config = dataclasses.replace(config, format="uniform")
    calib = calibration_windows(tokenizer, job.calib, job.seq_len, job.num_samples, seed=config.seed)
    logger.info("calibration: %d windows of %d tokens from %s", len(calib), job.seq_len, job.calib)
    tokens = _evaluation_tokens(tokenizer, job)
    ppl = {}
    if tokens is not None and config.joint:  # the joint search changes the weights: score the dense model first
        ppl = _perplexities({"dense": model}, tokens, job)
    reference = plain_step_seconds(model, calib[:config.batch_size]) if not config.fsdp else None
    release_freed_memory()  # the yardstick's gradients are as large as the weights
    held_out = _repair_check_windows(tokenizer, job, recon, model)
    result = prune(model, calib, config, progress=progress, held_out=held_out, repair=recon)
    release_freed_memory()  # the search's buffers: the export's copies come next
    if not _is_main_process():
        return None
    logger.info("search: %d steps in %.1f s; %s", result.steps_run, result.search_seconds, result.structure.summary())
    from accelerate import PartialState

    if config.fsdp and PartialState().num_processes > 1:  # the weights were frozen and sharded: export a fresh copy
        model, _, _ = load_model(job.model, dtype=job.dtype, device="cpu", trust_remote_code=job.trust_remote_code)
    if result.repaired is not None:  # the check after the repair ran: its winner comes repaired
        pruned, repair = result.repaired, result.repair
    else:
        pruned = build_pruned_model(model, result.structure)
        repair = reconstruct(pruned, model, result.structure, calib, recon, progress=progress) if recon else None
    if tokens is not None:
        ppl.update(_perplexities({"pruned": pruned} if ppl else {"dense": model, "pruned": pruned}, tokens, job))
    metadata = {
        "budget": {"keep": config.keep, "target_params": config.target, "resource": config.resource,
                   "target_resource": result.target_resource, "format": config.format},
        "search": {"steps_run": result.steps_run, "uniform_steps_run": result.uniform_steps_run,
                   "seconds": round(result.search_seconds, 2),
                   "precision": result.precision,
                   "step_cost": _step_cost(result, reference), "depth_check": result.depth_check,
                   "depth_check_after_repair": 0 if held_out is None else len(held_out),
                   "calibration": str(job.calib), "seq_len": job.seq_len, "num_samples": job.num_samples,
                   "config": config.settings()},
        "base_model": base_model_reference(job.model),
        "command": command_line("prune", job, PRUNE_FLAGS),
    }
    if repair is not None:
        blocks = repair["blocks"]
        metadata["reconstruction"] = {
            "samples": recon.samples, "ridge": recon.ridge, "tokens": repair["tokens"],
            "seconds": round(repair["seconds"], 2), "blocks_refit": len(blocks),
            "mean_error_before": sum(b["error_before"] for b in blocks) / max(len(blocks), 1),
            "mean_error_after": sum(b["error_after"] for b in blocks) / max(len(blocks), 1),
            "check": repair["check"],
        }
    if ppl:
        metadata["perplexity"] = ppl
    sizes = ResourceModel(ModelShape.from_model(model))
    kept = {"params_before": sizes.dense(), "params_after": count_parameters(pruned),
            "embedding_params": sizes.embedding_params()}
    warning = " ".join(w for w in (blocks_warning(kept), quality_warning(ppl)) if w)
    if warning:
        logger.warning(warning)
        metadata["warning"] = warning
    log = "".join(json.dumps(h) + "\n" for h in result.history)
    if not is_dispatched(model):  # from here on only the dense model's config is read: its weights go, so that the
        model.to("meta")  # export's reload check fits beside the pruned copy (Gemma 3 270M: the command's peak)
    exported = export(model, result.structure, out, tokenizer=tokenizer, source_dir=source_dir,
                      overwrite=job.overwrite or job.resume, metadata=metadata, pruned=pruned,
                      extra_files={"dms_search_log.jsonl": log})
    Path(config.checkpoint_path).unlink(missing_ok=True)
    Path(uniform_state_path(config.checkpoint_path)).unlink(missing_ok=True)
    info = load_structure_file(out)
    gguf = _write_gguf(out, job)
    url = _push(out, job) if job.push_to_hub else None
    return PruneRun(out, result, exported, repair, ppl or None, info, time.perf_counter() - t0, url, gguf)


def _push(out: Path, job) -> str:
    from .hub import push

    url = push(out, job.push_to_hub, private=job.private)
    logger.info("uploaded %s to %s", out, url)
    return url


def finetune_checkpoint(job: FinetuneJob, progress: bool = True) -> FinetuneRun | None:
    """Run the whole ``dms-llm finetune`` job: distil the dense model into the export ``job.model`` and write the
    result like an export (same format, its record plus a ``recovery`` entry). The input export is never changed."""
    t0 = time.perf_counter()
    config = job.config
    if job.no_teacher:  # the LM loss alone
        config = dataclasses.replace(config, kl_weight=0.0, lm_loss_weight=config.lm_loss_weight or 1.0)
    check_budget(config.tokens, job.seq_len)
    _needs_peft(config.lora, "lora")
    _check_data(job)
    _, _, source_dir = resolve_source(job.model)
    if source_dir is None:
        raise ModelLoadError(f"{job.model} is not a local folder; download the export first "
                             f"(hf download {job.model} --local-dir DIR) and finetune DIR")
    info = load_structure_file(source_dir)  # fails early on a folder that is not a dms-llm export
    if job.gguf is not None:
        check_gguf_family(json.loads((source_dir / "config.json").read_text()), job.model)
    out = check_output_dir(job.out, source_dir, job.overwrite or job.resume)
    teacher_name = None if job.no_teacher else (job.teacher or info.get("base_model"))
    if not job.no_teacher and not teacher_name:
        raise DMSError(f"{source_dir} does not record its base model: give `teacher` or set `no_teacher=True`")
    config = dataclasses.replace(config, checkpoint_path=str(state_path(out, "recovery")), resume=job.resume)
    announce_saved_state(state_path(out, "recovery"), "recovery", job.resume)
    torch.manual_seed(config.seed)
    device = default_device(job.device)
    model, tokenizer, _ = load_model(job.model, dtype=job.dtype, device=device, device_map=job.device_map,
                                     trust_remote_code=job.trust_remote_code, check_supported=False)
    teacher = None
    if teacher_name:
        teacher, _, teacher_dir = load_model(teacher_name, dtype=job.dtype, device=device, device_map=job.device_map,
                                             trust_remote_code=job.trust_remote_code, check_supported=False)
        check_output_dir(job.out, teacher_dir, True)  # never write into the teacher's folder either
        check_teacher(model, teacher)  # before any data is read
    wanted = math.ceil(config.tokens / job.seq_len)
    windows = calibration_windows(tokenizer, job.calib, job.seq_len, wanted, seed=config.seed, allow_fewer=True)
    if len(windows) < wanted:
        logger.info("%s holds %d windows of %d tokens: the %d-token budget reuses them for %.1f epochs", job.calib,
                    len(windows), job.seq_len, config.tokens, config.tokens / (len(windows) * job.seq_len))
    tokens = _evaluation_tokens(tokenizer, job)
    ppl = _perplexities({"pruned": model}, tokens, job) if tokens is not None else {}
    result = finetune(model, windows, config, teacher=teacher, progress=progress)
    if not _is_main_process():
        return None
    if tokens is not None:
        ppl.update(_perplexities({"recovered": model}, tokens, job))
    recovery = {
        "teacher": teacher_name, "calibration": str(job.calib), "tokens": config.tokens,
        "tokens_seen": result.tokens_seen, "steps": result.steps_run, "seq_len": job.seq_len, "lora": config.lora,
        "seconds": round(result.seconds, 2), "config": {k: v for k, v in result.config.items()
                                                         if k not in ("checkpoint_path", "resume", "checkpoint_every")},
        "command": command_line("finetune", job, FINETUNE_FLAGS),
    }
    log = "".join(json.dumps(h) + "\n" for h in result.history)
    save_recovered(model, out, source_dir, tokenizer=tokenizer, recovery=recovery,
                   overwrite=job.overwrite or job.resume, perplexity=ppl or None,
                   extra_files={"dms_recovery_log.jsonl": log})
    Path(config.checkpoint_path).unlink(missing_ok=True)
    gguf = _write_gguf(out, job)
    url = _push(out, job) if job.push_to_hub else None
    return FinetuneRun(out, result, teacher_name, ppl or None, time.perf_counter() - t0, url, gguf)


def evaluate_checkpoint(job: EvalJob, progress: bool = True) -> dict:
    """Run the whole ``dms-llm eval`` job. Data sources and task names (and local task data) are checked before
    the model loads. Returns :func:`dms_llm.evaluate`'s results plus ``"model"``."""
    from .evaluation import evaluate
    from .zeroshot import check_tasks

    eval_data = job.eval_data or (None if (job.tasks or job.speed) else "wikitext2")
    if eval_data is not None:
        check_source(eval_data)
    manager = check_tasks(job.tasks, job.include_path, job.zeroshot_data) if job.tasks else None
    model, tokenizer, _ = load_model(job.model, dtype=job.dtype, device=default_device(job.device),
                                     trust_remote_code=job.trust_remote_code, check_supported=False,
                                     device_map=job.device_map)
    batch = job.batch_size if str(job.batch_size) == "auto" else int(job.batch_size)
    results = evaluate(model, tokenizer, [eval_data] if eval_data else [], job.eval_seq_len, job.eval_windows,
                       tasks=job.tasks, include_path=job.include_path, limit=job.limit, batch_size=batch,
                       measure_speed=job.speed, zeroshot_data=job.zeroshot_data, task_manager=manager,
                       request_cache=job.request_cache)
    return {"model": job.model, **results}


__all__ = ["EvalJob", "FinetuneJob", "FinetuneRun", "PruneJob", "PruneRun", "command_line", "evaluate_checkpoint",
           "finetune_checkpoint", "prune_checkpoint"]
