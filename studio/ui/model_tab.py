"""Model & preset tab: the card, the model and the KTO recipe; a memory estimate and auto-fit; downloads and cache."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from studio import safepaths
from studio.models import hub, load as models, repo_size
from studio.training import autofit, memory, plan as planner
from studio.config import presets
from studio.ui.widgets import collect, field_component

FIELDS = [("model", "name_or_path"), ("model", "backend"), ("model", "load_in_4bit")]
PATH_LABELS = {"unsloth": "Unsloth 4-bit", "bnb": "bitsandbytes 4-bit", "full": "full precision"}
DETECTED = planner.DETECTED


def device_markdown(d=None) -> str:
    d = d or models.detect_device()
    mem = f", {d.total_gib} GiB ({d.free_gib} free)" if d.total_gib else ""
    cc = f", compute capability {d.compute_capability}" if d.compute_capability else ""
    flags = ", ".join(f"{k}: {'yes' if getattr(d, k) else 'no'}" for k in ("unsloth", "bitsandbytes", "flash_attn"))
    notes = "".join(f"\n\n> {n}" for n in d.notes)
    dtype = "bf16" if d.bf16 and d.kind == "cuda" else ("fp16 (no bf16 on this card)" if d.kind == "cuda" else "float32")
    return f"**Device:** {d.name} ({d.kind}{mem}{cc}; compute dtype {dtype})  \n{flags}{notes}"


# ---- presets -----------------------------------------------------------------------------------------------------

def gpu_choices(device) -> list[tuple[str, str]]:
    out = [(p.title, p.key) for p in presets.list_presets("gpu")]
    if device.kind == "cuda" and device.total_gib:
        out.insert(0, (f"This GPU: {device.name} ({device.total_gib} GiB)", DETECTED))
    return out


def default_gpu(device) -> str:
    if device.kind == "cuda":
        return DETECTED
    return "mps" if device.kind == "mps" else "cpu"


def budget_for(gpu_key: str, device) -> tuple[float | None, str]:
    """(GiB PyTorch may use, device kind) for a GPU preset, or for this machine's card."""
    return planner.budget_for(gpu_key, device)


def model_choices() -> list[tuple[str, str]]:
    out = []
    for p in presets.list_presets("models"):
        gated = " · gated" if p.get("gated") else ""
        out.append((f"{p.title} · {p.get('tier')}{gated}", p.key))
    return out + [("Any hub id / local folder / GGUF (type it below)", presets.OTHER_MODEL)]


def model_choice_for(name_or_path: str) -> str:
    p = presets.find_model(name_or_path)
    return p.key if p else presets.OTHER_MODEL


def recipe_choices() -> list[tuple[str, str]]:
    return [(p.title, p.key) for p in presets.list_presets("recipes")]


def preset_info(model_key: str, recipe_key: str, source: str | None = None) -> str:
    """The model preset and the recipe in words; ``source``: the repo the run config will load (the preset's 4-bit
    copy on a CUDA card, its 16-bit repo elsewhere), whose download size is shown."""
    lines = []
    if model_key and model_key != presets.OTHER_MODEL:
        p = presets.get("models", model_key)
        gate = (" **Gated:** accept the licence on the hub and add a token below — or use Unsloth's pre-quantized "
                f"copy `{p.get('unsloth_id')}` on a CUDA GPU (no token)." if p.get("gated") else "")
        repo = source if source and presets.find_model(source) == p else p.get("hub_id")
        size = repo_size.download_size(repo) if repo else None
        size = f", {size.describe()}" if size else ""
        lines.append(f"**{p.title}** — hub `{p.get('hub_id')}`"
                     + (f", 4-bit `{p.get('unsloth_id')}`" if p.get("unsloth_id") else "")
                     + f"; licence: {p.get('licence')}{size}.{gate}")
        if p.description:  # what was measured with this model (e.g. a path that fails)
            lines.append(p.description)
    if recipe_key:
        r = presets.get("recipes", recipe_key)
        lines.append(f"**Recipe {r.title}** (effective batch {r.get('effective_batch')}): {r.description}")
    return "\n\n".join(lines)


# ---- memory ------------------------------------------------------------------------------------------------------

def chart_frame(plan: autofit.CardPlan | None) -> pd.DataFrame:
    rows = []
    if plan is not None:
        for path, e in plan.estimates.items():
            for k in memory.COMPONENTS:
                rows.append({"path": PATH_LABELS.get(path, path), "part": memory.COMPONENT_LABELS[k],
                             "GiB": round(e.components[k], 3)})
    return pd.DataFrame(rows, columns=["path", "part", "GiB"])


def plan_markdown(plan: autofit.CardPlan, applied: bool, unsloth_installed: bool = False) -> str:
    if plan.budget_gib is None:
        return plan.message
    head = f"**Budget: {plan.budget_gib:g} GiB** for {plan.arch.label()}"
    lines = [head, "", "| path | fits | max_length | batch | accumulation | effective batch | memory savers | "
             "predicted peak |", "|---|---|---|---|---|---|---|---|"]
    for path, f in plan.fits.items():
        e = f.estimate
        peak = f"{e.total_gib:.2f} GiB" if e is not None else "–"
        if f.ok:
            lines.append(f"| {PATH_LABELS[path]} | yes | {f.seq} | {f.batch} | {f.grad_accum} | {f.effective_batch} | "
                         f"{savers_label(f)} | {peak} |")
        else:
            lines.append(f"| {PATH_LABELS[path]} | **no** | – | – | – | – | – | {peak} |")
    lines.append("")
    if plan.path is None:
        lines.append(f"**Does not fit:** {plan.message}")
    elif applied:
        f = plan.fits[plan.path]
        lines.append(f"Applied for the {PATH_LABELS[plan.path]} path: max_length **{f.seq}**, per-device batch "
                     f"**{f.batch}**, gradient accumulation **{f.grad_accum}** (effective batch {f.effective_batch})"
                     + (f", memory savers: {savers_label(f)}" if f.micro_batch else "") + ".")
    other = other_path_line(plan, unsloth_installed)
    if other:
        lines += ["", other]
    lines += [f"> {n}" for n in plan_notes(plan)]
    return "\n".join(lines)


def plan_notes(plan: autofit.CardPlan) -> list[str]:
    """What the estimates say about their settings: the applied path's; with none applied, those of the paths that
    fit (a path that does not fit has no settings to explain). Each note once: a note several paths share (e.g.
    "Gradients are taken 1 row(s) at a time …", whose row count differs per path) is said for the first of them."""
    if plan.path in plan.estimates:
        notes = plan.estimates[plan.path].notes
    else:
        notes = [n for path, e in plan.estimates.items() if path in plan.fits and plan.fits[path].ok for n in e.notes]
    said: dict[str, str] = {}
    for n in notes:
        said.setdefault(n.split(";")[0], n)
    return list(said.values())


def other_path_line(plan: autofit.CardPlan, unsloth_installed: bool = False) -> str:
    """The Unsloth plan, when the run cannot take that path here (not installed) but it would train more."""
    f = plan.fits.get("unsloth")
    if f is None or not f.ok or plan.path == "unsloth" or unsloth_installed:
        return ""
    chosen = plan.fits.get(plan.path) if plan.path else None
    if chosen is not None and (chosen.seq, chosen.batch) >= (f.seq, f.batch):
        return ""
    return (f"With Unsloth installed you could train at max_length {f.seq} x batch {f.batch} "
            f"({f.estimate.total_gib:.2f} GiB predicted): `pip install unsloth` (see the README's GPU notes); "
            "the plan above is for what is installed.")


def savers_label(f: autofit.Fit) -> str:
    if not f.micro_batch:
        return "–"
    return f"gradients {f.micro_batch} row{'s' if f.micro_batch > 1 else ''} at a time"


def preferred_path(cfg, device) -> str | None:
    """The 4-bit path a run takes with what is installed here (Unsloth only where it is installed)."""
    return planner.installed_path(device)


def cpu_markdown(p: planner.Plan, applied: bool) -> str:
    cfg, d = p.config, p.duration
    est = p.card_plan.estimates.get("full") if p.card_plan else None
    mem = f", about {est.total_gib:.1f} GiB of system memory" if est else ""
    t = cfg.train
    cap = f"**{t.max_steps}** optimizer steps (a cap: the whole data would take longer)" if t.max_steps > 0 else \
        "all epochs"
    lines = [f"**CPU only:** full-precision LoRA on the CPU{mem}. "
             + ("Planned for this machine" if applied else "Current settings")
             + f": max_length **{cfg.kto.max_length}**, per-device batch **{t.per_device_train_batch_size}** x "
               f"accumulation **{t.gradient_accumulation_steps}**, gradient checkpointing "
               f"**{'on' if t.gradient_checkpointing else 'off'}**, {cap}."]
    if applied and p.card_plan is not None:
        lines.append("max_length covers 90% of your training rows whole (longer ones are truncated).")
    if cfg.data.eval_max_rows:
        lines.append(f"Held-out rows: at most **{cfg.data.eval_max_rows}** (whole prompts), scored by the base model "
                     "before training and by the tuned one during and after it.")
    if d is not None:
        lines.append(f"**Expected duration: {d.describe()}.**" + "".join(f" {n}" for n in d.notes))
    return "\n\n".join(lines)


# ---- the tab -----------------------------------------------------------------------------------------------------

def fit_view(studio, device, gpu_key: str, recipe_key: str | None, seq_ceiling, apply: bool = True,
             model_key: str | None = None, recipe_changed: bool = False, version: int | None = None):
    """(markdown, chart update) of the plan for the current config on the chosen card (``studio.training.plan``, the
    same plan the Train tab shows); ``apply`` re-plans everything the card decides (path, budget, max_length,
    batch, accumulation, memory savers; on a CPU checkpointing and a step cap) and writes it into the config.
    ``version``: the user choice this plan is for (``Studio.begin``); None when a newer choice came while it was
    planned (a slow lookup): the result is dropped, neither written nor shown."""
    if version is None:
        version = studio.begin()
    if apply:
        studio.card = gpu_key  # the user's choice itself is known at once; only its plan takes time
    p = planner.plan(studio.config, gpu_key, device, model_key=model_key, recipe_key=recipe_key,
                     seq_ceiling=seq_ceiling, apply=apply, apply_recipe=recipe_changed)
    if not (studio.apply(p.config, version) if apply else studio.current(version)):
        return None
    studio.card = gpu_key
    run_plan = planner.run_plan_markdown(p.config, gpu_key, device)  # what a run here will use
    run_plan = f"\n\n{run_plan}" if run_plan else ""
    if p.error:
        return f"**No estimate:** {p.error}{run_plan}", chart(None)
    if p.device_kind == "cpu":
        return cpu_markdown(p, apply) + run_plan, chart(p.card_plan)
    return plan_markdown(p.card_plan, apply, device.unsloth) + run_plan, chart(p.card_plan)


def chart(plan: autofit.CardPlan | None) -> dict:
    """The stacked breakdown per path; the title carries the budget the bars are measured against."""
    title = "Predicted peak GPU memory"
    if plan is not None and plan.budget_gib is not None:
        title += f" (budget {plan.budget_gib:g} GiB)"
    elif plan is not None:
        title = "Predicted peak memory (system RAM on CPU / MPS)"
    return gr.update(value=chart_frame(plan), title=title)


def cache_view():
    items = hub.cached_models()
    frame = pd.DataFrame([[m.name, m.kind, m.size_gb, m.path] for m in items],
                         columns=["model", "kind", "size (GB)", "path"])
    token_line = " · a Hugging Face token is stored" if hub.has_token() else ""
    return hub.describe_cache(items) + token_line, frame, gr.update(choices=[m.name for m in items], value=None)


def build(studio, tab: gr.Tab | None = None):
    device = models.detect_device()
    start_gpu, start_recipe = studio.card or default_gpu(device), studio.recipe
    start_model = model_choice_for(studio.config.model.name_or_path)
    first_md, first_chart = fit_view(studio, device, start_gpu, start_recipe, memory.DEFAULT_SEQ_CEILING, apply=False)
    first_cache_md, first_cache, _ = cache_view()

    gr.Markdown(device_markdown(device), elem_id="device-info")
    with gr.Row():
        gpu = gr.Dropdown(gpu_choices(device), value=start_gpu, label="Your card",
                          info="Sets how the model is loaded and the memory auto-fit plans with.", elem_id="gpu-preset")
        model_pick = gr.Dropdown(model_choices(), value=start_model, label="Model",
                                 info="Small to 8B instruct models; gated ones need a licence click and a token.",
                                 elem_id="model-preset")
        recipe = gr.Dropdown(recipe_choices(), value=start_recipe, label="KTO recipe",
                             info="Learning rate, beta and the effective batch.", elem_id="recipe-preset")
    info = gr.Markdown(preset_info(start_model, start_recipe, studio.config.model.name_or_path), elem_id="preset-info")
    comps = [field_component(studio.config, s, n) for s, n in FIELDS]
    with gr.Row():
        ceiling = gr.Number(memory.DEFAULT_SEQ_CEILING, label="Longest sequence to allow (tokens)", precision=0,
                            minimum=memory.MIN_SEQ, info="Auto-fit picks the longest max_length up to this, then the "
                            "largest batch.", elem_id="seq-ceiling")
        fit_btn = gr.Button("Auto-fit to this card", variant="primary", elem_id="autofit")
    fit_md = gr.Markdown(first_md, elem_id="fit-settings")
    chart_plot = gr.BarPlot(first_chart["value"], x="path", y="GiB", color="part", title=first_chart["title"],
                            y_title="GiB", height=300, elem_id="memory-chart")
    msg = gr.Markdown(elem_id="model-message")

    with gr.Accordion("Download & model cache", open=False):
        with gr.Row():
            dl_btn = gr.Button("Download the model now", elem_id="download")
            token = gr.Textbox(label="Hugging Face token (for gated models)", type="password", elem_id="hf-token",
                               placeholder="hf_…  (stored by huggingface_hub's login, never in the studio's files)")
            token_btn = gr.Button("Save token", elem_id="save-token")
        dl_md = gr.Markdown(elem_id="download-message")
        cache_md = gr.Markdown(first_cache_md, elem_id="cache-info")
        cache_table = gr.Dataframe(first_cache, interactive=False, elem_id="cache-table")
        with gr.Row():
            to_delete = gr.Dropdown(list(first_cache["model"]), value=None, label="Delete a cached model",
                                    elem_id="cache-delete-pick")
            del_btn = gr.Button("Delete", variant="stop", elem_id="cache-delete")

    # handlers with several outputs return {component: value}
    def field_values() -> dict:
        c = studio.config
        return {comp: getattr(getattr(c, s), n) for comp, (s, n) in zip(comps, FIELDS)}

    def plan_view(md_and_chart) -> dict | None:
        if md_and_chart is None:  # a newer choice came while this one was planned: it wins
            return None
        md, frame = md_and_chart
        return {fit_md: md, chart_plot: frame}

    def info_view(model_key, recipe_key) -> str:  # after the plan: the card decides which repo is downloaded
        return preset_info(model_key, recipe_key, studio.config.model.name_or_path)

    # every choice re-plans the whole card (studio.training.plan): nothing planned for an earlier card or model stays
    def on_gpu(gpu_key, model_key, recipe_key, seq_ceiling):
        view = plan_view(fit_view(studio, device, gpu_key, recipe_key, seq_ceiling, model_key=model_key))
        if view is None:
            return gr.skip()
        return {**view, info: info_view(model_key, recipe_key), **field_values()}

    def on_model(model_key, gpu_key, recipe_key, seq_ceiling):
        view = plan_view(fit_view(studio, device, gpu_key, recipe_key, seq_ceiling, model_key=model_key))
        if view is None:
            return gr.skip()
        return {**view, info: info_view(model_key, recipe_key), **field_values()}

    def on_recipe(recipe_key, model_key, gpu_key, seq_ceiling):
        studio.recipe = recipe_key
        view = plan_view(fit_view(studio, device, gpu_key, recipe_key, seq_ceiling, recipe_changed=True))
        if view is None:
            return gr.skip()
        return {**view, info: info_view(model_key, recipe_key)}

    def on_fit(gpu_key, recipe_key, seq_ceiling):
        return fit_view(studio, device, gpu_key, recipe_key, seq_ceiling) or gr.skip()

    def on_fields(*values):
        try:
            changes = collect(FIELDS, values)
            # a local model folder or .gguf file only where the web UI may read (a hub id or the bundled model as is)
            model = safepaths.ui_model(changes["model.name_or_path"])
            changes["model.name_or_path"] = str(model) if model is not None else changes["model.name_or_path"]
            cfg = studio.update(changes)
            return f"Model: `{cfg.model.name_or_path}`", gr.update(value=model_choice_for(cfg.model.name_or_path))
        except ValueError as e:
            return f"**{e}**", gr.update()

    def on_download(progress=gr.Progress()):
        name = studio.config.model.name_or_path
        try:
            if not hub.is_hub_id(name):
                src = models.resolve_source(name)
                return f"`{name}` is a {src.kind} model: nothing to download.", *cache_view()
            path = hub.download(name, progress=lambda done, total, m: progress(
                done / total if total else None, desc=f"{m}: {done / 1e9:.2f} / {total / 1e9:.2f} GB"))
            return f"Ready: `{name}` in `{path}`", *cache_view()
        except (hub.HubError, models.ModelLoadError) as e:
            return f"**{e}**", *cache_view()

    def on_token(value):
        try:
            return hub.login(value), ""
        except hub.HubError as e:
            return f"**{e}**", ""

    def on_delete(name):
        if not name:
            return "Pick a model to delete.", *cache_view()
        try:
            freed = hub.delete_cached(name)
            return f"Deleted `{name}`: {freed / 1e9:.2f} GB freed.", *cache_view()
        except hub.HubError as e:
            return f"**{e}**", *cache_view()

    gpu.input(on_gpu, [gpu, model_pick, recipe, ceiling], [info, fit_md, chart_plot, *comps])
    model_pick.input(on_model, [model_pick, gpu, recipe, ceiling], [info, fit_md, chart_plot, *comps])
    recipe.input(on_recipe, [recipe, model_pick, gpu, ceiling], [info, fit_md, chart_plot])
    fit_btn.click(on_fit, [gpu, recipe, ceiling], [fit_md, chart_plot])
    for c in comps:
        c.input(on_fields, comps, [msg, model_pick])
    dl_btn.click(on_download, None, [dl_md, cache_md, cache_table, to_delete], concurrency_limit=1)
    token_btn.click(on_token, token, [dl_md, token])
    del_btn.click(on_delete, to_delete, [dl_md, cache_md, cache_table, to_delete])

    # a refreshed page (or a run opened from the history) shows the studio's current config, not the one at start
    def on_load(seq_ceiling):
        """The card, model and recipe the studio holds, and the plan of its current config (not a re-plan); nothing
        when the user made a choice while it was drawn (that choice's handler shows its own result)."""
        version = studio.version
        card = studio.card or default_gpu(device)
        model_key = model_choice_for(studio.config.model.name_or_path)
        view = plan_view(fit_view(studio, device, card, studio.recipe, seq_ceiling, apply=False, version=version))
        if view is None:
            return gr.skip()
        return {**field_values(), gpu: card, model_pick: model_key, recipe: studio.recipe,
                info: info_view(model_key, studio.recipe), **view}

    shown = [*comps, gpu, model_pick, recipe, info, fit_md, chart_plot]
    app = gr.context.Context.root_block
    if app is not None:
        app.load(on_load, ceiling, shown)
    if tab is not None:  # shown again: the plan of the config as it is now (the Data tab's save re-plans it)
        tab.select(on_load, ceiling, shown, show_progress="hidden")

