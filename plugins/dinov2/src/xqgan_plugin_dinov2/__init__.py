"""DINOv2 teacher for xqgan's semantic alignment (``use = "dinov2"`` in ``[[aligners]]``)."""
