"""CLIP teacher for xqgan's semantic alignment (``use = "clip"`` in ``[[aligners]]``)."""
