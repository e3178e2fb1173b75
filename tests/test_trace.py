"""Causal tracing on a tiny random model with the default model's tokenizer."""
import pytest
import torch

from hf_kedit.trace import trace
from test_rome import tiny

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_restoring_the_last_state_recovers_the_clean_probability(tokenizer, arch, tmp_path):
    model = tiny(tokenizer, arch)
    t = trace(model, tokenizer, PROMPT, SUBJECT, samples=3, noise=10.0, progress=False)
    ids = tokenizer(PROMPT).input_ids
    assert t.scores.shape == (len(ids), model.config.num_hidden_layers)
    assert "".join(t.tokens[t.subject_range[0]:t.subject_range[1]]).strip() == SUBJECT
    # The last layer's state at the last token is all the logits depend on.
    assert t.scores[-1, -1].item() == pytest.approx(t.clean, rel=1e-4)
    # Tokens before the subject are not corrupted: restoring them changes nothing.
    assert torch.allclose(t.scores[:t.subject_range[0]], torch.full_like(t.scores[:t.subject_range[0]], t.corrupted),
                          rtol=1e-4)
    t.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 5000
    assert 0 <= t.best_layer() < model.config.num_hidden_layers


def test_bad_input(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        trace(model, tokenizer, PROMPT, "Victor Hugo", progress=False)
    with pytest.raises(ValueError, match="kind='attn'"):
        trace(model, tokenizer, PROMPT, SUBJECT, kind="attn", progress=False)


def test_kedit_trace_draws_the_heatmap(tokenizer, tmp_path, capsys):
    from hf_kedit.cli import main as kedit

    tiny(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "trace.png"
    assert kedit(["trace", "--model", str(tmp_path / "model"), "--prompt", PROMPT, "--subject", SUBJECT,
                  "--samples", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and "most at layer" in capsys.readouterr().out
    assert kedit(["trace", "--model", str(tmp_path / "model"), "--prompt", PROMPT, "--subject", "Hugo",
                  "--out", str(out)]) == 2
    assert "does not occur in the prompt" in capsys.readouterr().err
