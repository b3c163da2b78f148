"""The whole job as one library call: the command line and the Python entry point write the same folder, the
record holds a command line that runs the same job again, and errors speak in flags on the command line."""

import dataclasses
import json
import shlex
import shutil

import pytest
import torch

from dms_llm import cli
from dms_llm.pipeline import FinetuneJob, PruneJob, finetune_checkpoint, prune_checkpoint
from dms_llm.reconstruct import after_repair_candidates
from dms_llm.recovery import FinetuneConfig
from dms_llm.search import PruneConfig


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k and k != "step_cost"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _snapshot(folder):
    """Every file of a folder; JSON and JSONL parsed, with wall-clock times left out."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            files[path.name] = _without_times(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            files[path.name] = [_without_times(json.loads(line)) for line in path.read_text().splitlines()]
        else:
            files[path.name] = path.read_bytes()
    return files


def _prune_args(dense_folder, text_file, out, *more):
    return ["prune", str(dense_folder), "--keep", "0.7", "--steps", "3", "--seq-len", "32", "--num-samples", "4",
            "--calib", str(text_file), "--eval-data", str(text_file), "--eval-seq-len", "64", "--eval-windows", "2",
            "--out", str(out), "--quiet", *more]


def test_cli_and_python_entry_point_write_the_same_folder(dense_folder, text_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main(_prune_args(dense_folder, text_file, out, "--format", "per-layer")) == 0
    from_cli = _snapshot(out)
    shutil.rmtree(out)
    job = PruneJob(str(dense_folder), str(out), PruneConfig(keep=0.7, steps=3, format="per-layer"),
                   calib=str(text_file), seq_len=32,
                   num_samples=4, eval_data=str(text_file), eval_seq_len=64, eval_windows=2)
    run = prune_checkpoint(job, progress=False)
    from_api = _snapshot(out)
    assert sorted(from_api) == sorted(from_cli)
    assert {"model.safetensors", "config.json", "dms_structure.json", "dms_structure.png", "README.md",
            "dms_search_log.jsonl", "modeling_dms_llama.py"} <= set(from_api)
    for name in from_api:
        assert from_api[name] == from_cli[name], name
    info = run.info
    assert info["perplexity"]["pruned"]["windows"] == 2 and info["params_after"] <= 0.7 * info["params_before"]
    assert not list(tmp_path.glob(".*"))  # the search state and temporary folders are gone


def test_recorded_command_runs_the_same_job(dense_folder, text_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main(_prune_args(dense_folder, text_file, out)) == 0
    command = json.loads((out / "dms_structure.json").read_text())["command"]
    assert command.startswith(f"dms-llm prune {dense_folder} --out {out}")
    recorded = cli.build_parser().parse_args(shlex.split(command)[1:])
    given = cli.build_parser().parse_args(_prune_args(dense_folder, text_file, out))
    assert {k: v for k, v in vars(recorded).items() if k != "quiet"} == \
        {k: v for k, v in vars(given).items() if k != "quiet"}


def test_parser_defaults_are_the_library_defaults():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for verb, job_cls, config in (("prune", PruneJob, PruneConfig(keep=0.5)), ("finetune", FinetuneJob,
                                                                              FinetuneConfig())):
        flags = {a.dest: a.default for a in sub[verb]._actions}
        settings = {f.name: f.default for f in dataclasses.fields(job_cls) if f.default is not dataclasses.MISSING}
        settings.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        # --repair-every unset is None: the config's own default (REPAIR_EVERY, or off where it cannot run)
        assert verb != "prune" or flags["repair_every"] is None
        shared = set(flags) & set(settings) - {"keep", "eval_data", "channel_multiple", "repair_every"}
        assert shared and all(flags[n] == settings[n] for n in shared), \
            {n: (flags[n], settings[n]) for n in shared if flags[n] != settings[n]}
    # --channel-multiple follows --gguf: unset, it is the library's default unless a quantized GGUF is asked for
    from dms_llm.gguf_export import channel_multiple_for

    assert channel_multiple_for(None) == PruneConfig(keep=0.5).channel_multiple == channel_multiple_for("f16")


@pytest.mark.parametrize("extra, message", [
    (["--keep", "1.5"], "--keep must be a fraction strictly between 0 and 1"),
    (["--keep", "0.7", "--steps", "0"], "--steps must be at least 1"),
])
def test_cli_errors_name_flags(dense_folder, tmp_path, capsys, extra, message):
    assert cli.main(["prune", str(dense_folder), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_refused_in_flags_and_parameters(dense_folder, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert cli.main(_prune_args(dense_folder, text_file, out)) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    from dms_llm.folder import ExportError

    with pytest.raises(ExportError, match="pass `overwrite=True` to replace it"):
        prune_checkpoint(PruneJob(str(dense_folder), str(out), PruneConfig(keep=0.7)))
    assert (out / "mine.txt").read_text() == "user data"


def test_finetune_job_without_a_recorded_base_model_needs_a_teacher(pruned_folder, tmp_path):
    info = json.loads((pruned_folder / "dms_structure.json").read_text())
    del info["base_model"]
    (pruned_folder / "dms_structure.json").write_text(json.dumps(info))
    from dms_llm.errors import DMSError

    with pytest.raises(DMSError, match="`teacher`"):
        finetune_checkpoint(FinetuneJob(str(pruned_folder), str(tmp_path / "r")))


@pytest.mark.parametrize("change, message", [
    (dict(calib="/no/such/file.txt"), "neither an existing file"),
    (dict(eval_data="/no/such/eval.raw"), "neither an existing file"),
    (dict(calib="BINARY"), "looks binary"),
    (dict(out="EXISTING"), "not empty"),
    (dict(out="SOURCE"), "source folder"),
])
def test_bad_inputs_stop_before_the_model_loads(dense_folder, tmp_path, monkeypatch, change, message):
    import dms_llm.pipeline as pipeline_mod
    from dms_llm.errors import DMSError

    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an input that can be checked without it")

    monkeypatch.setattr(pipeline_mod, "load_model", never)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "mine.txt").write_text("keep me")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01 not text")
    where = {"EXISTING": str(tmp_path / "existing"), "SOURCE": str(dense_folder / "inside"),
             "BINARY": str(tmp_path / "binary.txt")}
    settings = {"out": str(tmp_path / "out"), **{k: where.get(v, v) for k, v in change.items()}}
    with pytest.raises(DMSError, match=message):
        prune_checkpoint(PruneJob(str(dense_folder), config=PruneConfig(keep=0.7), **settings))
    with pytest.raises(DMSError):
        finetune_checkpoint(FinetuneJob(str(dense_folder), **settings))


def test_rerun_after_an_interruption_says_what_it_found(dense_folder, text_file, tmp_path, monkeypatch, caplog):
    import logging

    import dms_llm.training as training_mod

    real_batch = training_mod.batch_rows

    def interrupt_at_step_3(n, step, batch_size, seed):
        if step == 2 and seed == 0:  # the search's third batch (the warm-up uses seed + 1)
            raise KeyboardInterrupt
        return real_batch(n, step, batch_size, seed)

    monkeypatch.setattr(training_mod, "batch_rows", interrupt_at_step_3)
    args = _prune_args(dense_folder, text_file, tmp_path / "out")
    assert cli.main(args) == 130
    state = tmp_path / ".out.search-state.pt"
    assert state.exists()
    monkeypatch.setattr(training_mod, "batch_rows", real_batch)
    with caplog.at_level(logging.WARNING, logger="dms_llm"):
        prune_checkpoint(PruneJob(str(dense_folder), str(tmp_path / "out"), PruneConfig(keep=0.7, steps=3),
                                  calib=str(text_file), seq_len=32, num_samples=4, eval_data=None))
    message = caplog.text
    assert "found the saved state of an interrupted search" in message and "after step 2" in message
    assert "starts over and replaces it" in message and "`resume=True`" in message
    assert not state.exists()  # this run completed: its own state is removed with it
    from dms_llm.errors import as_flags

    assert "run again with --resume" in as_flags(message)  # how the command line shows it


def test_the_depth_check_chooses_after_the_repair_on_held_out_windows(dense_folder, text_file, tmp_path):
    """With the repair on, every depth-check candidate is repaired and scored on calibration windows the search
    and the repair did not read: the export is the candidate with the lowest KL, and reloading it gives that KL."""
    from dms_llm.data import held_out_windows
    from dms_llm.loading import load_model
    from dms_llm.reconstruct import kl_to_dense

    config = PruneConfig(keep=0.45, steps=16, warmup_steps=2, batch_size=2, patience=3, depth_check=4)
    job = PruneJob(str(dense_folder), str(tmp_path / "out"), config, calib=str(text_file), seq_len=32,
                   num_samples=8, recon_samples=4, repair_check=3, repair_check_len=128, eval_data=None)
    run = prune_checkpoint(job, progress=False)
    checked = run.info["search"]["depth_check"]
    assert len(checked) > 1 and run.info["search"]["depth_check_after_repair"] == 3
    scored = [i for i, c in enumerate(checked) if c["kl_repaired"] is not None]
    assert scored == after_repair_candidates(checked)  # the searched, the pre-repair favourite, none removed; uniform
    assert {checked[i]["format"] for i in scored} == {"per-layer", "uniform"} and 0 in scored
    kls = [c["kl_repaired"] for c in checked]
    chosen = [i for i, c in enumerate(checked) if c["chosen"]]
    best = min(kls[i] for i in scored)
    assert len(chosen) == 1 and chosen[0] in scored and checked[chosen[0]]["reason"]
    assert kls[chosen[0]] == best or (checked[chosen[0]]["format"] == "uniform" and kls[chosen[0]] <= 1.01 * best)
    assert run.search.structure == run.search.candidates[chosen[0]]
    assert run.export.uniform == (checked[chosen[0]]["format"] == "uniform")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## How the structure was chosen" in card and checked[chosen[0]]["reason"] in card
    assert run.search.pruned_resource == checked[chosen[0]]["resource"] <= run.search.target_resource
    dense, tokenizer, _ = load_model(str(dense_folder))
    exported, _, _ = load_model(str(tmp_path / "out"), trust_remote_code=True, check_supported=False)
    held_out = held_out_windows(tokenizer, text_file, 32, 8, 3, length=128)
    assert held_out.shape == (3, 128)
    assert abs(kl_to_dense(exported, dense, held_out) - kls[chosen[0]]) < 1e-4
    # the Python API makes the same choice, given the same held-out windows and repair
    from dms_llm.data import calibration_windows
    from dms_llm.reconstruct import ReconstructConfig
    from dms_llm.search import prune

    calib = calibration_windows(tokenizer, str(text_file), 32, 8, seed=config.seed)
    same = prune(dense, calib, config, progress=False, held_out=held_out, repair=ReconstructConfig(samples=4))
    assert same.structure == run.search.structure and same.repaired is not None
    assert [c["kl_repaired"] for c in same.depth_check] == pytest.approx(kls)
    off = prune_checkpoint(dataclasses.replace(job, out=str(tmp_path / "off"), repair_check=0), progress=False)
    assert off.info["search"]["depth_check_after_repair"] == 0
    assert all("kl_repaired" not in c for c in off.info["search"]["depth_check"])


def test_after_repair_candidates_keep_both_ends_of_the_depth_range_and_the_favourite():
    def c(fmt, removed, loss):
        return {"format": fmt, "removed": {"attn_depth": removed, "mlp_depth": 0}, "loss": loss}

    checked = [c("per-layer", 8, 1.6), c("per-layer", 6, 1.5), c("per-layer", 4, 1.55), c("per-layer", 2, 1.8),
               c("per-layer", 0, 1.62), c("uniform", 0, 3.0)]
    assert after_repair_candidates(checked) == [0, 1, 4, 5]
    assert after_repair_candidates(checked[:1] + checked[5:]) == [0, 1]
    # successive halving: a low loss on fewer windows is not the favourite; the best finalist is
    halved = [dict(x, windows=16) for x in checked]
    halved[1]["windows"], halved[3]["windows"] = 4, 8
    assert after_repair_candidates(halved) == [0, 2, 4, 5]
    # an end of the range far behind the favourite (more than 10% above its loss) is not repaired
    far = [c("per-layer", 8, 2.0), c("per-layer", 3, 1.5), c("per-layer", 0, 1.64), c("uniform", 2, 1.0),
           c("uniform", 0, 1.2)]
    assert after_repair_candidates(far) == [1, 2, 3]
    assert after_repair_candidates(far, margin=0.5) == [0, 1, 2, 3, 4]


def test_recorded_command_keeps_settings_turned_off(dense_folder, text_file, tmp_path):
    """On-by-default settings turned off (--no-search-depth, --no-reconstruct) are part of the recorded command."""
    out = tmp_path / "out"
    args = _prune_args(dense_folder, text_file, out) + ["--no-search-depth", "--no-reconstruct", "--depth-check", "2"]
    assert cli.main(args) == 0
    info = json.loads((out / "dms_structure.json").read_text())
    assert "--no-search-depth" in info["command"] and "--no-reconstruct" in info["command"]
    recorded = cli.build_parser().parse_args(shlex.split(info["command"])[1:])
    given = cli.build_parser().parse_args(args)
    assert {k: v for k, v in vars(recorded).items() if k not in ("quiet", "repair_every")} == \
        {k: v for k, v in vars(given).items() if k not in ("quiet", "repair_every")}
    # nothing ships repaired, so the search did not aim at the repaired model either, and the command says so
    assert given.repair_every is None and recorded.repair_every == 0 and "--repair-every 0" in info["command"]
    assert info["num_layers_after"] == info["num_layers_before"]
    # without the depth search, the check only compares formats (auto): no candidate removes a block
    checked = info["search"]["depth_check"]
    assert checked and "uniform" in {c["format"] for c in checked}
    assert not any(any(c["removed"].values()) for c in checked)


def test_a_model_far_worse_than_dense_is_flagged_in_the_report_and_the_card():
    from dms_llm.card import render_model_card
    from dms_llm.pipeline import QUALITY_RATIO, quality_warning

    def ppl(dense, pruned):
        return {label: {"ppl": v, "data": "/x/wiki.test.raw", "windows": 8, "seq_len": 2048}
                for label, v in (("dense", dense), ("pruned", pruned))}

    assert quality_warning(ppl(20.0, 20.0 * QUALITY_RATIO)) is None
    assert quality_warning({}) is None
    warning = quality_warning(ppl(20.0, 142.0))
    assert "7.1x" in warning and "wiki.test.raw" in warning and "dms-llm finetune" in warning
    info = {"base_model": "x/y", "format": "uniform (stock config)", "params_before": 10, "params_after": 5,
            "perplexity": ppl(20.0, 142.0), "warning": warning}
    card = render_model_card(info)
    assert "## Quality warning" in card and warning in card
    assert "Quality warning" not in render_model_card({**info, "warning": None})


def test_the_plain_step_yardstick_drops_each_gradient_and_restores_the_flags(gqa_model, calib):
    """The plain forward+backward the search step is timed against backpropagates into every weight, but never holds
    a model's worth of gradients: each is dropped once complete; the weights' requires_grad flags come back."""
    from dms_llm.pipeline import plain_step_seconds

    reached = set()  # weights whose gradient was completed (hooks registered while they require grad)
    gqa_model.requires_grad_(True)
    for name, p in gqa_model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: reached.add(name))
    gqa_model.requires_grad_(False)
    gqa_model.model.norm.weight.requires_grad_(True)
    held = []  # the gradients present at the end of each backward pass
    real_backward = torch.Tensor.backward

    def backward(loss, *args, **kwargs):
        real_backward(loss, *args, **kwargs)
        held.append([n for n, p in gqa_model.named_parameters() if p.grad is not None])

    torch.Tensor.backward = backward
    try:
        seconds = plain_step_seconds(gqa_model, calib[:1])
    finally:
        torch.Tensor.backward = real_backward
    assert seconds > 0 and held == [[], []]  # warm-up and timed step
    assert reached == {name for name, _ in gqa_model.named_parameters()}
    assert all(p.grad is None for p in gqa_model.parameters())
    assert [n for n, p in gqa_model.named_parameters() if p.requires_grad] == ["model.norm.weight"]


def test_a_budget_that_leaves_the_blocks_less_than_half_is_flagged_with_why():
    from dms_llm.card import render_model_card
    from dms_llm.pipeline import blocks_warning
    from dms_llm.report import blocks_kept

    # Gemma 3 270M's proportions: 63% of the parameters are embeddings; keep 0.8 leaves the blocks 46%
    gemma = {"base_model": "x/y", "format": "per-layer", "params_before": 268_000_000, "params_after": 214_400_000,
             "embedding_params": 168_000_000}
    assert abs(blocks_kept(gemma) - 0.464) < 1e-3
    warning = blocks_warning(gemma)
    assert "80% of all parameters" in warning and "46% of the transformer blocks" in warning
    assert "embeddings are 63%" in warning and "keep 0.82" in warning
    smollm = {**gemma, "params_before": 134_515_008, "params_after": 107_604_288, "embedding_params": 28_311_552}
    assert blocks_warning(smollm) is None and abs(blocks_kept(smollm) - 0.747) < 1e-3
    assert blocks_kept({"params_before": 10, "params_after": 5}) is None  # a record from before the field
    card = render_model_card({**gemma, "warning": warning})
    assert "46.4% of those outside the embeddings" in card and warning in card
