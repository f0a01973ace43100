"""rlt_jax: Run-Length Tokenization for video Vision Transformers in JAX/Flax."""
