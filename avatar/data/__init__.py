"""Datasets: video → dataset (:mod:`.prepare`), what a recording shows (:mod:`.coverage`), the one reader of a
dataset directory (:mod:`.reader`) and the synthetic subject (:mod:`.synth`).

May import :mod:`avatar.base` and :mod:`avatar.capture`.
"""
