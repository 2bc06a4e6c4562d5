"""``python -m dti_cli``: train DTI embeddings from folders of images, headless.

One job:   python -m dti_cli --checkpoint MODEL.safetensors --images DIR --name NAME [--initializer dog ...]
Many jobs: python -m dti_cli --checkpoint MODEL.safetensors --jobs jobs.toml   (or .json)
Scores:    python -m dti_cli evaluate --generated DIR --references DIR --image-model VISION.safetensors ...
           (see dti_cli/evaluate.py)

The model loads once, through ComfyUI's loaders (the checkpoint loader, or UNETLoader +
CLIPLoader + VAELoader's calls); every job then runs DTI Train's ``run`` exactly as ComfyUI's
executor calls it (under ``torch.inference_mode()``). Every DTI Train input is an option here
(``--learning-rate``, ``--save-every``, ...) with the node's defaults, read from the node itself.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import shards

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "comfyui_dti_cli_pack"  # the pack's import name here (its folder name has a hyphen)
MODEL_KEYS = ("checkpoint", "diffusion_model", "text_encoders", "clip_type", "vae")
JOB_ONLY_KEYS = ("images",)
NOT_OPTIONS = ("model", "clip", "vae", "images", "image_folder")  # node inputs the CLI fills itself (--images)


class UsageError(Exception):
    """A bad input the user can fix; printed without a traceback (exit status 2)."""


# --------------------------------------------------------------------------------------------
# Where ComfyUI is
# --------------------------------------------------------------------------------------------

def _is_comfyui(path) -> bool:
    return path is not None and (Path(path) / "comfy" / "sd.py").is_file() and (Path(path) / "folder_paths.py").is_file()


def find_comfyui(explicit: str | None) -> Path:
    """``--comfyui``, else ``COMFYUI_PATH``, else the ComfyUI this pack sits in (``custom_nodes/<pack>``)."""
    if explicit:
        if not _is_comfyui(explicit):
            raise UsageError(f"--comfyui {explicit}: not a ComfyUI folder (no comfy/sd.py and folder_paths.py there)")
        return Path(explicit).resolve()
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not _is_comfyui(env):
            raise UsageError(f"COMFYUI_PATH={env}: not a ComfyUI folder (no comfy/sd.py and folder_paths.py there)")
        return Path(env).resolve()
    # The pack's folder two levels down (through a symlinked custom_nodes entry too: the logical $PWD).
    candidates = [PACK_ROOT.parent.parent]
    pwd = os.environ.get("PWD")
    if pwd and (Path(pwd) / "dti_cli" / "main.py").is_file():
        candidates.insert(0, Path(os.path.abspath(pwd)).parent.parent)
    for c in candidates:
        if _is_comfyui(c):
            return c.resolve()
    raise UsageError("ComfyUI not found: pass --comfyui PATH, set COMFYUI_PATH, or run from ComfyUI/custom_nodes/<this pack>")


def setup_comfyui(comfy_path: Path, cpu: bool):
    """ComfyUI made importable and its device chosen (``comfy_host/startup.py``, loaded by path: the
    pack cannot be imported before ComfyUI is), then the pack imported as a package the way
    ComfyUI's custom-node loader does. Returns the pack module."""
    spec = importlib.util.spec_from_file_location("dti_comfy_startup", PACK_ROOT / "comfy_host" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    startup.start(comfy_path, cpu, pack_root=PACK_ROOT)

    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    root = str(PACK_ROOT)
    spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    import importlib as _il

    for sub in ("nodes", "nodes.train_node", "nodes.common", "dti_core.names", "comfy_host.images",
                "comfy_host.loaders", "comfy_host.paths"):
        _il.import_module(f"{PACK_MODULE}.{sub}")
    return pack


# --------------------------------------------------------------------------------------------
# Images: the folder trains through DTI Train's image_folder (each photo at its own aspect ratio,
# a PNG's alpha as its subject mask), read by the node's own reader
# --------------------------------------------------------------------------------------------

def check_folder(folder, training) -> int:
    """Read every photo of ``folder`` once, as DTI Train will, so that a missing folder or a broken
    file is reported before the model loads. ``training`` is the pack's ``comfy_host.images``."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    names = training.image_files(str(folder))
    if not names:
        raise UsageError(f"no images in {folder} (looked for {', '.join(training.IMAGE_EXTENSIONS)})")
    for name in names:
        try:
            training.read_image(str(folder / name))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return len(names)


# --------------------------------------------------------------------------------------------
# Options = DTI Train's inputs
# --------------------------------------------------------------------------------------------

def node_options(node_cls) -> dict[str, tuple]:
    """``{input name: (kind, default, choices, tooltip)}`` for DTI Train's widget inputs."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name in NOT_OPTIONS:
                continue
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, (list, tuple)):
                out[name] = ("COMBO", opts.get("default", kind[0] if kind else None), list(kind), opts.get("tooltip", ""))
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out[name] = (kind, opts.get("default"), None, opts.get("tooltip", ""))
            # other sockets (masks, ...) have no command-line form
    return out


def parse_bool(text) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def coerce(name: str, value, option: tuple, where: str):
    """Check a value from a jobs file (or the command line) against the node input's kind."""
    kind, _, choices, _ = option
    ok = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "STRING": lambda v: isinstance(v, str),
          "BOOLEAN": lambda v: isinstance(v, bool),
          "COMBO": lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        raise UsageError(f"{where}: {name} must be {kind.lower()}, got {value!r}")
    if kind == "FLOAT":
        value = float(value)
    if kind == "COMBO" and name != "resume_from" and value not in choices:
        raise UsageError(f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def build_parser(options: dict | None, add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dti_cli", add_help=add_help,
        description="Train Directional Textual Inversion embeddings from folders of images, without the "
                    "ComfyUI server. Uses ComfyUI's loaders and DTI Train's own code: the same defaults, "
                    "the same files.")
    g = p.add_argument_group("model (a checkpoint, or a diffusion model + text encoder(s) + VAE)")
    g.add_argument("--checkpoint", help="A checkpoint .safetensors (as CheckpointLoaderSimple loads it).")
    g.add_argument("--diffusion-model", help="A diffusion model .safetensors (as UNETLoader loads it).")
    g.add_argument("--text-encoder", dest="text_encoders", action="append",
                   help="A text encoder .safetensors (as CLIPLoader loads it); repeat for DualCLIPLoader's two.")
    g.add_argument("--clip-type", default=None,
                   help="The CLIPLoader type of the text encoder(s): stable_diffusion, sdxl, flux, sd3, chroma, ... "
                        "(default: stable_diffusion for one file, flux for two)")
    g.add_argument("--vae", help="A VAE .safetensors (as VAELoader loads it).")
    g = p.add_argument_group("what to train")
    g.add_argument("--images", help="Folder of images of the concept (png/jpg/webp/bmp/tif; a PNG's transparency is its subject mask).")
    g.add_argument("--jobs", help="A jobs file (.toml or .json): many concepts, one model load. See docs/cli.md.")
    g.add_argument("--output", help="Folder for the embeddings (default: ComfyUI's embeddings folder).")
    g.add_argument("--shard", help="Train only shard K/N of the jobs (0 <= K < N; a job's shard depends on its name "
                                   "only), or 'auto' in a Slurm array or a Kubernetes Indexed Job. A job whose file "
                                   "already holds its result is skipped, so a requeued shard only trains what is left.")
    g.add_argument("--summary", help="Append one JSON line per job (and one per run) to this file.")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="Train the jobs on a Ray cluster, one actor per GPU, each loading the model once: "
                        "ADDRESS is HOST:PORT or ray://HOST:PORT, 'auto' (the default: the cluster this machine "
                        "is in) or 'local' (start Ray here with the devices this machine has). Needs --output on "
                        "a disk every node sees, and Ray installed (pip install ray).")
    g.add_argument("--actors", type=int, help="With --ray: how many actors (default: one per GPU of the cluster; "
                                              "with --cpu, 1).")
    g = p.add_argument_group("host")
    g.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, else the ComfyUI this pack sits in).")
    g.add_argument("--cpu", action="store_true", help="Run on the CPU, as ComfyUI's --cpu.")
    if options:
        g = p.add_argument_group("DTI Train inputs (defaults are the node's)")
        for name, (kind, default, choices, tooltip) in options.items():
            flag = "--" + name.replace("_", "-")
            text = f"{tooltip} (default: {default!r})".replace("%", "%%")
            if kind == "BOOLEAN":
                g.add_argument(flag, dest=name, type=parse_bool, nargs="?", const=True, default=None, help=text)
            elif kind == "INT":
                g.add_argument(flag, dest=name, type=int, default=None, help=text)
            elif kind == "FLOAT":
                g.add_argument(flag, dest=name, type=float, default=None, help=text)
            else:
                g.add_argument(flag, dest=name, default=None, help=text)
    return p


def read_jobs_file(path) -> dict:
    """A jobs file as data (TOML through ``tomllib``, or JSON): never executed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read jobs file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"jobs file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"jobs file {path}: the top level must be a table/object")
    return data


def plan_jobs(args, options: dict) -> tuple[dict, list[dict]]:
    """``(model paths, [job])`` from the command line and the jobs file; each job is
    ``{"images": folder, "where": label, "inputs": {node input: value}}`` with the node's defaults
    overridden by the command line, then the file's ``[defaults]``, then the job's own keys."""
    cli = {name: getattr(args, name) for name in options if getattr(args, name, None) is not None}
    for name, value in cli.items():
        cli[name] = coerce(name, value, options[name], "command line")
    model = {k: getattr(args, k) for k in MODEL_KEYS if getattr(args, k, None)}
    base = Path.cwd()
    if args.jobs:
        if args.images:
            raise UsageError("give either --images (one job) or --jobs (a jobs file), not both")
        data = read_jobs_file(args.jobs)
        base = Path(args.jobs).resolve().parent
        unknown = set(data) - set(MODEL_KEYS) - {"defaults", "job"}
        if unknown:
            raise UsageError(f"jobs file: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                             f"expected {', '.join(MODEL_KEYS)}, [defaults] and [[job]]")
        for k in MODEL_KEYS:
            if k in data and k not in model:  # the command line wins
                model[k] = _resolve_paths(data[k], base) if k != "clip_type" else data[k]
        defaults = data.get("defaults", {})
        entries = data.get("job", [])
        if not isinstance(defaults, dict) or not isinstance(entries, list) or not entries:
            raise UsageError("jobs file: needs at least one [[job]] entry (a list 'job' in JSON)")
        _check_keys(defaults, options, "jobs file [defaults]", allow_images=False)
        jobs = []
        for i, entry in enumerate(entries, 1):
            where = f"jobs file, job {i}"
            if not isinstance(entry, dict):
                raise UsageError(f"{where}: must be a table/object")
            _check_keys(entry, options, where, allow_images=True)
            if "images" not in entry:
                raise UsageError(f"{where}: has no 'images' folder")
            inputs = {n: o[1] for n, o in options.items()}
            inputs.update(cli)
            inputs.update({k: coerce(k, v, options[k], where) for k, v in defaults.items()})
            inputs.update({k: coerce(k, v, options[k], where) for k, v in entry.items() if k != "images"})
            jobs.append({"images": _resolve_paths(entry["images"], base), "where": where, "inputs": inputs})
    else:
        if not args.images:
            raise UsageError("nothing to train: give --images FOLDER (and --name), or --jobs FILE")
        inputs = {n: o[1] for n, o in options.items()}
        inputs.update(cli)
        jobs = [{"images": str(Path(args.images)), "where": "command line", "inputs": inputs}]
    return model, jobs


def _check_keys(entry: dict, options: dict, where: str, allow_images: bool) -> None:
    allowed = set(options) | (set(JOB_ONLY_KEYS) if allow_images else set())
    unknown = set(entry) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; DTI Train's inputs are "
                         f"{', '.join(options)}")


def _resolve_paths(value, base: Path):
    if isinstance(value, list):
        return [_resolve_paths(v, base) for v in value]
    if not isinstance(value, str):
        raise UsageError(f"jobs file: expected a path, got {value!r}")
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


# --------------------------------------------------------------------------------------------
# Loading the model with ComfyUI's loaders
# --------------------------------------------------------------------------------------------

def _safetensors(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist")
    if not path.lower().endswith(".safetensors"):
        raise UsageError(f"{what} {path}: only .safetensors files are loaded (they cannot run code)")
    return path


def check_model_paths(model: dict) -> None:
    if model.get("checkpoint"):
        if any(model.get(k) for k in ("diffusion_model", "text_encoders", "vae")):
            raise UsageError("give either --checkpoint or --diffusion-model/--text-encoder/--vae, not both")
        _safetensors(model["checkpoint"], "checkpoint")
        return
    missing = [k for k in ("diffusion_model", "text_encoders", "vae") if not model.get(k)]
    if missing == ["diffusion_model", "text_encoders", "vae"]:
        raise UsageError("no model: give --checkpoint, or --diffusion-model, --text-encoder and --vae")
    if missing:
        raise UsageError(f"missing {', '.join('--' + k.replace('_', '-').rstrip('s') for k in missing)} "
                         f"(a separate diffusion model needs text encoder(s) and a VAE)")
    _safetensors(model["diffusion_model"], "diffusion model")
    encoders = model["text_encoders"] if isinstance(model["text_encoders"], list) else [model["text_encoders"]]
    if not 1 <= len(encoders) <= 3:
        raise UsageError("give one to three text encoders")
    for e in encoders:
        _safetensors(e, "text encoder")
    _safetensors(model["vae"], "VAE")


# --------------------------------------------------------------------------------------------
# Progress in the terminal
# --------------------------------------------------------------------------------------------

class TerminalProgress:
    """A progress line per job from DTI Train's own progress events: step, loss, ETA."""

    def __init__(self, label: str, stream=None, width: int = 24):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = self.first_step = None
        self.last_line = ""

    def __call__(self, event: str, data: dict) -> None:
        if event == "dti.start":
            self.started = time.monotonic()
            self.first_step = int(data.get("start", 0))
        elif event == "dti.progress":
            self.show(int(data["step"]), int(data["steps"]), data.get("loss"))
        elif event == "dti.done" and self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()

    def show(self, step: int, steps: int, loss) -> None:
        now = time.monotonic()
        done = step - (self.first_step or 0)
        per = (now - self.started) / done if self.started and done > 0 else None
        eta = _clock(per * (steps - step)) if per is not None else "?"
        filled = int(self.width * step / max(steps, 1))
        bar = "#" * filled + "." * (self.width - filled)
        loss_text = f"{loss:.5f}" if isinstance(loss, (int, float)) else "?"
        line = f"{self.label} [{bar}] step {step}/{steps} loss {loss_text} ETA {eta}"
        self.last_line = line
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(signal, "SIGUSR1") and sys.stderr is not None:
        # `kill -USR1 <pid>` prints where every thread is to stderr: for a run that seems stuck
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if "evaluate" in argv[:2] and (argv[0] == "evaluate" or argv[0] == "--cpu"):
        from . import evaluate
        try:
            return evaluate.main([a for i, a in enumerate(argv) if not (a == "evaluate" and i < 2)])
        except UsageError as e:
            print(f"dti_cli evaluate: error: {e}", file=sys.stderr)
            return 2
    if any(a in ("-h", "--help") for a in argv):
        # The node's inputs are listed only when ComfyUI is found (they are read from the node).
        options = None
        try:
            # (without its own -h: it would print the short help and exit before the node is read)
            pre = build_parser(None, add_help=False).parse_known_args(argv)[0]
            pack = setup_comfyui(find_comfyui(pre.comfyui), cpu=True)
            options = node_options(pack.nodes.train_node.DTITrain)
        except Exception:
            pass
        build_parser(options).parse_args(argv)
        return 0
    try:
        return _run(argv)
    except UsageError as e:
        print(f"dti_cli: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dti_cli: interrupted", file=sys.stderr)
        return 130


def _run(argv) -> int:
    pre = build_parser(None).parse_known_args(argv)[0]
    ray_address = None
    if pre.ray is not None or pre.actors is not None:
        ray_address = check_ray_options(pre)  # before ComfyUI is imported: a wrong address must not wait for that
    shard = None
    if pre.shard:  # (also before ComfyUI is imported: a typo is an answer at once, not after seconds of imports)
        try:
            shard = shards.parse_shard(pre.shard)
        except shards.ShardError as e:
            raise UsageError(str(e)) from None
    comfy_path = find_comfyui(pre.comfyui)
    print(f"dti_cli: ComfyUI at {comfy_path}", file=sys.stderr)
    pack = setup_comfyui(comfy_path, cpu=pre.cpu)
    train_node = pack.nodes.train_node
    common = pack.nodes.common
    host = pack.comfy_host
    training = host.images
    check_name = sys.modules[f"{PACK_MODULE}.dti_core.names"].check_name
    options = node_options(train_node.DTITrain)
    args = build_parser(options).parse_args(argv)
    model_paths, jobs = plan_jobs(args, options)

    if args.output:
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output {out} is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        host.paths.add_embedding_folder(str(out.resolve()))

    # Every input is checked before the model loads: a typo in job 7 must not cost a model load. Names are
    # checked across the whole file (two shards must never write one file); folders in this shard.
    problems, names = [], {}
    for job in jobs:
        try:
            name = check_name(job["inputs"]["name"])
            if name in names:
                raise UsageError(f"name {name!r} is used by {names[name]} too")
            names[name] = job["where"]
            job["inputs"]["name"] = name
        except (UsageError, ValueError) as e:
            problems.append(f"{job['where']}: {e}")
    total = len(jobs)
    if shard is not None and not problems:
        jobs = shards.select(jobs, *shard)
        print(f"dti_cli: shard {shard[0]}/{shard[1]}: {len(jobs)} of {total} job(s)", file=sys.stderr)
    for job in jobs:
        try:
            check_folder(job["images"], training)
        except (UsageError, ValueError) as e:
            problems.append(f"{job['where']}: {e}")
    try:
        check_model_paths(model_paths)
    except UsageError as e:
        problems.append(str(e))
    if problems:
        raise UsageError("\n  ".join(["the inputs have problems:"] + problems))
    summary = shards.Summary(args.summary, shard or (0, 1)) if (shard or args.summary) else None
    if not jobs:
        if summary:
            print(summary.close(), file=sys.stderr)
        return 0
    if args.ray is not None:
        summary = shards.Summary(args.summary, "ray") if args.summary else None
        from . import ray_runner

        return ray_runner.run(args, ray_address, model_paths, jobs, comfy_path, summary)

    label = model_paths.get("checkpoint") or model_paths.get("diffusion_model")
    print(f"dti_cli: loading model {label}", file=sys.stderr)
    started = time.monotonic()
    try:
        model, clip, vae = host.loaders.load_model(model_paths)
    except (ValueError, RuntimeError) as e:  # ComfyUI raises RuntimeError for a file it cannot detect
        raise UsageError(" ".join(x.strip() for x in str(e).splitlines() if x.strip()) or repr(e)) from None
    print(f"dti_cli: model loaded in {time.monotonic() - started:.1f} s; {len(jobs)} job(s)", file=sys.stderr)

    failed = 0
    for i, job in enumerate(jobs, 1):
        inputs = job["inputs"]
        progress = TerminalProgress(f"[{i}/{len(jobs)}] {inputs['name']}")
        common.LISTENERS.append(progress)
        job_started = time.monotonic()
        try:
            out = run_job(pack, (model, clip, vae), job)
        except Exception as e:  # one job's failure (a clash, out of memory) leaves the others to run
            failed += 1
            print(f"\ndti_cli: {job['where']} ({inputs['name']}) failed: {e}", file=sys.stderr)
            if summary:
                summary.job(inputs["name"], "failed", time.monotonic() - job_started, error=str(e))
            continue
        finally:
            common.LISTENERS.remove(progress)
        text = out["ui"]["text"][0]
        emb = out["result"][1]
        print(f"{text}\n-> {emb.path}")
        if summary:
            summary.job(inputs["name"], job_status(out), time.monotonic() - job_started, path=emb.path)
        if inputs.get("preview_every"):
            print(f"-> {write_preview(pack, out)}")
    return finish_run(summary, failed, len(jobs))


def finish_run(summary, failed: int, total: int) -> int:
    """The run's closing lines; the exit status (1 when a job failed)."""
    if summary:
        print(summary.close(), file=sys.stderr)
    if failed:
        print(f"dti_cli: {failed} of {total} job(s) failed", file=sys.stderr)
        return 1
    return 0


def job_status(out) -> str:
    """``reused`` when DTI Train found the file already holding this run's result, else ``trained``."""
    return "reused" if out["ui"]["text"][0].startswith("Reused ") else "trained"


def write_preview(pack, out) -> str:
    """The last preview of DTI Train's output ``out`` as ``NAME.preview.png`` beside the embedding."""
    path = os.path.splitext(out["result"][1].path)[0] + ".preview.png"
    _write_png(pack.nodes.previews.to_pil(out["result"][3]), path)
    return path


def check_ray_options(args) -> str | None:
    """The Ray options checked (Ray importable, the address answering); returns what ``ray.init`` takes."""
    from . import ray_runner

    if args.ray is None:
        raise UsageError("--actors is for --ray")
    if args.shard:
        raise UsageError("give either --ray or --shard: a Ray cluster hands out the jobs itself")
    if not args.output:
        raise UsageError("--ray needs --output FOLDER, on a disk that every Ray node sees")
    if args.actors is not None and args.actors < 1:
        raise UsageError(f"--actors {args.actors}: give 1 or more")
    ray_runner.import_ray()
    return ray_runner.check_address(args.ray)


def run_job(pack, loaded, job) -> dict:
    """DTI Train's ``run`` on one job, as ComfyUI's executor calls it; returns the node's output."""
    import torch

    model, clip, vae = loaded
    # The node reads image_folder under ComfyUI's input directory: make it this folder's parent.
    folder = Path(job["images"]).resolve()
    pack.comfy_host.paths.set_input_directory(str(folder.parent))
    with torch.inference_mode():
        return pack.nodes.train_node.DTITrain().run(model, clip, vae, image_folder=folder.name, **job["inputs"])


def write_atomic(path: str, write, suffix: str = ".tmp") -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then renamed onto it: never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=".dti-", suffix=suffix, dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_png(pil_image, path: str) -> None:
    write_atomic(path, lambda f: pil_image.save(f, format="PNG"), ".png.tmp")
