"""Data tab: load a file, see what is in it, fix it, balance it, save a cleaned copy and train on it.

All the work is done by ``studio.data.workbench.Workbench``; this file only wires it to components.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio import safepaths
from studio.ui import inert
from studio.config.run import SAMPLE_DATA
from studio.data import DataError, resolve
from studio.data.balance import ratio as weighted_ratio
from studio.data.balance import in_range, in_words, suggest_weights
from studio.data.clean import CleanOptions
from studio.data.normalize import FIELDS, ColumnError
from studio.data.readers import BadLineError
from studio.data.plots import gauge_figure, length_figure
from studio.data.workbench import Workbench, parse_row_numbers

PAGE_SIZE = 25
TABLE_COLUMNS = ["#", "source row", "label", "prompt", "completion", "tokens", "issues"]
# prompt and completion side by side, each cut short (the whole row shows below the table when a row is picked)
COLUMN_WIDTHS = ["48px", "104px", "112px", "30%", "30%", "84px", "170px"]
CELL_CHARS = 160
ISSUE_KINDS = {"duplicate": "duplicate", "conflicting labels": "conflicting_labels",  # table tag -> report kind
               "empty completion": "empty_completion", "empty prompt": "empty_prompt",
               "over max_length": "over_length", "prompt fills max_length": "prompt_too_long",
               "template mismatch": "chat_template_mismatch", "unlabeled": "unlabeled"}
LABEL_COLUMN = TABLE_COLUMNS.index("label")
MAX_LISTED = 25


def _numbers(rows: list[int]) -> str:
    shown = ", ".join(f"#{n}" for n in rows[:MAX_LISTED])
    return shown + (f" … and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else "")


NO_COLUMN = ("(not in my file)", "")  # the empty choice with words: an empty label shows only the picker's "✓"


def map_choices(columns: list[str]) -> list[tuple[str, str]]:
    """Choices of a Column mapping dropdown: "not in my file" first, then the file's own columns."""
    return [NO_COLUMN] + [(c, c) for c in columns]


def _options(dupes: bool, empty: bool, long: bool) -> CleanOptions:
    return CleanOptions(drop_duplicates=bool(dupes), drop_empty=bool(empty), drop_over_length=bool(long))


# ---- views: plain functions of a Workbench ----------------------------------------------------------------------------

def summary_md(wb: Workbench) -> str:
    r, n = wb.report, wb.norm
    shape = {"unpaired": "KTO rows", "messages": "labelled conversations", "paired": "preference pairs",
             "hh": "Anthropic HH pairs"}.get(n.shape, n.shape)
    lines = [f"**{wb.name}**: {n.n_records} records ({shape}) → **{r.n_rows} KTO rows**: {r.n_desirable} desirable, "
             f"{r.n_undesirable} undesirable" + (f", {r.n_unlabeled} without a usable label" if r.n_unlabeled else "")]
    lines += [f"- {c}" for c in n.conversions]
    if wb.edits:
        lines.append(f"- {wb.edits} labels changed by you")
    lines.append("\n_Your file is only read. Nothing is used for training until you save the cleaned copy below._")
    return "\n".join(lines)


def problems_md(wb: Workbench) -> str:
    items = []
    unlabeled = [i + 1 for i, row in enumerate(wb.rows) if row["label"] is None]
    if unlabeled:
        items.append(f"- **No usable label** ({len(unlabeled)}): {_numbers(unlabeled)}. Labels must be true/false, "
                     "yes/no, 1/0, good/bad, desirable/undesirable or 👍/👎; the studio does not guess. Type one into "
                     "the table's label column, or these rows are left out.")
    for p in wb.report.problems():
        items.append(f"- **{p['kind'].replace('_', ' ')}** ({p['count']}): {p['message']}. Rows {_numbers(p['rows'])}")
    if wb.report.n_desirable == 0 or wb.report.n_undesirable == 0:
        items.append("- **One label only**: " + suggest_weights(wb.report.n_desirable, wb.report.n_undesirable).note)
    return ("### Problems found\n" + "\n".join(items)) if items else "### Problems found\nNone."


def lengths_md(wb: Workbench) -> str:
    if wb.lengths is None:
        return f"Token lengths not measured: {wb.tokenizer_note}" if wb.tokenizer_note else ""
    st = wb.lengths.stats()
    rows = ["| tokens | min | median | 95% | max |", "|---|---|---|---|---|"]
    for name in ("prompt", "completion", "total"):
        if name in st:
            s = st[name]
            rows.append(f"| {name} | {s['min']} | {s['median']} | {s['p95']} | {s['max']} |")
    r = wb.report
    rows.append("")
    if r.max_length:
        rows.append(f"With max_length = {r.max_length}: **{len(r.truncated)}** rows would be truncated, "
                    f"**{len(r.dropped)}** dropped by the trainer (prompt alone too long).")
    rows.append(f"Chat-template / tokenization mismatches: **{len(r.mismatched)}**. (Measured with "
                f"{wb.length_model}'s tokenizer.)")
    return "\n".join(rows)


def label_frame(wb: Workbench, options: CleanOptions) -> pd.DataFrame:
    keep, _ = wb.kept(options)
    kept_ids = {id(r) for r in keep}
    counts: dict[tuple[str, str], int] = {}
    for row in wb.rows:
        label = {True: "desirable", False: "undesirable", None: "no label"}[row["label"]]
        stage = "kept" if id(row) in kept_ids else "dropped by filters"
        counts[(label, stage)] = counts.get((label, stage), 0) + 1
    return pd.DataFrame([{"label": k[0], "rows": v, "stage": k[1]} for k, v in sorted(counts.items())],
                        columns=["label", "rows", "stage"])


def _cut(text: str, limit: int = CELL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def table_frame(wb: Workbench, page: int, only_issues: bool) -> tuple[pd.DataFrame, int, str]:
    rows, page, pages = wb.table(page, PAGE_SIZE, only_issues)
    for r in rows:
        r["prompt"], r["completion"] = _cut(r["prompt"]), _cut(r["completion"])
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df["tokens"] = df["tokens"].astype("object").where(df["tokens"].notna(), "")
    return df, page, f"page {page} of {pages}"


def row_md(wb: Workbench | None, number: int | None) -> str:
    """One row in full: label, token count, each issue with its reason, the whole prompt and completion."""
    if wb is None or not number or not 1 <= number <= len(wb.rows):
        return "_Pick a row in the table to see it in full here._"
    from studio.data.normalize import completion_text

    i = number - 1
    row = wb.rows[i]
    label = {True: "desirable", False: "undesirable", None: "no usable label"}[row["label"]]
    tokens = f" · {wb.lengths.total[i]} tokens" if wb.lengths else ""
    reasons = {p["kind"]: p["message"] for p in wb.report.problems()}
    reasons["unlabeled"] = "the label is not one the studio reads; type one into the table's label column"
    issues = wb.issues_by_row().get(i, [])
    lines = [f"#### Row #{number} (row {wb.norm.sources[i] if wb.norm.sources else number} of your file) · "
             f"**{label}**{tokens}"]
    for tag in issues:
        why = reasons.get(ISSUE_KINDS.get(tag, tag), "")
        lines.append(f"- ⚠️ **{tag}**" + (f": {why}" if why else ""))

    def text(v) -> str:  # the user's text is shown as text: no HTML, link or image is made of it (studio.ui.inert)
        if isinstance(v, list):
            return "\n\n".join(f"**{inert.text(m.get('role'))}:** {inert.text(m.get('content'))}" for m in v)
        return inert.text(completion_text(v))

    lines += ["", "**Prompt**", "", text(row["prompt"]), "", "**Completion**", "", text(row["completion"])]
    return "\n".join(lines)


def balance_md(wb: Workbench, options: CleanOptions, wd: float, wu: float) -> str:
    nd, nu = wb.counts(options)
    s = suggest_weights(nd, nu)
    r = weighted_ratio(nd, nu, wd, wu)
    head = (f"After the filters: **{nd} desirable, {nu} undesirable**. Suggested: desirable_weight = "
            f"{s.desirable_weight}, undesirable_weight = {s.undesirable_weight}. ")
    if r is None:
        return head + s.note
    verdict = ("in the range the studio accepts (0.9 to 1.33 times; the KTO paper advises 1 to 1.33)"
               if in_range(r) else
               f"**{'less' if r < 1 else 'more'}** than the KTO paper advises (1 to 1.33 times): use the suggested "
               "weights, or raise the weight of the scarcer label")
    return head + (f"With your weights ({wd:g} / {wu:g}) all desirable rows together weigh {in_words(r)} the "
                   f"undesirable ones, {verdict}.")


def build(studio):
    wb_state = gr.State(None)
    gr.Markdown("Load your data: KTO rows (prompt / completion / label), preference pairs (prompt / chosen / "
                "rejected), Anthropic HH transcripts or labelled conversations, as JSONL, JSON, CSV/TSV, Parquet, a "
                "saved `datasets` folder or a hub dataset id. The studio converts it, shows what is in it and "
                "saves a cleaned copy in its own data folder.")
    with gr.Row():
        upload = gr.File(label="Upload a data file", file_count="single", elem_id="data-upload")
        with gr.Column():
            path = gr.Textbox(label="…or a path / hub dataset id", value=lambda: studio.config.data.train_file,
                              info=f"'{SAMPLE_DATA}' is the small example set that ships with the studio.",
                              elem_id="data-path")
            with gr.Row():
                load_btn = gr.Button("Load", variant="primary", elem_id="data-load")
                ratings_btn = gr.Button("Use my chat ratings (👍/👎, A/B votes)", elem_id="data-use-ratings")
            # shown when a JSONL file has broken lines: load the others, listing the skipped ones in the summary
            skip_btn = gr.Button("Skip the bad lines and load", visible=False, elem_id="data-skip-bad")
    with gr.Accordion("Column mapping", open=False, elem_id="data-mapping") as map_box:
        gr.Markdown("When the columns can't be told apart, say which of your columns holds what. Leave a field "
                    "empty when your file has no such column.")
        with gr.Row():
            map_dd = [gr.Dropdown(choices=[NO_COLUMN], value="", label=f, allow_custom_value=True,
                                  elem_id=f"data-map-{f}") for f in FIELDS]
        map_btn = gr.Button("Load with this mapping", elem_id="data-map-apply")
    summary = gr.Markdown(elem_id="data-summary")
    problems = gr.Markdown(elem_id="data-problems")

    gr.Markdown("### Inspect")
    with gr.Row():
        model_box = gr.Textbox(label="Measure tokens with the model", value=lambda: studio.config.model.name_or_path,
                               info="The chat template and tokenizer of the model you will train.",
                               elem_id="data-model")
        max_len = gr.Number(label="max_length (tokens)", value=lambda: studio.config.kto.max_length, precision=0,
                            minimum=16, info="From the run config (Model & preset tab); try other values here.",
                            elem_id="data-max-length")
        measure_btn = gr.Button("Measure token lengths", elem_id="data-measure")
    with gr.Row():
        label_plot = gr.BarPlot(x="label", y="rows", color="stage", title="Rows per label",
                                color_map={"kept": "#2e9d5b", "dropped by filters": "#d1495b"},
                                elem_id="data-label-plot", scale=1)
        length_plot = gr.Plot(label="Token lengths", elem_id="data-length-plot", scale=3)
    lengths = gr.Markdown(elem_id="data-lengths")

    gr.Markdown("### Rows\nEdit a **label** cell (desirable / undesirable, yes / no, 👍 / 👎 …) to relabel a row.")
    with gr.Row():
        only_issues = gr.Checkbox(False, label="Only rows with issues", elem_id="data-only-issues")
        prev_btn = gr.Button("◀ Previous", size="sm", elem_id="data-prev")
        page = gr.Number(value=1, precision=0, label="Page", minimum=1, elem_id="data-page")
        next_btn = gr.Button("Next ▶", size="sm", elem_id="data-next")
        page_info = gr.Markdown(elem_id="data-page-info")
    table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=True, wrap=True, max_height=600,
                         static_columns=[i for i in range(len(TABLE_COLUMNS)) if i != LABEL_COLUMN],
                         column_widths=COLUMN_WIDTHS, elem_id="data-table")
    full_row = gr.Markdown(row_md(None, None), elem_id="data-row-detail")
    with gr.Row():
        flip_rows = gr.Textbox(label="Flip the label of rows (#)", placeholder="3, 7-9", elem_id="data-flip-rows")
        flip_btn = gr.Button("Flip labels", elem_id="data-flip")

    gr.Markdown("### Fix and balance")
    with gr.Row():
        drop_dupes = gr.Checkbox(True, label="Drop duplicates (and rows labelled both ways)", elem_id="data-drop-dupes")
        drop_empty = gr.Checkbox(True, label="Drop empty completions", elem_id="data-drop-empty")
        drop_long = gr.Checkbox(False, label="Drop rows over max_length (else truncated)", elem_id="data-drop-long")
    with gr.Row():
        eval_frac = gr.Slider(0.0, 0.5, step=0.05, value=0.0, label="Hold out into a separate eval file",
                              info="Whole prompts, so pairs stay together. At 0 the run itself holds out "
                              "data.eval_fraction of the rows (5% by default) to watch while training.",
                              elem_id="data-eval-fraction")
        seed = gr.Number(value=lambda: studio.config.train.seed, precision=0, label="Split seed", elem_id="data-seed")
    with gr.Row():
        auto_w = gr.Checkbox(True, label="Use the suggested weights", elem_id="data-auto-weights")
        wd = gr.Number(value=lambda: studio.config.kto.desirable_weight, label="desirable_weight", minimum=0.001,
                       elem_id="data-desirable-weight")
        wu = gr.Number(value=lambda: studio.config.kto.undesirable_weight, label="undesirable_weight",
                       minimum=0.001, elem_id="data-undesirable-weight")
    with gr.Row():
        gauge = gr.Plot(label="Balance", elem_id="data-gauge", scale=2)
        balance = gr.Markdown(elem_id="data-balance")
    save_btn = gr.Button("Save cleaned copy and train on it", variant="primary", elem_id="data-save")
    saved = gr.Markdown(elem_id="data-saved")

    filters = [drop_dupes, drop_empty, drop_long]
    view_out = [summary, problems, label_plot, length_plot, lengths, table, page, page_info, wd, wu, gauge, balance]

    # handlers return {component: value} for what they change (Gradio leaves the other outputs as they are), or
    # gr.skip() when nothing changes
    def view(wb, pg, issues_only, dupes, empty, long, auto, w_d, w_u, new_lengths=False) -> dict:
        """Every view of ``wb``; the histogram figure only when the lengths were (re)measured (it is the slow one)."""
        if wb is None:
            return {}
        opts = _options(dupes, empty, long)
        if auto:
            s = wb.balance(opts)
            w_d, w_u = s.desirable_weight, s.undesirable_weight
        df, pg, info = table_frame(wb, pg, issues_only)
        nd, nu = wb.counts(opts)
        out = {summary: summary_md(wb), problems: problems_md(wb), label_plot: label_frame(wb, opts),
               lengths: lengths_md(wb), table: df, page: pg, page_info: info, wd: w_d, wu: w_u,
               gauge: gauge_figure(weighted_ratio(nd, nu, w_d, w_u)), balance: balance_md(wb, opts, w_d, w_u)}
        if new_lengths:
            out[length_plot] = length_figure(wb.lengths, wb.max_length) if wb.lengths else None
        return out

    def changed(out: dict):
        return out or gr.skip()

    view_in = [page, only_issues, *filters, auto_w, wd, wu]

    def load(file, source, model, max_length, *rest, progress=gr.Progress(), use_mapping=False,
             skip_bad_lines=False):
        """Load ``file`` (else ``source``). Only "Load with this mapping" applies the dropdowns: any other load reads
        the file with its own column names (the dropdowns may still hold the previous file's columns)."""
        mapping_values, view_args = rest[:len(FIELDS)], rest[len(FIELDS):]
        if not use_mapping:
            mapping_values = [""] * len(FIELDS)
        mapping = {theirs: ours for ours, theirs in zip(FIELDS, mapping_values) if theirs}
        src = file if file else (source or SAMPLE_DATA)
        try:
            # the web UI reads only the studio home, uploads, the sample and folders allowed with --allow-path
            user_src = safepaths.ui_read(resolve(src))
            model = safepaths.ui_model(model)
        except safepaths.PathRefused as e:
            return _refused(f"**Cannot use this data:** {e}")
        src = str(user_src)
        name = Path(file).name if file else Path(src).name
        try:
            progress(0, desc="reading")
            wb = Workbench.load(user_src, name=name, mapping=mapping or None,
                                progress=lambda f, msg: progress(f, desc=msg), skip_bad_lines=skip_bad_lines)
        except ColumnError as e:
            columns = list(e.columns)
            map_updates = {dd: gr.update(choices=map_choices(columns), value=v if v in columns else "")
                           for dd, v in zip(map_dd, mapping_values)}
            # the Column mapping box sits above this message, under the file pickers
            where = ("Pick the column that holds the label in **Column mapping** above (opened for you), then press "
                     "**Load with this mapping**." if e.missing_label else
                     "Say which of your columns holds what in **Column mapping** above (opened for you), then press "
                     "**Load with this mapping**.")
            return {**_refused(f"**Cannot use this data:** {e}  \n{where}"), map_box: gr.update(open=True),
                    **map_updates}
        except BadLineError as e:
            return {**_refused(f"**Cannot use this data:** {e}.  \nPress **Skip the bad lines and load** (next to "
                               "Load) to load the other lines; the skipped ones are listed here."),
                    skip_btn: gr.update(visible=True)}
        except DataError as e:
            return _refused(f"**Cannot use this data:** {e}")
        except Exception as e:  # a reader we don't know failing: say so, keep the app up
            return _refused(f"**Cannot use this data:** {type(e).__name__}: {e}")
        choices = map_choices(wb.norm.columns)
        ours_to_theirs = {ours: theirs for theirs, ours in wb.norm.mapping.items()}
        map_updates = {dd: gr.update(choices=choices, value=ours_to_theirs.get(f, f if f in wb.norm.columns else ""))
                       for dd, f in zip(map_dd, FIELDS)}
        _measure(wb, model, max_length, progress)
        box = {}
        if _cpu_card() and wb.lengths:
            # the CPU plan takes max_length from each file's own lengths: judge this file by that, not by a limit
            # planned for the previous file (rows whose prompt fills it are dropped on save)
            from studio.training.duration import cpu_seq

            own = cpu_seq(wb.lengths.total, int(max_length or studio.config.kto.max_length))
            if own != (int(max_length) if max_length else None):
                _measure(wb, model, own)
                box = {max_len: own}
        return {wb_state: wb, skip_btn: gr.update(visible=False), **map_updates, **box,
                **view(wb, 1, *view_args, new_lengths=True)}

    def _cpu_card() -> bool:
        from studio.models import load as models

        card = getattr(studio, "card", None)
        return card == "cpu" or (card is None and models.detect_device().kind == "cpu")

    def _refused(message: str) -> dict:
        # the summary carries the error; the views are emptied so nothing stale from an earlier file is shown (the
        # weights stay as they are)
        return {wb_state: None, skip_btn: gr.update(visible=False), summary: message, problems: gr.update(value=""), label_plot: None, length_plot: None,
                lengths: None, table: None, page: 1, page_info: "", gauge: None, balance: ""}

    def _measure(wb, model, max_length, progress=None):
        """``model``: a UserPath from safepaths.ui_model (or None: the run config's model)."""
        ml = int(max_length) if max_length else None
        model = str(safepaths.require(model, "the model to measure with") or studio.config.model.name_or_path)
        if progress:
            progress(0, desc=f"loading the tokenizer of {model}")
        wb.measure(model, ml, (lambda f, msg: progress(f, desc=msg)) if progress else None)

    load_out = [wb_state, summary, map_box, skip_btn, *map_dd, max_len, *view_out[1:]]
    load_in = [upload, path, model_box, max_len, *map_dd, *view_in[1:]]

    load_btn.click(load, load_in, load_out)

    def use_ratings(*rest, progress=gr.Progress()):
        """The ratings file, read with its own columns (never the mapping left from another file); the file and path
        boxes are not its inputs (it reads no path the page sends)."""
        from studio.data import feedback

        try:
            safepaths.ui_model(rest[0])  # the model box is checked before anything else is said
        except safepaths.PathRefused as e:
            return _refused(f"**Cannot use this data:** {e}")
        f = feedback.feedback_path()
        if not f.is_file():
            raise gr.Error("No ratings yet: rate replies with 👍/👎 or vote in A/B (blind) in the Chat tab first; "
                           f"they are collected in {f}.")
        return {upload: None, path: str(f), **load(None, str(f), *rest, progress=progress)}

    def load_mapped(*args, progress=gr.Progress()):
        return load(*args, progress=progress, use_mapping=True)

    def load_skipping(*args, progress=gr.Progress()):
        return load(*args, progress=progress, skip_bad_lines=True)

    ratings_btn.click(use_ratings, load_in[2:], [upload, path, *load_out])
    skip_btn.click(load_skipping, load_in, load_out)
    map_btn.click(load_mapped, load_in, load_out)
    upload.upload(load, load_in, load_out)

    def measure(wb, model, max_length, *args, progress=gr.Progress()):
        try:
            model = safepaths.ui_model(model)
        except safepaths.PathRefused as e:
            return {summary: f"**Cannot measure with this model:** {e}"}
        if wb is None:
            return gr.skip()
        _measure(wb, model, max_length, progress)
        return view(wb, *args, new_lengths=True)

    measure_btn.click(measure, [wb_state, model_box, max_len, *view_in], view_out)
    max_len.submit(measure, [wb_state, model_box, max_len, *view_in], view_out)  # lengths are kept: only the limit
    model_box.submit(measure, [wb_state, model_box, max_len, *view_in], view_out)

    def refresh(wb, *args):
        return changed(view(wb, *args))

    for comp in (only_issues, *filters, auto_w):
        comp.input(refresh, [wb_state, *view_in], view_out)
    page.submit(refresh, [wb_state, *view_in], view_out)

    def step(delta):
        def go(wb, pg, *args):
            return changed(view(wb, int(pg or 1) + delta, *args))

        return go

    prev_btn.click(step(-1), [wb_state, *view_in], view_out)
    next_btn.click(step(+1), [wb_state, *view_in], view_out)

    def own_weights(wb, *args):
        # typing a weight means the user overrides the suggestion
        args = list(args)
        args[-3] = False
        return {auto_w: False, **view(wb, *args)}

    for w in (wd, wu):
        w.input(own_weights, [wb_state, *view_in], [auto_w, *view_out])

    def edit_labels(wb, df, *args):
        if wb is None or df is None:
            return gr.skip()
        errors = []
        for _, row in df.iterrows():
            try:
                num = int(row["#"])
            except (TypeError, ValueError):
                continue
            if not 1 <= num <= len(wb.rows):
                continue
            value = str(row["label"]).strip()
            current = wb.rows[num - 1]["label"]
            if value.startswith("?") and current is None:
                continue
            try:
                wb.set_label(num, value)
            except DataError as e:
                errors.append(str(e))
        if errors:
            gr.Warning("; ".join(errors[:3]))
        return {wb_state: wb, **view(wb, *args)}

    table.input(edit_labels, [wb_state, table, *view_in], [wb_state, *view_out])

    def on_pick(wb, df, evt: gr.SelectData):
        try:
            r = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            return row_md(wb, int(df.iloc[r]["#"]))
        except (TypeError, ValueError, IndexError, KeyError):
            return gr.skip()

    table.select(on_pick, [wb_state, table], full_row, show_progress="hidden")

    def flip(wb, text, *args):
        if wb is None:
            gr.Warning("Load data first.")
            return gr.skip()
        try:
            nums = parse_row_numbers(text or "", len(wb.rows))
        except DataError as e:
            gr.Warning(str(e))
            return gr.skip()
        n = wb.flip(nums)
        gr.Info(f"Flipped {n} label{'' if n == 1 else 's'}.")
        return {wb_state: wb, flip_rows: "", **view(wb, *args)}

    flip_btn.click(flip, [wb_state, flip_rows, *view_in], [wb_state, flip_rows, *view_out])

    def save(wb, dupes, empty, long, frac, split_seed, w_d, w_u):
        if wb is None:
            return "Load data first."
        if not w_d or not w_u or w_d <= 0 or w_u <= 0:
            return "**Not saved:** both weights must be greater than 0."
        try:
            s = wb.save(_options(dupes, empty, long), float(frac or 0), int(split_seed or 0), (float(w_d), float(w_u)))
            changes = {"data.train_file": s["train_file"], "data.eval_file": s["eval_file"],
                       "kto.desirable_weight": float(w_d), "kto.undesirable_weight": float(w_u)}
            if s["eval_file"]:  # the saved eval file is the held-out set; without one the run splits its own
                changes["data.eval_fraction"] = 0.0
            cfg = studio.update(changes)
        except (DataError, ValueError) as e:
            return f"**Not saved:** {e}"
        ev = f" and {s['eval_rows']} eval rows to `{s['eval_file']}`" if s["eval_file"] else ""
        return (f"**Saved {s['train_rows']} rows** to `{s['train_file']}`{ev} (your file is unchanged). The run "
                f"config now trains on it with desirable_weight = {cfg.kto.desirable_weight}, undesirable_weight = "
                f"{cfg.kto.undesirable_weight}." + _replan_cpu())

    def _replan_cpu() -> str:
        """On the CPU card the plan depends on the data (max_length from its lengths, the step cap): re-plan it."""
        from studio.models import load as models
        from studio.training import plan as planner

        if not _cpu_card():
            return ""
        device = models.detect_device()
        version = studio.begin()
        try:
            p = planner.plan(studio.config, "cpu", device, recipe_key=getattr(studio, "recipe", None))
        except Exception:  # a plan that cannot be made leaves the settings as they are
            return ""
        if not studio.apply(p.config, version):  # a newer choice came while planning: it wins
            return ""
        c = p.config
        steps = f"{c.train.max_steps} steps" if c.train.max_steps > 0 else "all rows"
        when = f", expected {p.duration.describe()}" if p.duration else ""
        return (f"  \nCPU plan updated for this data: max_length {c.kto.max_length}, batch "
                f"{c.train.per_device_train_batch_size} x {c.train.gradient_accumulation_steps}, {steps}"
                + (f", at most {c.data.eval_max_rows} held-out rows scored" if c.data.eval_max_rows else "")
                + f"{when}.")

    save_btn.click(save, [wb_state, *filters, eval_frac, seed, wd, wu], saved)
