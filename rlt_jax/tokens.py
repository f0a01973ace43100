"""`python -m rlt_jax.tokens`: the former name of `python -m rlt_jax.kept_tokens`."""

from rlt_jax.kept_tokens import main

if __name__ == "__main__":
  main()
