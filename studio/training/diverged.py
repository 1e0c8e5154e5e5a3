"""A run that turned NaN/inf (studio.training.events stops it at the first non-finite gradient, weight or logged
number): its adapter is rolled back to the last good checkpoint, or none is saved, and the run ends "failed" with
what happened and what to change. Whether or not the run has a held-out split."""
from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def roll_back(engine, job, trainer) -> dict:
    """The run hit NaN/inf: roll back to its last good checkpoint (its adapter becomes adapter/, checked
    finite), or save no adapter when there is none; either way the run failed and says why and what to do.
    Returns the run's 'done' event (the engine writes it once the run's memory is released)."""
    import shutil

    from studio.runs import checkpoints, folder
    from studio.training import health

    d = job.diverged
    cfg = job.config
    where = f" ({', '.join(d['names'])})" if d.get("names") else ""
    text = (f"Training stopped at step {d['step']}: the {d['what'] or 'training'} became NaN or infinite"
            f"{where}, so every later update would be garbage.")
    adapter = None
    good, skipped = folder.latest_checkpoint(job.run_dir) if is_main_process() else (None, [])
    if good is not None:
        engine.phase(job, "saving", f"Rolling back to {good.name}…")
        out = folder.adapter_dir(job.run_dir)
        trainer.save_model(str(out))  # the tokenizer and config; the weights come from the good checkpoint
        for f in good.glob("adapter_model*.safetensors"):
            shutil.copy2(f, out / f.name)
        weights = list(out.glob("adapter_model*.safetensors"))
        if weights and not any(checkpoints.non_finite_problem(f) for f in weights):
            adapter = str(out)
        else:  # never expected: the checkpoint was checked; never leave a non-finite adapter as the result
            shutil.rmtree(out, ignore_errors=True)
    if adapter:
        text += (f" The adapter was rolled back to {good.name} (the last good checkpoint) and saved to "
                 f"{adapter}; the run did not train to the end, so it is marked failed. To go on: "
                 f"{health.diverged_fix(cfg.train.learning_rate)}, then resume from {good.name}.")
    else:
        text += (" No finite checkpoint was saved before it, so no adapter was saved. "
                 f"{health.diverged_fix(cfg.train.learning_rate)}, then start the run again.")
    if is_main_process():
        engine._report_health(job)
    job.adapter_path = adapter
    job.error = text
    try:
        folder.write_error(job.run_dir, text + "\n")
    except OSError:
        pass
    engine.emit(job, "error", message=text)
    return dict(state="failed", adapter=adapter, step=d["step"], message=text)
