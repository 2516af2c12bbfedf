"""Temporal filtering of tracked signals: the One Euro filter (Casiez et al., CHI 2012), vectorised.

Low cutoff while the signal is still (kills jitter), higher cutoff when it moves fast (keeps lag small).
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2 * math.pi * np.asarray(cutoff))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filters a vector signal ``[d]`` sampled at irregular times (seconds)."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t: float | None = None

    def reset(self) -> None:
        self.x = self.dx = self.t = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.x is None or self.t is None or t <= self.t:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self.t
        dx = (x - self.x) / dt
        a_d = _alpha(self.d_cutoff, dt)
        self.dx = a_d * dx + (1 - a_d) * self.dx
        cutoff = self.min_cutoff + self.beta * np.abs(self.dx)
        a = _alpha(cutoff, dt)
        self.x = a * x + (1 - a) * self.x
        self.t = t
        return self.x.copy()


def pose_to_vector(pose: np.ndarray) -> np.ndarray:
    """``[4, 4]`` rigid pose → ``[6]`` (rotation vector in radians, translation)."""
    rvec, _ = cv2.Rodrigues(np.asarray(pose[:3, :3], dtype=np.float64))
    return np.concatenate([rvec[:, 0], pose[:3, 3]])


def vector_to_pose(v: np.ndarray) -> np.ndarray:
    rot, _ = cv2.Rodrigues(np.asarray(v[:3], dtype=np.float64))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, v[3:]
    return pose


class PoseFilter:
    """One Euro filtering of a head pose in rotation-vector + translation form."""

    def __init__(self, min_cutoff: float = 0.8, beta: float = 0.3):
        self.filter = OneEuroFilter(min_cutoff, beta)

    def reset(self) -> None:
        self.filter.reset()

    def __call__(self, pose: np.ndarray, t: float) -> np.ndarray:
        return vector_to_pose(self.filter(pose_to_vector(pose), t))
