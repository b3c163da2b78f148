"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts as files)."""

import platform
from pathlib import Path

import torch


def machine_name(device: str) -> str:
    """The device the numbers come from, as written next to them."""
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def eval_windows(arg: int | None, device: str) -> int | None:
    """How many 2048-token evaluation windows to score: the argument, else 8 on CPU and all on a GPU (0 = all)."""
    windows = arg if arg is not None else (None if device == "cuda" else 8)
    return windows or None


def replace_section(markdown: str | Path, start: str, end: str, lines: list[str]) -> Path:
    """Put ``lines`` (which begin with ``start`` and end with ``end``) in place of that marked section of the file,
    or append them when the file has no such section yet."""
    md = Path(markdown)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    md.write_text(text)
    return md


def dms_llm_teacher_top_k() -> int:
    from dms_llm.search import PruneConfig

    return PruneConfig.teacher_top_k


def search_precision() -> str:
    """The autocast the DMS searches run under here (their default, ``mixed_precision="auto"``, resolved)."""
    import torch

    from dms_llm.training import resolve_precision

    return resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")


DMS_FORMATS = {"dms_per_layer": "per-layer", "dms_uniform": "uniform", "dms_auto": "auto"}
METHODS = ("dms_per_layer", "dms_uniform", "dms_auto", "flap", "wanda_sp", "minitron_width", "sleb", "shortgpt",
           "taylor_uniform", "random_uniform")
PEERS = tuple(m for m in METHODS if not m.startswith("dms")) + ("torch_pruning",)


def add_protocol_args(parser) -> None:
    """The peer table's protocol flags, shared by the benchmark scripts: eval windows, search steps, calibration."""
    parser.add_argument("--windows", type=int, default=None, help="first N eval windows (default: 8 on CPU; 0 = all)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--calib", default="wikitext2")
    parser.add_argument("--eval-data", default="wikitext2")
    parser.add_argument("--repair-check", type=int, default=4,
                        help="held-out calibration windows on which the DMS depth check chooses after the repair, "
                             "as `dms-llm prune` does (0: the search's pre-repair choice)")


def protocol_windows(tokenizer, calib: str, seq_len: int = 256, num_samples: int = 64, repair_check: int = 4,
                     repair_check_len: int = 2048):
    """(calibration windows, the held-out windows after them for the DMS depth check's choice after the repair, or
    None) — what `dms-llm prune` draws from the same source with the same settings."""
    import dms_llm
    from dms_llm.data import held_out_windows

    windows = dms_llm.calibration_windows(tokenizer, calib, seq_len, num_samples)
    return windows, held_out_windows(tokenizer, calib, seq_len, num_samples, repair_check, length=repair_check_len)


def parse_search_options(items: list[str]) -> dict:
    """``["batch_size=4", "lr=0.05"]`` -> ``{"batch_size": 4, "lr": 0.05}``: PruneConfig fields (values read as JSON
    where they parse, else as text), checked against the config's fields."""
    import dataclasses
    import json

    import dms_llm

    fields = {f.name for f in dataclasses.fields(dms_llm.PruneConfig)}
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--search-option {item!r}: give FIELD=VALUE with a PruneConfig field "
                             f"({', '.join(sorted(fields))})")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def effective_search_options(options: dict) -> dict:
    """``options`` (PruneConfig fields) with the in-search repair as the library resolves it: its fields are there
    exactly when it is on, so that a search keyed or recorded with them differs from one without it also when the
    library's default turns it on or off (an option equal to the default then changes nothing)."""
    import dms_llm

    config = dms_llm.PruneConfig(keep=0.5, **options)
    effective = {k: v for k, v in options.items() if k not in ("repair_every", "repair_takeover")}
    if config.repair_every:
        effective.update(repair_every=config.repair_every, repair_takeover=config.repair_takeover)
    return effective


class Methods:
    """Every method of the benchmarks on one model and calibration set: its structure at a budget (cached in memory
    and, keyed by everything it depends on, on disk under ``cache_dir``), and its pruned model — as the method
    leaves it (FLAP with its bias compensation) or, for a name ending in ``+recon``, after dms-llm's reconstruction."""

    def __init__(self, model, calib, calib_name: str, steps: int = 200, recon_samples: int = 32,
                 cache_dir: str | Path | None = None, channel_multiple: int = 8, held_out=None,
                 uniform_steps: int | None = None, search_options: dict | None = None):
        self.model, self.calib, self.steps, self.recon_samples = model, calib, steps, recon_samples
        # more PruneConfig fields of every DMS search (the in-search repair's as resolved: in the key when on)
        self.search_options = effective_search_options(search_options or {})
        self.uniform_steps = uniform_steps  # dms_auto's uniform search (None: the library's default, = steps)
        self.channel_multiple = channel_multiple  # of the DMS searches (8 = the library's default)
        # held-out calibration windows: the DMS searches' depth check then chooses after the repair, as
        # `dms-llm prune` does (docs/DESIGN.md §3)
        self.held_out = held_out
        self.key = f"{Path(str(calib_name)).name}-{calib.shape[0]}x{calib.shape[1]}-{steps}steps"
        self.key += f"-cm{channel_multiple}" if channel_multiple != 8 else ""
        self.dms_key = f"-rc{held_out.shape[0]}x{held_out.shape[1]}" if held_out is not None else ""
        self.dms_key += f"-topk{dms_llm_teacher_top_k()}-{search_precision()}"
        self.dms_key += "".join(f"-{k}{v}" for k, v in sorted(self.search_options.items()))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._stats, self._structures = None, {}
        self._repaired = {}  # structure key -> (repaired model, repair seconds) left by the depth check
        self.checked = {}  # structure key -> the candidates the DMS checks scored (format, losses, chosen, why)

    def structure(self, method: str, keep: float, seed: int = 0):
        """(structure, seconds it took to find it — also when it comes from the cache); ``seed``: of a DMS search
        (the other methods are deterministic)."""
        import json
        import time

        import dms_llm
        from dms_llm import baselines
        from dms_llm.resources import ResourceModel
        from dms_llm.structure import ModelShape, Structure

        seed = seed if method.startswith("dms") else 0
        if (method, keep, seed) in self._structures:
            return self._structures[method, keep, seed]
        path = self._cache_path(method, keep, seed)
        if path is not None and path.exists():
            saved = json.loads(path.read_text())  # with the seconds its search took when it was found
            found = (Structure.from_dict(saved["structure"]), saved["seconds"])
            self._structures[method, keep, seed] = found
            return found
        t0 = time.perf_counter()
        model, calib = self.model, self.calib
        target = dms_llm.PruneConfig(keep=keep).resolve_target(ResourceModel(ModelShape.from_model(model)))
        if method in ("flap", "minitron_width") and self._stats is None:
            self._stats = baselines.activation_stats(model, calib)
        if method.startswith("dms"):
            config = dms_llm.PruneConfig(keep=keep, steps=self.steps, format=DMS_FORMATS[method],
                                         channel_multiple=self.channel_multiple, seed=seed,
                                         uniform_steps=self.uniform_steps, **self.search_options)
            structure = self.choose(dms_llm.prune(model, calib, config, progress=False))
        elif method == "flap":
            structure = baselines.flap(model, self._stats, target)
        elif method == "minitron_width":
            structure = baselines.minitron_width(model, self._stats, calib, target)
        elif method == "wanda_sp":
            structure = baselines.wanda_sp(model, calib, target)
        elif method == "sleb":  # its greedy loop scores every remaining layer per removal: 8 windows keep it short
            structure = baselines.sleb(model, calib[:8], target)
        elif method == "shortgpt":
            structure = baselines.shortgpt(model, calib, target)
        elif method == "taylor_uniform":
            structure = baselines.taylor_uniform(model, calib, target)
        elif method == "random_uniform":
            structure = baselines.random_uniform(model, target)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return self.remember(method, keep, structure, time.perf_counter() - t0, seed)

    def choose(self, result):
        """The structure a DMS search returns here: its own choice, or with held-out windows the depth-check
        candidate closest to the dense model once repaired."""
        from dms_llm.reconstruct import ReconstructConfig, choose_after_repair_of

        if self.held_out is None or len(result.candidates) < 2:
            return result.structure
        result = choose_after_repair_of(self.model, result, self.calib, self.held_out,
                                        ReconstructConfig(samples=self.recon_samples))
        # its +recon row takes it as it is
        self._repaired[_key(result.structure)] = (result.repaired, result.repair["seconds"])
        self.checked[_key(result.structure)] = result.depth_check
        return result.structure

    def _cache_path(self, method: str, keep: float, seed: int = 0) -> Path | None:
        key = self.key + (self.dms_key + (f"-seed{seed}" if seed else "") if method.startswith("dms") else "")
        if method == "dms_auto":  # the uniform search's steps
            key += f"-u{self.uniform_steps or self.steps}"
        return self.cache_dir / f"{method}-keep{keep}-{key}.json" if self.cache_dir else None

    def remember(self, method: str, keep: float, structure, seconds: float, seed: int = 0):
        """Keep a structure found elsewhere (e.g. a DMS search another benchmark ran with these settings) as this
        method's at ``keep`` (and DMS ``seed``), in memory and in the cache, so the other benchmarks reuse it;
        returns (structure, seconds)."""
        import json

        found = (structure, seconds)
        self._structures[method, keep, seed] = found
        path = self._cache_path(method, keep, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"seconds": seconds, "structure": structure.to_dict()}))
        return found

    def pruned(self, name: str, keep: float, seed: int = 0):
        """(pruned model, structure, search seconds, reconstruction seconds or None) for ``method[+recon]``."""
        import time

        import dms_llm
        from dms_llm import baselines
        from dms_llm.reconstruct import ReconstructConfig, reconstruct

        method, recon = name.removesuffix("+recon"), name.endswith("+recon")
        structure, seconds = self.structure(method, keep, seed)
        if recon and _key(structure) in self._repaired:  # repaired already, by the depth check after the repair
            pruned, recon_seconds = self._repaired.pop(_key(structure))
            return pruned, structure, seconds, recon_seconds
        if recon:
            pruned = dms_llm.build_pruned_model(self.model, structure)
            t0 = time.perf_counter()
            reconstruct(pruned, self.model, structure, self.calib, ReconstructConfig(samples=self.recon_samples),
                        progress=False)
            return pruned, structure, seconds, time.perf_counter() - t0
        # FLAP's compensation is a bias per kept block (its budget counts them); the per-layer format carries it
        pruned = dms_llm.build_pruned_model(self.model, structure, output_bias=method == "flap")
        if method == "flap":
            self._stats = self._stats or baselines.activation_stats(self.model, self.calib)
            baselines.flap_bias(pruned, self.model, structure, self._stats)
        return pruned, structure, seconds, None


def _key(structure) -> str:
    import json

    return json.dumps(structure.to_dict(), sort_keys=True)


def best_peers(results: str | Path, keep: float, n: int = 2, fallback=("flap+recon", "minitron_width+recon")) -> list:
    """The ``n`` peer methods (each in its best variant, with or without the reconstruction) with the lowest
    perplexity at ``keep`` in the perplexity benchmark's results.json (``fallback`` when there is none)."""
    import json

    path = Path(results)
    rows = json.loads(path.read_text()) if path.exists() else []
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        base = r["method"].removesuffix("+recon")
        if r["keep"] == keep and base in PEERS and base != "torch_pruning":
            best[base] = min(best.get(base, (float("inf"), "")), (r["ppl_wikitext2"], r["method"]))
    ranked = [name for _, name in sorted(best.values())]
    return ranked[:n] if ranked else list(fallback[:n])
