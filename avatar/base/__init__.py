"""What every other part of :mod:`avatar` may import: errors meant for people (:mod:`.errors`), atomic files and
checked safetensors (:mod:`.fileio`), device choice (:mod:`.devices`), image metrics (:mod:`.metrics`).

Imports nothing from :mod:`avatar`; torch, numpy, safetensors and scikit-image only.
"""
