"""Expression coefficients → the fast field's basis weights, one basis per thing a face does.

MediaPipe's 52 blendshape scores are strongly correlated in any one video (opening the jaw also raises
``mouthLowerDown*``, ``mouthFunnel``, ``mouthClose`` …). A learned linear map from all 52 scores to a few
bases ties each basis to whatever co-varied in the recording, so setting ``jawOpen`` alone barely moves the
mouth. Here the map is fixed instead, and built so that each semantic group has its own basis driven by its
own scores only, and the few extra bases that carry everything else are decorrelated from the groups over
the training frames — so whatever the video shows with the jaw is learned on the jaw's basis.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from avatar.capture.tracking import BLENDSHAPE_NAMES

# Semantic groups with their own basis (members are averaged). Left/right blinks stay apart: people wink.
EXPRESSION_GROUPS: dict[str, tuple[str, ...]] = {
    "jawOpen": ("jawOpen",),
    "mouthSmile": ("mouthSmileLeft", "mouthSmileRight"),
    "eyeBlinkLeft": ("eyeBlinkLeft",),
    "eyeBlinkRight": ("eyeBlinkRight",),
    "browInnerUp": ("browInnerUp",),
    "browOuterUp": ("browOuterUpLeft", "browOuterUpRight"),
    "mouthPucker": ("mouthPucker",),
    "mouthFunnel": ("mouthFunnel",),
    "browDown": ("browDownLeft", "browDownRight"),
}


def group_rows(names: tuple[str, ...] | list[str] = BLENDSHAPE_NAMES,
               groups: dict[str, tuple[str, ...]] = EXPRESSION_GROUPS) -> tuple[list[str], Float[np.ndarray, "g e"]]:
    """``[g, e]`` rows that average each group's members out of an expression vector (groups whose members
    are all absent from ``names`` are left out)."""
    labels, rows = [], []
    for label, members in groups.items():
        idx = [list(names).index(m) for m in members if m in names]
        if not idx:
            continue
        row = np.zeros(len(names))
        row[idx] = 1.0 / len(idx)
        labels.append(label)
        rows.append(row)
    return labels, np.array(rows).reshape(len(rows), len(names))


def _group_ranges(e: Float[np.ndarray, "t e"], names, groups, min_span: float):
    """Each group's mean score per frame ``g_raw [t, g]`` (rows ``[g, e]``), its 1st / 99th percentiles and
    whether that range spans ``min_span``: the scale both the fixed map and the frame balance use."""
    labels_all, rows = group_rows(names, groups)
    g_raw = e @ rows.T  # [t, g]
    lo, hi = np.percentile(g_raw, 1, axis=0), np.percentile(g_raw, 99, axis=0)
    return labels_all, rows, g_raw, lo, hi, (hi - lo) >= min_span


def disentangled_map(expressions: Float[np.ndarray, "t e"], names: tuple[str, ...] | list[str] = BLENDSHAPE_NAMES,
                     residual: int = 4, min_span: float = 0.05, groups: dict[str, tuple[str, ...]] = EXPRESSION_GROUPS
                     ) -> tuple[Float[np.ndarray, "k e"], Float[np.ndarray, " k"], list[str]]:
    """A fixed affine map ``w = A e + b`` from expressions to ``k`` basis weights, and each weight's label.

    - one weight per group whose trained range (1st–99th percentile) spans ≥ ``min_span``: its members' mean,
      0 at the group's rest value (1st percentile) and 1 at its 99th percentile;
    - then ``residual`` weights: the principal directions of what the groups do not explain (the expressions
      minus their least-squares prediction from the group weights), unit variance over the training frames.
      By construction they are uncorrelated with every group weight over the training frames, so they cannot
      take over a group's look.
    """
    e = np.asarray(expressions, dtype=np.float64)
    labels_all, rows, g_raw, lo, hi, keep = _group_ranges(e, names, groups, min_span)
    span = np.where(keep, hi - lo, 1.0)
    a_groups = (rows / span[:, None])[keep]  # [g', e]
    b_groups = (-lo / span)[keep]
    labels = [l for l, k in zip(labels_all, keep) if k]
    mean = e.mean(0)
    centred = e - mean
    if "_neutral" in names:  # MediaPipe's "no expression" score mirrors all the others; it is no direction
        centred[:, list(names).index("_neutral")] = 0.0
    g = centred @ a_groups.T  # [t, g'] centred group weights
    beta = np.linalg.lstsq(g, centred, rcond=None)[0] if g.shape[1] else np.zeros((0, e.shape[1]))  # [g', e]
    remove = np.eye(e.shape[1]) - a_groups.T @ beta  # [e, e]: (row vectors) e ↦ e minus what the groups predict
    rest = centred @ remove
    _, s, vt = np.linalg.svd(rest, full_matrices=False)
    count = int(min(residual, (s > 1e-6 * max(s.max(initial=0), 1e-12)).sum()))
    a_rest = vt[:count] @ remove.T  # [r, e]: v · (e removed) as one row
    std = (centred @ a_rest.T).std(0) + 1e-8
    a_rest = a_rest / std[:, None]
    b_rest = -(a_rest @ mean)
    labels += [f"residual{i}" for i in range(count)]
    return np.concatenate([a_groups, a_rest]), np.concatenate([b_groups, b_rest]), labels


def group_activity(expressions: Float[np.ndarray, "t e"], names: tuple[str, ...] | list[str] = BLENDSHAPE_NAMES,
                   min_span: float = 0.05, groups: dict[str, tuple[str, ...]] = EXPRESSION_GROUPS
                   ) -> tuple[Float[np.ndarray, "g t"], list[str]]:
    """How active each expression group is in each frame, in ``[0, 1]``: 0 at the group's rest (1st percentile),
    1 at its 99th percentile — the scale of :func:`disentangled_map`'s group weights. Groups whose trained range
    spans less than ``min_span`` are left out. Returns ``[g, t]`` and the groups' labels."""
    labels_all, _, g_raw, lo, hi, keep = _group_ranges(np.asarray(expressions, np.float64), names, groups, min_span)
    active = np.clip((g_raw[:, keep] - lo[keep]) / (hi - lo)[keep], 0.0, 1.0).T
    return active, [lab for lab, k in zip(labels_all, keep) if k]


def balanced_frame_table(activity: Float[np.ndarray, "g t"], power: float = 2.0) -> Float[np.ndarray, "g t"]:
    """Per group, a distribution over frames that favours the frames where that group is strongest
    (``activity ** power``, normalised); a group active in no frame gets the uniform one."""
    w = np.power(np.asarray(activity, np.float64), power)
    total = w.sum(1, keepdims=True)
    uniform = np.full_like(w, 1.0 / max(w.shape[1], 1))
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), uniform)


def pick_frame(rng: np.random.Generator, count: int, table: Float[np.ndarray, "g t"] | None, balance: float) -> int:
    """A training frame for one step: with probability ``balance`` a random group's frame drawn from ``table``
    (:func:`balanced_frame_table`), else any frame. A real recording shows a smile or a raised brow in few
    frames; drawn uniformly those frames get few steps and their bases learn little."""
    if table is None or table.shape[0] == 0 or rng.random() >= balance:
        return int(rng.integers(count))
    g = int(rng.integers(table.shape[0]))
    return int(rng.choice(count, p=table[g]))


def weight_limits(matrix: Float[np.ndarray, "k e"], offset: Float[np.ndarray, " k"], labels: list[str],
                  expressions: Float[np.ndarray, "t e"], margin: float = 0.1) -> tuple[list[float], list[float]] | None:
    """Per-weight ``(low, high)`` bounds: residual weights stay inside their trained range (plus ``margin`` of
    it). An edit such as "jawOpen alone" leaves the scores that normally move with the jaw at rest, which the
    residual weights read as an extreme never seen in training; unbounded, they would paint untrained looks.
    Group weights are not bounded (a group's own basis may extrapolate a little): without residual weights
    there is nothing to bound (None)."""
    if not any(lab.startswith("residual") for lab in labels):
        return None
    w = np.asarray(expressions, np.float64) @ matrix.T + offset  # [t, k]
    lo, hi = w.min(0), w.max(0)
    pad = (hi - lo) * margin
    big = 1e6
    low = [float(l - p) if lab.startswith("residual") else -big for l, p, lab in zip(lo, pad, labels)]
    high = [float(h + p) if lab.startswith("residual") else big for h, p, lab in zip(hi, pad, labels)]
    return low, high
