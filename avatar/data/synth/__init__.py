"""The synthetic subject: a real face photo lifted to a textured 3-D head that talks, smiles, blinks and turns.

- :mod:`.head`: lifting the photo (segmenting the head, depth from an ellipsoid, the point cloud) — :func:`build_head`;
- :mod:`.deform`: the expression deformations (jaw, smile, blinks, brows), the head pose and the point-splat
  rasteriser — :func:`deform`, :func:`head_pose`, :func:`render`;
- :mod:`.motion`: the performance schedule and novel head poses — :func:`make_motion`, :func:`novel_poses`.

May import numpy, opencv, scikit-image and :mod:`avatar.capture`.
"""

from avatar.data.synth.deform import (
           EXPRESSION_NAMES,
           SynthHead,
           deform,
           head_pose,
           render,
)
from avatar.data.synth.head import build_head
from avatar.data.synth.motion import Motion, Segment, make_motion, novel_poses

__all__ = ["EXPRESSION_NAMES", "Motion", "Segment", "SynthHead", "build_head", "deform", "head_pose", "make_motion",
           "novel_poses", "render"]
