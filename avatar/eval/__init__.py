"""Held-out evaluation beside the nearest training frame (:mod:`.evaluation`) and expression fidelity read
back with MediaPipe (:mod:`.fidelity`).

May import every other part of :mod:`avatar`.
"""
