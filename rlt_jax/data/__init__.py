"""Video → clips: decoding, TFRecord shards, the DMVR layout, the input pipeline."""
