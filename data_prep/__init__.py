"""Data preparation: corpora to packed, Megatron-compatible token shards, and the training reader."""
