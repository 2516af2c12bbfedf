"""Device choice and per-device settings shared by every command (``--device auto|cpu|cuda[:N]|mps``)."""

from __future__ import annotations

import torch

from avatar.base.errors import UserError

DEVICE_HELP = "auto (CUDA when available, then MPS, then CPU), cpu, cuda, cuda:N, mps"

# Samples per field call. The CPU wants the [hidden, chunk] activations in cache (16k: ~2× faster than a whole
# frame at once); a GPU wants few, large launches (and a TensorRT profile whose opt size actually occurs).
CPU_CHUNK, GPU_CHUNK = 1 << 14, 1 << 19
# The torch engine on a GPU: a whole 512² frame (~1.6 M samples) in one decoder call; its activations take
# ~64 × 4 B per sample, 1 GiB at this size.
TORCH_GPU_CHUNK = 1 << 22


def pick_device(name: str) -> torch.device:
    """``auto`` → the best device here; otherwise the named one, checked (one clear line when it is absent)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} ({DEVICE_HELP})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {name!r} ({DEVICE_HELP})")
    return device


def prepare_device(device: torch.device) -> None:
    """Per-process settings for ``device``: on CUDA, make it current and keep matmuls in full fp32.

    TF32 was tried and measured (bench/gpu_check.py, H200, 2026-11-26): the density head's ``exp`` turns TF32's
    10-bit mantissas into renders up to 103/255 (256²) and 183/255 (512²) away from the CPU's, against 1/255
    in fp32 — while the frame rate there is bound by per-frame overheads (53 fps at 256², 58 at 512²), not by
    matmul throughput."""
    if device.type == "cuda":
        if device.index is not None:  # (set_device rejects a bare "cuda"; that one means the current GPU anyway)
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def chunk_for(device: torch.device) -> int:
    return CPU_CHUNK if torch.device(device).type == "cpu" else GPU_CHUNK
