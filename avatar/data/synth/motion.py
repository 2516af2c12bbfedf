"""The synthetic performance: every expression channel alone over its full range and in pairs with independent
timing, in rounds of ~2 s, with head motion chosen uncorrelated with any channel (a field trained on it cannot
explain one channel by another or by the pose); and novel head poses away from all training poses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar.data.synth.deform import EXPRESSION_NAMES, _smoothstep


@dataclass(frozen=True)
class Segment:
    """A stretch of the performance ``[start, end)``: rest, one channel alone, or a combination."""

    start: int
    end: int
    kind: str  # "rest" | "alone" | "combination"
    channels: tuple[str, ...]


@dataclass(frozen=True)
class Motion:
    """Per-frame ground truth of a synthetic clip."""

    angles_deg: np.ndarray  # [t, 3] yaw, pitch, roll
    translation_cm: np.ndarray  # [t, 3]
    expression: np.ndarray  # [t, 5] in EXPRESSION_NAMES order, each in [0, 1]
    segments: tuple[Segment, ...] = ()  # how the expression schedule was built, in time order


ROUND_SECONDS = 2.0  # one round shows every channel alone and two pairs; 300 frames at 25 fps = 6 rounds


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, n_waves: int = 3) -> np.ndarray:
    """Sum of a few random sinusoids over phase ``t`` in [0, 1], scaled to [-1, 1]."""
    out = np.zeros_like(t)
    for _ in range(n_waves):
        out += np.sin(2 * np.pi * (rng.uniform(0.7, 3.0) * t + rng.uniform()))
    return out / n_waves


def _pulse(length: int, start: int, stop: int, ramp: int) -> np.ndarray:
    """``[length]`` 0 outside ``[start, stop)``, rising to 1 over ``ramp`` frames, held, falling likewise."""
    i = np.arange(length, dtype=float)
    up = (i - start + 1) / (ramp + 1)
    down = (stop - i) / (ramp + 1)
    return _smoothstep(np.minimum(up, down))


def _beat_lengths(frames: int, beats: int) -> np.ndarray:
    edges = np.round(np.linspace(0, frames, beats + 1)).astype(int)
    return np.diff(edges)


def expression_schedule(frames: int, fps: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, tuple[Segment, ...]]:
    """``[frames, 5]`` expression values and the segments they were built from.

    The clip is cut into rounds of about ROUND_SECONDS; each round shows every channel alone (to its
    full value, held, others at rest) and two combinations of two channels, each with its own onset, hold
    and amplitude, in a shuffled order. Pairs cycle so that every pair occurs over a long clip. Channels are
    thus seen alone and together with independent timing (low cross-correlation), and any stretch of a round
    or more (the held-out tail of a prepared dataset, the 48-frame test clip) covers every channel.
    """
    names = EXPRESSION_NAMES
    expression = np.zeros((frames, len(names)))
    segments: list[Segment] = []
    rounds = max(1, int(round(frames / (ROUND_SECONDS * fps))))
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
    starts = np.round(np.linspace(0, frames, rounds + 1)).astype(int)
    for r in range(rounds):
        beats = [("alone", (k,)) for k in range(len(names))]
        beats += [("combination", pair_order.pop(0) if pair_order else tuple(rng.choice(len(names), 2, False)))
                  for _ in range(2)]
        if not pair_order:
            pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
        beats = [beats[i] for i in rng.permutation(len(beats))]
        t0 = starts[r]
        for (kind, chans), length in zip(beats, _beat_lengths(starts[r + 1] - t0, len(beats))):
            # One frame of rest opens each beat: neutral frames all along the clip.
            if length > 2:
                segments.append(Segment(int(t0), int(t0 + 1), "rest", ()))
                a, n = t0 + 1, length - 1
            else:
                a, n = t0, length
            ramp = 2 if n >= 6 else 1  # ramps pass through the middle of the range; holds at its ends
            for k in chans:
                if kind == "alone":
                    on, off, amp = 0, n, 1.0  # to the channel's full value, held
                else:  # each channel of a pair on its own clock and to its own value
                    on = int(rng.integers(0, max(1, n // 3)))
                    off = int(n - rng.integers(0, max(1, n // 3)))
                    amp = float(rng.uniform(0.35, 1.0))
                expression[a:a + n, k] = amp * _pulse(n, on, off, ramp)
            segments.append(Segment(int(a), int(a + n), kind, tuple(names[k] for k in chans)))
            t0 += length
    return expression, tuple(segments)


def make_motion(frames: int, fps: float, seed: int = 0) -> Motion:
    """A performance for the camera: head turns and nods within ±25° and small shifts, and an expression
    schedule (:func:`expression_schedule`) that is drawn independently of the head motion.

    Head motion is defined over the clip's phase, so a short clip still covers the whole pose range.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, frames, endpoint=False)
    expression, segments = expression_schedule(frames, fps, np.random.default_rng([seed, 1]))
    # Slow sinusoids correlate with a few-second schedule by chance (|r| ≈ 0.2 over 300 frames): each angle
    # takes, of 256 random phases and rates, the one least correlated with every channel, so that no head
    # pose predicts an expression.
    angles = []
    for amplitude, cycles in ((24.0, 2.0), (14.0, 2.7), (9.0, 1.3)):  # yaw, pitch, roll
        rate = cycles * rng.uniform(0.85, 1.15, size=(256, 1))
        candidates = amplitude * np.sin(2 * np.pi * (rate * t[None] + rng.uniform(size=(256, 1))))  # [256, t]
        angles.append(candidates[np.argmin(_max_abs_correlation(candidates, expression))])
    trans = np.stack([1.2 * _smooth_noise(rng, t), 0.8 * _smooth_noise(rng, t), 1.5 * _smooth_noise(rng, t)], 1)
    return Motion(np.stack(angles, 1), trans, expression, segments)


def _max_abs_correlation(series: np.ndarray, expression: np.ndarray) -> np.ndarray:
    """``[k]`` largest |Pearson r| of each of ``series [k, t]`` with any column of ``expression [t, c]``."""
    a = series - series.mean(1, keepdims=True)
    b = expression - expression.mean(0)
    cov = a @ b  # [k, c]
    norm = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=0)[None] + 1e-12
    return np.abs(cov / norm).max(1)


def novel_poses(motion: Motion, count: int, seed: int = 0, min_distance_deg: float = 8.0) -> np.ndarray:
    """``[count, 3]`` yaw/pitch/roll within the clip's range but ≥ ``min_distance_deg`` from every clip pose."""
    rng = np.random.default_rng(seed + 1)
    lo, hi = motion.angles_deg.min(0), motion.angles_deg.max(0)
    chosen: list[np.ndarray] = []
    for _ in range(20000):
        cand = rng.uniform(lo * 0.9, hi * 0.9)
        if np.linalg.norm(motion.angles_deg - cand, axis=1).min() >= min_distance_deg:
            chosen.append(cand)
            if len(chosen) == count:
                break
    return np.array(chosen).reshape(-1, 3)
