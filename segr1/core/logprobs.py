"""The sampled tokens' log-probs and the entropy per position, from logits, without whole-vocabulary copies.

At Qwen2.5-VL's 151,936-token vocabulary the logits of a micro-batch of 4 completions of 400 tokens
are about 1 GB in float32. ``torch.log_softmax`` writes another tensor of that size and keeps it
for the backward pass, and the entropy's ``exp() * log_probs`` two more. Here the rows are taken a
chunk at a time (``CHUNK_BYTES`` of float32 each): the forward keeps only each row's log-sum-exp
and entropy, and the backward recomputes the chunk's softmax to write the logits' gradient. What is
left of whole-vocabulary size is the logits and their gradient, which any backward pass produces.

With ``x`` a row of logits, ``lse = log sum exp x`` and ``p = exp(x - lse)``:

- ``log p(t) = x_t - lse``, whose gradient is ``onehot(t) - p``;
- ``H = -sum p log p``, whose gradient is ``-p (log p + H)``.

Both are in float32 whatever the logits' dtype, as vLLM computes its log-probs. They describe the
distribution the engines sample from: ``x`` is the logits divided by the sampling temperature, with
the ids the engines ban removed. The logits' gradient is then ``x``'s divided by the temperature,
and zero on the banned ids.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 << 20  # float32 working memory per chunk of rows: 110 rows of Qwen's vocabulary
# A banned id's logit: the lowest finite float rather than -inf, so that its p is exactly 0 and
# p * x is 0 in the entropy's sum, where 0 * -inf would make it NaN.
BANNED_LOGIT = torch.finfo(torch.float32).min


def token_logprobs_and_entropy(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, banned: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(token)`` and the entropy of each position, both ``[B, T]``, from ``logits`` ``[B, T, V]``
    and ``token_ids`` ``[B, T]``, where ``p = softmax(logits / temperature)`` over the ids that
    ``banned`` (1-D, on the logits' device) does not hold. Differentiable in both outputs."""
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match token_ids {tuple(token_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _LogprobsEntropy.apply(logits, token_ids, temperature, banned)


def _sampled(rows: torch.Tensor, temperature: float, banned: torch.Tensor | None) -> torch.Tensor:
    """A chunk of logits as the sampler sees them, in float32 (a new tensor whenever it differs)."""
    x = rows.float()
    if temperature != 1.0:
        x = x / temperature
    if banned is not None:
        x = x.index_fill(1, banned, BANNED_LOGIT)
    return x


def _chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, banned: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = logits.shape[-1]
        flat, ids = logits.reshape(-1, vocab), token_ids.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        for rows in _chunks(flat.shape[0], vocab):
            x = _sampled(flat[rows], temperature, banned)
            lse[rows] = torch.logsumexp(x, dim=-1)
            logp[rows] = x.gather(1, ids[rows]).squeeze(1) - lse[rows]
            log_p = x - lse[rows, None]
            # -sum p log p as one dot product, without a [rows, V] product. Not lse - sum p x: that
            # subtracts two sums of about lse's size and keeps float32's rounding of both: at Qwen's
            # vocabulary 1.3e-5 off float64, against 7.9e-6 this way (tests/test_logprobs.py's case).
            entropy[rows] = -torch.linalg.vecdot(log_p.exp(), log_p)
        ctx.save_for_backward(logits, token_ids, lse, entropy)
        ctx.temperature, ctx.banned = temperature, banned
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: no work for it
        return logp.view(token_ids.shape), entropy.view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, token_ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        vocab = logits.shape[-1]
        flat, ids = logits.reshape(-1, vocab), token_ids.reshape(-1, 1)
        grad = torch.empty_like(flat)
        g_logp = None if grad_logp is None else grad_logp.reshape(-1, 1).float()
        g_entropy = None if grad_entropy is None else grad_entropy.reshape(-1, 1).float()
        for rows in _chunks(flat.shape[0], vocab):
            log_p = _sampled(flat[rows], ctx.temperature, ctx.banned) - lse[rows, None]
            p = log_p.exp()
            # d/dx of g_logp log p(t) + g_entropy H  =  g_logp onehot(t) - p (g_logp + g_entropy (log p + H))
            if g_entropy is not None:
                factor = log_p.add_(entropy[rows, None]).mul_(g_entropy[rows])  # in place: log_p is done
                if g_logp is not None:
                    factor.add_(g_logp[rows])
            else:
                factor = g_logp[rows]
            g = p.mul_(factor).neg_()
            if g_logp is not None:
                g.scatter_add_(1, ids[rows], g_logp[rows])
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            if ctx.banned is not None:
                g.index_fill_(1, ctx.banned, 0.0)  # p = 0 there, but 0 x the huge log p may have left NaN
            grad[rows] = g
        return grad.view(logits.shape), None, None, None
