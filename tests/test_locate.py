"""The locate-and-edit core's split forward: prefixes run once into a KV cache,
suffixes on top of it, with the same logits as the whole prompts."""
import pytest
import torch

from hf_kedit.methods.locate.core import SplitBatch
from tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_suffix_logits_on_the_prefix_cache_equal_the_whole_prompts(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    lengths, cuts = [9, 5, 12, 4], [4, 0, 9, 3]  # a cut at 0: a prompt that starts with the subject
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    batch = SplitBatch.cut(rows, cuts, pad=0, device="cpu")
    with torch.no_grad():
        heads, suffix = batch.suffix_pass(model, batch.prefix_cache(model), batch.suffix_ids.shape[1])
        for row, cut, logits, n in zip(rows, cuts, suffix, batch.suffix_lengths):
            whole = model(torch.tensor([row])).logits[0]
            assert n == len(row) - cut
            torch.testing.assert_close(logits[len(logits) - n:], whole[cut:], atol=1e-4, rtol=1e-4)
    assert heads.shape == (*suffix.shape[:2], model.get_output_embeddings().in_features)


def test_the_prefix_cache_is_not_consumed_by_a_step():
    model = tiny_model("llama")
    batch = SplitBatch.cut([[5, 6, 7, 8], [9, 10, 11]], [2, 1], pad=0, device="cpu")
    cache = batch.prefix_cache(model)
    with torch.no_grad():
        (_, first), (_, second) = batch.suffix_pass(model, cache, 3), batch.suffix_pass(model, cache, 2)
    assert second.shape[1] == 2 and torch.equal(first[:, -2:], second)


def test_a_suffix_pass_without_logits_gives_the_head_its_input_and_no_work():
    model = tiny_model("llama")
    batch = SplitBatch.cut([[5, 6, 7, 8], [9, 10, 11]], [2, 1], pad=0, device="cpu")
    cache = batch.prefix_cache(model)
    with torch.no_grad():
        heads, logits = batch.suffix_pass(model, cache, 2)
        bare_heads, none = batch.suffix_pass(model, cache, 2, logits=False)
    assert none is None and torch.equal(bare_heads, heads)
    torch.testing.assert_close(model.get_output_embeddings()(heads), logits)
