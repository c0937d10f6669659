"""Shapes of the tiny models the tests build locally (nothing is downloaded)."""

# A transformers LlamaConfig's arguments: 2 layers, GQA 8 query / 2 KV heads of 16 dims.
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
