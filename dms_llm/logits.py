"""Next-token losses without full-vocabulary tensors, and the dense model's outputs computed once (docs/DESIGN.md §9).

A causal LM's last step turns each position's final hidden state (H numbers) into V logits. With V = 262,144
(Gemma 3) one 256-token window's fp32 logits take 268 MB, and a KL between two such tensors, with its log-softmaxes
and gradients, holds several copies: that, not the weights, is what fills memory. So the model's own forward is run
for its final hidden states only (:func:`final_hidden`), and the head is applied to a few positions at a time
(:func:`next_token_loss`): each chunk's logits, its loss and its gradients (to the hidden states and, when they
train, the head's weights) are taken and freed before the next chunk is made — the chunked form of a fused
linear + cross-entropy. Nothing is recomputed in the backward pass: it only scales the gradients found in the forward.

The teacher of the search is the dense model (the same weights with the gates off), whose next-token distribution on
a calibration window never changes, so :class:`TeacherCache` computes it once per window, the first time the window
is used, and keeps it in one of two forms:

- ``top_k > 0`` (the search; 64 by default): the teacher's k most likely tokens with their log-probabilities and the
  log of the remaining mass. The KL is taken between the two distributions coarsened to those k tokens plus one
  "rest" bin (sparse distillation with the tail's mass kept): it is exact where the teacher's tail is empty and
  otherwise lower than the full KL by p_rest * KL(teacher's rest || student's rest), the shapes within the rest.
  Per step the teacher costs nothing; a window takes T x k x 12 bytes (256 tokens, k = 64: 197 kB).
- ``top_k = 0`` (held-out scoring; exact): the teacher's final hidden states; the KL is exact and each use costs one
  product with the head, not a forward pass of the dense model. A window takes T x H x 4 bytes.

Each window's entry is computed alone (batch of one), so it does not depend on which windows shared its batch: a
resumed search rebuilds the entries it needs exactly as the uninterrupted one made them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MB in fp32): 128 positions of a 262,144-token vocabulary, 682 of 49,152


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a data-parallel wrapper (accelerate's DDP), else the model itself."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states (B, T, H) of ``model`` on ``ids``: what its head turns into logits. The model's own
    forward runs (its wrappers, hooks and device placement included), but its head is bypassed for that call: even
    the one position ``logits_to_keep=1`` asks for costs a product with the whole head, and under autocast a cast of
    the frozen head and a transposed copy of it (about 1 s per forward for Gemma 3's 262,144 x 640 head on a CPU)."""
    captured = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    inner = _unwrap(model)
    handle = inner.get_decoder().register_forward_hook(keep)
    head = inner.get_output_embeddings()
    bypass = head is not None
    if bypass:  # an instance attribute shadows the class's forward (accelerate's hooks set one too: kept aside)
        previous = head.__dict__.get("forward")
        head.forward = _no_logits
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
        if bypass:
            if previous is None:
                del head.forward
            else:
                head.forward = previous
    return captured[-1]


def _no_logits(hidden: torch.Tensor) -> torch.Tensor:
    """What the head returns while :func:`final_hidden` runs: no logits ((..., 0))."""
    return hidden[..., :0]


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, gathered from its shards when FSDP2 holds it as a DTensor (outside the model's forward the head's
    weights stay sharded; the search's are frozen, so the gathered copy needs no gradient). A collective: every
    process must make its head at the same point."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class OutputHead:
    """The model's hidden -> logits map: its output embedding (``lm_head``: ``weight``, ``bias``), then the final
    logit softcap where the config has one (Gemma)."""

    def __init__(self, model: nn.Module):
        inner = _unwrap(model)
        module = inner.get_output_embeddings()
        self.weight, self.bias = _whole(module.weight), _whole(module.bias)
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)
        self.vocab_size = self.weight.shape[0]

    def matmul_weight(self) -> torch.Tensor:
        """The head's weight as its products use it: under autocast a frozen weight is cast to the autocast dtype
        once and the copy kept while the weight is unchanged (autocast itself casts a frozen weight again at every
        product: for Gemma 3's 262,144 x 640 head, several times per step), else the weight itself."""
        w = self.weight
        kind = w.device.type
        if not torch.is_autocast_enabled(kind) or w.requires_grad:
            return w
        dtype = torch.get_autocast_dtype(kind)
        if w.dtype == dtype:
            return w
        version, cast = getattr(w, "_dms_cast", (None, None))  # kept on the weight: it goes when the weight goes
        if version != w._version or cast.dtype != dtype:
            cast = w.detach().to(dtype)
            w._dms_cast = (w._version, cast)
        return cast

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden`` (N, H), in fp32."""
        w = self.matmul_weight()
        bias = None if self.bias is None else self.bias.to(w.dtype)
        logits = F.linear(hidden.to(w.device, w.dtype), w, bias).float()
        if self.softcap:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def positions_per_chunk(self) -> int:
        return max(1, CHUNK_ELEMENTS // self.vocab_size)


def drop_casts(model: nn.Module) -> None:
    """Free the autocast copy of ``model``'s head that :meth:`OutputHead.matmul_weight` keeps (end of a run)."""
    getter = getattr(_unwrap(model), "get_output_embeddings", None)
    module = getter() if getter is not None else None
    if module is not None and hasattr(module.weight, "_dms_cast"):
        del module.weight._dms_cast


class TopKTargets:
    """A batch's teacher in the top-k form: token ids (N, k), their log-probabilities (N, k) and the log of the
    teacher's remaining mass (N,), per flattened position."""

    def __init__(self, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor):
        self.ids, self.logp, self.log_rest = ids.long(), logp, log_rest


class HiddenTargets:
    """A batch's teacher as its final hidden states (N, H) and its head: the exact KL, one head product per chunk."""

    def __init__(self, hidden: torch.Tensor, head: OutputHead):
        self.hidden, self.head = hidden, head


def _exp_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn logits (N, V) in place into exp(z - max), the unnormalised probabilities; returns (their row sums, the
    log-normaliser), both (N,)."""
    top = z.amax(-1, keepdim=True)
    total = z.sub_(top).exp_().sum(-1)
    return total, top[:, 0] + total.log()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (N, V) tensors, without an (N, V) temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def _chunk(head: OutputHead, hidden: torch.Tensor, teacher, rows: slice, targets: torch.Tensor, kl_scale: float,
           lm_scale: float, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of positions: the summed KL(teacher || model) and next-token NLL of the logits ``head(hidden)`` and,
    with ``grad``, the gradient of ``kl_scale`` * KL + ``lm_scale`` * NLL with respect to the head's linear output.
    One vocabulary-sized buffer (three with the exact teacher): the gradient is written by hand, in place over the
    exponentials (with q the student's probabilities, d KL / d z = q - p for the exact teacher; for the top-k one
    q - p on the teacher's k tokens and q (1 - p_rest / q_rest) on the rest; d NLL / d z = q - onehot)."""
    z = head(hidden)
    slope = None
    if head.softcap and grad:  # z = c tanh(u / c): dz/du = 1 - (z / c)^2
        slope = 1 - (z / head.softcap).square_()
    has_next = targets >= 0
    nxt = targets.clamp_min(0)[:, None]
    z_next = z.gather(-1, nxt)[:, 0]
    kl = z.new_zeros(())
    if isinstance(teacher, HiddenTargets):
        with torch.no_grad():
            p = teacher.head(teacher.hidden[rows].to(teacher.head.weight.device)).to(z.device)
        p.div_(_exp_(p)[0][:, None])
        # KL = sum p log p - sum p z + lse(z): both sums before z turns into exponentials
        neg_entropy, cross = torch.xlogy(p, p).sum(-1), _dot(p, z)
    elif isinstance(teacher, TopKTargets):
        ids, logp = teacher.ids[rows], teacher.logp[rows]
        z_top = z.gather(-1, ids)
    total, lse = _exp_(z)  # z holds exp(z - max) from here on: q = z / total
    nll = (lse - z_next)[has_next].sum()
    if isinstance(teacher, HiddenTargets):
        kl = (neg_entropy - cross + lse).sum()
    elif isinstance(teacher, TopKTargets):
        whole = ids.shape[-1] == z.shape[-1]  # k covers the vocabulary: no rest, the exact KL
        kl = (logp.exp() * (logp - (z_top - lse[:, None]))).sum()
        if not whole:
            log_rest = teacher.log_rest[rows]
            e_top = z.gather(-1, ids)
            z.scatter_(-1, ids, 0.0)
            q_rest = (z.sum(-1) / total).clamp_min(1e-30)  # the student's mass outside the teacher's k tokens
            z.scatter_(-1, ids, e_top)
            kl = kl + (log_rest.exp() * (log_rest - q_rest.log())).sum()
    if not grad:
        return kl, nll, None
    # the gradient, in place over the exponentials (one pass scales them into q times each row's factor)
    row_scale = lm_scale * has_next.to(z.dtype)
    if isinstance(teacher, HiddenTargets):
        z.mul_(((row_scale + kl_scale) / total)[:, None]).sub_(p.mul_(kl_scale))
    elif isinstance(teacher, TopKTargets):
        p_top = logp.exp()
        if whole:
            z.mul_(((row_scale + kl_scale) / total)[:, None]).scatter_add_(-1, ids, -kl_scale * p_top)
        else:  # the teacher's k tokens are written, not added: q (1 - ratio) + q ratio cancels when q_rest is small
            q_top = e_top / total[:, None]
            ratio = (log_rest.exp() / q_rest)[:, None]  # p_rest / q_rest
            z.mul_((row_scale[:, None] + kl_scale * (1 - ratio)) / total[:, None])
            z.scatter_(-1, ids, (row_scale + kl_scale)[:, None] * q_top - kl_scale * p_top)
    else:
        z.mul_((row_scale / total)[:, None])
    z.scatter_add_(-1, nxt, -row_scale[:, None])
    return kl, nll, z.mul_(slope) if slope is not None else z


class _ChunkedLoss(torch.autograd.Function):
    """``kl_scale`` * KL + ``lm_scale`` * NLL over the chunks of positions of ``hidden`` (N, H) through the head
    (``weight``, ``bias``); each chunk's gradients (to ``hidden`` and, when they train, to the head's weights) are taken
    in the forward pass, from :func:`_chunk`'s gradient at the logits, before the next chunk's logits exist; the
    backward pass only scales them."""

    @staticmethod
    def forward(ctx, run, head, hidden, weight, bias):
        need_h, need_w, need_b = ctx.needs_input_grad[2:5]
        product = head.matmul_weight()  # under autocast: the weight in its dtype, cast once
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows, loss, g in run(grad=True):  # g: fp32, d loss / d (the chunk's linear output)
            total += loss
            if need_h:
                grad_hidden[rows] = (g.to(product.dtype) @ product).to(grad_hidden.device, torch.float32)
            if need_w:  # in place: a temporary would be as large as the head
                grad_weight.addmm_(g.T, hidden[rows].to(g.device, torch.float32))
            if need_b:
                grad_bias += g.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place: a head's weight gradient is as large as the head (671 MB for Gemma 3's)
        grads = [None if g is None else g.mul_(grad_out).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (None, None, *grads)


def next_token_loss(hidden: torch.Tensor, head: OutputHead, ids: torch.Tensor, teacher=None, kl_weight: float = 1.0,
                    lm_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kl_weight`` * KL(teacher || model) (mean over every position) + ``lm_weight`` * next-token cross-entropy
    (mean over the positions that have a next token) of the logits ``head(hidden)``, for ``hidden`` (B, T, H) the
    final hidden states on the token ids ``ids`` (B, T) and ``teacher`` a :class:`TopKTargets` / :class:`HiddenTargets`
    of the same positions (None: no KL). The logits are made :meth:`OutputHead.positions_per_chunk` positions at a
    time. Returns the loss (with gradients to ``hidden`` and the head's trainable weights when grad mode is on) and its
    detached parts ``{"kl", "lm"}`` (the LM part is reported even when its weight is 0)."""
    b, t, h = hidden.shape
    flat = hidden.reshape(b * t, h)
    targets = torch.cat([ids[:, 1:], ids.new_full((b, 1), -100)], 1).reshape(-1).to(head.weight.device)
    teacher = teacher if kl_weight else None
    n_kl, n_lm = b * t, max(b * (t - 1), 1)
    kl_scale, lm_scale = kl_weight / n_kl, lm_weight / n_lm
    parts = {"kl": torch.zeros((), device=hidden.device), "lm": torch.zeros((), device=hidden.device)}
    step = head.positions_per_chunk()

    def run(grad: bool):
        for a in range(0, b * t, step):
            rows = slice(a, min(a + step, b * t))
            kl, nll, g = _chunk(head, flat[rows].detach(), teacher, rows, targets[rows], kl_scale, lm_scale, grad)
            kl, lm = (kl / n_kl).to(hidden.device), (nll / n_lm).to(hidden.device)
            parts["kl"] += kl.detach()
            parts["lm"] += lm.detach()
            yield rows, kl_weight * kl + lm_weight * lm, g

    params = (flat, head.weight, head.bias)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        loss = _ChunkedLoss.apply(run, head, *params)
    else:
        with torch.no_grad():
            loss = sum(loss for _, loss, _ in run(grad=False))
    return loss, parts


class TeacherCache:
    """The dense model's next-token distribution on each of ``windows`` ((N, T) token ids), computed on first use
    (:meth:`fill`) and kept in the form the loss needs: ``top_k`` > 0 the top-k form, 0 the final hidden states
    (module docstring). Entries live on the CPU and move to the device per batch."""

    def __init__(self, windows: torch.Tensor, top_k: int = 64):
        if top_k < 0:
            raise ValueError(f"`top_k` must be 0 (exact: cache the final hidden states) or positive, got {top_k}")
        self.windows, self.top_k = windows, top_k
        self.entries: dict[int, tuple[torch.Tensor, ...]] = {}
        self.head: OutputHead | None = None

    @torch.no_grad()
    def fill(self, model: nn.Module, rows, context=nullcontext) -> None:
        """Compute the entries of ``rows`` (indices into the windows) that are missing, each window alone, with
        ``model`` as the teacher (inside ``context``, e.g. the gates or adapters switched off)."""
        rows = [int(r) for r in rows if int(r) not in self.entries]
        if not rows:
            return
        was_training = model.training
        model.eval()
        head = OutputHead(model)
        self.head = self.head or head
        device = model.get_input_embeddings().weight.device
        try:
            with context():
                for r in rows:
                    hidden = final_hidden(model, self.windows[r: r + 1].to(device))[0]
                    self.entries[r] = self._entry(hidden, head)
        finally:
            model.train(was_training)

    def _entry(self, hidden: torch.Tensor, head: OutputHead) -> tuple[torch.Tensor, ...]:
        if not self.top_k:
            return (hidden.float().cpu(),)
        k = min(self.top_k, head.vocab_size)
        step = head.positions_per_chunk()
        ids, logp, rests = [], [], []
        for a in range(0, len(hidden), step):
            z = head(hidden[a: a + step])
            top = z.topk(k, -1)
            total, lse = _exp_(z)
            rest = z.scatter_(-1, top.indices, 0.0).sum(-1).div_(total).clamp_min(1e-30).log()  # the mass outside
            rests.append(rest.cpu())
            ids.append(top.indices.int().cpu())
            logp.append((top.values - lse[:, None]).cpu())
        return torch.cat(ids), torch.cat(logp), torch.cat(rests)

    def targets(self, rows, device) -> TopKTargets | HiddenTargets:
        """The teacher of a batch of ``rows`` (filled before), flattened like :func:`next_token_loss`'s positions."""
        entries = [self.entries[int(r)] for r in rows]
        parts = [torch.cat([e[i] for e in entries]).to(device) for i in range(len(entries[0]))]
        return HiddenTargets(parts[0], self.head) if not self.top_k else TopKTargets(*parts)


__all__ = ["HiddenTargets", "OutputHead", "TeacherCache", "TopKTargets", "drop_casts", "final_hidden",
           "next_token_loss"]
