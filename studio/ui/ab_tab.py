"""Chat tab, A/B (blind): two models answer the same prompt as "A" and "B" in a random order; the user votes, then
sees which was which, and the win rate with its 95% interval updates.

Thin: studio.tuned.votes decides contenders, prompts, what a vote stores and means, and draws the plot; studio.tuned.chat
generates (one model in memory, adapters switched on it).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio import safepaths
from studio.ui import inert
from studio.tuned import votes
from studio.tuned.chat import ChatModel, GenerationSettings, build_messages, list_adapters, newest
from studio.tuned.votes import VoteError

NO_ADAPTER = ("No trained adapter yet: train a run in the **Train** tab (or let it reach its first checkpoint), "
              "then press **↻**.")
INTRO = ("Which model answers better? Pick two: the base model or any run's adapter or checkpoint. For each prompt "
         "they are shown as **A** and **B** in a random order, with the same sampling settings and seed; vote, then "
         "see who was who. Every vote is kept in the run history and becomes KTO rows (the preferred reply "
         "desirable, the other undesirable; both bad: both undesirable; tie: none) that the **Data** tab's *Use my "
         "chat ratings* loads. Headless: `python -m studio votes`.")
VOTES = (("A", "A is better", "ab-vote-a"), ("B", "B is better", "ab-vote-b"), ("tie", "Tie", "ab-vote-tie"),
         ("both_bad", "Both bad", "ab-vote-bad"))


def _chat(studio) -> ChatModel:
    if getattr(studio, "chat", None) is None:
        studio.chat = ChatModel()  # the Chat tab's model: one base in memory for both modes
    return studio.chat


def model_choices() -> tuple[list[tuple[str, str]], str | None]:
    """(label, value) for the two pickers: the base model, then every adapter; and the newest adapter."""
    adapters = list_adapters()
    pick = newest(adapters)
    return ([("base model (adapter off)", votes.BASE)] + [(a.label, str(a.path)) for a in adapters],
            str(pick.path) if pick else None)


def _shown(messages: list[dict]) -> list[dict]:
    return [dict(m) for m in messages if m["role"] in ("user", "assistant")]


def _show(hist: list[dict]) -> list[dict]:
    """A conversation as the Chatbot shows it: prompts as literal text, replies without HTML or images."""
    return inert.shown(hist)


def tally_views(history, first, second):
    """The sentence and the plot for the pair picked now (nothing is loaded: only the run folders are read)."""
    try:
        ref, cand = votes.contenders(first, second)
    except Exception as e:  # noqa: BLE001 - not a pair yet: say why, no plot
        return f"Win rate: {e}." if (first and second) else "", None
    t = votes.tally(history.votes(), ref, cand)
    return f"**Win rate.** {t.sentence()}", votes.tally_figure(t)


PAIR_COLUMNS = ["candidate", "against (reference)", "votes", "wins", "ties", "both bad", "losses", "win rate",
                "95% interval"]


def pairs_frame(history) -> pd.DataFrame:
    """Every pair of models with votes: the tallies ``python -m studio votes`` prints."""
    rows = []
    for t in votes.tallies(history.votes()):
        lo, hi = t.interval
        rate = f"{100 * t.win_rate:.0f}%" if t.win_rate is not None else "–"
        span = f"{100 * lo:.0f}–{100 * hi:.0f}%" if t.decided else "–"
        rows.append([t.candidate_label, t.reference_label, t.votes, t.wins, t.ties, t.both_bad, t.losses, rate, span])
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def build(studio):
    chat = _chat(studio)
    choices, newest_adapter = model_choices()
    pools: dict[tuple, tuple[list, str]] = {}
    pending = gr.State(None)

    gr.Markdown(INTRO)
    with gr.Row(equal_height=True):
        first = gr.Dropdown(choices=choices, value=votes.BASE, label="Model 1 (reference)", scale=3,
                            elem_id="ab-first")
        second = gr.Dropdown(choices=choices, value=newest_adapter, label="Model 2 (candidate)", scale=3,
                             elem_id="ab-second", info="The win rate is Model 2's against Model 1.")
        refresh = gr.Button("↻", scale=0, min_width=60, elem_id="ab-refresh")
    with gr.Accordion("Prompts and sampling (the same for both sides, stored with each vote)", open=False):
        prompt_file = gr.Textbox(label="Prompt file for Next prompt (optional)", elem_id="ab-prompt-file",
                                 placeholder="empty: the held-out prompts of Model 2's run (else Model 1's)")
        system = gr.Textbox(label="System prompt (optional)", lines=1, elem_id="ab-system")
        with gr.Row():
            max_new = gr.Slider(8, 1024, value=128, step=8, label="max new tokens", elem_id="ab-max-new")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)",
                                    elem_id="ab-temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p", elem_id="ab-top-p")
            seed = gr.Number(0, precision=0, label="seed (both sides)", elem_id="ab-seed")
    with gr.Row(equal_height=True):
        msg = gr.Textbox(placeholder="Type a prompt for both, or draw one with Next prompt…", show_label=False,
                         scale=5, elem_id="ab-input")
        ask = gr.Button("Ask both", scale=0, min_width=100, elem_id="ab-ask")
        draw = gr.Button("Next prompt ▶", variant="primary", scale=0, min_width=140, elem_id="ab-next")
    status = gr.Markdown("" if newest_adapter else NO_ADAPTER, elem_id="ab-status")
    with gr.Row():
        box_a = gr.Chatbot(label="A", elem_id="ab-a", height=320)
        box_b = gr.Chatbot(label="B", elem_id="ab-b", height=320)
    with gr.Row():
        vote_btns = [gr.Button(text, elem_id=eid, interactive=False) for _, text, eid in VOTES]
    reveal = gr.Markdown(elem_id="ab-reveal")
    tally0, fig0 = tally_views(studio.history, votes.BASE, newest_adapter)
    tally_md = gr.Markdown(tally0, elem_id="ab-tally")
    plot = gr.Plot(fig0, show_label=False, elem_id="ab-plot")
    with gr.Accordion("All pairs voted on", open=False):
        pairs = gr.Dataframe(pairs_frame(studio.history), interactive=False, elem_id="ab-pairs")
    with gr.Row():
        export_btn = gr.Button("Export all votes (CSV)", size="sm", scale=0, min_width=200, elem_id="ab-export")
        csv_file = gr.File(label="votes.csv", interactive=False, visible=False, elem_id="ab-csv", scale=3)

    # ---- handlers ----------------------------------------------------------------------------------------------
    def on_refresh(a, b, said):
        ch, pick = model_choices()
        values = [v for _, v in ch]
        a = a if a in values else votes.BASE
        b = b if b in values else pick
        # "no adapter yet" goes once ↻ (or opening a picker) has found one, and comes back when none is left
        note = NO_ADAPTER if pick is None else ("" if said == NO_ADAPTER else gr.update())
        return (gr.update(choices=ch, value=a), gr.update(choices=ch, value=b), *tally_views(studio.history, a, b),
                note)

    def on_pair(a, b):
        return tally_views(studio.history, a, b)

    def _pool(ref, cand, file):
        """``file``: a UserPath from safepaths.ui_read (bounded to the studio home, uploads and --allow-path), or
        None."""
        run = None if file else next((Path(c.adapter).parent for c in (cand, ref) if c.tuned), None)
        key = (str(run), file)
        if key not in pools:
            pools[key] = votes.prompt_pool(run, file)
        return pools[key]

    def generate(draw_one: bool):
        def handler(text, a_spec, b_spec, file, sys_prompt, n_new, temp, p, sd):
            """Yields {component: value} for what changes (the vote buttons stay off until both have answered)."""
            buttons = {btn: gr.update(interactive=False) for btn in vote_btns}
            try:
                # the prompt file box reads only what the web UI may read (the studio home, uploads, --allow-path)
                file = safepaths.ui_read(file, hub=False)
                ref, cand = votes.contenders(a_spec, b_spec)
                if draw_one:
                    pool, source = _pool(ref, cand, file)
                    voted = [v["prompt"] for v in studio.history.votes()
                             if {v["model_a"], v["model_b"]} == {ref.id, cand.id}]
                    prompt = votes.next_prompt(pool, voted)
                    if prompt is None:
                        raise VoteError(f"every prompt of {source} already has a vote for this pair: give another "
                                        "prompt file, or type your own")
                    messages = votes.as_messages(prompt)
                    if sys_prompt and sys_prompt.strip() and messages[0]["role"] != "system":
                        messages = [{"role": "system", "content": sys_prompt.strip()}] + messages
                else:
                    text = (text or "").strip()
                    if not text:
                        raise VoteError("type a prompt first, or press Next prompt")
                    messages = build_messages([], text, sys_prompt)
            except Exception as e:  # noqa: BLE001 - VoteError/ChatError/EvalError say what to do
                yield {status: f"❌ {e}", pending: None, **buttons}
                return
            a, b = votes.assign(ref, cand)
            settings = GenerationSettings(max_new_tokens=int(n_new), temperature=float(temp), top_p=float(p),
                                          seed=int(sd or 0))
            hist = {"A": _shown(messages) + [{"role": "assistant", "content": ""}],
                    "B": _shown(messages) + [{"role": "assistant", "content": ""}]}
            note = "⏳ Loading the model…" if not chat.loaded else "⏳ Writing A…"
            yield {msg: "", box_a: gr.update(value=_show(hist["A"]), label="A"),
                   box_b: gr.update(value=_show(hist["B"]), label="B"),
                   status: note, reveal: "", pending: None, **buttons}
            replies = {}
            for letter, who in (("A", a), ("B", b)):
                reply = ""
                try:
                    for reply in votes.stream_reply(chat, who, messages, settings):
                        hist[letter][-1]["content"] = reply
                        yield {msg: "", box_a: _show(hist["A"]), box_b: _show(hist["B"]), status: f"⏳ Writing {letter}…", reveal: "",
                               pending: None, **buttons}
                except Exception as e:  # noqa: BLE001
                    hist[letter][-1]["content"] = f"(generation failed: {e})"
                    yield {msg: "", box_a: _show(hist["A"]), box_b: _show(hist["B"]), status: f"❌ {e}", reveal: "", pending: None,
                           **buttons}
                    return
                replies[letter] = reply
            state = {"a": a, "b": b, "ref": ref, "cand": cand, "prompt": chat.feedback_prompt(messages),
                     "reply_a": replies["A"], "reply_b": replies["B"], "settings": vars(settings).copy(),
                     "base_model": chat.key.name_or_path if chat.key else None}
            done = "Both have answered. Which is better? (The names are shown after your vote.)"
            if studio.engine.busy:
                done += "  \n⚠️ A training run is going on: chat shares the machine with it and is slower."
            yield {msg: "", box_a: _show(hist["A"]), box_b: _show(hist["B"]), status: done, reveal: "", pending: state,
                   **{btn: gr.update(interactive=True) for btn in vote_btns}}
        return handler

    def vote(choice: str):
        def handler(state):
            off = {btn: gr.update(interactive=False) for btn in vote_btns}
            if not state:  # a second click on a vote already cast (the buttons are off until both have answered)
                return {pending: None, **off}
            a, b = state["a"], state["b"]
            v = votes.record(studio.history, a=a, b=b, prompt=state["prompt"], reply_a=state["reply_a"],
                             reply_b=state["reply_b"], choice=choice, settings=state["settings"],
                             base_model=state["base_model"])
            rows = votes.kto_rows(v)
            won = {"A": a.label, "B": b.label}.get(choice)
            why = ""
            if choice in ("A", "B") and not rows:
                why = " (the two replies are the same text, so neither can be preferred)"
            text = (f"**A** was **{a.label}**; **B** was **{b.label}**. You voted *{votes.CHOICE_TEXT[choice]}*"
                    + (f": {won} wins this one." if won else ".")
                    + f" Vote #{v['id']} stored; {len(rows)} KTO row{'' if len(rows) == 1 else 's'} added to your "
                    f"chat ratings{why}.")
            t = votes.tally(studio.history.votes(), state["ref"], state["cand"])
            return {reveal: text, tally_md: f"**Win rate.** {t.sentence()}", plot: votes.tally_figure(t),
                    box_a: gr.update(label=f"A · {a.label}"), box_b: gr.update(label=f"B · {b.label}"), pending: None,
                    pairs: pairs_frame(studio.history), **off}
        return handler

    def on_export():
        all_votes = studio.history.votes()
        if not all_votes:
            raise gr.Error("No votes yet: vote on a few prompts first.")
        from studio import paths

        return gr.update(value=str(votes.export_csv(all_votes, paths.data_dir() / "votes.csv")), visible=True)

    refresh.click(on_refresh, [first, second, status], [first, second, tally_md, plot, status])
    for dd in (first, second):
        dd.focus(on_refresh, [first, second, status], [first, second, tally_md, plot, status])
        dd.input(on_pair, [first, second], [tally_md, plot])
    gen_in = [msg, first, second, prompt_file, system, max_new, temperature, top_p, seed]
    gen_out = [msg, box_a, box_b, status, reveal, pending, *vote_btns]
    draw.click(generate(True), gen_in, gen_out)
    ask.click(generate(False), gen_in, gen_out)
    msg.submit(generate(False), gen_in, gen_out)
    for (choice, _, _), btn in zip(VOTES, vote_btns):
        btn.click(vote(choice), [pending], [reveal, tally_md, plot, box_a, box_b, pending, pairs, *vote_btns])
    export_btn.click(on_export, None, csv_file)
