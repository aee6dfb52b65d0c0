"""segr1.core.logprobs against hand-computed values and against torch's own log_softmax and autograd."""

from __future__ import annotations

import math

import pytest
import torch

import segr1.core.logprobs as logprobs
from segr1.core.logprobs import token_logprobs_and_entropy


def reference(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the learner computed before: whole-vocabulary float32 log_softmax, twice."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
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
