"""`python -m rlt_jax.synthetic`: the former name of `python -m rlt_jax.data.synthetic`."""

from rlt_jax.data.synthetic import main

if __name__ == "__main__":
  main()
