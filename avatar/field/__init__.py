"""The radiance fields and everything that trains them: encodings (:mod:`.encoding`), the paper's field
(:mod:`.paper`), the fast field and its per-frame maths — blend, activation, lookup — (:mod:`.fast`), the
fixed expression map (:mod:`.expressions`), the avatar model and its renderer interface (:mod:`.model`),
occupancy carving (:mod:`.carve`), training pieces (:mod:`.training`), photometric pose refinement
(:mod:`.posefit`) and the learned upsampler of renders (:mod:`.upsample`).

May import :mod:`avatar.base`, :mod:`avatar.capture` and :mod:`avatar.render`.
"""
