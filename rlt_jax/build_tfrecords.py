"""`python -m rlt_jax.build_tfrecords`: the former name of `python data/build_tfrecords.py`
(`python -m rlt_jax.data.build_tfrecords`)."""

from rlt_jax.data.build_tfrecords import main

if __name__ == "__main__":
  main()
