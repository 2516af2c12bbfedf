"""Fused CPU marching of the fast field: compiled per-ray kernels around one matrix-multiply MLP.

The torch marcher (:func:`avatar.occupancy.march_culled`) spends most of a CPU frame on bookkeeping over
hundreds of thousands of samples: every step of it (sample points, cell indices, masks, gathers, scans) is a
separate pass over memory. Here the per-ray work is a few compiled loops (numba, ``nogil``) that touch each
sample once, and the only per-sample tensor work left is the field's MLP, which runs as dense matrix products
(float32; bfloat16 is an option of the engine).

Same samples as the torch marcher (fixed steps at ``near + (k + ½)·step``, only in occupied cells, the field
evaluated exactly, composited front to back, the background closing every ray), so the pictures match it
(float32: ≤ 1/255; bfloat16: a few /255). Differences in *how*: empty space is skipped with a distance field
of the occupancy grid (a ray in an empty cell jumps as many steps as its cell's distance to the nearest occupied
cell allows, read from a table), and rays
stop exactly when their transmittance falls below ``min_transmittance`` (per sample, not per block).

Rays are marched in rounds: each round takes the next few occupied samples of every ray still open, runs the
MLP on all of them at once and composites them; rays that became opaque drop out. A deferred-shading field has
no per-sample MLP, so its rays are marched in one pass each (:func:`march_deferred`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from jaxtyping import Float
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from avatar.render.march import MIN_TRANSMITTANCE

# The coarse level of the occupancy lookup (:func:`occupancy_lookup`): 64³ bytes stay in a core's cache; a 128³
# grid's own table (2 MB) shares it with the planes, and one 128³ level cost more than two (measured).
COARSE = 64


# -- explicit vector rows ------------------------------------------------------------------------------------------
# A texel row is 8–16 floats. LLVM's loop vectoriser (numba's only route to SIMD) takes such a loop in chunks of
# vector width × interleave (64 floats on this CPU), behind run-time aliasing checks between the row and the
# destination, so a 16-channel row ran its scalar remainder loop: the deferred march's per-sample work, measured
# on its own, ran 2× slower than with these. Rows are taken LANES floats at a time with explicit vector loads and
# stores (8: one AVX2 register, half an AVX-512 one — Zen 4 splits those in two anyway); the remainder is scalar.
LANES = 8
_VEC = ir.VectorType(ir.FloatType(), LANES)


def _vector_at(context, builder, array_type, array, offset):
    """A pointer to ``LANES`` floats at flat element ``offset`` of a C-contiguous float32 ``array``."""
    data = cgutils.create_struct_proxy(array_type)(context, builder, value=array).data
    return builder.bitcast(builder.gep(data, [offset]), _VEC.as_pointer())


def _load(builder, pointer):
    value = builder.load(pointer)
    value.align = 4  # rows start at any float
    return value


def _splat(builder, scalar):
    one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


@intrinsic
def _lerp_add(typingctx, dst, at, src, o00, o01, o10, o11, w00, w01, w10, w11):
    """``dst[at : at+LANES] += w00·src[o00 : …] + w01·src[o01 : …] + w10·src[o10 : …] + w11·src[o11 : …]``
    (flat offsets into C-contiguous float32 arrays): one bilinear lookup of LANES channels."""
    sig = types.void(dst, at, src, o00, o01, o10, o11, w00, w01, w10, w11)

    def codegen(context, builder, signature, args):
        total = None
        for offset, weight in zip(args[3:7], args[7:11]):
            term = builder.fmul(_load(builder, _vector_at(context, builder, signature.args[2], args[2], offset)),
                                _splat(builder, weight), flags=("fast",))
            total = term if total is None else builder.fadd(total, term, flags=("fast",))
        target = _vector_at(context, builder, signature.args[0], args[0], args[1])
        builder.store(builder.fadd(_load(builder, target), total, flags=("fast",)), target).align = 4
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _axpy(typingctx, dst, at, src, src_at, weight):
    """``dst[at : at+LANES] += weight · src[src_at : src_at+LANES]``."""
    sig = types.void(dst, at, src, src_at, weight)

    def codegen(context, builder, signature, args):
        term = builder.fmul(_load(builder, _vector_at(context, builder, signature.args[2], args[2], args[3])),
                            _splat(builder, args[4]), flags=("fast",))
        target = _vector_at(context, builder, signature.args[0], args[0], args[1])
        builder.store(builder.fadd(_load(builder, target), term, flags=("fast",)), target).align = 4
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _flat(typingctx, array, offset):
    """``array``'s element at flat ``offset`` (C order), for any number of dimensions (numba's ``reshape(-1)``
    calls out of line each time)."""
    sig = array.dtype(array, offset)

    def codegen(context, builder, signature, args):
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0]).data
        return builder.load(builder.gep(data, [args[1]]))

    return sig, codegen


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _lerp_row(dst, at, src, o00, o01, o10, o11, w00, w01, w10, w11, n):
    """``dst[at : at+n] +=`` (``dst`` one-dimensional) the bilinear lookup of ``n`` channels whose four texel rows
    start at the flat offsets ``o00 … o11`` of ``src`` (LANES at a time, the rest one by one)."""
    c = 0
    while c + LANES <= n:
        _lerp_add(dst, at + c, src, o00 + c, o01 + c, o10 + c, o11 + c, w00, w01, w10, w11)
        c += LANES
    while c < n:
        dst[at + c] += (w00 * _flat(src, o00 + c) + w01 * _flat(src, o01 + c) + w10 * _flat(src, o10 + c)
                        + w11 * _flat(src, o11 + c))
        c += 1


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _axpy_row(dst, src, weight, n):
    """``dst[:n] += weight · src[:n]`` (LANES at a time, the rest one by one)."""
    c = 0
    while c + LANES <= n:
        _axpy(dst, c, src, c, weight)
        c += LANES
    while c < n:
        dst[c] += weight * src[c]
        c += 1


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _skip(x, y, z, coarse_skip, fine_skip, fine, box_min, cells_per_cm):
    """0 when the point ``(x, y, z)`` is in an occupied cell, else how many steps it can skip
    (:func:`occupancy_lookup`'s tables: the coarse level first, then, in an occupied coarse cell of a finer grid
    (``fine`` > 1), the fine cell's)."""
    g = coarse_skip.shape[0]
    fx = (x - box_min[0]) * cells_per_cm[0]
    fy = (y - box_min[1]) * cells_per_cm[1]
    fz = (z - box_min[2]) * cells_per_cm[2]
    ix = min(max(int(fx), 0), g - 1)
    iy = min(max(int(fy), 0), g - 1)
    iz = min(max(int(fz), 0), g - 1)
    skip = coarse_skip[ix, iy, iz]
    if skip or fine == 1:
        return np.int64(skip)
    gf = g * fine
    jx = min(max(int(fx * fine), 0), gf - 1)
    jy = min(max(int(fy * fine), 0), gf - 1)
    jz = min(max(int(fz * fine), 0), gf - 1)
    return np.int64(fine_skip[jx, jy, jz])


def _plan_round(origins, dirs, near, far, active, kpos, step, most, coarse_skip, fine_skip, fine, box_min,
                cells_per_cm, out_k, out_n):
    """For each active ray: the step indices of its next ≤ ``most`` occupied samples (from ``kpos``); advances
    ``kpos`` past them. Empty cells are skipped by the occupancy's skip tables (:func:`_skip`)."""
    for a in prange(active.shape[0]):
        r = active[a]
        k = kpos[r]
        steps = int(math.ceil((far[r] - near[r]) / step - 0.5))
        n = 0
        while k < steps and n < most:
            t = near[r] + (k + 0.5) * step
            skip = _skip(origins[r, 0] + dirs[r, 0] * t, origins[r, 1] + dirs[r, 1] * t, origins[r, 2] + dirs[r, 2] * t,
                         coarse_skip, fine_skip, fine, box_min, cells_per_cm)
            if skip == 0:
                out_k[a, n] = k
                n += 1
                k += 1
            else:
                k += skip
        kpos[r] = k
        out_n[a] = n


def _pack(active, out_k, offsets, row_ray, row_k):
    """The planned samples as rows in ray order: each row's ray and step index."""
    for a in prange(active.shape[0]):
        for j in range(offsets[a + 1] - offsets[a]):
            row_ray[offsets[a] + j] = active[a]
            row_k[offsets[a] + j] = out_k[a, j]


def _gather(origins, dirs, near, row_ray, row_k, first, step, planes, center, inv_half, feats):
    """Tri-plane features of rows ``first …first + len(feats)`` (into ``feats [rows, 3C]``): bilinear with
    ``align_corners=True`` on planes laid out ``[3, y, x, C]`` (the same numbers as ``grid_sample``), mirroring
    :func:`avatar.field.fast.unit_points` and :func:`avatar.field.fast.triplane_lookup_gather`."""
    res = planes.shape[1]
    ch = planes.shape[3]
    half = 0.5 * (res - 1)
    for i in prange(feats.shape[0]):
        r = row_ray[first + i]
        t = near[r] + (row_k[first + i] + 0.5) * step
        px = min(max((origins[r, 0] + dirs[r, 0] * t - center[0]) * inv_half[0], -1.0), 1.0)
        py = min(max((origins[r, 1] + dirs[r, 1] * t - center[1]) * inv_half[1], -1.0), 1.0)
        pz = min(max((origins[r, 2] + dirs[r, 2] * t - center[2]) * inv_half[2], -1.0), 1.0)
        for p in range(3):  # planes xy, xz, yz: (width axis, height axis), as avatar.field.fast.PLANE_AXES
            u = px if p < 2 else py
            v = py if p == 0 else pz
            fx = (u + 1.0) * half
            fy = (v + 1.0) * half
            x0 = min(int(fx), res - 2)
            y0 = min(int(fy), res - 2)
            wx = fx - x0
            wy = fy - y0
            w00 = (1.0 - wx) * (1.0 - wy)
            w01 = wx * (1.0 - wy)
            w10 = (1.0 - wx) * wy
            w11 = wx * wy
            base = p * ch
            for c in range(ch):
                feats[i, base + c] = (w00 * planes[p, y0, x0, c] + w01 * planes[p, y0, x0 + 1, c]
                                      + w10 * planes[p, y0 + 1, x0, c] + w11 * planes[p, y0 + 1, x0 + 1, c])


def _composite(active, offsets, out_k, near, step, raw, view_rgb, color, depth, trans, min_transmittance,
               density_clamp, density_shift):
    """Front-to-back compositing of one round's samples: ``raw [m, 4]`` = (density logit, colour logits);
    density ``exp(min(raw, density_clamp) − density_shift)`` and colour ``sigmoid(raw + view term)``, mirroring
    :func:`avatar.field.fast.density_activation` and :func:`avatar.field.fast.colour_activation` (whose
    constants the caller passes). A ray stops at its first sample that takes its transmittance below
    ``min_transmittance``."""
    for a in prange(active.shape[0]):
        r = active[a]
        tr = trans[r]
        for row in range(offsets[a], offsets[a + 1]):
            sigma = math.exp(min(raw[row, 0], density_clamp) - density_shift)
            alpha = 1.0 - math.exp(-sigma * step)
            w = tr * alpha
            for c in range(3):
                color[r, c] += w / (1.0 + math.exp(-(raw[row, 1 + c] + view_rgb[r, c])))
            depth[r] += w * (near[r] + (out_k[a, row - offsets[a]] + 0.5) * step)
            tr *= 1.0 - alpha
            if tr < min_transmittance:
                break
        trans[r] = tr


# Rays that look for their first occupied step side by side (:func:`_first_steps`).
LOCKSTEP = 4


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _first_steps(origins, dirs, near, far, rays, start, stop, step, coarse_skip, fine_skip, fine, box_min, cells_per_cm,
                 first, k, steps, done):
    """``first[i]``: the first occupied step of ray ``rays[start + i]`` (``i < stop − start ≤ LOCKSTEP``; its step
    count where it has none), the rays skipping through empty space in turns. A ray's skips are one chain of
    dependent loads and conversions (~30 % of a deferred frame's march); a few independent chains at once keep the
    core busy while each waits (3–10 % faster a frame). ``k``, ``steps``, ``done``: scratch of ``LOCKSTEP``."""
    n = stop - start
    for i in range(n):
        r = rays[start + i]
        steps[i] = int(math.ceil((far[r] - near[r]) / step - 0.5))
        k[i] = 0
        done[i] = False
    searching = n
    while searching:
        for i in range(n):
            if done[i]:
                continue
            r = rays[start + i]
            skip = 0
            if k[i] < steps[i]:
                t = near[r] + (np.float32(k[i]) + np.float32(0.5)) * step
                skip = _skip(origins[r, 0] + dirs[r, 0] * t, origins[r, 1] + dirs[r, 1] * t,
                             origins[r, 2] + dirs[r, 2] * t, coarse_skip, fine_skip, fine, box_min, cells_per_cm)
            if skip:
                k[i] += skip
            else:
                done[i] = True
                searching -= 1
    for i in range(n):
        first[i] = k[i]


def _march_deferred(origins, dirs, near, far, rays, step, coarse_skip, fine_skip, fine, box_min, cells_per_cm,
                    planes, center, inv_half, w_density, b_density, b_hidden, w_hidden, min_transmittance,
                    density_clamp, density_shift, block, part, parts, feature_sum, alpha, depth, samples):
    """A deferred-shading field marched in one pass per ray, for rays ``rays [h]`` (those that meet the head box;
    row ``a`` of every output is ray ``rays[a]``): the samples of :func:`_plan_round` (fixed steps in occupied
    cells, empty cells skipped by the skip tables; each ray's first one found with its block's neighbours,
    :func:`_first_steps`), each sample's tri-plane features ``f`` as :func:`_gather`,
    its density ``exp(min(raw, density_clamp) − density_shift)`` and its features composited onto
    ``feature_sum [h, F]`` front to back (as :func:`_composite` composites colours) — until the transmittance falls below
    ``min_transmittance``. Nothing per sample leaves the core: no sample lists, no feature buffer. Writes
    ``alpha [h]`` (opacity), ``depth [h]`` (far where empty) and ``samples [h]``.

    ``raw = b_density + w_density · f`` for a linear head (``d = 0`` hidden units), ``b_density + w_hidden ·
    relu(W f + b_hidden)`` for a hidden layer (as the field's two heads; ``w_density`` is not read then), whose
    pre-activations ``W f`` are read like the features: ``planes [3, r, r, C + d]`` holds, after each texel's C
    features, its d values through its plane's share of the layer
    (:meth:`avatar.field.fast.FastField.gather_state`): the layer is linear and the lookup is a weighted sum of
    texels, so ``W f`` is the lookup of ``W · texels``. Per sample that is d more values to interpolate, from the
    same rows, instead of ``F × d`` multiply-adds (``b_density`` and ``b_hidden`` carry the frame's share).

    Rays go in blocks of ``block``; this call takes blocks ``part, part + parts, …`` (threads run the parts:
    :func:`_march_deferred_parallel`). Positions are float32
    (float64 in the other kernels: here they would double the per-sample arithmetic for < 1e-6 cm)."""
    res = planes.shape[1]
    hidden = b_hidden.shape[0]
    row = planes.shape[3]  # floats per texel: its features, then its hidden pre-activations
    ch = row - hidden
    width = 3 * ch
    half = np.float32(0.5 * (res - 1))
    one = np.float32(1.0)
    step32 = np.float32(step)
    clamp32 = np.float32(density_clamp)
    shift32 = np.float32(density_shift)
    f = np.empty(width, np.float32)
    pre = np.empty(max(hidden, 1), np.float32)  # the hidden layer's pre-activations
    acc = np.empty(width, np.float32)
    n_blocks = (rays.shape[0] + block - 1) // block
    first = np.zeros(block, np.int64)  # each ray of a block: its first occupied step
    first_k, first_steps, first_done = (np.zeros(LOCKSTEP, np.int64), np.zeros(LOCKSTEP, np.int64),
                                        np.zeros(LOCKSTEP, np.bool_))  # (_first_steps' scratch)
    for b in range(part, n_blocks, parts):
        lo = b * block
        hi = min((b + 1) * block, rays.shape[0])
        for a in range(lo, hi, LOCKSTEP):
            _first_steps(origins, dirs, near, far, rays, a, min(a + LOCKSTEP, hi), step32, coarse_skip, fine_skip,
                         fine, box_min, cells_per_cm, first[a - lo:], first_k, first_steps, first_done)
        for a in range(lo, hi):
            r = rays[a]
            steps = int(math.ceil((far[r] - near[r]) / step - 0.5))
            acc[:] = 0.0
            k = first[a - lo]
            tr = np.float32(1.0)
            d = np.float32(0.0)
            n = 0
            while k < steps:
                t = near[r] + (np.float32(k) + np.float32(0.5)) * step32
                x = origins[r, 0] + dirs[r, 0] * t
                y = origins[r, 1] + dirs[r, 1] * t
                z = origins[r, 2] + dirs[r, 2] * t
                skip = _skip(x, y, z, coarse_skip, fine_skip, fine, box_min, cells_per_cm)
                if skip:
                    k += skip
                    continue
                px = min(max((x - center[0]) * inv_half[0], -one), one)
                py = min(max((y - center[1]) * inv_half[1], -one), one)
                pz = min(max((z - center[2]) * inv_half[2], -one), one)
                raw = b_density
                f[:] = 0.0
                for j in range(hidden):
                    pre[j] = b_hidden[j]
                for p in range(3):  # planes xy, xz, yz, as _gather
                    u = px if p < 2 else py
                    v = py if p == 0 else pz
                    fx = (u + one) * half
                    fy = (v + one) * half
                    x0 = min(int(fx), res - 2)
                    y0 = min(int(fy), res - 2)
                    wx = fx - np.float32(x0)
                    wy = fy - np.float32(y0)
                    w00 = (one - wx) * (one - wy)
                    w01 = wx * (one - wy)
                    w10 = (one - wx) * wy
                    w11 = wx * wy
                    texel = (p * res + y0) * res + x0  # the four texels: texel, +1, +res, +res+1
                    o = texel * row
                    _lerp_row(f, p * ch, planes, o, o + row, o + res * row, o + (res + 1) * row, w00, w01, w10, w11, ch)
                    if hidden:  # (the same four rows, after the features: one fetch of each texel's cache lines)
                        o += ch
                        _lerp_row(pre, 0, planes, o, o + row, o + res * row, o + (res + 1) * row,
                                  w00, w01, w10, w11, hidden)
                if hidden:
                    for j in range(hidden):
                        raw += w_hidden[j] * max(pre[j], np.float32(0.0))
                else:  # (a hidden head's w_density is 0)
                    for c in range(width):
                        raw += w_density[c] * f[c]
                # (float32 throughout: a float64 operand made both of these libm's double exp)
                sigma = math.exp(min(raw, clamp32) - shift32)
                opacity = one - math.exp(-sigma * step32)
                w = tr * opacity
                _axpy_row(acc, f, w, width)
                d += w * t
                tr *= one - opacity
                n += 1
                k += 1
                if tr < min_transmittance:
                    break
            feature_sum[a, :] = acc
            alpha[a] = 1.0 - tr
            depth[a] = d + tr * far[r]
            samples[a] = n


def _compile(fn, parallel: bool):
    # cache=True: compiled once per machine (next to this file), not in every process.
    return njit(cache=True, fastmath=True, nogil=True, parallel=parallel)(fn)


# One serial and one parallel build of each kernel: one thread skips the threading layer's overhead.
KERNELS = {parallel: tuple(_compile(f, parallel) for f in (_plan_round, _pack, _gather, _composite))
           for parallel in (False, True)}
MARCH_DEFERRED = _compile(_march_deferred, False)


def _march_deferred_parallel(origins, dirs, near, far, rays, step, coarse_skip, fine_skip, fine, box_min,
                             cells_per_cm, planes, center, inv_half, w_density, b_density, b_hidden, w_hidden,
                             min_transmittance, density_clamp, density_shift, block, parts, feature_sum, alpha, depth,
                             samples):
    """:func:`_march_deferred` in ``parts`` parts on numba's threads. Numba hands a parallel loop's body its
    arrays typed with any layout, and the march compiled for those ran ~1.8× slower per thread; each part is the
    serial kernel on the same arrays typed C-contiguous again (``np.ascontiguousarray`` copies nothing: the
    caller passes contiguous arrays, so the outputs are written in place). Numba's OpenMP threads, not a pool of
    our own: torch's OpenMP threads spin for milliseconds after each op, and threads of another pool then share
    the cores with them (the march ran ~40 % slower right after a torch op)."""
    c = np.ascontiguousarray
    for part in prange(parts):
        MARCH_DEFERRED(c(origins), c(dirs), c(near), c(far), c(rays), step, c(coarse_skip), c(fine_skip), fine,
                       c(box_min), c(cells_per_cm), c(planes), c(center), c(inv_half), c(w_density), b_density,
                       c(b_hidden), c(w_hidden), min_transmittance, density_clamp, density_shift,
                       block, part, parts, c(feature_sum), c(alpha), c(depth), c(samples))


MARCH_DEFERRED_PARALLEL = _compile(_march_deferred_parallel, True)
# Parts per thread: interleaved blocks of rays, so that each thread gets some of the face and some of the empty
# corners of the head box (measured: 4 beat 1 and 16).
PARTS_PER_THREAD = 4


class Occupancy(NamedTuple):
    """What the kernels test points against (:func:`_skip`, made by :func:`occupancy_lookup` for one step size):
    per cell, 0 where occupied, else how many steps a ray may skip from any point of it (1–255)."""

    coarse_skip: np.ndarray  # uint8 [c, c, c]: the coarse level (any of its fine cells occupied)
    fine_skip: np.ndarray  # uint8 [c·fine]³: the finer grid's own, read in the coarse level's occupied shell
    fine: int  # fine cells per coarse cell along an axis (1: the grid is the coarse level; fine_skip unused)
    step: float  # the step size (cm) the tables count in


def skip_steps(occupied: np.ndarray, cell_cm: float, step: float) -> np.ndarray:
    """Per cell of an occupancy grid ``[g, g, g]`` (cells of at least ``cell_cm`` on every axis): 0 where
    occupied, else how many steps a ray may take from any point of it without passing an occupied cell's point.

    The gap between two cells (as boxes) is ``|max(|Δi| − 1, 0)|`` cells, which is the distance between the
    centres of the one cell and the nearest of the 3×3×3 cells around the other: the distance field of the grid
    grown by one cell (:func:`distance_field`; 0 next to an occupied cell). The samples a skip of ``s`` steps
    passes over lie within ``(s − 1)·step`` of the point (the one it lands on is tested), so ``s = ⌊gap/step⌋ + 1``
    (a hair less, for rounding; the bound from the centre distance alone, ``distance − √3``, skipped a step at a
    time through the shell two cells from the surface, where most steps of a frame were). At least 1, at most 255
    (taken shorter, a skip stays safe). Tabled once: a step of the march reads one byte."""
    from scipy.ndimage import binary_dilation

    grown = binary_dilation(occupied, np.ones((3, 3, 3), bool))
    gap_cm = distance_field(grown).astype(np.float64) * cell_cm
    steps = np.floor((gap_cm - 1e-4 * cell_cm) / step) + 1
    return np.where(occupied, 0, np.clip(steps, 1, 255)).astype(np.uint8)


def occupancy_lookup(mask: np.ndarray, extent: np.ndarray, step: float, coarse: int = COARSE) -> Occupancy:
    """The kernels' :class:`Occupancy` of an occupancy mask ``[r, r, r]`` over a box of ``extent`` cm, for steps
    of ``step`` cm: a grid finer than ``coarse`` (a multiple of it) gets a coarse level (``[coarse]³``, occupied
    where any of its cells is) in front of its own table (``fine = r / coarse``); other grids are the coarse
    level themselves."""
    mask = np.asarray(mask, bool)
    r = mask.shape[0]
    cell_cm = float(np.min(extent)) / r  # the smallest side: a skip's length is a lower bound on every axis
    if r > coarse and r % coarse == 0:
        fine = r // coarse
        occupied = mask.reshape(coarse, fine, coarse, fine, coarse, fine).any(axis=(1, 3, 5))
        fine_skip = skip_steps(mask, cell_cm, step)
    else:
        fine, occupied, fine_skip = 1, mask, np.zeros((1, 1, 1), np.uint8)
    coarse_skip = skip_steps(occupied, cell_cm * fine, step)
    return Occupancy(np.ascontiguousarray(coarse_skip), np.ascontiguousarray(fine_skip), fine, float(step))


def _tables(occupancy: Occupancy, step: float, box_min: np.ndarray, box_max: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The kernels' occupancy arguments ``(coarse_skip, fine_skip, fine, cells_per_cm)`` (coarse cells per cm
    on each axis of the box), the tables checked against the march's step (tables for a longer step would skip
    occupied cells)."""
    if not math.isclose(occupancy.step, step, rel_tol=1e-6):
        raise ValueError(f"occupancy tables are for steps of {occupancy.step} cm, the march takes {step}")
    cells_per_cm = (occupancy.coarse_skip.shape[0] / (box_max - box_min).astype(np.float32)).astype(np.float32)
    return occupancy.coarse_skip, occupancy.fine_skip, occupancy.fine, cells_per_cm


def distance_field(occupied: np.ndarray) -> np.ndarray:
    """Per cell, the Euclidean distance (in cells, between centres) to the nearest occupied cell; 0 inside."""
    from scipy.ndimage import distance_transform_edt

    if not occupied.any():
        return np.full(occupied.shape, float(max(occupied.shape)) * 2, np.float32)
    return distance_transform_edt(~occupied.astype(bool)).astype(np.float32)


# Samples per ray in each round: most rays reach the surface within a few occupied samples of entering the
# grid and turn opaque within two or three more; later rounds grow for the rays that pass through thin stuff.
ROUNDS = (6, 3, 4, 8, 16, 32)


class Workspace:
    """Buffers reused from frame to frame (fresh multi-megabyte arrays cost a page fault per 4 KiB each frame)."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._arrays.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._arrays[name] = np.empty(max(size, int(1.25 * (0 if buf is None else buf.size))), dtype)
        return buf[:size].reshape(shape)


def march_fused(mlp, origins: Float[np.ndarray, "n 3"], dirs: Float[np.ndarray, "n 3"], near: Float[np.ndarray, " n"],
                far: Float[np.ndarray, " n"], hit: np.ndarray, planes: Float[np.ndarray, "3 r r c"],
                center: np.ndarray, inv_half: np.ndarray, view_rgb: Float[np.ndarray, "n 3"],
                background: Float[np.ndarray, "n 3"], occupancy: Occupancy,
                box_min: np.ndarray, box_max: np.ndarray, step: float, min_transmittance: float = MIN_TRANSMITTANCE,
                parallel: bool = False, workspace: Workspace | None = None, chunk: int = 8192, *,
                density_clamp: float, density_shift: float) -> dict:
    """Render rays through one frame's field. ``mlp(features [m, 3C] float32, out [m, 4] float32)`` is the
    field's decoder without its activations (see :func:`_composite`; ``density_clamp``/``density_shift`` are the
    field's, :data:`avatar.field.fast.DENSITY_CLAMP` and ``DENSITY_SHIFT``), writing into ``out``; ``planes`` the
    frame's blended planes laid out ``[3, y, x, C]``; ``view_rgb`` each ray's view-dependent colour term;
    ``occupancy`` the grid's :func:`occupancy_lookup` for ``step``.
    Features are gathered and decoded ``chunk`` samples at a time, so that they are still in cache when the MLP
    reads them. Returns ``rgb [n, 3]``, ``alpha [n]``, ``depth [n]`` (of the head, far where it is empty) and
    ``samples`` (field evaluations). (A deferred-shading field goes through :func:`march_deferred`.)"""
    plan_round, pack, gather, composite = KERNELS[parallel]
    ws = workspace or Workspace()
    n = origins.shape[0]
    coarse_skip, fine_skip, fine, cells_per_cm = _tables(occupancy, step, box_min, box_max)
    color = np.zeros((n, 3), np.float32)
    depth = np.zeros(n, np.float32)
    trans = np.ones(n, np.float32)
    kpos = np.zeros(n, np.int64)
    active = np.flatnonzero(hit).astype(np.int64)
    samples = 0
    width = planes.shape[0] * planes.shape[3]
    for i in range(64):
        if not active.size:
            break
        most = ROUNDS[min(i, len(ROUNDS) - 1)]
        out_k = ws.get("out_k", (active.size, most), np.int64)
        out_n = ws.get("out_n", (active.size,), np.int64)
        plan_round(origins, dirs, near, far, active, kpos, step, most, coarse_skip, fine_skip, fine, box_min,
                   cells_per_cm, out_k, out_n)
        offsets = ws.get("offsets", (active.size + 1,), np.int64)
        offsets[0] = 0
        np.cumsum(out_n, out=offsets[1:])
        m = int(offsets[-1])
        if m == 0:
            break
        row_ray, row_k = ws.get("row_ray", (m,), np.int64), ws.get("row_k", (m,), np.int64)
        pack(active, out_k, offsets, row_ray, row_k)
        raw = ws.get("raw", (m, 4))
        for first in range(0, m, chunk):
            feats = ws.get("feats", (min(chunk, m - first), width))
            gather(origins, dirs, near, row_ray, row_k, first, step, planes, center, inv_half, feats)
            mlp(feats, raw[first:first + feats.shape[0]])
        composite(active, offsets, out_k, near, step, raw, view_rgb, color, depth, trans, min_transmittance,
                  density_clamp, density_shift)
        samples += m
        active = active[(trans[active] >= min_transmittance) & (out_n > 0)]
    color += trans[:, None] * background
    alpha = 1.0 - trans
    depth += trans * far
    return {"rgb": color, "alpha": alpha, "depth": depth, "samples": samples}



def march_deferred(origins: Float[np.ndarray, "n 3"], dirs: Float[np.ndarray, "n 3"], near: Float[np.ndarray, " n"],
                   far: Float[np.ndarray, " n"], hit: np.ndarray, planes: Float[np.ndarray, "3 r r w"],
                   center: np.ndarray, inv_half: np.ndarray, occupancy: Occupancy,
                   box_min: np.ndarray, box_max: np.ndarray, step: float, density_head: tuple,
                   min_transmittance: float = MIN_TRANSMITTANCE, threads: int = 1,
                   workspace: Workspace | None = None, block: int = 16, *, density_clamp: float,
                   density_shift: float) -> dict:
    """Render the rays of a deferred-shading field up to its per-pixel MLP (:func:`_march_deferred`, one pass per
    ray). ``density_head = (w_density [F], b_density, b_hidden [d], w_hidden [d])`` with the frame's share in the
    biases (a linear head: ``d = 0``); ``planes`` the frame's blended planes laid out ``[3, y, x, C + d]``, each
    texel's hidden pre-activations after its features (``w = C + d``); ``occupancy`` the grid's
    :func:`occupancy_lookup` for ``step``.
    Returns ``rays [h]`` (the rays that meet the head box), their ``feature_sum [h, F]`` (weighted sums of the
    samples' features, a workspace buffer), ``alpha [h]`` and ``depth [h]``, and ``samples`` (field evaluations).
    ``threads`` threads march the rays (numba's)."""
    ws = workspace or Workspace()
    coarse_skip, fine_skip, fine, cells_per_cm = _tables(occupancy, step, box_min, box_max)
    rays = np.flatnonzero(hit).astype(np.int64)
    w_density, b_density, b_hidden, w_hidden = density_head
    features = planes.shape[0] * (planes.shape[3] - b_hidden.shape[0])
    feature_sum = ws.get("feature_sum", (rays.size, features))  # (every row written)
    alpha, depth = ws.get("alpha", (rays.size,)), ws.get("depth", (rays.size,))
    samples = ws.get("samples", (rays.size,), np.int64)
    # contiguous once here, not in every part of the parallel kernel (a camera's origin is one row broadcast)
    origins, dirs, near, far, planes = (np.ascontiguousarray(a) for a in (origins, dirs, near, far, planes))
    args = (origins, dirs, near, far, rays, step, coarse_skip, fine_skip, fine, box_min, cells_per_cm,
            planes, center, inv_half, w_density, np.float32(b_density), b_hidden, w_hidden,
            min_transmittance, density_clamp, density_shift, block)
    outs = (feature_sum, alpha, depth, samples)
    if threads <= 1:
        MARCH_DEFERRED(*args, 0, 1, *outs)
    else:
        MARCH_DEFERRED_PARALLEL(*args, PARTS_PER_THREAD * threads, *outs)
    return {"rays": rays, "feature_sum": feature_sum, "alpha": alpha, "depth": depth, "samples": int(samples.sum())}

