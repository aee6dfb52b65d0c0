"""segr1.core.logprobs against hand-computed values and against torch's own log_softmax and autograd."""

from __future__ import annotations

import math

import pytest
import torch

import segr1.core.logprobs as logprobs
from segr1.core.logprobs import token_logprobs_and_entropy


def reference(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
              banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the learner computed before: whole-vocabulary float32 log_softmax, twice (over the ids
    not banned only)."""
    x = logits.float() / temperature
    if banned is not None:
        allowed = torch.ones(x.shape[-1], dtype=torch.bool).index_fill(0, banned, False)
        x, token_ids = x[..., allowed], (allowed.cumsum(0) - 1)[token_ids]  # ids renumbered among the allowed
    log_probs = torch.log_softmax(x, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), entropy


def test_hand_computed_log_probs_and_entropies():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    logp, entropy = token_logprobs_and_entropy(logits, torch.tensor([[2, 1]]))
    assert logp.tolist()[0] == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-6)
    assert entropy.tolist()[0] == pytest.approx([math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                                                abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [4 * 1000 * 2, logprobs.CHUNK_BYTES])  # 2 rows a chunk, or all at once
def test_values_and_gradients_equal_the_whole_vocabulary_computation(monkeypatch, dtype, chunk_bytes):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 1000) * 4).to(dtype).requires_grad_()
    token_ids = torch.randint(0, 1000, (3, 7))
    weights = torch.randn(3, 7), torch.randn(3, 7)  # a loss that uses both outputs

    ours = token_logprobs_and_entropy(logits, token_ids)
    (ours_grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), logits)
    theirs = reference(logits, token_ids)
    (theirs_grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(theirs, weights)), logits)
    for o, t in zip(ours, theirs):
        assert o.dtype == torch.float32 and torch.allclose(o, t, atol=1e-5, rtol=0)
    assert ours_grad.dtype == dtype
    assert torch.allclose(ours_grad.float(), theirs_grad.float(), atol=1e-5, rtol=0)


def test_at_qwens_vocabulary_both_are_within_1e5_of_float64():
    """At 151,936 ids a float32 sum over the vocabulary rounds enough to matter: torch's own float32
    log_softmax is 1.7e-5 (log-probs) and 7.4e-5 (entropies) off float64 here, and an entropy taken as
    lse - sum p x was 1.3e-5 off. Ours must stay within 1e-5 of float64 in both."""
    vocab = 151_936
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 256, vocab, generator=g, dtype=torch.bfloat16).mul_(3)  # as benchmarks/logprobs.py
    token_ids = torch.randint(0, vocab, (1, 256), generator=g)
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(logits, token_ids)
        log_probs = torch.log_softmax(logits.double(), dim=-1)
    assert (logp.double() - log_probs.gather(-1, token_ids[..., None]).squeeze(-1)).abs().max() < 1e-5
    assert (entropy.double() + (log_probs.exp() * log_probs).sum(-1)).abs().max() < 1e-5


def test_hand_computed_log_probs_at_a_temperature_with_a_banned_id():
    """logits (0, log 3, 5) at temperature 1/2 are (0, 2 log 3, 10); with id 2 banned, p = (1/10, 9/10)."""
    logits = torch.tensor([[[0.0, math.log(3.0), 5.0]]])
    logp, entropy = token_logprobs_and_entropy(logits, torch.tensor([[1]]), temperature=0.5, banned=torch.tensor([2]))
    assert logp.item() == pytest.approx(math.log(0.9), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), abs=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_the_sampled_distribution_at_a_temperature_with_banned_ids(temperature):
    """The engines' distribution: values and gradients equal the whole-vocabulary computation, and
    the banned ids get no gradient (an entropy weight above 1 would turn their 0 x huge into NaN)."""
    torch.manual_seed(2)
    logits = (torch.randn(2, 6, 500) * 2).requires_grad_()
    banned = torch.tensor([3, 77, *range(480, 500)])
    token_ids = torch.randint(100, 400, (2, 6))  # never a banned id, as the engines sample them
    weights = torch.randn(2, 6), torch.randn(2, 6) * 5

    ours = token_logprobs_and_entropy(logits, token_ids, temperature, banned)
    (ours_grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), logits)
    theirs = reference(logits, token_ids, temperature, banned)
    (theirs_grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(theirs, weights)), logits)
    for o, t in zip(ours, theirs):
        assert torch.allclose(o, t, atol=1e-5, rtol=0)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)  # gradients of several units here
    assert ours_grad[..., banned].abs().max() == 0


def test_a_temperature_of_zero_is_refused():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        token_logprobs_and_entropy(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_a_loss_on_the_log_probs_alone_gets_their_gradient_only():
    """The entropy unused (``entropy_coef`` 0): its gradient comes as None and adds nothing."""
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 300, requires_grad=True)
    token_ids = torch.randint(0, 300, (2, 5))
    (ours,) = torch.autograd.grad(token_logprobs_and_entropy(logits, token_ids)[0].sum(), logits)
    (theirs,) = torch.autograd.grad(reference(logits, token_ids)[0].sum(), logits)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 10\) do not match token_ids \(2, 4\)"):
        token_logprobs_and_entropy(torch.zeros(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))
