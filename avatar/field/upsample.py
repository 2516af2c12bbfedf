"""The learned upsampler: a head render at 1/factor of the size it is shown at, brought to full size by a small
convolutional network trained on the avatar's own training frames (EG3D, GeneFace++ and most real-time neural
avatars render at low resolution and upsample this way).

It works on the engines' premultiplied RGBA (colour over black, and alpha), so the live loop lays its output over
any background, and a full-size background stays sharp under it. Its output is the bilinear upsampling plus a
residual computed at the low resolution and rearranged to full size (ESPCN's pixel shuffle): every convolution
runs on the small image, and with its last layer at zero it starts as plain bilinear.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

UPSAMPLER_FILE = "upsampler.safetensors"


class Upsampler(nn.Module):
    """``rgba [b, 4, h, w]`` (premultiplied, in [0, 1]) → ``[b, 4, factor·h, factor·w]``."""

    def __init__(self, factor: int = 2, channels: int = 24, layers: int = 3):
        super().__init__()
        if factor < 2 or layers < 2:
            raise ValueError("an upsampler needs factor ≥ 2 and ≥ 2 layers")
        self.hparams = dict(factor=int(factor), channels=int(channels), layers=int(layers))
        body: list[nn.Module] = [nn.Conv2d(4, channels, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(channels, 4 * factor * factor, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*body, last)
        self.shuffle = nn.PixelShuffle(factor)
        self.factor = factor

    def forward(self, rgba: Float[Tensor, "b 4 h w"]) -> Float[Tensor, "b 4 H W"]:
        base = nn.functional.interpolate(rgba, scale_factor=self.factor, mode="bilinear", align_corners=False)
        out = (base + self.shuffle(self.body(rgba))).clamp(0.0, 1.0)
        # premultiplied: no colour brighter than its opacity
        return torch.cat([torch.minimum(out[:, :3], out[:, 3:]), out[:, 3:]], 1)


def upsample_render(upsampler: Upsampler, rgb: Float[Tensor, "h w 3"], alpha: Float[Tensor, "h w"]
                    ) -> tuple[Float[Tensor, "H W 3"], Float[Tensor, "H W"]]:
    """One engine render (premultiplied colour over black, alpha) through the upsampler."""
    # [h, w, 4] permuted to [1, 4, h, w] is already channels-last in memory: oneDNN's convolutions take that
    # layout ~1.6× faster than planar here (the upsampler's weights are converted once, in load_upsampler)
    rgba = torch.cat([rgb, alpha[..., None]], -1).float().permute(2, 0, 1)[None]
    with torch.inference_mode():
        out = upsampler(rgba)[0].permute(1, 2, 0)
    return out[..., :3], out[..., 3]


def over(rgb: Float[Tensor, "h w 3"], alpha: Float[Tensor, "h w"], background: Float[Tensor, "h w 3"]
         ) -> Float[Tensor, "h w 3"]:
    """A premultiplied render over a background."""
    return rgb + (1.0 - alpha[..., None]) * background


def train_upsampler(pairs: list[tuple[Tensor, Tensor, Tensor]], factor: int, steps: int = 1500, crop: int = 48,
                    batch: int = 8, lr: float = 2e-3, seed: int = 0, channels: int = 24, layers: int = 3,
                    progress: Callable[[int, float], None] | None = None) -> tuple[Upsampler, dict]:
    """Fit an upsampler on ``pairs`` of (low render ``[4, h, w]`` premultiplied RGBA, full-size truth
    ``[3, H, W]``, full-size background ``[3, H, W]``): L1 of its output laid over the background against the
    truth, on random ``crop``² patches (of the low image). Returns it and the training's figures."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Upsampler(factor, channels, layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    h, w = pairs[0][0].shape[1:]
    crop = min(crop, h, w)
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        lows, truths, bgs = [], [], []
        for j in rng.integers(0, len(pairs), batch):
            low, truth, bg = pairs[j]
            y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            lows.append(low[:, y:y + crop, x:x + crop])
            big = (slice(None), slice(y * factor, (y + crop) * factor), slice(x * factor, (x + crop) * factor))
            truths.append(truth[big])
            bgs.append(bg[big])
        out = model(torch.stack(lows))
        pred = out[:, :3] + (1.0 - out[:, 3:]) * torch.stack(bgs)
        loss = (pred - torch.stack(truths)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return model, {"steps": steps, "seconds": round(time.perf_counter() - start, 1),
                   "final_l1": round(float(np.mean(losses[-50:])), 5), "pairs": len(pairs), "crop": crop}


def save_upsampler(path, upsampler: Upsampler, report: dict) -> None:
    """The upsampler's weights and settings (safetensors metadata), atomically."""
    import json

    from avatar.base.fileio import safetensors_bytes, write_bytes_atomic

    tensors = {k: v.detach().cpu().contiguous() for k, v in upsampler.state_dict().items()}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata={"hparams": json.dumps(upsampler.hparams),
                                                                  "report": json.dumps(report)}))


def load_upsampler(path) -> tuple[Upsampler, dict]:
    """:func:`save_upsampler`'s file back; one clear line (:class:`avatar.base.errors.UserError`) when it is not one."""
    import json

    from avatar.base.errors import UserError
    from avatar.base.fileio import read_safetensors

    tensors, meta = read_safetensors(path, "the upsampler", "retrain it with trainer/upsample.py")
    try:
        upsampler = Upsampler(**json.loads(meta["hparams"]))
        upsampler.load_state_dict(tensors)
        report = json.loads(meta.get("report", "{}"))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{path} is not an upsampler of this version ({str(exc)[:160]}); retrain it with "
                        "trainer/upsample.py") from None
    return upsampler.eval().to(memory_format=torch.channels_last), report
