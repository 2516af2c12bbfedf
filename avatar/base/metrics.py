"""Image quality metrics on float images in [0, 1] (``[h, w, 3]`` NumPy arrays)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

# LPIPS needs AlexNet/VGG backbone weights; the `lpips` package would download them at first use, which
# cannot happen here, so the metric is reported as unavailable rather than estimated.
LPIPS_UNAVAILABLE = "unavailable (LPIPS backbone weights are not available offline; never estimated)"


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2, data_range=1.0))


def image_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"l1": l1(pred, truth), "psnr": psnr(pred, truth), "ssim": ssim(pred, truth)}


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float | str]:
    keys = ("l1", "psnr", "ssim")
    out: dict[str, float | str] = {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}
    out["lpips"] = LPIPS_UNAVAILABLE
    out["frames"] = len(rows)
    return out
