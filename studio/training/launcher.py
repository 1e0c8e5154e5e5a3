"""Training on several GPUs from the Train tab: `accelerate launch -m studio train` in a subprocess.

The Train tab trains in its own process's background thread on one device. With more than one GPU visible it also
offers "all N GPUs (data-parallel)": ``launch`` starts ``accelerate launch --num_processes N -m studio train RUN.yaml``
(every rank runs the same engine; rank 0 writes the run folder), and the tab watches the run through its folder's
event log and stops it through its stop request, like any run another process trains (``studio.runs.live``). On a
CPU machine the same launcher runs two CPU processes (the test of this module). Note: accelerate 1.16's
``--cpu --num_processes 2`` starts ONE process on a single machine (several CPU processes need mpirun there), so
``cpu=True`` with more than one process launches through torchrun (``--multi_gpu``) with no CUDA device visible:
each rank trains on the CPU over gloo.

No Gradio here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from studio import paths
from studio.config.run import RunConfig
from studio.runs import folder

LAUNCH_DIR = "launches"  # under the studio home: the launched runs' configs and console logs


@dataclass
class Launch:
    """A launched run: its process (``accelerate launch``), run folder and console log."""

    process: subprocess.Popen
    config: RunConfig
    log: Path
    command: list[str]

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop_processes(self) -> None:
        """Kill the launcher and its ranks (its own process group). A run's Stop is ``live.request_stop`` instead:
        this is for a launch that must end now (a test's cleanup); its run then reads 'interrupted'."""
        import signal

        import psutil

        try:  # torchrun starts each rank in a session of its own: the ranks by parentage, then the launcher's group
            ranks = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            ranks = []
        for p in ranks:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


def gpu_choices(count: int) -> list[tuple[str, int]]:
    """What the Train tab offers: one GPU, and with several visible, all of them (data-parallel)."""
    out = [("this process (one GPU or the CPU)", 1)]
    if count > 1:
        out.append((f"all {count} GPUs (data-parallel)", count))
    return out


def command(config_path: str | Path, processes: int, cpu: bool = False, resume_from: str | None = None) -> list[str]:
    """The command line: ``accelerate launch [--cpu] --num_processes N -m studio train CONFIG [--resume ...]``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cpu and processes == 1:
        cmd.append("--cpu")
    elif processes > 1:  # torchrun: one process per rank (with cpu, no CUDA device is visible to them: gloo)
        cmd.append("--multi_gpu")
    cmd += ["-m", "studio", "train", str(config_path)]
    if resume_from:
        cmd += ["--resume", str(resume_from)]
    return cmd


def launch(cfg: RunConfig, processes: int, cpu: bool = False, resume_from: str | None = None,
           env: dict | None = None) -> Launch:
    """Start ``cfg`` under ``accelerate launch`` with ``processes`` ranks; returns at once. A fresh start takes a
    free run name first (every rank must train into the same folder); its events go to the run folder's
    events.jsonl, its console output to ``<studio home>/launches/NAME.log``."""
    if resume_from is None:
        cfg, _ = folder.new_run(cfg)
    where = paths.home() / LAUNCH_DIR
    where.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config_path = cfg.save(where / f"{cfg.name}-{stamp}.yaml")
    log = where / f"{cfg.name}-{stamp}.log"
    cmd = command(config_path, processes, cpu=cpu, resume_from=resume_from)
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        run_env["CUDA_VISIBLE_DEVICES"] = ""
        run_env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=run_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=os.getcwd(), start_new_session=True)
    return Launch(proc, cfg, log, cmd)
