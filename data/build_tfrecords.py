"""Kinetics / Something-Something v2 / "path label" lists → DMVR-layout TFRecord shards.

    python data/build_tfrecords.py --format kinetics --annotations kinetics400/train.csv \
        --video_dir kinetics400/train --output_dir /data/k400 --split train --workers 16

The converter lives in `rlt_jax/data/build_tfrecords.py` (also
`python -m rlt_jax.data.build_tfrecords`); `--help` lists every option.
"""

from rlt_jax.data import build_tfrecords

if __name__ == "__main__":
  build_tfrecords.main()
