"""Text→image and image→image search over a FAISS index of image features (``python -m cn_clip.search``)."""
