"""``python -m dti_cli --jobs jobs.toml --output DIR --ray [ADDRESS]``: the jobs file on a Ray cluster.

One actor per GPU (``num_gpus=1``; with ``--cpu``, CPU actors). Each actor loads the model once through
ComfyUI's loaders and trains the jobs it is handed one after another, with the same code as the
sequential run (``main.run_job``), so the files are the same. The driver feeds jobs as actors free up;
a job that fails, or whose actor dies, is tried once more on another actor, then reported. A dead actor
is replaced (at most as many times as there were actors). Ctrl-C kills the actors: every file is
written whole or not at all (the node writes a temp file and renames it).

Ray is optional (not in requirements.txt); it is imported only here, only when ``--ray`` is given.
Every node of the cluster needs ComfyUI, this pack and the model files at the same paths, and the
output folder on a shared disk (as for array jobs).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections import deque
from pathlib import Path

from .main import PACK_ROOT, UsageError, _clock, finish_run

ATTEMPTS = 2  # a job runs at most twice: once, then once more elsewhere
CONNECT_TIMEOUT_S = 5.0
WAIT_NOTICE_S = 120.0  # no actor placed by then: say so (a busy cluster), keep waiting


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray: Ray is not installed in this Python (it is optional): "
                         f"{sys.executable} -m pip install ray") from None
    return ray


def check_address(address: str | None) -> str | None:
    """``local`` -> None (start a Ray here); ``auto``/None -> "auto" (the cluster this machine is in);
    ``host:port`` or ``ray://host:port`` is checked with one TCP connection first, because ``ray.init``
    waits minutes on an address where nothing answers."""
    if address == "local":
        return None
    if address in (None, "", "auto"):
        return "auto"
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray {address}: give local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: no Ray cluster answers there "
                         f"({e.strerror or type(e).__name__ if not isinstance(e, socket.timeout) else 'timed out'})"
                         ) from None
    return address


class Trainer:
    """The Ray actor: ComfyUI and the model loaded once, then one job after another. ``progress`` answers
    while ``train`` runs (the actor runs two calls at a time; the driver never sends two jobs)."""

    def __init__(self, comfy_path: str, cpu: bool, model_paths: dict, output: str):
        from . import main as cli

        self.cli = cli
        self.pack = cli.setup_comfyui(Path(comfy_path), cpu)
        self.pack.comfy_host.paths.add_embedding_folder(output)
        started = time.monotonic()
        self.loaded = self.pack.comfy_host.loaders.load_model(model_paths)
        self.load_s = time.monotonic() - started
        self.state = {"job": None, "step": 0, "steps": 0}

    def where(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "load_s": self.load_s}

    def progress(self) -> dict:
        return dict(self.state)

    def train(self, job: dict) -> dict:
        common = self.pack.nodes.common
        name = job["inputs"]["name"]
        self.state = {"job": name, "step": 0, "steps": int(job["inputs"].get("steps", 0))}

        def listen(event, data):
            if event == "dti.progress":
                self.state = {"job": name, "step": int(data["step"]), "steps": int(data["steps"])}

        started = time.monotonic()
        common.LISTENERS.append(listen)
        try:
            out = self.cli.run_job(self.pack, self.loaded, job)
        except Exception as e:  # reported to the driver, which decides on the retry
            return {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started}
        finally:
            common.LISTENERS.remove(listen)
            self.state = {"job": None, "step": 0, "steps": 0}
        text = out["ui"]["text"][0]
        result = {"status": self.cli.job_status(out), "text": text,
                  "path": out["result"][1].path, "seconds": time.monotonic() - started}
        if job["inputs"].get("preview_every"):
            result["preview"] = self.cli.write_preview(self.pack, out)
        return result


class Progress:
    """The driver's one line: jobs done/total, what runs where, ETA from the rate so far."""

    def __init__(self, total: int, stream=None, every_s: float = 10.0):
        self.total, self.stream, self.every_s = total, stream or sys.stderr, every_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.last_key, self.last_time = None, 0.0

    def say(self, text: str, stream=None) -> None:
        """A message line; on a terminal it replaces the progress line, which the next show redraws."""
        stream = stream or self.stream
        if self.tty and stream is self.stream:
            stream.write("\r\033[K")
        stream.write(text + "\n")
        stream.flush()
        self.last_key = None

    def show(self, done: int, failed: int, running: dict[str, tuple[int, int]], force: bool = False) -> None:
        fraction = sum(step / steps for step, steps in running.values() if steps)
        work = done + failed + fraction
        elapsed = time.monotonic() - self.started
        eta = _clock(elapsed / work * (self.total - work)) if work > 0 else "?"
        jobs = ", ".join(f"{n} {s}/{t}" for n, (s, t) in sorted(running.items()))
        text = (f"dti_cli: ray: {done}/{self.total} done, {failed} failed, {len(running)} running"
                f"{' (' + jobs + ')' if jobs else ''}, ETA {eta}")
        now = time.monotonic()
        key = (done, failed, tuple(sorted(running)))
        if force and key == self.last_key:
            return
        if not (force or self.tty or key != self.last_key or now - self.last_time >= self.every_s):
            return
        self.last_key, self.last_time = key, now
        self.stream.write(("\r\033[K" + text) if self.tty else text + "\n")
        self.stream.flush()


def run(args, address: str | None, model_paths: dict, jobs: list[dict], comfy_path: Path, summary) -> int:
    """Train ``jobs`` on Ray actors at ``address`` (``check_address``'s answer: None starts a local Ray);
    returns the exit status (0, 1 when a job failed twice, 130 on Ctrl-C)."""
    ray = import_ray()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(PACK_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        if address is None:
            ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"--ray {args.ray}: cannot connect to Ray ({str(e).splitlines()[0]})") from None
    try:
        return _drive(ray, args, model_paths, jobs, comfy_path, summary)
    finally:
        ray.shutdown()


def _drive(ray, args, model_paths, jobs, comfy_path, summary) -> int:
    from ray.exceptions import RayActorError

    cluster = ray.cluster_resources()
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    if args.cpu:
        count, resources, have = args.actors or 1, {"num_cpus": 1}, cpus
    else:
        if not gpus:
            raise UsageError(f"--ray {args.ray or 'auto'}: the cluster has no GPU; add --cpu to train on CPU actors")
        count, resources, have = args.actors or gpus, {"num_gpus": 1}, gpus
    if count > have:  # Ray would leave the rest waiting for a device forever
        print(f"dti_cli: ray: {count} actors asked for, the cluster has {have} {'CPU' if args.cpu else 'GPU'}(s): "
              f"starting {have}", file=sys.stderr)
        count = have
    count = max(1, min(count, len(jobs)))
    actor_cls = ray.remote(Trainer).options(max_concurrency=2, **resources)
    spare = count  # replacements for actors that die
    output = str(Path(args.output).resolve())

    def start_actor():
        actor = actor_cls.remote(str(comfy_path), bool(args.cpu), model_paths, output)
        return actor, actor.where.remote()

    print(f"dti_cli: ray: {len(jobs)} job(s) on {count} {'CPU' if args.cpu else 'GPU'} actor(s) "
          f"(the cluster has {gpus} GPU(s)); files go to {output}", file=sys.stderr)
    starting = dict(start_actor() for _ in range(count))  # actor -> its where() future
    idle, labels = [], {}
    queue = deque({"job": job, "attempts": 0, "failed_on": set()} for job in jobs)
    running = {}  # future -> (actor, entry, started)
    done = failed = 0
    progress = Progress(len(jobs))
    polls = {}  # actor -> progress future
    last_steps = {}  # job -> (step, steps) last answered
    waited = False

    def retire(entry, error):
        nonlocal failed
        failed += 1
        name = entry["job"]["inputs"]["name"]
        progress.say(f"dti_cli: ray: {entry['job']['where']} ({name}) failed: {error}")
        if summary:
            summary.job(name, "failed", 0.0, error=error)

    def on_failure(entry, actor_label, error):
        entry["attempts"] += 1
        entry["failed_on"].add(actor_label)
        name = entry["job"]["inputs"]["name"]
        if entry["attempts"] < ATTEMPTS:
            progress.say(f"dti_cli: ray: {name} on {actor_label}: {error}; trying once more elsewhere")
            queue.appendleft(entry)
        else:
            retire(entry, error)

    try:
        while queue or running:
            # actors that finished loading
            if starting:
                ready, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)
                for actor in [a for a, f in starting.items() if f in ready]:
                    future = starting.pop(actor)
                    try:
                        where = ray.get(future)
                    except RayActorError as e:
                        progress.say(f"dti_cli: ray: an actor did not start: {_first_line(e)}")
                        continue
                    labels[actor] = f"actor {len(labels) + 1} (pid {where['pid']} on {where['node']})"
                    progress.say(f"dti_cli: ray: {labels[actor]} model loaded in {where['load_s']:.1f} s")
                    idle.append(actor)
            if not idle and not running and not starting:
                while queue:
                    retire(queue.popleft(), "no actor could start (see above)")
                break
            # hand out work: a retried job prefers an actor it has not failed on
            for actor in list(idle):
                if not queue:
                    break
                entry = next((e for e in queue if labels[actor] not in e["failed_on"]), None)
                if entry is None:
                    others = [a for a in list(idle) + [r[0] for r in running.values()] if a is not actor]
                    if others or starting:
                        continue  # wait for another actor
                    entry = queue[0]  # the only actor left: the second try runs here
                queue.remove(entry)
                idle.remove(actor)
                running[actor.train.remote(entry["job"])] = (actor, entry, time.monotonic())
                progress.say(f"dti_cli: ray: {entry['job']['inputs']['name']} started on {labels[actor]}")
            if not running:
                if not labels and time.monotonic() - progress.started > WAIT_NOTICE_S and not waited:
                    waited = True
                    progress.say(f"dti_cli: ray: no actor has started after {WAIT_NOTICE_S:.0f} s: the cluster may "
                                 f"have no free {'CPU' if args.cpu else 'GPU'} (ray status shows what it holds)")
                ray.wait(list(starting.values()), num_returns=1, timeout=1.0)
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for future in finished:
                actor, entry, started = running.pop(future)
                polls.pop(actor, None)
                name = entry["job"]["inputs"]["name"]
                try:
                    result = ray.get(future)
                except RayActorError as e:
                    progress.say(f"dti_cli: ray: {labels[actor]} died during {name} ({_first_line(e)})")
                    on_failure(entry, labels[actor], f"its actor died: {_first_line(e)}")
                    if spare > 0:
                        spare -= 1
                        new, where_future = start_actor()
                        starting[new] = where_future
                    continue
                idle.append(actor)
                if result["status"] == "failed":
                    on_failure(entry, labels[actor], result["error"])
                    continue
                done += 1
                progress.say(f"{result['text']}\n-> {result['path']}" +
                             (f"\n-> {result['preview']}" if result.get("preview") else ""), sys.stdout)
                if summary:
                    summary.job(name, result["status"], result["seconds"], path=result["path"])
            # step progress of the running jobs (answered by the actors between steps)
            for actor, _, _ in running.values():
                polls.setdefault(actor, actor.progress.remote())
            answered, _ = ray.wait(list(polls.values()), num_returns=len(polls), timeout=0) if polls else ([], [])
            steps = {}
            for actor in [a for a, f in polls.items() if f in answered]:
                try:
                    state = ray.get(polls.pop(actor))
                except RayActorError:
                    continue
                if state["job"]:
                    steps[state["job"]] = (state["step"], state["steps"])
            for _, entry, _ in running.values():
                name = entry["job"]["inputs"]["name"]
                steps.setdefault(name, last_steps.get(name, (0, entry["job"]["inputs"].get("steps", 0))))
            last_steps = steps
            progress.show(done, failed, steps)
    except KeyboardInterrupt:
        names = [entry["job"]["inputs"]["name"] for _, entry, _ in running.values()]
        progress.say(f"dti_cli: ray: interrupted; stopping the actors ({', '.join(names) or 'no job'} running, "
                     f"{len(queue)} not started). Files are whole or absent: run again to train what is left.")
        for actor in list(idle) + [r[0] for r in running.values()] + list(starting):
            ray.kill(actor)
        if summary:
            print(summary.close(), file=sys.stderr)
        return 130
    progress.show(done, failed, {}, force=True)
    if progress.tty:
        sys.stderr.write("\n")
    return finish_run(summary, failed, len(jobs))


def _first_line(error) -> str:
    """What went wrong, in one line: Ray's first line, or, where an actor's start raised (a file missing on
    that node), the exception's own last line instead of Ray's preamble."""
    lines = [x for x in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() if x.strip()]
    if not lines:
        return type(error).__name__
    if "creation task" not in lines[0]:
        return lines[0]
    raised = [i for i, x in enumerate(lines) if re.match(r"[A-Za-z_.]*(Error|Exception)\b", x)]
    return " ".join(x.strip() for x in lines[raised[-1] if raised else -1:])
