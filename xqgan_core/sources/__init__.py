"""The built-in data sources, registered through the ``xqgan.data`` entry points like any plugin's:
``folder`` (a directory of images) and ``sample`` (photographs shipped with scikit-image).

Both produce items ``{"image": float tensor (3, R, R) in [-1, 1], "label": int, "index": int}`` through
``xqgan_core.fallback_dataset``, and accept the item keys described there.
"""
