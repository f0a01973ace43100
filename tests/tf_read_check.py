"""Reads a shard with tf.data (CRC checked) and prints label:frames:video_id per record."""

import sys

import tensorflow as tf

dataset = tf.data.TFRecordDataset(sys.argv[1], compression_type="")
for serialized in dataset:
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={"clip/label/index": tf.io.FixedLenFeature([], tf.int64),
                        "video/filename": tf.io.FixedLenFeature([], tf.string)},
      sequence_features={"image/encoded": tf.io.FixedLenSequenceFeature([], tf.string)})
  print(f"{int(context['clip/label/index'])}:{len(sequence['image/encoded'])}:"
        f"{context['video/filename'].numpy().decode()}")
