"""Is DTI Train correct on this device? One process, every check run, a JSON report (issue #15, first part).

For SD1.5 and SDXL with random weights (real-size layouts by default; ``--thin`` for the small test
models), loaded through ComfyUI's checkpoint loader with the dtype ComfyUI picks on this device, it runs
the node itself (``DTITrain.run`` under ``torch.inference_mode()``, as ComfyUI's executor calls it) and
checks, per model:

  loss_finite              the loss of every step is finite
  grad_nonzero_finite      the gradient reaching each encoder's vectors is finite and non-zero in every
                           step (hooked on the vectors the training loop hands the node's DiffusionStep)
  grad_no_underflow        at most 1% zero entries where the diffusion model hands the gradient back to
                           the text conditioning (half-precision weights, no loss scaling: an underflowing
                           gradient shows up as exact zeros there), and in the vectors' gradient
  grad_vs_fp32             the first step's gradient at the vectors with the weights as loaded, against the
                           same weights upcast to fp32: cosine >= 0.99 and norm ratio within 10%
  norm_invariant           every saved vector is fp32 with norm m* (|norm - m*| <= 1e-5 m*)
  same_seed_same_file      a second run in the same process with the same seed gives the same vectors:
                           largest angle between corresponding vectors <= 1e-3 rad (GPU kernels may sum
                           in a different order from run to run, e.g. atomics in attention's backward;
                           a one-ulp difference in one step's gradient turns a vector by far less than
                           this, one step turns it by ~atan(lr * batch) ~ 0.02 rad). The largest element
                           difference and whether the files' vectors are bit-identical are reported too.
  memory_released_after_run   torch.cuda.memory_allocated after the second run <= before it + 64 MiB
  oom_refused_clearly      an out-of-memory error injected into the second step (after that step's
                           forward has built its graph) reaches the caller as ComfyUI's OOM exception
                           with what to lower, and no file is written
  memory_released_after_oom   memory_allocated after that refused run <= before it + 64 MiB
                           (both memory checks are skipped, with a note, without CUDA)

and once, on SD1.5:

  teacher_student          (skipped below 20 steps, e.g. a CPU smoke run) the node's DiffusionStep with the model's call turned into student - teacher + x0
                           (tests/host/test_learning.py's target: "a photo of a dog"; the word starts at
                           "car"): the cosine of the learned word to "dog" rises by > 0.1 and the loss falls

Exit status 1 if any check failed; every check runs regardless.

  COMFYUI_PATH=/opt/ComfyUI python3 bench/gpu_correctness.py --out gpu_correctness.json    # GPU, real size
  COMFYUI_PATH=/opt/ComfyUI DTI_TEST_CACHE=/root/dti_cache python3 bench/gpu_correctness.py --thin --cpu
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_train_step import load_by_path  # noqa: E402

MODEL_CHECKS = ["loss_finite", "grad_nonzero_finite", "grad_no_underflow", "grad_vs_fp32", "norm_invariant",
                "same_seed_same_file", "memory_released_after_run", "oom_refused_clearly", "memory_released_after_oom"]
ONCE_CHECKS = ["sd15.teacher_student"]
MIB = 2**20
LEAK_TOLERANCE = 64 * MIB
SAME_SEED_MAX_ANGLE = 1e-3  # radians
NORM_RTOL = 1e-5
TS_MIN_STEPS = 20  # fewer teacher-student steps (a CPU smoke run) cannot show convergence: reported as skipped
UNDERFLOW_MAX_ZERO_FRACTION = 0.01


class Report:
    """The checks so far; rewritten to ``path`` after each one, so a run stopped by its time limit
    still leaves what it found (``"complete": false``)."""

    def __init__(self, path, **head):
        self.path = Path(path)
        self.data = dict(head, complete=False, checks={}, models={})
        self.t0 = time.perf_counter()

    def check(self, name, ok, **detail):
        status = "skipped" if ok is None else ("pass" if ok else "fail")
        self.data["checks"][name] = dict(status=status, **detail)
        print(f"[{status.upper():7}] {time.perf_counter() - self.t0:6.1f}s {name} {json.dumps(detail, default=str)[:400]}", flush=True)
        self.write()

    def write(self):
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def failed(self, names, exc):
        for n in names:
            if n not in self.data["checks"]:
                self.check(n, False, error=f"{type(exc).__name__}: {exc}"[:2000])


class Recorder:
    """Wraps DiffusionStep.__call__ (the node's step function) for one run: per step the loss, and from
    backward hooks the gradient reaching each trained encoder's vectors and the gradient the diffusion
    model hands back to the text conditioning (c_crossattn). No product code changes."""

    def __init__(self, ct, model):
        self.ct, self.model, self.steps = ct, model, []

    def __enter__(self):
        real_call = self.real_call = self.ct.step.DiffusionStep.__call__
        rec = self

        def recording_call(step_self, embeds, step):
            entry = {"step": step, "grad": {}, "cond_grad": []}
            for key, e in embeds.items():
                if e.requires_grad:  # trained encoders (frozen ones are plain tensors)
                    m = float(e.detach().norm(dim=-1).mean())  # e = m* v: dL/dv = m* dL/de

                    def hook(g, key=key, m=m):
                        g = g.detach().float()
                        entry["grad"][key] = {"norm": float(g.norm()) * m, "min_row_norm": float(g.norm(dim=-1).min()) * m,
                                              "finite": bool(torch.isfinite(g).all()),
                                              "zero_fraction": float((g == 0).float().mean())}
                    e.register_hook(hook)
            loss = real_call(step_self, embeds, step)
            entry["loss"] = float(loss.detach())
            rec.steps.append(entry)
            return loss

        real_apply = self.real_apply = self.model.model.apply_model

        def apply_model(*args, **kwargs):
            c = kwargs.get("c_crossattn")
            if torch.is_tensor(c) and c.requires_grad:
                def hook(g):
                    rec.steps[-1]["cond_grad"].append({"dtype": str(g.dtype), "finite": bool(torch.isfinite(g).all()),
                                                       "zero_fraction": float((g == 0).float().mean()),
                                                       "abs_max": float(g.detach().abs().max())})
                c.register_hook(hook)
            return real_apply(*args, **kwargs)

        self.ct.step.DiffusionStep.__call__ = recording_call
        self.model.model.apply_model = apply_model
        return self

    def __exit__(self, *exc):
        self.ct.step.DiffusionStep.__call__ = self.real_call
        del self.model.model.apply_model  # back to the class's method
        return False


def angles(a, b):
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--thin", action="store_true", help="the small test models instead of the real-size layouts")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--steps", type=int, default=3, help="steps per node run (three runs per model)")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--res", type=int, default=0, help="0: 512 SD1.5 / 768 SDXL real size, 64 thin")
    p.add_argument("--ts-steps", type=int, default=40, help="teacher-student steps")
    p.add_argument("--ts-res", type=int, default=0, help="teacher-student resolution; 0: 512 real size, 64 thin")
    p.add_argument("--out", default="gpu_correctness.json")
    a = p.parse_args()

    ck = load_by_path("dti_bench_checkpoints", ROOT / "tests" / "host" / "checkpoints.py")
    cuda = torch.cuda.is_available() and not a.cpu
    ck.setup_comfy(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"), cpu=not cuda)
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths

    emb_dir = tempfile.mkdtemp(prefix="dti-gpu-correctness-")
    folder_paths.add_model_folder_path("embeddings", emb_dir, is_default=True)
    pack = load_by_path("ComfyUI_DTI_gc", ROOT / "__init__.py")  # the pack as ComfyUI imports it
    tn = importlib.import_module("ComfyUI_DTI_gc.nodes.train_node")
    ct = importlib.import_module("ComfyUI_DTI_gc.comfy_host")
    for sub in ("images", "latents", "step", "text", "autograd"):
        importlib.import_module(f"ComfyUI_DTI_gc.comfy_host.{sub}")
    ef = importlib.import_module("ComfyUI_DTI_gc.dti_core.embedding_file")
    templates = importlib.import_module("ComfyUI_DTI_gc.dti_core.templates")
    dev = mm.get_torch_device()
    report = Report(a.out, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    thin=a.thin, steps=a.steps, bs=a.bs, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    if not cuda:
        print("NOTE: no CUDA device in use: the GPU memory checks are skipped", flush=True)
    cache = os.environ.get("DTI_TEST_CACHE") or tempfile.mkdtemp(prefix="dti-gpu-correctness-ckpt-")
    t_start = time.perf_counter()

    def mem():
        if not cuda:
            return None
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def run_node(model, clip, vae, images, name, res, seed=0):
        with torch.inference_mode():
            return tn.DTITrain().run(model, clip, vae, images=images, name=name, initializer="dog", steps=a.steps,
                                     batch_size=a.bs, learning_rate=0.01, kappa=1e-4, magnitude="mean",
                                     magnitude_value=0.4, templates="object", custom_templates="", resolution=res,
                                     horizontal_flip=False, seed=seed, save_every=0, resume_from="(none)",
                                     overwrite=True)

    def memory_check(name, before, after, **extra):
        if before is None:
            report.check(name, None, note="no CUDA device: GPU memory not measured")
        else:
            report.check(name, after - before <= LEAK_TOLERANCE, before_mib=before / MIB, after_mib=after / MIB,
                         grown_mib=(after - before) / MIB, tolerance_mib=LEAK_TOLERANCE / MIB, **extra)

    for kind in [k.strip() for k in a.models.split(",") if k.strip()]:
        names = [f"{kind}.{c}" for c in MODEL_CHECKS]
        info = report.data["models"][kind] = {}
        res = a.res or (64 if a.thin else {"sd15": 512, "sdxl": 768}[kind])
        info["res"] = res
        try:
            t0 = time.perf_counter()
            path = ck.ensure_checkpoint(kind if a.thin else kind + "-full", cache)
            info["checkpoint_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            (model, clip, vae), _ = ck.load_checkpoint(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))
            info["load_s"] = time.perf_counter() - t0
            encs = ct.text.text_encoders(clip)
            info["dtypes"] = {"unet_weights": str(model.model.get_dtype()), "unet_manual_cast": str(model.model.manual_cast_dtype),
                              "text_weights": {k: str(next(e.parameters()).dtype) for k, (_, _, e) in encs.items()},
                              "vae": str(vae.vae_dtype)}
            images = torch.rand(4, res, res, 3, generator=torch.Generator().manual_seed(0))
        except Exception as e:
            traceback.print_exc()
            report.failed(names, e)
            continue

        # Run 1: recorded steps, the saved file.
        path_a = None
        try:
            t0 = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with Recorder(ct, model) as rec:
                out = run_node(model, clip, vae, images, f"gc-{kind}-a", res)
            info["run1_s"] = time.perf_counter() - t0
            info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            path_a = out["result"][1].path
            steps = rec.steps
            info["steps"] = steps
            losses = [s["loss"] for s in steps]
            report.check(f"{kind}.loss_finite", len(steps) == a.steps and all(math.isfinite(x) for x in losses),
                         losses=losses)
            keys = set(ct.text.text_encoders(clip))
            grads_ok = len(steps) == a.steps and all(
                set(s["grad"]) == keys and all(g["finite"] and g["norm"] > 0 and g["min_row_norm"] > 0
                                               for g in s["grad"].values()) for s in steps)
            report.check(f"{kind}.grad_nonzero_finite", grads_ok,
                         grad_norms=[{k: g["norm"] for k, g in s["grad"].items()} for s in steps])
            cond_zero = [c["zero_fraction"] for s in steps for c in s["cond_grad"]]
            vec_zero = [g["zero_fraction"] for s in steps for g in s["grad"].values()]
            report.check(f"{kind}.grad_no_underflow",
                         bool(cond_zero) and all(c["finite"] for s in steps for c in s["cond_grad"])
                         and max(cond_zero) <= UNDERFLOW_MAX_ZERO_FRACTION
                         and max(vec_zero, default=1) <= UNDERFLOW_MAX_ZERO_FRACTION,
                         cond_grad_zero_fraction_max=max(cond_zero, default=None),
                         cond_grad_dtype=sorted({c["dtype"] for s in steps for c in s["cond_grad"]}),
                         cond_grad_abs_max=[max((c["abs_max"] for c in s["cond_grad"]), default=None) for s in steps],
                         vector_grad_zero_fraction_max=max(vec_zero, default=None))
        except Exception as e:
            traceback.print_exc()
            report.failed([f"{kind}.{c}" for c in ("loss_finite", "grad_nonzero_finite", "grad_no_underflow")], e)

        try:
            if path_a is None:
                raise RuntimeError("run 1 wrote no file")
            emb = ef.load_embedding(path_a)
            worst, dtypes = 0.0, set()
            for key, v in emb.vectors.items():
                m = emb.m_star(key)
                dtypes.add(str(v.dtype))
                worst = max(worst, float(((v.double().norm(dim=-1) - m).abs() / m).max()))
            report.check(f"{kind}.norm_invariant", dtypes == {"torch.float32"} and worst <= NORM_RTOL,
                         max_rel_norm_error=worst, tolerance=NORM_RTOL, dtypes=sorted(dtypes),
                         m_star={k: emb.m_star(k) for k in emb.vectors})
        except Exception as e:
            traceback.print_exc()
            report.failed([f"{kind}.norm_invariant"], e)

        # Run 2: same seed, in the same process; memory before/after (the models are loaded as run 1 left them).
        try:
            before = mem()
            t0 = time.perf_counter()
            out = run_node(model, clip, vae, images, f"gc-{kind}-b", res)
            info["run2_s"] = time.perf_counter() - t0
            del out
            after = mem()
            memory_check(f"{kind}.memory_released_after_run", before, after)
            if path_a is None:
                raise RuntimeError("run 1 wrote no file")
            va = ef.load_embedding(path_a).vectors
            vb = ef.load_embedding(os.path.join(os.path.dirname(path_a), f"gc-{kind}-b.safetensors")).vectors
            diff = max(float((va[k] - vb[k]).abs().max()) for k in va)
            ang = max(float(angles(va[k].double(), vb[k].double()).max()) for k in va)
            report.check(f"{kind}.same_seed_same_file", set(va) == set(vb) and ang <= SAME_SEED_MAX_ANGLE,
                         bit_identical=all(torch.equal(va[k], vb[k]) for k in va), max_abs_diff=diff,
                         max_angle_rad=ang, tolerance_rad=SAME_SEED_MAX_ANGLE)
        except Exception as e:
            traceback.print_exc()
            report.failed([f"{kind}.memory_released_after_run", f"{kind}.same_seed_same_file"], e)

        # Run 3: an OOM injected at step 2, after that step's forward built its graph.
        try:
            real_call = ct.step.DiffusionStep.__call__

            def oom_call(self, embeds, step):
                loss = real_call(self, embeds, step)
                if step == 1:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                return loss

            before = mem()
            ct.step.DiffusionStep.__call__ = oom_call
            err_text, err_type = None, None
            try:
                run_node(model, clip, vae, images, f"gc-{kind}-oom", res)
            except Exception as err:  # what ComfyUI's executor would catch (it is dropped at the block's end)
                err_text, err_type = str(err), type(err).__name__
                ok = isinstance(err, mm.OOM_EXCEPTION) and "batch_size or resolution" in err_text
            else:
                ok = False
            finally:
                ct.step.DiffusionStep.__call__ = real_call
            after = mem()
            written = os.path.exists(os.path.join(emb_dir, f"gc-{kind}-oom.safetensors"))
            report.check(f"{kind}.oom_refused_clearly", ok and not written, error_type=err_type,
                         message=err_text, file_written=written)
            memory_check(f"{kind}.memory_released_after_oom", before, after)
        except Exception as e:
            traceback.print_exc()
            report.failed([f"{kind}.oom_refused_clearly", f"{kind}.memory_released_after_oom"], e)

        # The first step's gradient with the weights as loaded against the same weights in fp32.
        try:
            t0 = time.perf_counter()
            report.check(f"{kind}.grad_vs_fp32", **grad_vs_fp32(ct, mm, templates, path, model, clip, vae, images, res,
                                                                a.bs, dev))
            info["grad_vs_fp32_s"] = time.perf_counter() - t0
        except Exception as e:
            traceback.print_exc()
            report.failed([f"{kind}.grad_vs_fp32"], e)

        if kind == "sd15":
            try:
                t0 = time.perf_counter()
                ts_res = a.ts_res or (64 if a.thin else 512)
                report.check("sd15.teacher_student", **teacher_student(pack, ct, (model, clip, vae), a.ts_steps, ts_res, dev))
                info["teacher_student_s"] = time.perf_counter() - t0
            except Exception as e:
                traceback.print_exc()
                report.failed(ONCE_CHECKS, e)
        del model, clip, vae
        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()

    expected = [f"{k.strip()}.{c}" for k in a.models.split(",") if k.strip() for c in MODEL_CHECKS]
    expected += [c for c in ONCE_CHECKS if c.split(".")[0] in a.models.split(",")]
    for name in expected:
        if name not in report.data["checks"]:
            report.check(name, False, error="not reached")
    report.data["total_s"] = time.perf_counter() - t_start
    failed = [n for n, c in report.data["checks"].items() if c["status"] == "fail"]
    report.data["failed"] = failed
    report.data["complete"] = True
    report.write()
    summary = {n: c["status"] for n, c in report.data["checks"].items()}
    print("SUMMARY " + json.dumps({"device": report.data["device"], "failed": failed, "checks": summary,
                                   "total_s": round(report.data["total_s"], 1)}), flush=True)
    return 1 if failed else 0


def grad_vs_fp32(ct, mm, templates, path, model, clip, vae, images, res, bs, dev) -> dict:
    """Gradient at the initial vectors for step 0 of the node's DiffusionStep, with the UNet as loaded
    and with the same checkpoint loaded with fp32 weights (same CLIP, same latents, same draws)."""
    import comfy.sd

    with torch.inference_mode():
        model32 = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                        model_options={"dtype": torch.float32})[0]
        latents = ct.latents.encode_buckets(vae, model, ct.images.load_training_images(images), res, False)
        init, mu, m_star = ct.text.initial_vectors(clip, "dog", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, templates.OBJECT, {k: v.shape[0] for k, v in init.items()})
    grads, losses, scales = {}, {}, {}
    for label, m in (("as_loaded", model), ("fp32", model32)):
        mm.load_models_gpu([m, clip.patcher], force_full_load=True)
        with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(m, clip):
            ds = ct.step.DiffusionStep(m, clip, prompts, [tl.cloned() for tl in latents], None, bs, 0, res, dev)
            e = {k: (m_star[k] * init[k]).to(dev).requires_grad_() for k in sorted(init)}
            loss = ds(e, 0)
            # with the node's fp16 loss scale (1 unless something computes in fp16), divided out after
            scales[label] = ds.loss_scale
            g = torch.autograd.grad(loss * scales[label], [e[k] for k in sorted(init)])
            grads[label] = {k: x.detach().double().cpu() / scales[label] for k, x in zip(sorted(init), g)}
            losses[label] = float(loss.detach())
            del ds, loss, g, e
    fp32_dtype = str(model32.model.get_dtype())
    del model32
    mm.unload_all_models()
    mm.soft_empty_cache()
    cos, ratio = {}, {}
    for k in sorted(init):
        ga, gb = grads["as_loaded"][k].flatten(), grads["fp32"][k].flatten()
        cos[k] = float(ga @ gb / (ga.norm() * gb.norm()))
        ratio[k] = float(ga.norm() / gb.norm())
    ok = all(c >= 0.99 for c in cos.values()) and all(0.9 <= r <= 1.1 for r in ratio.values())
    return dict(ok=ok, unet_dtype=str(model.model.get_dtype()), reference_unet_dtype=fp32_dtype, cosine=cos, norm_ratio=ratio,
                loss=losses, loss_scale=scales)


def teacher_student(pack, ct, loaded, steps, res, dev) -> dict:
    """tests/host/test_learning.py's target and measure, through the node's DiffusionStep at ``res`` on
    ``dev``: the model's call returns student - teacher + x0, so the denoising loss is the distance of the
    student's prediction (the learned word) from the teacher's ("a photo of a dog").
    The CPU's numbers to hold the GPU's against (thin SD1.5, 64 px, 40 steps, 2026-11-27): cos to "dog"
    -0.019 -> 0.133, loss (5-step means) 1.3e-4 -> 8.8e-6."""
    import comfy.model_management as mm

    core = importlib.import_module("ComfyUI_DTI_gc.dti_core.training")
    learning = load_by_path("dti_test_learning", ROOT / "tests" / "host" / "test_learning.py")
    setup, teacher_student_denoiser = learning.teacher_student, learning.teacher_student_denoiser
    model, clip, _ = loaded
    mm.load_models_gpu([model, clip.patcher], force_full_load=True)
    target, init, mu, m_star, _, cos_to_dog = setup(pack, loaded)
    (_, _, encoder), = ct.text.text_encoders(clip).values()
    vocab_dev = ct.text.vocabulary(encoder).device
    with torch.inference_mode():
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    latents = torch.randn(4, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 3, res, dev)
        with teacher_student_denoiser(ds, model, target):
            start = cos_to_dog(init["clip_l"].to(vocab_dev))
            result = core.train(init, mu, m_star, lambda e, s: ds(e, s),
                                core.TrainConfig(steps=steps, lr=0.04, kappa=0.0), device=dev,
                                loss_scale=lambda: ds.loss_scale)
    learned = cos_to_dog(result.vectors["clip_l"].to(vocab_dev))
    loss = result.history.loss
    first, last = sum(loss[:5]) / len(loss[:5]), sum(loss[-5:]) / len(loss[-5:])
    v = result.vectors["clip_l"]
    norm_err = float(((v.double().norm(dim=-1) - m_star["clip_l"]).abs() / m_star["clip_l"]).max())
    finite = all(math.isfinite(x) for x in loss)
    ok = learned > start + 0.1 and last < first and norm_err <= NORM_RTOL and finite
    if steps < TS_MIN_STEPS:  # the code ran; too few steps to judge convergence
        ok = None if finite and norm_err <= NORM_RTOL else False
    return dict(ok=ok, res=res, steps=steps, min_steps_to_judge=TS_MIN_STEPS,
                cos_to_dog_before=start, cos_to_dog_after=learned, loss_first5=first, loss_last5=last,
                max_rel_norm_error=norm_err, all_losses_finite=finite)


if __name__ == "__main__":
    sys.exit(main())
