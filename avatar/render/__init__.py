"""Field-agnostic rendering maths, pure functions over tensors: rays (:mod:`.rays`), stratified/importance
sampling and compositing with the background as the last sample (:mod:`.volrend`), the occupancy grid
(:mod:`.grid`) and the packed, culled marcher with its dense reference (:mod:`.march`). Fields reach these
through density callbacks; nothing here owns a network.

May import :mod:`avatar.base` and torch.
"""
