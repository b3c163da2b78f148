"""The one training skeleton that the DMS search and the recovery finetune both run (docs/DESIGN.md §3, §7).

Both train a few tensors of a model on windows of token ids, and both need the same care:

- placement: one device under ``accelerate`` (several processes under ``accelerate launch``), or a model that a
  ``device_map`` spread over devices, which is never moved;
- precision (``mixed_precision``), activation checkpointing (on for CUDA by default), a fixed seed;
- resume: the state is saved atomically every ``checkpoint_every`` steps, on completion and on Ctrl-C / SIGTERM,
  and ``resume=True`` continues from it with the same data order (the batch of a step depends only on the seed and
  the step), so an interrupted run ends where an uninterrupted one would;
- a non-finite loss stops before the update, keeping the state of the last good step;
- whatever happens, the model gets back its ``requires_grad`` flags, train/eval mode and checkpointing setting.

A method supplies its loss (``loss_fn``) and its update after the backward pass (``update_fn``); :class:`Trainer`
does the rest. The losses both methods use live here too.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DMSError

logger = logging.getLogger("dms_llm")


class TrainingError(DMSError, ValueError):
    """Training settings or inputs that cannot work."""


PRECISIONS = ("auto", "no", "bf16", "fp16")


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda", ...) multiplies bf16 matrices in hardware: a CUDA GPU of compute
    capability 8 or more, a CPU with AVX512-BF16 or AMX (where bf16 matmuls run about twice as fast as fp32; on
    other CPUs torch emulates them, slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(choice: str, device_type: str) -> str:
    """The autocast precision a run uses: ``choice``, with "auto" read as bf16 where :func:`native_bf16`, else
    "no" (fp32)."""
    if choice != "auto":
        return choice
    return "bf16" if native_bf16(device_type) else "no"


@dataclass
class TrainingConfig:
    """Settings every training run shares (the search's and the recovery's configs extend it)."""

    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16", or "auto": bf16 where the device multiplies in bf16 natively
    activation_checkpointing: bool | None = None  # None: on for CUDA
    checkpoint_path: str | None = None  # where the resumable state is saved (None: not saved)
    checkpoint_every: int = 25
    resume: bool = False

    def __post_init__(self):
        if self.mixed_precision not in PRECISIONS:
            raise TrainingError(f"`mixed_precision` must be one of {', '.join(PRECISIONS)}, got "
                                f"{self.mixed_precision!r}")
        if self.checkpoint_every < 1:
            raise TrainingError(f"`checkpoint_every` must be at least 1, got {self.checkpoint_every}")


# -- losses --------------------------------------------------------------------------------------------------
def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student), computed in fp32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` on the token ids ``ids``, in fp32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch_rows(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The indices (into ``n`` windows) of the global batch of ``step``: a deterministic function of (seed, step), so
    a resumed run sees the same data. Each epoch visits the windows in a new random order."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = order[pos * batch_size : (pos + 1) * batch_size]
    return idx if len(idx) == batch_size else order[:batch_size]


def batch_of(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The global batch of ``step`` (:func:`batch_rows`)."""
    return windows[batch_rows(len(windows), step, batch_size, seed)]


def check_windows(windows, vocab_size: int) -> None:
    """Refuse anything but a (num_samples, seq_len) tensor of token ids of this vocabulary."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise TrainingError("the windows must be a (num_samples, seq_len) tensor of token ids; see "
                            "dms_llm.calibration_windows")
    if windows.min() < 0 or windows.max() >= vocab_size:
        raise TrainingError(f"token ids must lie in [0, {vocab_size}); was the model's tokenizer used?")


# -- placement -------------------------------------------------------------------------------------------------
def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was placed across devices with a ``device_map`` (accelerate's big-model dispatch)."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device


# -- LoRA --------------------------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model: nn.Module, rank: int, alpha: int):
    """Wrap ``model`` with peft LoRA adapters on its attention and MLP projections (dropout 0, no bias)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'dms-llm[peft]'") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=[t for t in LORA_TARGETS if t in names])
    return get_peft_model(model, lora)


# -- state -------------------------------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (all weights, or only the LoRA adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a :func:`trainable_state` back into ``model`` (resume)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value)


def save_atomically(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


KEPT_FREE_BYTES = 2**28


def reuse_freed_memory() -> bool:
    """Keep freed memory in this process for the next allocation instead of returning it to the system (glibc only;
    the command line calls this once). Large tensors — a chunk of logits, many times a step — are otherwise mapped
    afresh each time (the main job once had 48 million minor page faults, a sixth of its CPU time). Up to
    ``KEPT_FREE_BYTES`` of free memory stay with the process, a few chunks' worth (dms_llm.logits). Returns whether
    it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, KEPT_FREE_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return False


def release_freed_memory() -> bool:
    """Give the memory this process has freed back to the system now (glibc's ``malloc_trim``; elsewhere nothing).
    With :func:`reuse_freed_memory` in force freed memory stays resident, so a phase whose tensors are freed (the
    plain-step yardstick's full-size gradients, the search's buffers) would otherwise add to every later phase's
    peak. Returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


@contextmanager
def deferred_interrupts():
    """Ctrl-C and SIGTERM that arrive inside wait until it ends, then act as usual: an update and the record of
    its step happen together or not at all, so the state saved on an interruption is always a whole step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            raise KeyboardInterrupt(f"signal {received[0]}")


def _set_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn transformers' activation checkpointing on or off; False when the model does not support it."""
    if on and not getattr(model, "supports_gradient_checkpointing", False):
        return False
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"  # transformers 5.2x
    switch = getattr(model, f"{prefix}_checkpointing_{'enable' if on else 'disable'}", None)
    if switch is None:
        return False
    switch(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}) if on else switch()
    return on


class Trainer:
    """Context manager around one training run of ``model`` (and, frozen, ``teacher``) under ``config``.

    On entry: a fresh ``Accelerator`` (precision, CPU or GPU, the processes of ``accelerate launch``), the seed, the
    device (``input_device`` of a dispatched model, which is never moved), activation checkpointing and train mode.
    On exit, always: checkpointing off, train/eval mode and ``requires_grad`` flags as they were.

    ``name`` ("search", "recovery") names the run in messages; ``hint`` says what to try after a non-finite loss.
    """

    def __init__(self, model: nn.Module, config: TrainingConfig, name: str, hint: str = "",
                 teacher: nn.Module | None = None, train_mode: bool = True):
        self.model, self.config, self.name, self.hint = model, config, name, hint
        self.teacher, self.train_mode = teacher, train_mode
        self.path = Path(config.checkpoint_path) if config.checkpoint_path else None
        self.optimizer = None
        self._beat = None  # the step lines' heartbeat (log_every)

    # -- setup and restore ---------------------------------------------------------------------------------
    def __enter__(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        # AcceleratorState is a process-wide singleton: let each run pick its own precision (process group kept)
        AcceleratorState._reset_state(reset_partial_state=False)
        self.precision = resolve_precision(self.config.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
        if self.config.mixed_precision == "auto":
            logger.info("mixed precision: %s (auto: %s)", self.precision,
                        "the device multiplies in bf16 natively" if self.precision == "bf16" else
                        "no native bf16 matmuls on this device")
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available())
        set_seed(self.config.seed)
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.dispatched = is_dispatched(self.model) or (self.teacher is not None and is_dispatched(self.teacher))
        if self.dispatched and self.world > 1:
            raise TrainingError("a model dispatched with a device_map is trained in one process only; use one process "
                                "(device_map) or accelerate launch without a device_map (DDP/FSDP)")
        self.device = input_device(self.model) if self.dispatched else self.accelerator.device
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._was_training = self.model.training
        checkpointing = self.config.activation_checkpointing
        if checkpointing is None:
            checkpointing = self.device.type == "cuda"
        self.checkpointing = checkpointing and _set_checkpointing(self.model, True)
        # transformers checkpoints only in train mode; Llama has no dropout, so train mode changes nothing else
        self.model.train(self.train_mode or self.checkpointing)
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        from .logits import drop_casts

        for m in (self.model, self.teacher):
            if m is not None:
                drop_casts(m)  # the head's autocast copy, kept for the run's products
        if self.checkpointing:
            _set_checkpointing(self.model, False)
        self.model.train(self._was_training)
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def place(self, *models: nn.Module) -> None:
        """Move models to this process's device, except dispatched ones (they stay where their map put them)."""
        for m in models:
            if m is not None and not is_dispatched(m):
                m.to(self.device)

    def prepare(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None):
        """The optimizer (and a trained model, wrapped for data parallelism) as accelerate prepares them."""
        if model is None:
            self.optimizer = self.accelerator.prepare(optimizer)
            return self.optimizer
        model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return model

    def rows(self, n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The indices (into ``n`` windows) of this process's rows of the global batch of ``step`` (``batch_size``
        rows per process)."""
        if batch_size < 1 or batch_size * self.world > n:
            raise TrainingError(f"{self.world} process(es) x `batch_size` {batch_size} must be between 1 and the "
                                f"{n} windows")
        rows = batch_rows(n, step, batch_size * self.world, seed)
        return rows.chunk(self.world)[self.accelerator.process_index] if self.world > 1 else rows

    def batch(self, windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """This process's rows of the global batch of ``step`` (:meth:`rows`), on its device."""
        return windows[self.rows(len(windows), step, batch_size, seed)].to(self.device)

    def average_gradients(self, tensors) -> None:
        """Data parallel without a wrapped model: average these gradients over the processes, so every process takes
        the same step and the result equals one process on the global batch."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for grad in tensors:
            if grad is not None:
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad.div_(self.world)

    # -- state ---------------------------------------------------------------------------------------------
    def resume_state(self) -> dict | None:
        """The saved state to continue from, when ``resume`` is set and one exists."""
        if not (self.config.resume and self.path is not None and self.path.exists()):
            return None
        state = torch.load(self.path, map_location=self.device, weights_only=False)
        logger.info("resumed the %s from %s at step %d", self.name, self.path, state["step"])
        return state

    def save(self, state: dict) -> None:
        if self.path is not None and self.is_main:
            save_atomically(self.path, state)

    @contextmanager
    def stage(self, name: str, checkpoint_path: str | None):
        """A second loop in the same run (its accelerator, device and precision) under its own ``name`` in the logs
        and its own resumable state at ``checkpoint_path``."""
        saved = self.name, self.path, self._beat
        self.name, self.path, self._beat = name, Path(checkpoint_path) if checkpoint_path else None, None
        try:
            yield self
        finally:
            self.name, self.path, self._beat = saved

    # -- the loop ------------------------------------------------------------------------------------------
    def run(
        self,
        steps: int,
        history: list[dict],
        loss_fn: Callable[[int], tuple[torch.Tensor, dict]],
        update_fn: Callable[[int, torch.Tensor, dict], dict],
        state_fn: Callable[[int], dict],
        stop_fn: Callable[[int, dict], bool] | None = None,
        postfix: Callable[[dict], str] | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """Steps ``len(history)`` .. ``steps - 1``: ``loss, parts = loss_fn(step)``; a non-finite loss saves the last
        good state and stops; then backward, ``record = update_fn(step, loss, parts)`` (the method's update; it returns
        the step's log record), periodic saves, and ``stop_fn(step, record)`` to end early. ``state_fn(step)`` is
        the resumable state after ``step`` steps; it is saved on completion and on Ctrl-C as well."""
        from tqdm.auto import tqdm

        start = len(history)
        # a live bar on a terminal only (tqdm's disable=None); the per-step records go to the log file
        bar = tqdm(range(start, steps), desc=f"DMS {self.name}", dynamic_ncols=True,
                   disable=None if progress and self.is_main else True)
        try:
            for step in bar:
                with self.accelerator.autocast():
                    loss, parts = loss_fn(step)
                if not torch.isfinite(loss):
                    self._stop_on_nonfinite(loss, step, state_fn)
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                with deferred_interrupts():  # the update and its record: both or neither
                    record = update_fn(step, loss, parts)
                    history.append(record)
                if postfix is not None:
                    bar.set_postfix_str(postfix(record))
                if (step + 1) % self.config.checkpoint_every == 0:
                    self.save(state_fn(step + 1))
                if stop_fn is not None and stop_fn(step, record):
                    break
            bar.close()
            self.save(state_fn(len(history)))
        except KeyboardInterrupt:
            if self.path is not None:
                self.save(state_fn(len(history)))
                logger.warning("interrupted: %s state of step %d saved to %s (continue with resume)", self.name,
                               len(history), self.path)
            raise
        return history

    def log_every(self, step: int) -> int:
        """The level to log step ``step``'s line at: INFO every ``checkpoint_every`` steps and at least every
        ``HEARTBEAT_SECONDS`` (dms_llm.progress), DEBUG otherwise (the console shows one live bar; every step is in the
        run's JSONL log)."""
        from .progress import Heartbeat

        if self._beat is None:
            self._beat = Heartbeat(self.name)
        due = self._beat.due()  # always asked, so that the interval counts from the last INFO line
        return logging.INFO if (step + 1) % self.config.checkpoint_every == 0 or step == 0 or due else logging.DEBUG

    def _stop_on_nonfinite(self, loss: torch.Tensor, step: int, state_fn) -> None:
        where = ""
        if self.path is not None:  # nothing was updated yet in this step: the state is the last good one
            self.save(state_fn(step))
            where = f"; the state after step {step} is saved in {self.path} (continue with `resume=True`)"
        raise FloatingPointError(f"the {self.name} loss became {loss.item()} at step {step + 1}{where}. {self.hint}")


__all__ = ["Trainer", "TrainingConfig", "TrainingError", "add_lora", "batch_of", "batch_rows", "check_windows",
           "input_device", "is_dispatched", "kl_divergence", "lm_loss", "load_trainable_state", "save_atomically",
           "trainable_state"]
