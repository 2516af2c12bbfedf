"""Render engines, one interface: (expression, head pose, latent code, size) → RGB + alpha. The shared frame
logic (:mod:`.base`), torch (:mod:`.torch_engine`), fused numba kernels (:mod:`.fused`, :mod:`.fused_kernels`),
ONNX Runtime (:mod:`.onnx`), TensorRT (:mod:`.tensorrt`), and engine choice and timing (:mod:`.choice`).

Not inside :mod:`avatar.render` (as ``../shared/DESIGN.md`` drew it) because engines depend on the field and
the bundle, while the render maths is what the field trains with: keeping them apart keeps the packages acyclic.
May import every part of :mod:`avatar` but :mod:`avatar.eval`.
"""
