"""Mutation harness for issue #10: each listed bug, made alone in a copy of the pack, must turn
the tests that guard it red.

Run from anywhere (not collected by pytest: no ``test_`` prefix, no ComfyUI import here):

    COMFYUI_PATH=/opt/ComfyUI DTI_TEST_CACHE=/root/dti_cache python3 tests/mutants.py [--only ID ...]
    python3 tests/mutants.py --list
    python3 tests/mutants.py --baseline --only flip-ignored   # the listed tests pass unmutated first

For each mutant: copy the repository's files (``git ls-files``: tracked, plus untracked files git
does not ignore, so a new test counts before it is committed) into a temp folder, check the old
text occurs exactly once in the file (else STALE: the code moved and the mutant must be updated),
replace it, run pytest on the mutant's test ids in the copy, and classify the exit code:
1 = KILLED (tests failed), 0 = SURVIVED, anything else = BROKEN (collection or usage error).
Exits non-zero if any mutant survived, is stale or broken, or a baseline failed.
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

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    bug: str  # the wording, or what the extra mutant breaks
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


GE = "tests/host/test_gpu_emulation.py"
NH = "tests/host/test_newer_host_rope.py"
TL = "tests/host/test_loss.py::test_step_inputs_and_loss_match_an_independent_reference"
BM = "tests/host/test_buckets_masks.py"
HD = "tests/host/test_host_differences.py"

MUTANTS = (
    # ---- the list -----------------------------------------------------------------
    Mutant("no-m-star", "the learned vectors reach the step function without the m* scale",
           "dti_core/training.py",
           "embeds = {k: scales[k] * params[k] for k in keys}",
           "embeds = {k: params[k] for k in keys}",
           ("tests/core/test_training.py::test_step_function_gets_m_star_times_the_unit_direction_attached_to_the_graph",)),
    Mutant("clip-g-detached", "only the CLIP-G vectors detached from the graph (SDXL's second encoder never trains)",
           "comfy_host/step.py",
           "by_token_key = {tkey: embeds[key] for key, (tkey, _, _) in self.encoders.items()}",
           "by_token_key = {tkey: embeds[key].detach() if key == 'clip_g' else embeds[key]"
           " for key, (tkey, _, _) in self.encoders.items()}",
           ("tests/host/test_learning.py::test_every_encoder_trains_and_the_loss_falls_through_the_diffusion_step",)),
    Mutant("clip-g-detached-core", "the CLIP-G vectors handed to the step function detached (core loop)",
           "dti_core/training.py",
           "embeds = {k: scales[k] * params[k] for k in keys}",
           "embeds = {k: (scales[k] * params[k]).detach() if k == 'clip_g' else scales[k] * params[k] for k in keys}",
           ("tests/core/test_training.py::test_step_function_gets_m_star_times_the_unit_direction_attached_to_the_graph",)),
    Mutant("pooled-zeros", "SDXL's pooled text replaced by zeros",
           "comfy_host/step.py",
           "p = pooled[rows].to(self.device) if pooled is not None else None",
           "p = torch.zeros_like(pooled[rows]).to(self.device) if pooled is not None else None",
           (TL,)),
    Mutant("flip-ignored", "the horizontal flip ignored (flip option on, latents not mirrored)",
           "comfy_host/step.py",
           "mirrored = bk.flipped is not None and bool(flip[i])",
           "mirrored = False",
           (TL,)),
    Mutant("flip-not-mirrored", "flip on, but the 'mirrored' latents are encoded from the unmirrored photo",
           "comfy_host/latents.py",
           "fmean, fstd = _posterior_moments(vae, model, px.flip(2)) if hflip else (None, None)",
           "fmean, fstd = _posterior_moments(vae, model, px) if hflip else (None, None)",
           ("tests/host/test_train.py::test_horizontal_flip_hands_the_step_the_mirrored_latents",)),
    Mutant("timestep-range", "the timestep range changed (t drawn from part of the model's sigma table)",
           "comfy_host/step.py",
           "index = (u * len(self.table)).floor().long()",
           "index = (u * 0.9 * len(self.table)).floor().long()",
           ("tests/host/test_loss.py::test_timesteps_cover_the_whole_sigma_table",)),
    Mutant("no-grad-guard", "the non-finite-gradient guard removed",
           "dti_core/training.py",
           "            if not bool(torch.isfinite(params[k].grad).all()):\n"
           "                raise NonFiniteError(",
           "            if False:\n"
           "                raise NonFiniteError(",
           ("tests/core/test_training.py::test_non_finite_gradient_stops_the_run_before_the_optimizer_step",)),
    Mutant("resume-from-0", "a core resume that restarts from step 0",
           "dti_core/training.py",
           "for step in range(start_step, config.steps):",
           "for step in range(0, config.steps):",
           ("tests/core/test_training.py::test_same_seed_same_result_and_resume_reproduces_uninterrupted_run",)),
    Mutant("slerp-first-row", "a single-vector embedding paired only with the other's first row in slerp",
           "dti_core/interpolate.py",
           "        if a.shape[0] == 1:\n            a = a.expand_as(b)",
           "        if a.shape[0] == 1:\n            b = b[:1]",
           ("tests/core/test_interpolate.py::test_single_vector_pairs_with_every_row_of_the_other_mismatch_refused",)),
    Mutant("no-width-check", "no width check for a per-encoder key on load (a clip_l tensor 1280 wide accepted)",
           "dti_core/embedding_file.py",
           "        if t.shape[1] != ENCODER_WIDTHS[key]:\n            raise EmbeddingFileError(\n"
           "                f\"{path}: key",
           "        if False:\n            raise EmbeddingFileError(\n"
           "                f\"{path}: key",
           ("tests/core/test_names_and_files.py::test_per_encoder_key_of_the_wrong_width_is_refused_on_load",)),
    Mutant("inspect-radians", "DTI Inspect's angle reported in radians instead of degrees",
           "dti_core/inspect.py",
           "ang = math.degrees(float(angle(v, d)))",
           "ang = float(angle(v, d))",
           ("tests/core/test_inspect.py::test_percentile_angle_in_degrees_and_nearest_ids",)),
    Mutant("name-normalised", "'a/../b' normalised to 'b' instead of refused",
           "dti_core/names.py",
           "    if name.startswith(\"/\"):\n        raise _refuse(name, \"absolute paths",
           "    name = os.path.normpath(name)\n"
           "    if name.startswith(\"/\"):\n        raise _refuse(name, \"absolute paths",
           ("tests/core/test_names_and_files.py::test_check_name_never_rewrites_a_path",)),
)

# ---- beyond the list: more bugs along the training path ------------------------------
MUTANTS += (
    Mutant("tangent-sign", "tangent projection adds the normal component instead of removing it",
           "dti_core/sphere.py",
           "return g - (g * v).sum(dim=-1, keepdim=True) * v",
           "return g + (g * v).sum(dim=-1, keepdim=True) * v",
           ("tests/core/test_sphere.py::test_tangent_projection_is_orthogonal_to_the_point",)),
    Mutant("no-retraction", "the optimizer step never retracts onto the sphere",
           "dti_core/optim.py",
           "p.copy_(retract(p))",
           "p.copy_(p)",
           ("tests/core/test_optim.py::test_beta_zero_moves_each_vector_by_lr_along_the_tangent",)),
    Mutant("prior-sign", "vMF prior pushes away from mu (sign flipped)",
           "dti_core/optim.py",
           "g = g - group[\"kappa\"] * mu",
           "g = g + group[\"kappa\"] * mu",
           ("tests/core/test_optim.py::test_prior_alone_pulls_toward_mu",)),
    Mutant("prior-scale", "vMF prior scaled by kappa squared",
           "dti_core/optim.py",
           "g = g - group[\"kappa\"] * mu",
           "g = g - group[\"kappa\"] ** 2 * mu",
           ("tests/core/test_optim.py::test_matches_independent_implementation_over_200_steps",)),
    Mutant("optim-lr", "Riemannian SGD moves by half the learning rate",
           "dti_core/optim.py",
           "p.sub_(g / denom, alpha=group[\"lr\"])",
           "p.sub_(g / denom, alpha=0.5 * group[\"lr\"])",
           ("tests/core/test_optim.py::test_beta_zero_moves_each_vector_by_lr_along_the_tangent",)),
    Mutant("node-lr-unscaled", "DTI Train's rate not scaled by the batch size",
           "nodes/train_node.py",
           "rate = float(learning_rate) * int(batch_size)",
           "rate = float(learning_rate)",
           ("tests/host/test_train.py::test_one_step_turns_the_vector_by_the_batch_scaled_rate",)),
    Mutant("m-star-zero-rows", "m* counts the vocabulary's zero (unused) rows",
           "dti_core/magnitude.py",
           "    norms = norms[norms > 0]\n",
           "",
           ("tests/core/test_names_and_files.py::test_magnitude_modes",)),
    Mutant("m-star-init-rows", "m* computed from the initializer tokens' rows, not the whole vocabulary",
           "comfy_host/text.py",
           "m_star[key] = target_norm(vocab.detach(), magnitude)",
           "m_star[key] = target_norm(vocab[ids].detach(), magnitude)",
           ("tests/host/test_train.py::test_one_step_turns_the_vector_by_the_batch_scaled_rate",)),
    Mutant("m-star-metadata", "the file's dti.m_star metadata written from the wrong encoder",
           "nodes/train_node.py",
           "base_meta = dict(method=method, m_star=m_star,",
           "base_meta = dict(method=method, m_star={k: m_star[sorted(m_star)[0]] for k in m_star},",
           ("tests/host/test_train.py::test_train_writes_a_file_that_clip_text_encode_uses",)),
    Mutant("slerp-endpoint", "slerp at t = 1 returns A",
           "dti_core/interpolate.py",
           "    if t == 1.0:\n        return b.clone()",
           "    if t == 1.0:\n        return a.clone()",
           ("tests/core/test_interpolate.py::test_endpoints_are_exact_copies",)),
    Mutant("slerp-norm", "slerp interpolates the norms the wrong way round",
           "dti_core/interpolate.py",
           "norm = ((1 - t) * na.double() + t * nb.double())",
           "norm = (t * na.double() + (1 - t) * nb.double())",
           ("tests/core/test_interpolate.py::test_norms_interpolate_linearly_for_different_lengths",)),
    Mutant("x0-loss", "loss on x0 instead of the model's own output (eps / v / flow target)",
           "comfy_host/step.py",
           "err = ((x0_pred - x0[r]) / slope) ** 2",
           "err = (x0_pred - x0[r]) ** 2",
           (TL,)),
    Mutant("noise-unscaled", "noise added without the sigma scale",
           "comfy_host/step.py",
           "x_t = self.ms.noise_scaling(sigma, noise, x0)",
           "x_t = self.ms.noise_scaling(torch.ones_like(sigma), noise, x0)",
           (TL,)),
    Mutant("sdxl-original-size", "SDXL's original-size conditioning given the bucket, not the photo's size",
           "comfy_host/step.py",
           "params = dict(cross_attn=cond, pooled_output=pooled, device=device, noise=noise, width=ow, height=oh,",
           "params = dict(cross_attn=cond, pooled_output=pooled, device=device, noise=noise, width=width, height=height,",
           (f"{BM}::test_non_square_photo_reaches_sdxl_y_with_its_size_bucket_and_crop",)),
    Mutant("sdxl-crop-swapped", "SDXL crop corner given as (left, top)",
           "comfy_host/step.py",
           "crop_w=crop[1], crop_h=crop[0]",
           "crop_w=crop[0], crop_h=crop[1]",
           (f"{BM}::test_non_square_photo_reaches_sdxl_y_with_its_size_bucket_and_crop",)),
    Mutant("mask-area", "masked loss divided by the whole latent, not the subject's area",
           "comfy_host/step.py",
           "return total / (weight.sum() * per_cell).clamp(min=1e-8)",
           "return total / x0.numel()",
           (f"{BM}::test_masked_loss_equals_the_hand_weighted_mse",)),
    Mutant("mask-ignored", "the subject mask not applied to the loss",
           "comfy_host/step.py",
           "part = (err * weight[r]).sum() if weight is not None else err.sum()",
           "part = err.sum()",
           (f"{BM}::test_masked_loss_equals_the_hand_weighted_mse",)),
    Mutant("mask-not-mirrored", "the mask of a mirrored photo not mirrored",
           "comfy_host/step.py",
           "self.flipped_mask = [m.flip(-1) for m in self.mask]",
           "self.flipped_mask = [m for m in self.mask]",
           (f"{BM}::test_masked_loss_equals_the_hand_weighted_mse",)),
    Mutant("bucket-ratio", "bucket chosen for the transposed aspect ratio",
           "dti_core/buckets.py",
           "ratio = math.log(height / width)",
           "ratio = math.log(width / height)",
           (f"{BM}::test_each_photo_is_resized_to_cover_its_bucket",)),
    Mutant("bucket-draw", "buckets drawn uniformly, not in proportion to their images",
           "comfy_host/step.py",
           "k = int(torch.multinomial(self.bucket_weights, 1, generator=g))",
           "k = int(torch.multinomial(torch.ones_like(self.bucket_weights), 1, generator=g))",
           (f"{BM}::test_batches_come_from_one_bucket_and_captions_follow_their_image",)),
    Mutant("captions-wrong-image", "captions bound to the image's place in its bucket, not among all images",
           "comfy_host/step.py",
           "which = torch.tensor([bk.index[int(i)] for i in idx])",
           "which = idx.clone()",
           (f"{BM}::test_batches_come_from_one_bucket_and_captions_follow_their_image",)),
    Mutant("posterior-mean", "the VAE posterior mean used every step instead of a fresh sample",
           "comfy_host/step.py",
           "sample = sample + std[j][window] * eps[i]",
           "sample = sample",
           ("tests/host/test_data_feed.py::test_step_samples_a_random_crop_of_the_posterior_and_conditions_on_its_corner",)),
    Mutant("posterior-std-unscaled", "posterior std not mapped into the model's latent scale",
           "comfy_host/latents.py",
           "stds.append(None if std is None else (slope.abs() * std))",
           "stds.append(None if std is None else std)",
           ("tests/host/test_data_feed.py::test_posterior_moments_equal_the_vae_encoder_s_own",)),
    Mutant("flux-guidance", "Flux trained at a fixed guidance, not the one given",
           "comfy_host/step.py",
           "params[\"guidance\"] = guidance",
           "params[\"guidance\"] = 1.0",
           ("tests/host/test_families.py::test_flux_flow_loss_equals_an_independent_computation",)),
    Mutant("flow-timestep-range", "flow models draw t from half their schedule",
           "comfy_host/step.py",
           "timestep = (self.t_min + u * (self.t_max - self.t_min)).float()",
           "timestep = (self.t_min + 0.5 * u * (self.t_max - self.t_min)).float()",
           ("tests/host/test_families.py::test_flux_flow_loss_equals_an_independent_computation",)),
    Mutant("family-encoders", "'all' trains only the family's first encoder (SDXL's CLIP-G left out)",
           "comfy_host/families.py",
           "    if text in (\"\", \"all\"):\n        return family.encoders",
           "    if text in (\"\", \"all\"):\n        return family.encoders[:1]",
           ("tests/host/test_train.py::test_train_writes_a_file_that_clip_text_encode_uses",)),
    Mutant("resume-opt-step", "a resumed optimizer restarts its bias-correction count at 0",
           "dti_core/training.py",
           "\"step\": start_step,",
           "\"step\": 0,",
           ("tests/core/test_training.py::test_same_seed_same_result_and_resume_reproduces_uninterrupted_run",)),
    # ---- what only a GPU runs (emulated), and the newer hosts ------------------------------------
    Mutant("pooled-on-encoder-device", "the batched pooled rows left on the encoders' device (SDXL on NVIDIA)",
           "comfy_host/text.py",
           "return cond, rows[:b].to(first_pooled.device)",
           "return cond, rows[:b]",
           (f"{GE}::test_pooled_models_train_with_text_encoders_on_the_gpu",)),
    Mutant("no-fp16-loss-scale", "fp16 compute gets no loss scaling",
           "comfy_host/step.py",
           "        if torch.float16 not in dtypes:\n            return 1.0",
           "        if True:\n            return 1.0",
           (f"{GE}::test_fp16_unet_gradient_matches_fp32_with_the_loss_scale",)),
    Mutant("loss-scale-not-divided", "the scaled gradient reaches the optimizer undivided",
           "dti_core/training.py",
           "params[k].grad.div_(scale)",
           "params[k].grad.div_(1.0)",
           ("tests/core/test_training.py::test_loss_scale_keeps_fp16_gradients_and_leaves_fp32_runs_exactly_as_they_were",)),
    Mutant("norms-keep-cast-weights", "cast norm layers keep ComfyUI's forward (the cast weight saved for backward)",
           "comfy_host/autograd.py",
           "if base.get(own) is _CastNorm and getattr(m, \"weight\", None) is not None:",
           "if False:",
           (f"{GE}::test_partial_load_with_pinned_offloaded_weights_trains_like_a_full_load",)),
    Mutant("pins-dropped", "the run swaps pinned weights for unpinned copies",
           "comfy_host/memory.py",
           "keys = sorted(getattr(patcher, \"pinned\", ()) or ()) if patcher is not None else []",
           "keys = []",
           (f"{GE}::test_partial_load_with_pinned_offloaded_weights_trains_like_a_full_load",)),
    Mutant("dynamic-no-delegate", "a dynamic model re-read from disk at every run",
           "comfy_host/memory.py",
           "return delegate() if delegate is not None else patcher.clone(disable_dynamic=True)",
           "return patcher.clone(disable_dynamic=True)",
           (f"{GE}::test_dynamic_models_from_core_loaders_train_as_classic_ones_reloaded_once",)),
    Mutant("kitchen-rope-no-stand-in", "the newer hosts' kitchen RoPE gets no backward",
           "comfy_host/kernels.py",
           "STAND_INS = {\"comfy_kitchen.apply_rope_split_half\": _rope_split_half}",
           "STAND_INS = {}",
           (f"{NH}::test_llm_encoders_train_through_the_kitchen_rope_with_the_torch_rope_gradient",)),
    Mutant("kitchen-rope-untransposed", "the RoPE stand-in's backward applies the forward rotation",
           "comfy_host/kernels.py",
           "freqs.transpose(-1, -2).contiguous()",
           "freqs.contiguous()",
           (f"{NH}::test_llm_encoders_train_through_the_kitchen_rope_with_the_torch_rope_gradient",)),
    Mutant("cublas-kernel-under-grad", "--fast cublas_ops layers keep their kernel without a backward in training",
           "comfy_host/autograd.py",
           "        if _is_cublas_linear(m):\n",
           "        if False:\n",
           (f"{GE}::test_fp16_unet_with_cublas_ops_trains_through_a_differentiable_linear",)),
    Mutant("context-processor-unchecked", "SD3's context processor trained with a launch-chosen attention without backward",
           "comfy_host/autograd.py",
           "        _check_context_processor(net)\n",
           "",
           (f"{GE}::test_sd3_context_processor_with_attention_without_a_backward_is_refused",)),
    Mutant("no-backward-check", "an op without a backward met at the first step as torch's raw error",
           "comfy_host/kernels.py",
           "    if op is None:\n        raise error\n    raise HostContractError(",
           "    if True:\n        raise error\n    raise HostContractError(",
           (f"{NH}::test_a_host_op_without_any_backward_is_one_clear_error_before_anything_is_written",)),
    Mutant("check-encodes-again", "a good first step still runs the separate backward check (an encode more)",
           "comfy_host/step.py",
           "            if error is None and all(kernels.gradient_problem(grads.get(k)) is None for k in learned):\n                return\n",
           "",
           (f"{HD}::test_a_good_first_step_is_the_backward_check_and_costs_no_extra_encode",)),
    Mutant("first-step-unchecked", "a first step without the learned rows' gradient left to torch's raw error",
           "comfy_host/step.py",
           "            self.check_backward(embeds, learned)\n        return check",
           "            pass\n        return check",
           (f"{HD}::test_an_encoder_that_cuts_the_gradient_is_one_clear_error_naming_it",
            f"{NH}::test_a_host_op_without_any_backward_is_one_clear_error_before_anything_is_written")),
)


def repo_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (repo / p).is_file()]


def copy_repo(repo: Path, dest: Path) -> None:
    for rel in repo_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def run_pytest(copy: Path, tests: tuple[str, ...], log) -> int:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
    return proc.returncode


def classify(rc: int) -> str:
    return {0: "SURVIVED", 1: "KILLED"}.get(rc, f"BROKEN(rc={rc})")


def run_one(m: Mutant, baseline: bool, log) -> tuple[str, float]:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"dti-mutant-{m.id}-") as tmp:
        copy = Path(tmp) / REPO.name
        copy_repo(REPO, copy)
        path = copy / m.file
        text = path.read_text()
        count = text.count(m.old)
        if count != 1:
            return f"STALE(old text found {count}x)", time.monotonic() - start
        if baseline:
            log.write(f"=== {m.id}: baseline\n")
            rc = run_pytest(copy, m.tests, log)
            if rc != 0:
                return f"BASELINE-FAILS(rc={rc})", time.monotonic() - start
        path.write_text(text.replace(m.old, m.new))
        log.write(f"=== {m.id}: mutated {m.file}\n")
        status = classify(run_pytest(copy, m.tests, log))
    return status, time.monotonic() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants (marking stale ones) and exit")
    ap.add_argument("--baseline", action="store_true", help="run each mutant's tests unmutated first")
    ap.add_argument("--log", default=None, help="write pytest output here (default: a temp file)")
    args = ap.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"
    if args.list:
        for m in MUTANTS:
            found = (REPO / m.file).read_text().count(m.old)
            mark = "" if found == 1 else f"  STALE(old text found {found}x)"
            print(f"{m.id:24} {m.file:28} {m.bug}{mark}\n{'':24} catch: {' '.join(m.tests)}")
        return 0
    chosen = MUTANTS
    if args.only:
        unknown = set(args.only) - set(ids)
        if unknown:
            ap.error(f"unknown mutant ids: {', '.join(sorted(unknown))}")
        chosen = tuple(m for m in MUTANTS if m.id in args.only)

    log_path = args.log or os.path.join(tempfile.gettempdir(), f"dti-mutants-{os.getpid()}.log")
    rows = []
    with open(log_path, "w") as log:
        for m in chosen:
            status, seconds = run_one(m, args.baseline, log)
            log.flush()
            rows.append((m, status, seconds))
            print(f"{m.id:24} {status:16} {seconds:6.1f}s  {' '.join(m.tests)}", flush=True)
    print(f"\npytest output: {log_path}")
    bad = [m.id for m, status, _ in rows if status != "KILLED"]
    print(f"{len(rows) - len(bad)}/{len(rows)} killed" + (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
