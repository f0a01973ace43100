"""Weights in and out: the torch-free .pth reader, saved models, train checkpoints."""
