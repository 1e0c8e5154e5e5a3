"""Chat tab: base vs tuned side by side, 👍/👎 into a feedback data set, held-out evaluation, export.

Thin: the work is done by studio.tuned.chat (one model in memory, adapter toggled), studio.data.feedback, studio.tuned.evaluate and
studio.tuned.export.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.tuned import evaluate, export, gguf_quant
from studio.data import feedback
from studio import paths, safepaths
from studio.ui import inert
from studio.tuned.chat import (ChatModel, GenerationSettings, Turn, build_messages, content_text, list_adapters,
                         newest)

NO_ADAPTER = ("No trained adapter yet: train a run in the **Train** tab (or let it reach its first checkpoint); "
              "the list refreshes when a run ends.")
MULTI_TURN = ("The chat is **multi-turn**: each side sees its own earlier questions and replies. Press **Clear** to "
              "start a new conversation.")
CUT_MARK = "\n\n✂️ *cut off at {n} new tokens: raise **max new tokens** to see more*"


def cut_mark(n: int) -> str:
    return CUT_MARK.format(n=n)


def _strip_mark(text: str) -> str:
    """A reply as the model wrote it: the cut-off mark is the studio's, never sent back to the model."""
    i = text.find("\n\n✂️ *cut off at ")
    return text[:i] if i >= 0 else text


def _chat(studio) -> ChatModel:
    if getattr(studio, "chat", None) is None:
        studio.chat = ChatModel()  # one model per studio, shared by every browser tab
    return studio.chat


def adapter_choices() -> tuple[list[tuple[str, str]], str | None]:
    """Dropdown choices (label, adapter path) and the one to preselect: the newest run's adapter."""
    adapters = list_adapters()
    pick = newest(adapters)
    return [(a.label, str(a.path)) for a in adapters], (str(pick.path) if pick else None)


def _plain(history) -> list[dict]:
    """What was said, from what the Chatbots show (user text escaped, replies' HTML and images escaped:
    studio.ui.inert)."""
    return [{"role": m["role"], "content": _strip_mark(content_text(m.get("content")))}
            for m in inert.said([m for m in (history or []) if isinstance(m, dict)
                                 and m.get("role") in ("user", "assistant")])]


def feedback_md() -> str:
    """The ratings counter: every row of the ratings file, those the A/B (blind) votes added included."""
    from studio.tuned.votes import FEEDBACK_SIDE

    c = feedback.counts()
    from_votes = sum(1 for r in feedback.load_rows() if r.get("side") == FEEDBACK_SIDE)
    votes_part = f", {from_votes} of them from A/B votes" if from_votes else ""
    return (f"Rate any reply with 👍 / 👎: it becomes a KTO row in `{feedback.feedback_path()}` "
            f"(**{c['rows']}** rows so far: {c['desirable']} 👍, {c['undesirable']} 👎{votes_part}). Load that "
            "file in the **Data** tab for the next run.")


def eval_views(result):
    """Heading, table and chart of a stored or fresh evaluation (as ``evaluate.read_eval`` returns it)."""
    if not result:
        return "No evaluation stored for this run yet.", pd.DataFrame(columns=evaluate.TABLE_COLUMNS), \
            pd.DataFrame(columns=["completions", "model", "mean log-prob"])
    verdict = result.get("verdict") or evaluate.verdict(result)
    icon = {evaluate.LEARNED: "✅", evaluate.DEGENERATED: "🛑"}.get(verdict.get("word"), "➖")
    head = (f"{icon} **{verdict.get('word')}** — {evaluate.verdict_line(result)}  \n"
            f"**{result['adapter_label']}** on {result['n_rows']} held-out rows from `{result['data']}` "
            f"({result['n_desirable']} desirable, {result['n_undesirable']} undesirable, {result['n_pairs']} paired "
            f"prompts; β = {result['beta']}) · {result['created']} · stored in `{result['run_dir']}/eval.json`")
    if result.get("note"):
        head += f"  \n{result['note']}"
    table = pd.DataFrame(evaluate.summary_table(result), columns=evaluate.TABLE_COLUMNS)
    chart = pd.DataFrame(evaluate.chart_rows(result))
    if not chart.empty:
        chart["completions"] = chart["completions"] + " · " + chart["model"]
    return head, table, chart


def _y_lim(chart: pd.DataFrame) -> list[float]:
    # log-probs are negative: bars hang down from 0, so the axis must reach 0
    low = float(chart["mean log-prob"].min()) if not chart.empty else -1.0
    return [min(low * 1.15, -1.0), 0.0]


def _chart_value(chart: pd.DataFrame):
    # None, never an empty frame: the browser sizes a chart's axes from the first frame it gets, and a chart that
    # first got an empty one stayed empty after the evaluation filled the table beside it
    return None if chart.empty else chart


def eval_outputs(result):
    head, table, chart = eval_views(result)
    return head, table, gr.update(value=_chart_value(chart), y_lim=_y_lim(chart))


def build(studio, tab: gr.Tab | None = None):
    chat = _chat(studio)
    choices, first = adapter_choices()
    turns = gr.State({"base": {}, "tuned": {}})

    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(choices=choices, value=first, scale=4,
                              label="Tuned side: adapter", elem_id="chat-adapter",
                              info="Any run's final adapter or checkpoint. The base side is the same model with "
                                   "the adapter switched off.")
        refresh = gr.Button("↻", scale=0, min_width=60, elem_id="chat-refresh")
    status = gr.Markdown(chat.describe() if chat.loaded else ("" if choices else NO_ADAPTER), elem_id="chat-status")
    with gr.Accordion("Prompt and sampling (the same for both sides)", open=False):
        system = gr.Textbox(label="System prompt (optional)", lines=2, elem_id="chat-system")
        with gr.Row():
            max_new = gr.Slider(16, 1024, value=200, step=8, label="max new tokens", elem_id="chat-max-new")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)",
                                    elem_id="chat-temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p", elem_id="chat-top-p")
            seed = gr.Number(0, precision=0, label="seed (both sides)", elem_id="chat-seed")
    with gr.Row():
        base_box = gr.Chatbot(label="Base model (adapter off)", elem_id="chat-base", height=380)
        tuned_box = gr.Chatbot(label="Tuned (adapter on)", elem_id="chat-tuned", height=380)
    with gr.Row(equal_height=True):
        msg = gr.Textbox(placeholder="Ask both models… (the conversation continues until you press Clear)",
                         show_label=False, scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=0, min_width=90, elem_id="chat-send")
        clear = gr.Button("Clear", scale=0, min_width=90, elem_id="chat-clear")
    gr.Markdown(MULTI_TURN, elem_id="chat-multi-turn")
    fb = gr.Markdown(feedback_md(), elem_id="chat-feedback")
    if tab is not None:  # A/B votes add rows to the same file: count again whenever this tab is shown
        tab.select(feedback_md, None, fb, show_progress="hidden")

    with gr.Accordion("Held-out evaluation: base vs tuned", open=False):
        gr.Markdown("Scores the held-out rows with the adapter off and on: mean log-prob of desirable and "
                    "undesirable completions, how often the desirable completion of a paired prompt outranks the "
                    "undesirable one, and the implicit rewards β·(log π_tuned − log π_base) as in training. "
                    "Headless: `python -m studio eval RUN_DIR`.")
        with gr.Row():
            eval_data = gr.Textbox(label="Held-out file", scale=3, elem_id="chat-eval-data",
                                   placeholder="empty: the run's eval file or held-out split")
            eval_limit = gr.Number(200, precision=0, minimum=2, label="at most N rows", elem_id="chat-eval-limit")
            eval_btn = gr.Button("Evaluate", scale=0, min_width=110, elem_id="chat-eval-run")
        head0, table0, chart0 = eval_views(_stored_eval(first) if first else None)
        eval_status = gr.Markdown(head0, elem_id="chat-eval-status")
        with gr.Row():
            eval_table = gr.Dataframe(table0, interactive=False, elem_id="chat-eval-table", scale=3)
            eval_plot = gr.BarPlot(_chart_value(chart0), x="completions", y="mean log-prob", color="model", height=260,
                                   y_lim=_y_lim(chart0), title="mean log-prob per completion (higher = more likely)",
                                   elem_id="chat-eval-plot", scale=2)

    with gr.Accordion("Export", open=False):
        gr.Markdown("**adapter**: the LoRA folder · **merged**: full model in safetensors (merged in float32 into "
                    "the base's 16-bit weights; a 4-bit-stored base dequantized as its kernel does) · **gguf**: one "
                    "file for llama.cpp / Ollama (Llama, Mistral, Qwen2 families) with a Modelfile, in the type "
                    "below · **gguf-adapter**: the LoRA alone as a llama.cpp adapter (tens of MB) with a Modelfile "
                    "that applies it to the base model in Ollama. Each export is loaded back and checked, and "
                    "offered for download. Headless: `python -m studio export RUN_DIR --format gguf --gguf-type "
                    "q4_k_m --out PATH`.", elem_id="chat-export-help")
        with gr.Row():
            fmt = gr.Radio(list(export.FORMATS), value="adapter", label="Format", elem_id="chat-export-format")
            gguf_type = gr.Dropdown([(f"{t} — {gguf_quant.DESCRIPTIONS[t]}", t) for t in gguf_quant.TYPES],
                                    value=gguf_quant.DEFAULT_TYPE, label="GGUF type", visible=False,
                                    elem_id="chat-export-gguf-type")
        with gr.Row():
            out = gr.Textbox(label="Export to", scale=3, elem_id="chat-export-out",
                             placeholder=f"empty: {paths.home() / safepaths.EXPORTS}/<run>-<format>; a name goes "
                                         "there too")
            overwrite = gr.Checkbox(False, label="Replace an earlier export there", elem_id="chat-export-overwrite",
                                    info="only the files that export wrote; never your own files")
            export_btn = gr.Button("Export", scale=0, min_width=110, elem_id="chat-export-run")
        export_size = gr.Markdown(elem_id="chat-export-size")
        export_md = gr.Markdown(elem_id="chat-export-result")
        download = gr.File(label="Download", file_count="multiple", interactive=False, visible=False,
                           elem_id="chat-export-download")

    # ---- handlers: each returns {component: value} for what it changes (Gradio leaves the other outputs) ------
    ended_seen = gr.State(None)

    def on_refresh(current):
        ch, pick = adapter_choices()
        value = current if current in [v for _, v in ch] else pick
        return {adapter: gr.update(choices=ch, value=value),
                status: chat.describe() if chat.loaded else ("" if ch else NO_ADAPTER)}

    def eval_shown(result):
        head, table, plot = eval_outputs(result)
        return {eval_status: head, eval_table: table, eval_plot: plot}

    def on_adapter(path):
        return eval_shown(_stored_eval(path) if path else None)

    def on_send(text, base_hist, tuned_hist, state, path, sys_prompt, n_new, temp, p, sd):
        text = (text or "").strip()
        base_hist, tuned_hist = _plain(base_hist), _plain(tuned_hist)
        # the message stays in its box
        before = {base_box: inert.shown(base_hist), tuned_box: inert.shown(tuned_hist), turns: state}
        if not text:
            yield before
            return
        if not path:
            yield {**before, status: NO_ADAPTER}
            return
        try:
            if chat.active is None or str(chat.active.path) != path:
                yield {**before, status: "⏳ Loading the model and the adapter…"}
            chat.use(path)
        except Exception as e:  # noqa: BLE001 - shown to the user (ChatError says what to do)
            yield {**before, status: f"❌ {e}"}
            return
        note = chat.describe()
        if studio.engine.busy:
            note += "  \n⚠️ A training run is going on: chat shares the machine with it and is slower."
        settings = GenerationSettings(max_new_tokens=int(n_new), temperature=float(temp), top_p=float(p),
                                      seed=int(sd or 0))
        prompt = {"base": build_messages(base_hist, text, sys_prompt),
                  "tuned": build_messages(tuned_hist, text, sys_prompt)}
        hist = {"base": base_hist + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}],
                "tuned": tuned_hist + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
        state = {k: dict(v) for k, v in (state or {"base": {}, "tuned": {}}).items()}

        def sent(message: str) -> dict:
            return {msg: "", base_box: inert.shown(hist["base"]), tuned_box: inert.shown(hist["tuned"]), turns: state,
                    status: message}

        yield sent(note)
        for side in ("base", "tuned"):
            reply = ""
            try:
                chat.use(path)  # another browser tab may have switched the adapter meanwhile
                for reply in chat.stream(prompt[side], tuned=side == "tuned", settings=settings):
                    hist[side][-1]["content"] = reply
                    yield sent(note)
                if chat.cut_off:
                    hist[side][-1]["content"] = reply + cut_mark(settings.max_new_tokens)
            except Exception as e:  # noqa: BLE001
                hist[side][-1]["content"] = f"(generation failed: {e})"
                yield sent(f"❌ {e}")
                return
            state[side][len(hist[side]) - 1] = Turn(
                side=side, messages=prompt[side], reply=reply, adapter=chat.active.label,
                base_model=chat.key.name_or_path, settings=vars(settings).copy(),
                prompt=chat.feedback_prompt(prompt[side]))
        yield sent(note)

    def rate(side):
        def handler(state, data: gr.LikeData):
            index = data.index if isinstance(data.index, int) else data.index[0]
            turn = (state or {}).get(side, {}).get(index)
            if turn is None:
                return {fb: "Not saved: this reply is still being written (rate it once both sides have finished), "
                            "or it was not generated in this browser session, so its prompt is unknown."}
            if data.liked is True or data.liked is False:
                feedback.record(turn.prompt, turn.reply, bool(data.liked), side=side, adapter=turn.adapter,
                                base_model=turn.base_model)
            else:  # the rating was taken back
                completion = ([{"role": "assistant", "content": turn.reply}] if isinstance(turn.prompt, list)
                              else turn.reply)
                feedback.remove(feedback.reply_id(turn.prompt, completion, side))
            return {fb: feedback_md()}
        return handler

    def on_clear():
        return {base_box: [], tuned_box: [], turns: {"base": {}, "tuned": {}}, msg: ""}

    def on_eval(path, data_file, limit, progress=gr.Progress()):
        try:
            data_file = safepaths.ui_read(data_file)  # a bounded UserPath, or None
        except safepaths.PathRefused as e:
            return {eval_status: f"❌ {e}"}
        if not path:
            return {eval_status: NO_ADAPTER}
        run_dir = _run_dir(path)
        try:
            result = evaluate.evaluate_run(run_dir, data=data_file,
                                           limit=int(limit) if limit else None, adapter=path, chat_model=chat,
                                           progress=lambda m, f: progress(f, desc=m))
        except Exception as e:  # noqa: BLE001
            return {eval_status: f"❌ {e}"}
        return eval_shown(result)

    def on_export(path, fmt_value, out_value, replace=False, type_value=None, progress=gr.Progress()):
        try:
            # the web UI writes only under the studio home (or folders allowed with app.py --allow-path)
            target = safepaths.ui_write(out_value, f"{_run_dir(path).name if path else 'adapter'}-{fmt_value}").path
        except safepaths.PathRefused as e:
            return {export_md: f"❌ Export failed: {e}", download: gr.update(visible=False, value=None)}
        if not path:
            return {export_md: NO_ADAPTER, download: gr.update(visible=False, value=None)}
        try:
            extra = {"gguf_type": type_value or gguf_quant.DEFAULT_TYPE} if fmt_value == "gguf" else {}
            r = export.export(path, fmt_value, target, progress=lambda m: progress(None, desc=m),
                              overwrite=bool(replace), **extra)
            progress(None, desc="Preparing the download…")
            files = downloads(r)
        except Exception as e:  # noqa: BLE001
            return {export_md: f"❌ Export failed: {e}", download: gr.update(visible=False, value=None)}
        return {export_md: _export_md(r), download: gr.update(visible=True, value=files)}

    def on_size(path, fmt_value, type_value):
        """Before anything is written: what the export will weigh (read from the checkpoint's shapes)."""
        visible = gr.update(visible=fmt_value == "gguf")
        if not path:
            return {gguf_type: visible, export_size: ""}
        try:
            size = export.estimate(path, fmt_value, type_value)["text"]
            return {gguf_type: visible, export_size: f"Size: **{size}**"}
        except Exception as e:  # noqa: BLE001 - e.g. a base model not downloaded yet
            return {gguf_type: visible, export_size: f"Size: known once the export starts ({e})"}

    def on_tick(seen, current):
        """A run that ended since this page last looked: its adapter joins the list (and is picked when none was)."""
        job = studio.engine.job
        key = f"{job.id}:{job.state}" if job is not None and job.done else None
        if key is None or key == seen:
            return gr.skip()
        return {**on_refresh(current), ended_seen: key}

    gr.Timer(2.0).tick(on_tick, [ended_seen, adapter], [adapter, status, ended_seen], show_progress="hidden")
    refresh.click(on_refresh, [adapter], [adapter, status])
    adapter.focus(on_refresh, [adapter], [adapter, status])
    adapter.change(on_adapter, [adapter], [eval_status, eval_table, eval_plot])
    send_inputs = [msg, base_box, tuned_box, turns, adapter, system, max_new, temperature, top_p, seed]
    send_outputs = [msg, base_box, tuned_box, turns, status]
    send.click(on_send, send_inputs, send_outputs)
    msg.submit(on_send, send_inputs, send_outputs)
    clear.click(on_clear, None, [base_box, tuned_box, turns, msg])
    base_box.like(rate("base"), [turns], [fb])
    tuned_box.like(rate("tuned"), [turns], [fb])
    eval_btn.click(on_eval, [adapter, eval_data, eval_limit], [eval_status, eval_table, eval_plot])
    export_btn.click(on_export, [adapter, fmt, out, overwrite, gguf_type], [export_md, download])
    for trigger in (fmt.change, gguf_type.change, adapter.change):
        trigger(on_size, [adapter, fmt, gguf_type], [gguf_type, export_size], show_progress="hidden")


def _run_dir(adapter_path: str) -> Path:
    return Path(adapter_path).parent


def _stored_eval(adapter_path: str):
    return evaluate.read_eval(_run_dir(adapter_path))


def _export_md(r) -> str:
    lines = [f"✅ **{r.format}** export written to `{r.path}` in {r.seconds:.0f} s and loaded back:"]
    for k, v in r.checks.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {vv:.4g}" if isinstance(vv, float) else f"{kk} {vv}" for kk, vv in v.items())
        lines.append(f"- {k}: {v}")
    if r.format in ("gguf", "gguf-adapter"):
        folder = Path(r.path).parent
        mf = next((f for f in r.files if f.endswith("Modelfile")), "Modelfile")
        lines.append(f"- Ollama: `cd {folder} && ollama create my-model -f {mf}`")
    return "\n".join(lines)


def downloads(r) -> list[str]:
    """The files a browser on another machine downloads: a GGUF export's file and Modelfile; a folder export as one
    zip (in the temp folder, never beside the user's files). Served from where they are (no second copy)."""
    import tempfile
    import zipfile

    if r.format in ("gguf", "gguf-adapter"):
        folder = Path(r.path).parent
        files = [str(folder / f) for f in r.files if (folder / f).is_file() and not f.endswith(export.MANIFEST)]
    else:
        folder = Path(r.path)
        zdir = Path(tempfile.mkdtemp(prefix="kto-studio-download-"))
        zpath = zdir / f"{folder.name}.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:  # safetensors do not compress: store, fast
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    z.write(f, f"{folder.name}/{f.name}")
        files = [str(zpath)]
    gr.set_static_paths(files)  # served in place: a multi-GB GGUF is not hashed and copied into Gradio's cache
    return files
