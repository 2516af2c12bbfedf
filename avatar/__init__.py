"""Shared core of the NerFace live-avatar project; the apps (``trainer/``, ``export/``, ``streamer/``) import from
here and never from each other.

Sub-packages, each importing only those listed before it:

- :mod:`avatar.base`: errors for people, atomic files and checked safetensors, devices, image metrics;
- :mod:`avatar.capture`: frame sources, video I/O, MediaPipe tracking, camera and face-shape fit, retargeting;
- :mod:`avatar.data`: video → dataset (prepare), recording coverage, the dataset reader, the synthetic subject;
- :mod:`avatar.render`: rays, volume rendering, the occupancy grid and the packed, culled marcher — the
  field-agnostic maths (density callbacks, never a network);
- :mod:`avatar.field`: the fields (paper and fast), their per-frame maths, the avatar model, training pieces,
  carving, photometric pose refinement;
- :mod:`avatar.bundle`: the avatar bundle and every file in it (weights, plates, occupancy cache, ONNX /
  TensorRT graphs, ``engines.json``), version and damage checks;
- :mod:`avatar.engines`: the render engines (torch, fused numba, ONNX Runtime, TensorRT) and engine choice;
- :mod:`avatar.eval`: held-out evaluation and expression fidelity.
"""

__version__ = "0.1.0"
