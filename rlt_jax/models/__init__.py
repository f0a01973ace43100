"""Model definitions (the VideoMAE-2 ViT)."""
