"""The avatar bundle and every file in it: ``avatar.json``, the weights, the plates (:mod:`.bundle`), the
reference expression and pose written into ``avatar.json`` (:mod:`.reference`), and the exported files —
occupancy cache, ONNX graphs, TensorRT plan, ``engines.json`` (:mod:`.files`). Never a pickle.

May import :mod:`avatar.base`, :mod:`avatar.capture`, :mod:`avatar.render` and :mod:`avatar.field`.
"""
