"""Blind A/B votes: the Wilson interval, the vote → KTO rows rules, storage in the history (across restarts), the
tallies and the headless command."""
from __future__ import annotations

import csv
import json
import random
import sqlite3

import pytest

from studio import safepaths
from studio.data import feedback
from studio.tuned import votes
from studio.data import load_kto
from studio.runs.history import History
from studio.tuned.votes import Contender, VoteError

BASE = Contender("base:m", "base m (adapter off)", "/runs/r/adapter", False)
TUNED = Contender("/runs/r/adapter", "r · final adapter", "/runs/r/adapter", True)
CKPT = Contender("/runs/r/checkpoint-2", "r · checkpoint-2", "/runs/r/checkpoint-2", True)
PROMPT = [{"role": "user", "content": "Capital of France?"}]


def _vote(choice, a=BASE, b=TUNED, reply_a="Lyon.", reply_b="Paris.", prompt=PROMPT):
    return {"model_a": a.id, "label_a": a.label, "model_b": b.id, "label_b": b.label, "choice": choice,
            "prompt": prompt, "reply_a": reply_a, "reply_b": reply_b}


# ---- the interval ------------------------------------------------------------------------------------------------

def test_wilson_matches_scipy_and_the_issue_example():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(14, 20), (0, 5), (5, 5), (1, 3), (37, 80), (500, 1000)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert votes.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    lo, hi = votes.wilson(14, 20)
    assert (round(100 * lo), round(100 * hi)) == (48, 85)  # "interval 48–85%" in the issue


def test_wilson_stays_in_range_is_symmetric_and_narrows_with_more_votes():
    assert votes.wilson(0, 0) == (0.0, 1.0)
    lo, hi = votes.wilson(0, 4)
    assert lo == 0.0 and 0 < hi < 1  # never a zero-width interval at 0 wins
    lo, hi = votes.wilson(4, 4)
    assert hi == 1.0 and 0 < lo < 1
    for k, n in [(3, 10), (7, 9), (50, 60)]:
        lo, hi = votes.wilson(k, n)
        assert lo < k / n < hi
        lo2, hi2 = votes.wilson(n - k, n)
        assert (lo2, hi2) == pytest.approx((1 - hi, 1 - lo))
    assert votes.wilson(70, 100)[1] - votes.wilson(70, 100)[0] < votes.wilson(7, 10)[1] - votes.wilson(7, 10)[0]
    with pytest.raises(ValueError):
        votes.wilson(6, 5)


# ---- vote -> KTO rows --------------------------------------------------------------------------------------------

def test_a_vote_marks_the_preferred_reply_desirable_and_the_other_undesirable():
    rows = votes.kto_rows(_vote("B"))
    assert [(r["completion"], r["label"], r["adapter"]) for r in rows] == [
        ("Lyon.", False, BASE.label), ("Paris.", True, TUNED.label)]
    assert all(r["prompt"] == PROMPT for r in rows)
    rows = votes.kto_rows(_vote("A"))
    assert [(r["completion"], r["label"]) for r in rows] == [("Lyon.", True), ("Paris.", False)]


def test_both_bad_makes_two_undesirable_rows_and_a_tie_none():
    assert [(r["completion"], r["label"]) for r in votes.kto_rows(_vote("both_bad"))] == [
        ("Lyon.", False), ("Paris.", False)]
    assert votes.kto_rows(_vote("tie")) == []


def test_identical_or_empty_replies_make_no_contradicting_rows():
    assert votes.kto_rows(_vote("A", reply_a="Paris.", reply_b="Paris. ")) == []  # no text beats itself
    assert [(r["completion"], r["label"]) for r in votes.kto_rows(_vote("both_bad", reply_a="Paris.",
                                                                          reply_b="Paris."))] == [("Paris.", False)]
    assert [(r["completion"], r["label"]) for r in votes.kto_rows(_vote("B", reply_a=""))] == [("Paris.", True)]
    with pytest.raises(VoteError):
        votes.kto_rows(_vote("maybe"))


def test_recorded_votes_load_as_kto_rows_with_the_thumbs_ratings(studio_home):
    feedback.record(PROMPT, "It is Paris.", True, side="tuned")  # a 👍 from the side-by-side chat
    h = History()
    votes.record(h, a=BASE, b=TUNED, prompt=PROMPT, reply_a="Lyon.", reply_b="Paris.", choice="B",
                 settings={"seed": 3, "temperature": 0.7}, base_model="m")
    votes.record(h, a=TUNED, b=BASE, prompt=PROMPT, reply_a="Marseille.", reply_b="Nice.", choice="both_bad")
    votes.record(h, a=TUNED, b=BASE, prompt=PROMPT, reply_a="Paris!", reply_b="Paris?", choice="tie")
    rows = load_kto(str(feedback.feedback_path())).rows  # what the Data tab's "use my chat ratings" loads
    got = [(r["completion"][0]["content"], r["label"]) for r in rows]
    assert got == [("It is Paris.", True), ("Lyon.", False), ("Paris.", True), ("Marseille.", False),
                   ("Nice.", False)]
    assert all(r["prompt"] == PROMPT for r in rows)
    sides = [r["side"] for r in feedback.load_rows()]
    assert sides == ["tuned"] + [votes.FEEDBACK_SIDE] * 4


# ---- storage -----------------------------------------------------------------------------------------------------

def test_a_vote_survives_a_restart_with_everything_it_was_cast_with(studio_home):
    h = History()
    settings = {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.95, "seed": 11, "repetition_penalty": 1.0}
    stored = votes.record(h, a=TUNED, b=BASE, prompt=PROMPT, reply_a="Paris.", reply_b="Lyon.", choice="A",
                          settings=settings, base_model="m")
    h.close()

    again = History()  # the app was restarted
    [v] = again.votes()
    assert v["id"] == stored["id"]
    assert (v["model_a"], v["label_a"], v["model_b"], v["label_b"]) == (TUNED.id, TUNED.label, BASE.id, BASE.label)
    assert (v["choice"], v["prompt"], v["reply_a"], v["reply_b"]) == ("A", PROMPT, "Paris.", "Lyon.")
    assert v["settings"] == settings and v["base_model"] == "m"
    t = votes.tally(again.votes(), BASE, TUNED)
    assert (t.wins, t.losses, t.ties, t.both_bad) == (1, 0, 0, 0)


def test_a_history_file_from_before_votes_gets_the_votes_table(studio_home):
    path = studio_home / "history.sqlite"
    studio_home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)  # an older studio's file: runs only
    db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, run_dir TEXT NOT NULL, config TEXT NOT "
               "NULL, status TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, ended_at REAL, step "
               "INTEGER, max_steps INTEGER, final_metrics TEXT, checkpoints TEXT NOT NULL DEFAULT '[]', adapter_path "
               "TEXT, error TEXT, backend TEXT, pid INTEGER, files_deleted_at REAL)")
    db.execute("INSERT INTO runs (id, name, run_dir, config, status, created_at, updated_at) "
               "VALUES ('r1', 'old', '/x', '{}', 'finished', 1, 1)")
    db.commit()
    db.close()
    h = History(path)
    assert [r["name"] for r in h.runs()] == ["old"]
    votes.record(h, a=BASE, b=TUNED, prompt="Q?", reply_a="a", reply_b="b", choice="tie")
    assert [v["choice"] for v in h.votes()] == ["tie"]


# ---- assignment, prompts, tallies --------------------------------------------------------------------------------

def test_the_side_assignment_is_drawn_at_random_for_each_prompt():
    rng = random.Random(1)
    firsts = [votes.assign(BASE, TUNED, rng)[0] for _ in range(400)]
    assert 150 < firsts.count(BASE) < 250 and firsts.count(BASE) + firsts.count(TUNED) == 400
    # the default draws from the system's randomness: not the same order every time
    assert len({votes.assign(BASE, TUNED)[0] for _ in range(64)}) == 2


def test_tallies_count_from_the_candidates_side_whichever_letter_it_had():
    vs = [_vote("B"), _vote("A", a=TUNED, b=BASE), _vote("A"), _vote("tie", a=TUNED, b=BASE),
          _vote("both_bad"), _vote("B", a=CKPT, b=TUNED)]
    t = votes.tally(vs, BASE, TUNED)
    assert (t.wins, t.losses, t.ties, t.both_bad, t.decided, t.votes) == (2, 1, 1, 1, 3, 5)
    assert t.history == ("win", "win", "loss", "tie", "both_bad")
    assert t.win_rate == pytest.approx(2 / 3)
    reverse = votes.tally(vs, TUNED, BASE)
    assert (reverse.wins, reverse.losses) == (1, 2)
    pairs = votes.tallies(vs)
    assert [(p.reference, p.candidate) for p in pairs] == [(BASE.id, TUNED.id), (CKPT.id, TUNED.id)]
    assert (pairs[1].wins, pairs[1].losses) == (1, 0)


def test_the_sentence_says_how_sure_the_win_rate_is():
    vs = [_vote("B")] * 14 + [_vote("A")] * 6
    s = votes.tally(vs, BASE, TUNED).sentence()
    assert s.startswith(f"{TUNED.label} wins 14 of 20 against {BASE.label}, 70%, interval 48–85%: likely better, "
                        "vote more to be sure")
    assert "better (the whole interval is above 50%)" in votes.tally([_vote("B")] * 15 + [_vote("A")] * 2,
                                                                      BASE, TUNED).sentence()
    worse = votes.tally([_vote("A")] * 9 + [_vote("tie")] * 2, BASE, TUNED).sentence()
    assert "wins 0 of 9" in worse and "worse" in worse and "(2 ties not counted)" in worse
    assert "none picked a side" in votes.tally([_vote("tie")], BASE, TUNED).sentence()
    assert votes.tally([], BASE, TUNED).sentence().startswith("No votes yet")


def test_next_prompt_skips_prompts_already_voted_on():
    pool = ["q1", "q2", [{"role": "user", "content": "q3"}]]
    rng = random.Random(0)
    voted = ["q1", [{"role": "user", "content": "q3"}]]
    assert {json.dumps(votes.next_prompt(pool, voted, rng)) for _ in range(10)} == {'"q2"'}
    assert votes.next_prompt(pool, pool, rng) is None
    assert votes.as_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(VoteError):
        votes.as_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_prompt_pool_from_a_file_keeps_each_prompt_once(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": lab}) + "\n" for p, c, lab in [
        ("Capital of France?", " Paris.", True), ("Capital of France?", " Lyon.", False),
        ("Two plus two?", " Four.", True)]))
    pool, source = votes.prompt_pool(data=safepaths.typed(str(f)))
    assert pool == ["Capital of France?", "Two plus two?"] and source == str(f)
    with pytest.raises(VoteError, match="no prompts"):
        votes.prompt_pool()


def test_next_prompt_draws_from_the_runs_held_out_prompts(tmp_path):
    from studio.config.run import RunConfig

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "completion": c, "label": lab})
                            + "\n" for q, c, lab in [("Q1?", "a", True), ("Q2?", "b", False), ("Q1?", "c", False)]))
    run = tmp_path / "run"
    run.mkdir()
    RunConfig().updated({"name": "run", "data.eval_file": str(held)}).save(run / "run.yaml")
    pool, source = votes.prompt_pool(run)
    assert pool == [[{"role": "user", "content": "Q1?"}], [{"role": "user", "content": "Q2?"}]]
    assert source == str(held)
    no_held = tmp_path / "plain"
    no_held.mkdir()
    RunConfig().updated({"name": "plain", "data.eval_fraction": 0.0}).save(no_held / "run.yaml")
    with pytest.raises(VoteError, match="no held-out data.*type your own prompt"):
        votes.prompt_pool(no_held)


def _fake_run(root, name, model):
    from studio.config.run import RunConfig

    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    RunConfig().updated({"name": name, "model.name_or_path": model}).save(run / "run.yaml")
    return run


def test_contenders_share_one_base_model(tmp_path):
    r1, r2, other = (_fake_run(tmp_path, n, m) for n, m in (("r1", "m"), ("r2", "m"), ("r3", "other-model")))
    base, tuned = votes.contenders("base", str(r1 / "adapter"))
    assert (base.id, base.tuned, base.adapter) == ("base:m", False, str(r1 / "adapter"))
    assert (tuned.id, tuned.label, tuned.tuned) == (str(r1 / "adapter"), "r1 · final adapter", True)
    a, b = votes.contenders(str(r1), str(r2))  # run X vs run Y
    assert (a.label, b.label) == ("r1 · final adapter", "r2 · final adapter")
    for x, y, msg in (("base", "base", "at least one adapter"), (str(r1), str(r1 / "adapter"), "two different"),
                      (str(r1), str(other), "different base models"), (None, str(r1), "pick two")):
        with pytest.raises(VoteError, match=msg):
            votes.contenders(x, y)


# ---- headless ----------------------------------------------------------------------------------------------------

def test_votes_command_prints_tallies_as_json_and_exports_csv(studio_home, tmp_path, capsys):
    from studio.cli import main

    h = History()
    for choice, a, b in [("B", BASE, TUNED), ("A", TUNED, BASE), ("A", BASE, TUNED), ("tie", CKPT, TUNED)]:
        votes.record(h, a=a, b=b, prompt=PROMPT, reply_a=f"{a.label} says", reply_b=f"{b.label} says", choice=choice,
                     settings={"seed": 5, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16})
    h.close()

    assert main(["votes"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["votes"] == 4 and len(out["pairs"]) == 2
    first = out["pairs"][0]
    assert (first["reference"], first["candidate"]) == (BASE.label, TUNED.label)
    assert (first["wins"], first["losses"], first["ties"], first["both_bad"]) == (2, 1, 0, 0)
    assert first["interval_95"] == pytest.approx(list(votes.wilson(2, 3)), abs=1e-4)

    out_csv = tmp_path / "votes.csv"
    assert main(["votes", "--pair", "r,base", "--csv", str(out_csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    [pair] = out["pairs"]
    assert (pair["reference"], pair["candidate"], pair["wins"], pair["losses"]) == (TUNED.label, BASE.label, 1, 2)
    with open(out_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model_a"], r["model_b"], r["choice"], r["winner"]) for r in rows] == [
        (BASE.label, TUNED.label, "B", TUNED.label), (TUNED.label, BASE.label, "A", TUNED.label),
        (BASE.label, TUNED.label, "A", BASE.label), (CKPT.label, TUNED.label, "tie", "")]
    assert rows[0]["prompt"] == "user: Capital of France?" and rows[0]["seed"] == "5"

    assert main(["votes", "--pair", "nobody,base"]) == 1
    assert "no votes involve 'nobody'" in capsys.readouterr().err


# ---- generation: any two adapters on one base in memory ----------------------------------------------------------

def test_two_adapters_and_the_base_answer_from_one_model_in_memory(chat, run_dir):
    from studio.tuned.chat import GenerationSettings

    final, ckpt = str(run_dir / "adapter"), str(run_dir / "checkpoint-2")
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0)
    msgs = votes.as_messages("What is the capital of France?")
    base_a, tuned = votes.contenders("base", final)
    earlier, later = votes.contenders(ckpt, final)  # a checkpoint vs the final adapter
    model = chat.model
    replies = {who.label + str(who.tuned): "".join(list(votes.stream_reply(chat, who, msgs, settings))[-1:])
               for who in (base_a, tuned, earlier, later)}
    assert chat.model is model  # no second copy of the base was loaded
    assert {loaded.adapter.path.name for loaded in chat._adapters.values()} == {"adapter", "checkpoint-2"}
    # each side really ran with its own adapter: the next-token logits differ between the three
    logits = {}
    for who in (base_a, earlier, later):
        chat.use(who.adapter)
        logits[who.label] = chat.logits(msgs, tuned=who.tuned)
    assert not logits[base_a.label].allclose(logits[earlier.label])
    assert not logits[earlier.label].allclose(logits[later.label])
    # the base side is the base whichever adapter is switched off for it
    base_b = votes.contenders("base", ckpt)[0]
    assert "".join(list(votes.stream_reply(chat, base_b, msgs, settings))[-1:]) == replies[base_a.label + "False"]
    assert replies[tuned.label + "True"] == replies[later.label + "True"]
