"""Contrastive fine-tuning: ``python -m cn_clip.training.main`` (reference flags, compatibility.md#training)."""
