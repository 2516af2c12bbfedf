"""Shared core of the NerFace live-avatar project: tracking, camera math, datasets, synthetic subject.

Apps (`trainer/`, `export/`, `streamer/`) import from here and never from each other.
"""

__version__ = "0.1.0"
