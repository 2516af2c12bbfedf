"""The fixed expression map: one basis per group, residual weights decorrelated from the groups and bounded."""

import numpy as np
import pytest
import torch

from avatar.capture.tracking import BLENDSHAPE_NAMES
from avatar.field.expressions import EXPRESSION_GROUPS, disentangled_map, group_rows, weight_limits

NAMES = list(BLENDSHAPE_NAMES)


def correlated_expressions(t: int = 400, seed: int = 0) -> np.ndarray:
    """Scores as a tracker reports them: jawOpen drags mouthLowerDown* and mouthFunnel along; blinks; smiles."""
    rng = np.random.default_rng(seed)
    e = np.abs(rng.normal(0, 0.005, (t, len(NAMES))))
    jaw, smile, blink = rng.uniform(0, 1, t) ** 2, rng.uniform(0, 1, t) ** 2, (rng.uniform(0, 1, t) > 0.8) * 0.9
    e[:, NAMES.index("jawOpen")] += 0.6 * jaw
    for n in ("mouthLowerDownLeft", "mouthLowerDownRight"):
        e[:, NAMES.index(n)] += 0.8 * jaw + 0.1 * smile
    e[:, NAMES.index("mouthFunnel")] += 0.2 * jaw
    for n in ("mouthSmileLeft", "mouthSmileRight"):
        e[:, NAMES.index(n)] += 0.7 * smile
    for n in ("eyeBlinkLeft", "eyeBlinkRight"):
        e[:, NAMES.index(n)] += blink
    e[:, 0] = 1 - e[:, 1:].mean(1)  # _neutral
    return e.astype(np.float32)


def test_each_group_weight_reads_only_its_own_scores():
    e = correlated_expressions()
    a, b, labels = disentangled_map(e, NAMES, residual=4)
    assert labels[:4] == ["jawOpen", "mouthSmile", "eyeBlinkLeft", "eyeBlinkRight"]
    jaw = a[labels.index("jawOpen")]
    assert jaw[NAMES.index("jawOpen")] > 0 and np.count_nonzero(jaw) == 1  # not mouthLowerDown, not the PCA of all
    w = e @ a.T + b
    k = labels.index("jawOpen")
    assert np.percentile(w[:, k], 1) == pytest.approx(0, abs=1e-6) and np.percentile(w[:, k], 99) == pytest.approx(1, abs=1e-6)
    # groups the video never exercises get no basis
    assert "mouthPucker" not in labels and "browInnerUp" not in labels


def test_residual_weights_are_uncorrelated_with_the_groups_on_the_training_frames():
    e = correlated_expressions()
    a, b, labels = disentangled_map(e, NAMES, residual=4)
    w = e @ a.T + b
    groups = [i for i, l in enumerate(labels) if not l.startswith("residual")]
    rest = [i for i, l in enumerate(labels) if l.startswith("residual")]
    assert len(rest) == 4
    corr = np.corrcoef(w.T)
    assert np.abs(corr[np.ix_(groups, rest)]).max() < 1e-6
    assert np.allclose(w[:, rest].std(0), 1.0, atol=1e-3)


def test_residual_weights_are_bounded_to_their_trained_range():
    e = correlated_expressions()
    a, b, labels = disentangled_map(e, NAMES, residual=4)
    low, high = weight_limits(a, b, labels, e)
    assert weight_limits(*disentangled_map(e, NAMES, residual=0), e) is None  # nothing to bound without residuals
    edit = e[int(e[:, 1:].sum(1).argmin())].copy()
    edit[NAMES.index("jawOpen")] = e[:, NAMES.index("jawOpen")].max()  # jaw alone: its companions stay at rest
    raw = edit @ a.T + b
    rest = [i for i, l in enumerate(labels) if l.startswith("residual")]
    assert any(raw[i] < low[i] or raw[i] > high[i] for i in rest)  # off the training range, unbounded …

    from avatar.field.fast import FastField

    field = FastField([-1, -1, -1], [1, 1, 1], expression_dim=len(NAMES), latent_dim=2, resolution=8, channels=2,
                      bases=len(labels), expression_map="fixed", expression_matrix=a.tolist(), expression_offset=b.tolist(),
                      expression_labels=labels, expression_low=low, expression_high=high)
    weights = torch.minimum(torch.maximum(field.expression_map(torch.tensor(edit)), field.weight_low), field.weight_high)
    clamped = weights.detach().numpy()
    assert all(low[i] - 1e-5 <= clamped[i] <= high[i] + 1e-5 for i in rest)  # … but not in the field
    # the planes the field blends are those of the bounded weights
    with torch.no_grad():
        field.planes[1:] = torch.randn_like(field.planes[1:])
    expected = field.planes[0] + torch.einsum("k,kpcij->pcij", weights, field.planes[1:])
    got = field.blend(torch.cat([torch.tensor(edit), torch.zeros(2)]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert field.expression_map.weight.requires_grad is False  # a fixed map stays fixed in training


def test_group_rows_average_members():
    labels, rows = group_rows(NAMES)
    assert set(labels) == set(EXPRESSION_GROUPS)
    smile = rows[labels.index("mouthSmile")]
    assert smile[NAMES.index("mouthSmileLeft")] == smile[NAMES.index("mouthSmileRight")] == 0.5


def test_learning_rate_decays_over_the_time_budget_when_that_comes_first():
    from avatar.field.training import FitConfig, learning_rate

    cfg = FitConfig(lr=1e-2, lr_decay_steps=8000)
    assert learning_rate(cfg, 0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 8000) == pytest.approx(1e-3)
    assert learning_rate(cfg, 100, time_fraction=1.0) == pytest.approx(1e-3)  # budget spent: fully decayed
    assert learning_rate(cfg, 100, time_fraction=0.5) == pytest.approx(1e-2 * 0.1 ** 0.5)
    assert learning_rate(cfg, 6000, time_fraction=0.1) == pytest.approx(1e-2 * 0.1 ** 0.75)  # steps ahead of time


def test_balanced_frames_favour_each_groups_strongest_frames():
    """--frame-balance: a group's table puts its weight on the frames where that group is active, so a rare
    expression (a blink in 20 % of frames) gets more of the steps; balance 0 is the uniform draw."""
    from avatar.field.expressions import balanced_frame_table, group_activity, pick_frame

    e = correlated_expressions()
    activity, labels = group_activity(e, NAMES)
    assert activity.shape == (len(labels), len(e)) and activity.min() >= 0 and activity.max() <= 1
    table = balanced_frame_table(activity)
    np.testing.assert_allclose(table.sum(1), 1.0)
    blink = labels.index("eyeBlinkLeft")
    blinking = activity[blink] > 0.5
    assert table[blink, blinking].sum() > 0.99
    rng = np.random.default_rng(0)
    share = {b: np.mean([blinking[pick_frame(rng, len(e), table, b)] for _ in range(3000)]) for b in (0.0, 0.5)}
    assert abs(share[0.0] - blinking.mean()) < 0.03 and share[0.5] > share[0.0] + 0.05
    assert pick_frame(rng, 5, None, 1.0) in range(5)
