"""SAM image-encoder teacher for xqgan's semantic alignment (``use = "sam"`` in ``[[aligners]]``)."""
