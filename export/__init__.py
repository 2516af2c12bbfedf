"""The exporter (``export/build.py``): ONNX graphs, a TensorRT plan, the occupancy cache, parity against the torch
engine and the frames/s of every engine that runs here, all written into the bundle through :mod:`avatar.bundle`.
May import :mod:`avatar`; never another app."""
