"""Cross-entropy through the LM head in one chunked pass: the same loss and
gradient as logits, log-softmax and autograd."""
import pytest
import torch
from torch.nn import functional as F

from hf_kedit.methods.locate import head_loss
from hf_kedit.methods.locate.head_loss import head_cross_entropy


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_loss_and_gradient_are_those_of_log_softmax(with_bias):
    g = torch.Generator().manual_seed(0)
    vocab = 2 * head_loss.CHUNK + 300  # two whole chunks and a partial one
    weight = torch.randn(vocab, 16, generator=g)
    bias = torch.randn(vocab, generator=g) if with_bias else None
    hidden = torch.randn(4, 16, generator=g, requires_grad=True)
    tokens = torch.tensor([3, vocab - 1, 2 * head_loss.CHUNK])
    q = torch.softmax(torch.randn(vocab, generator=g), -1)  # the last row's target is a distribution
    rows = torch.cat([weight[tokens], (q @ weight)[None]])
    row_bias = torch.cat([bias[tokens], (q @ bias)[None]]) if with_bias else torch.zeros(4)

    fused = head_cross_entropy(hidden, weight, bias, rows, row_bias)
    (fused * torch.arange(1.0, 5.0)).sum().backward()
    fused_grad, hidden.grad = hidden.grad, None

    log_p = F.log_softmax(F.linear(hidden, weight, bias), -1)
    plain = torch.cat([-log_p[:3].gather(1, tokens[:, None])[:, 0], -(q * log_p[3]).sum()[None]])
    (plain * torch.arange(1.0, 5.0)).sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, atol=1e-5, rtol=1e-4)


def test_the_gradient_comes_back_in_the_hidden_states_dtype():
    weight = torch.randn(300, 8)
    hidden = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = head_cross_entropy(hidden, weight, None, weight[[1, 2]], torch.zeros(2))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad.abs().sum() > 0
