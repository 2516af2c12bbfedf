"""Mutation check: break the code on purpose, one break at a time, and see whether the test suite notices.

    python tests/mutations.py                 # every break (each in a fresh copy of the working tree), a table
    python tests/mutations.py --list          # what each break does and which tests should catch it
    python tests/mutations.py --only token_any --only stale_frames_kept

Each break is a text substitution in one source file of a temporary copy of this checkout (the checkout itself
is never touched), followed by ``python -m pytest -q -x`` on the tests that should catch it. First the same
tests run on the unbroken copy: a break only counts as caught when those tests pass without it. The script
exits 1 when any break goes unnoticed (or the baseline fails). It takes a while (~15-25 min on 2 CPU cores:
several breaks need the small test avatars trained again), so CI does not run it; run it after changing tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("deferred_no_mean_feature", "a deferred field shades the summed features, not their mean (faint edges "
             "and opaque skin get different colours for one surface)",
             "avatar/field/fast.py", "        colour = shade(feature_sum[rows] / a[:, None], rows)",
             "        colour = shade(feature_sum[rows], rows)",
             ("tests/test_fast_field.py::test_a_deferred_field_shades_each_pixel_once_from_its_mean_feature",)),
    Mutation("linear_march_never_stops", "the one-pass deferred march keeps sampling a ray after it turned opaque",
             "avatar/engines/fused_kernels.py", "                if tr < min_transmittance:\n                    break",
             "                if tr < 0.0:\n                    break",
             ("tests/test_fused_kernels.py::test_deferred_march_kernel_marches_gathers_and_composites_each_ray_in_one_pass",)),
    Mutation("linear_density_ignores_frame", "the one-pass deferred march leaves the frame's share out of a linear "
             "density head",
             "avatar/engines/fused.py", "field.density.weight[0].contiguous().numpy(), float(field.density.bias + share[0]),",
             "field.density.weight[0].contiguous().numpy(), float(field.density.bias),",
             ("tests/test_fused.py::test_fused_engine_renders_what_the_torch_engine_renders",)),
    Mutation("hidden_planes_misaligned", "the density head's hidden layer is moved onto the planes with each "
             "plane given another plane's share of the layer",
             "avatar/field/fast.py", "                share = w.reshape(w.shape[0], 3, -1).permute(1, 0, 2)  # [3, d, C]",
             "                share = w.reshape(w.shape[0], 3, -1).permute(1, 0, 2).flip(0)  # [3, d, C]",
             ("tests/test_fast_field.py::test_a_deferred_fields_gather_state_appends_its_density_heads_hidden_layer_per_texel",)),
    Mutation("refined_grid_leaves_carved_cells", "the bundle's finer occupancy grid brings back cells the carving "
             "dropped", "avatar/render/grid.py",
             "        fine.mask = _dilate(fine.density > self.threshold) & inside",
             "        fine.mask = _dilate(fine.density > self.threshold)",
             ("tests/test_fast_field.py::test_a_refined_grid_is_finer_inside_the_coarse_one_and_still_renders_the_reference",)),
    Mutation("refined_grid_not_dilated", "the bundle's finer occupancy grid keeps no margin around the surface",
             "avatar/render/grid.py", "        fine.mask = _dilate(fine.density > self.threshold) & inside",
             "        fine.mask = (fine.density > self.threshold) & inside",
             ("tests/test_fast_field.py::test_a_refined_grid_is_finer_inside_the_coarse_one_and_still_renders_the_reference",)),
    Mutation("fine_skip_wrong_cell", "the kernels read a fine occupancy grid's skip table at the coarse cell's "
             "x index", "avatar/engines/fused_kernels.py",
             "    jx = min(max(int(fx * fine), 0), gf - 1)", "    jx = min(max(int(fx), 0), gf - 1)",
             ("tests/test_fused.py::test_empty_space_skipping_never_skips_an_occupied_sample",)),
    Mutation("gather_blend_drops_neutral", "an engine's channels-last frame state leaves the neutral planes out",
             "avatar/field/fast.py", "        planes = offset.add_(neutral.permute(0, 3, 1, 2))",
             "        planes = offset",
             ("tests/test_fast_field.py::test_an_engines_channels_last_frame_state_is_the_blend_and_follows_the_parameters",)),
    Mutation("gather_layout_never_refreshed", "an engine's channels-last copies of the planes are kept after the "
             "planes change", "avatar/field/fast.py", "        if cached is None or cached[0] != key:",
             "        if cached is None:",
             ("tests/test_fast_field.py::test_an_engines_channels_last_frame_state_is_the_blend_and_follows_the_parameters",)),
    Mutation("lockstep_first_steps_mixed_up", "rays that search for their first occupied step side by side all "
             "start from the first one's", "avatar/engines/fused_kernels.py", "        first[i] = k[i]",
             "        first[i] = k[0]",
             ("tests/test_fused_kernels.py::test_deferred_march_kernel_marches_gathers_and_composites_each_ray_in_one_pass",)),
    Mutation("deferred_pixels_misplaced", "the fused engine composites each shaded ray's colour onto the pixel of "
             "its place among the marched rays", "avatar/field/fast.py",
             "rgb.index_add(0, rows if pixels is None else pixels[rows], a[:, None] * colour)",
             "rgb.index_add(0, rows, a[:, None] * colour)",
             ("tests/test_fused.py::test_fused_engine_renders_what_the_torch_engine_renders",)),
    Mutation("vector_lerp_drops_a_corner", "the march's vector bilinear lookup leaves out its fourth texel",
             "avatar/engines/fused_kernels.py", "zip(args[3:7], args[7:11])", "zip(args[3:6], args[7:10])",
             ("tests/test_fused_kernels.py::test_deferred_march_kernel_marches_gathers_and_composites_each_ray_in_one_pass",)),
    Mutation("vector_row_remainder_dropped", "the march composites a row's features past its last whole vector "
             "with no weight", "avatar/engines/fused_kernels.py", "        dst[c] += weight * src[c]",
             "        dst[c] += 0.0 * src[c]",
             ("tests/test_fused_kernels.py::test_deferred_march_kernel_marches_gathers_and_composites_each_ray_in_one_pass",)),
    Mutation("upsampler_not_premultiplied", "the upsampler can output colour brighter than its opacity",
             "avatar/field/upsample.py", "        return torch.cat([torch.minimum(out[:, :3], out[:, 3:]), out[:, 3:]], 1)",
             "        return out",
             ("tests/test_upsample.py::test_an_untrained_upsampler_is_bilinear_and_keeps_colour_premultiplied",)),
    Mutation("live_never_upsamples", "the live loop shrinks the render instead of switching to the upsampler",
             "streamer/pipeline.py", "            if self.factor and not self.upsampled:",
             "            if False:",
             ("tests/test_upsample.py::test_the_live_loop_upsamples_before_it_shrinks_and_goes_back_to_native_when_there_is_room",)),
    Mutation("upsampler_loss_ignores_background", "the upsampler is fitted to the frames without the background "
             "behind its alpha",
             "avatar/field/upsample.py", "        pred = out[:, :3] + (1.0 - out[:, 3:]) * torch.stack(bgs)",
             "        pred = out[:, :3]",
             ("tests/test_upsample.py::test_training_beats_bilinear_on_held_out_images_of_what_it_was_trained_on",)),
    Mutation("resume_ignores_checkpoint", "fit.py --resume starts from scratch instead of the checkpoint",
             "trainer/fit.py", "    if resuming and ckpt_path.is_file():", "    if False:",
             ("tests/test_fit.py::test_interrupted_training_resumes_from_the_checkpoints_weights",)),
    Mutation("latent_dropped", "the per-frame latent code never reaches the field",
             "avatar/field/model.py", "    condition = torch.cat([expression, latent], -1)",
             "    condition = torch.cat([expression, latent * 0], -1)",
             ("tests/test_fast_field.py::test_the_latent_code_conditions_the_field",)),
    Mutation("retarget_frozen_neutral", "the retargeter always outputs the avatar's neutral expression",
             "streamer/pipeline.py", "            target_expr = relative_expression(",
             "            target_expr = self.neutral + 0 * relative_expression(",
             ("tests/test_live.py::test_relative_retargeting_calibrates_clamps_holds_and_eases",
              "tests/test_live.py::test_file_sink_holds_the_avatar_as_rendered_offline_and_follows_the_face")),
    Mutation("occupancy_test_skipped", "the culled marcher samples every step of an occupied block (no fine test)",
             "avatar/render/march.py", "            valid = valid & self.grid.occupied(pts.reshape(-1, 3)).reshape(valid.shape)",
             "            valid = valid",
             ("tests/test_fit.py::test_fast_field_trains_and_culls_like_the_dense_reference",)),
    Mutation("blendshape_names_swapped", "the dataset labels jawOpen's column eyeBlinkLeft and vice versa",
             "avatar/data/prepare.py", '        "expression_names": list(BLENDSHAPE_NAMES),',
             '        "expression_names": [{"jawOpen": "eyeBlinkLeft", "eyeBlinkLeft": "jawOpen"}.get(n, n) '
             'for n in BLENDSHAPE_NAMES],',
             ("tests/test_prepare.py::test_dataset_expressions_follow_the_true_performance",)),
    Mutation("token_any", "the WebRTC server accepts any token off the loopback interface",
             "streamer/webrtc.py", "        return hmac.compare_digest(given.encode(), self.token.encode())",
             "        return True",
             ("tests/test_live.py::test_off_loopback_every_request_needs_the_token_and_viewers_are_capped",)),
    Mutation("stale_frames_kept", "a source never drops a frame: the reader waits for the consumer (a backlog)",
             "avatar/capture/sources.py",
             "    def _publish(self, rgb: np.ndarray, media_time: float | None = None) -> None:\n        with self._cond:",
             "    def _publish(self, rgb: np.ndarray, media_time: float | None = None) -> None:\n"
             "        self._wait_until_taken()\n        with self._cond:",
             ("tests/test_live.py::test_a_slow_consumer_gets_the_newest_frame_not_a_backlog",)),
    Mutation("bundle_not_atomic", "the bundle's weights are written in place (a failed write destroys the old ones)",
             "avatar/bundle/bundle.py", "        write_bytes_atomic(directory / WEIGHTS_FILE, safetensors_bytes(tensors))",
             "        (directory / WEIGHTS_FILE).write_bytes(safetensors_bytes(tensors))",
             ("tests/test_faults.py::test_a_bundle_write_that_fails_half_way_leaves_the_previous_bundle_whole",)),
    # -- further breaks ---------------------------------------------------------------------------------
    Mutation("checkpoint_not_atomic", "the checkpoint is written in place",
             "avatar/field/training.py", "        write_bytes_atomic(path, safetensors_bytes(tensors, metadata=meta))",
             "        Path(path).write_bytes(safetensors_bytes(tensors, metadata=meta))",
             ("tests/test_faults.py::test_a_checkpoint_write_that_fails_half_way_is_one_line_and_keeps_the_previous_one",)),
    Mutation("checksum_unchecked", "a safetensors file's checksum is never compared",
             "avatar/base/fileio.py", "        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:",
             "        if False:",
             ("tests/test_faults.py::test_damaged_bundle_is_one_line_for_the_live_loop",)),
    Mutation("auto_engine_hides_damage", "the torch engine never looks at the bundle's occupancy cache",
             "avatar/bundle/files.py", "        load_occupancy_cache(cache)\n    engines_record(directory)",
             "        pass\n    engines_record(directory)",
             ("tests/test_faults.py::test_the_auto_engine_does_not_fall_back_past_a_damaged_cache",)),
    Mutation("stale_export_not_detected", "ONNX graphs exported from other weights (a retrained avatar) count as current",
             "avatar/bundle/files.py", '    if record["weights_sha256"] != weights_sha256(directory):', "    if False:",
             ("tests/test_bundle_files.py::test_a_stale_export_is_never_used",)),
    Mutation("render_ignores_set", "render.py ignores --set",
             "trainer/render.py", '    edited = parse_edits(cfg.set or [], meta["expression_names"], neutral)',
             '    edited = neutral.copy()', ("tests/test_fit.py::test_render_offline_video",)),
    Mutation("render_ignores_yaw", "render.py ignores --yaw",
             "trainer/render.py", '    yaw0, yaw1 = parse_range(cfg.yaw, "yaw")', "    yaw0, yaw1 = 0.0, 0.0",
             ("tests/test_fit.py::test_render_offline_video",)),
    Mutation("transparent_field", "the fast field renders the background plate only",
             "avatar/render/march.py", "        color = self.color + self.trans[:, None] * background",
             "        color = background", ("tests/test_fit.py::test_fast_field_trains_and_culls_like_the_dense_reference",)),
    Mutation("gain_control_ignored", "POST /control {\"gain\": …} answers 200 and changes nothing",
             "streamer/webrtc.py", '            self.controls.gain = float(body["gain"])', "            pass",
             ("tests/test_live.py::test_webrtc_client_receives_frames_and_junk_gets_400",)),
    Mutation("viewers_uncapped", "--max-viewers is never enforced",
             "streamer/webrtc.py", "        if len(self.peers) >= self.max_viewers:", "        if False:",
             ("tests/test_live.py::test_off_loopback_every_request_needs_the_token_and_viewers_are_capped",)),
    Mutation("no_easing", "a lost face snaps to neutral instead of easing",
             "streamer/pipeline.py",
             "        s = min(1.0, (gone - self.cfg.hold_seconds) / max(self.cfg.ease_seconds, 1e-6))", "        s = 1.0",
             ("tests/test_live.py::test_relative_retargeting_calibrates_clamps_holds_and_eases",)),
    Mutation("failed_start_keeps_file", "a run that fails while opening its sinks leaves a finished output file",
             "streamer/sinks.py", "    def abort(self) -> None:\n        self.writer.abort()",
             "    def abort(self) -> None:\n        self.writer.close()",
             ("tests/test_live.py::test_a_second_server_on_a_busy_port_is_one_line_and_leaves_no_file",)),
    Mutation("pose_lock_ignored", "--pose-lock does not hold the head",
             "streamer/pipeline.py", "        if self.controls.pose_lock:\n            target_pose = self.reference.copy()",
             "        if False:\n            target_pose = self.reference.copy()",
             ("tests/test_live.py::test_command_line_controls_reach_the_loop",)),
    Mutation("fused_skips_a_step_too_far", "the fused engine's empty-space jumps go one step past the gap",
             "avatar/engines/fused_kernels.py", "    steps = np.floor((gap_cm - 1e-4 * cell_cm) / step) + 1",
             "    steps = np.floor((gap_cm - 1e-4 * cell_cm) / step) + 2",
             ("tests/test_fused.py::test_empty_space_skipping_never_skips_an_occupied_sample",)),
    Mutation("fused_skips_too_far", "the fused engine's empty-space jumps take the distance between cell centres for "
             "the gap between cells (skip occupied samples)",
             "avatar/engines/fused_kernels.py", "    grown = binary_dilation(occupied, np.ones((3, 3, 3), bool))",
             "    grown = occupied",
             ("tests/test_fused.py::test_empty_space_skipping_never_skips_an_occupied_sample",)),
    Mutation("fused_view_term_dropped", "the fused engine leaves out the view-dependent colour",
             "avatar/engines/fused_kernels.py", "(raw[row, 1 + c] + view_rgb[r, c])", "(raw[row, 1 + c])",
             ("tests/test_fused.py::test_fused_engine_renders_what_the_torch_engine_renders",)),
    Mutation("fused_plan_skips_a_sample", "the fused planner steps over the sample after each occupied one",
             "avatar/engines/fused_kernels.py", "                n += 1\n                k += 1",
             "                n += 1\n                k += 2",
             ("tests/test_fused_kernels.py::test_plan_round_kernel_takes_the_next_occupied_steps",)),
    Mutation("fused_pack_local_ray", "the fused packer labels rows with the ray's place among the active rays",
             "avatar/engines/fused_kernels.py", "row_ray[offsets[a] + j] = active[a]", "row_ray[offsets[a] + j] = a",
             ("tests/test_fused_kernels.py::test_pack_kernel_lays_rows_out_in_ray_order",)),
    Mutation("fused_gather_off_by_one", "the fused gather reads one texel too far left for its last corner",
             "avatar/engines/fused_kernels.py", "w11 * planes[p, y0 + 1, x0 + 1, c]", "w11 * planes[p, y0 + 1, x0, c]",
             ("tests/test_fused_kernels.py::test_gather_kernel_looks_up_what_grid_sample_looks_up",)),
    Mutation("fused_composite_never_stops", "the fused compositor never stops a ray inside a round",
             "avatar/engines/fused_kernels.py", "            if tr < min_transmittance:\n                break",
             "            if False:\n                break",
             ("tests/test_fused_kernels.py::test_composite_kernel_blends_front_to_back_and_stops_rays",)),
    Mutation("tracking_thread_loses_faces", "frames tracked on the tracking thread arrive without their observation",
             "avatar/capture/sources.py", "frame.media_time, True, observation,", "frame.media_time, True, None,",
             ("tests/test_fused.py::test_tracking_on_its_own_thread_logs_what_tracking_in_turn_logs",)),
    Mutation("plate_not_kept_outside", "the compositor starts each frame from black instead of the room's plate",
             "streamer/pipeline.py", "        frame = self.base.copy()", "        frame = np.zeros_like(self.base)",
             ("tests/test_fullframe.py::test_compositor_keeps_the_plate_outside_the_box_and_the_head_inside",
              "tests/test_fullframe.py::test_live_output_is_the_full_camera_frame_with_the_room_around_the_head")),
    Mutation("layout_fits_instead_of_covering", "another aspect is fitted (bars) instead of covered by the room",
             "streamer/pipeline.py", "    scale = max(w / source[0], h / source[1])",
             "    scale = min(w / source[0], h / source[1])",
             ("tests/test_fullframe.py::test_layout_maps_the_crop_into_the_output_covering_it",)),
    Mutation("plate_not_loaded", "load_bundle forgets the full-frame plate (every bundle outputs its square)",
             "avatar/bundle/bundle.py", "    return LoadedAvatar(model, meta, background, plate)",
             "    return LoadedAvatar(model, meta, background, None)",
             ("tests/test_fullframe.py::test_a_version_1_bundle_still_loads_and_outputs_its_square",
              "tests/test_fullframe.py::test_live_output_is_the_full_camera_frame_with_the_room_around_the_head")),
    Mutation("file_sink_square", "the file sink writes a square of the output's width",
             "streamer/sinks.py", "VideoWriter(self.path, width, height,", "VideoWriter(self.path, width, width,",
             ("tests/test_fullframe.py::test_live_output_is_the_full_camera_frame_with_the_room_around_the_head",)),
    Mutation("virtualcam_square", "the virtual camera opens a square of the output's width",
             "streamer/sinks.py", "pyvirtualcam.Camera(width=width, height=height,",
             "pyvirtualcam.Camera(width=width, height=width,",
             ("tests/test_fullframe.py::test_the_virtual_camera_opens_at_the_output_size",)),
    Mutation("plate_with_the_person", "the recorder's empty-room plate takes frames with the face still in them",
             "trainer/record.py", "    if obs is None:\n        take.face_free_since",
             "    if True:\n        take.face_free_since",
             ("tests/test_fullframe.py::test_guided_recording_from_a_camera",)),
    Mutation("turn_read_as_roll", "the recorder measures head turns on the roll axis",
             "avatar/data/coverage.py", '    "headTurn": (0, 25.0,', '    "headTurn": (2, 25.0,',
             ("tests/test_fullframe.py::test_recorder_measures_what_a_video_performs",)),
    Mutation("workflow_never_current", "run_live.py --record redoes every step although its output is current",
             "streamer/workflow.py", "    if not output.exists():\n        return False",
             "    if True:\n        return False",
             ("tests/test_fullframe.py::test_one_command_from_a_recording_to_live",)),
    Mutation("cli_preset_ignored", "options left out take the dataclass defaults, not the named preset's",
             "avatar/base/cli.py", "    return dataclasses.replace(base, **given) if base is not None else cls(**given)",
             "    return cls(**given)", ("tests/test_cli.py::test_options_left_out_give_the_default_config",)),
    Mutation("cli_alias_silent", "a deprecated option spelling parses without a warning",
             "avatar/base/cli.py", '            print(f"warning: {option_string} is deprecated, use {flag}", file=sys.stderr)\n',
             "", ("tests/test_cli.py::test_a_deprecated_spelling_parses_to_the_same_config_and_warns",)),
    Mutation("cli_float_default_repr", "--help prints 180.0 for a float default of 180",
             "avatar/base/cli.py", '        return f"{value:g}"', "        return str(value)",
             ("tests/test_cli.py::test_help_runs_and_prints_the_true_defaults",)),
)


def copy_checkout(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files): no venvs, no outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"error: break {mutation.name}: the text to replace occurs {count} times in {mutation.path} "
                         "(the code changed: update tests/mutations.py)")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """(pytest exit code, first failing test or '', seconds)."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - start
    failed = next((line.split(" ", 2)[1] for line in r.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))), "")
    return r.returncode, failed, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this break (repeatable)")
    p.add_argument("--list", action="store_true", help="list the breaks and the tests meant to catch them")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per pytest run (default 1200)")
    p.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unbroken copy first")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown break(s) {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.path}\n    caught by: {', '.join(t.split('::')[-1] for t in m.tests)}")
        return 0

    rows, missed = [], []
    with tempfile.TemporaryDirectory(prefix="mutations.") as tmp:
        clean = Path(tmp) / "clean"
        copy_checkout(clean)
        for m in chosen:  # fail early when a break no longer applies to the code
            if (clean / m.path).read_text().count(m.old) != 1:
                apply(m, clean)  # exits with the explanation
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: {len(tests)} tests on the unbroken copy …", flush=True)
            code, failed, seconds = run_tests(clean, tests, args.timeout * 2)
            if code != 0:
                print(f"error: the tests fail without any break ({failed or f'exit {code}'}); fix them first",
                      file=sys.stderr)
                return 1
            print(f"baseline passed in {seconds:.0f} s", flush=True)
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            apply(m, tree)
            code, failed, seconds = run_tests(tree, m.tests, args.timeout)
            caught = code == 1
            verdict = f"caught by {failed.split('::')[-1]}" if caught else (
                "MISSED" if code == 0 else f"MISSED (pytest exit {code}{', ' + failed if failed else ''})")
            if not caught:
                missed.append(m.name)
            rows.append(f"| {m.name} | {m.what} | `{m.path}` | {verdict} | {seconds:.0f} |")
            print(f"{m.name}: {verdict} ({seconds:.0f} s)", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    print("\n| break | what it does | file | result | s |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(rows) - len(missed)} of {len(rows)} breaks caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
