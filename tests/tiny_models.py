"""Tiny random causal LMs built from configs (no download), one per architecture
family hf_kedit must read."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64)

CONFIGS = {
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gptj": dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(COMMON),
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=2),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "gemma": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "phi": dict(COMMON),
    "opt": dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
}
ARCHITECTURES = sorted(CONFIGS)


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0):
    """A tiny random model of `arch` in eval mode."""
    config = AutoConfig.for_model(arch, **CONFIGS[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_inputs(batch: int = 2, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def tiny_llama_for(tokenizer, hidden_size: int = 16):
    """A tiny random two-layer Llama with `tokenizer`'s vocabulary (the default model's, in
    the tests that read real text), in eval mode."""
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                                  intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()
