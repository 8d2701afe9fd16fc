"""Pseudo QA: parsing, special-token filtering, de-duplication, answer-token confidence, cut."""
import math

import pytest
import torch
from PIL import Image

from leaml.engine import models
from leaml.engine import pseudo
from leaml.engine.models import Generation


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return models.load("tiny")


def _gen(tok, text, logprobs=None):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return Generation(text, ids, logprobs if logprobs is not None else [-0.1] * len(ids))


def test_parse_accepts_the_target_format_only():
    assert pseudo.parse_qa("Question: Is there text?\nAnswer: no") == ("Is there text?", "no")
    assert pseudo.parse_qa("  Question:  Is there text? \nAnswer:  yes, red ") == ("Is there text?", "yes, red")
    for bad in ["Is there text?\nAnswer: no", "Question: Is there text?", "Question: \nAnswer: no",
                "Question: q?\nAnswer: ", "Question: q?\nAnswer: no\nQuestion: r?",
                "Question: q?\nAnswer: a Question: b", "Question: q? Answer: x\nAnswer: y"]:
        assert pseudo.parse_qa(bad) is None, bad
    assert pseudo.format_qa(" q? ", "a ") == "Question: q?\nAnswer: a"


def test_special_tokens_are_dropped_as_ids_and_as_spelled_text(tiny):
    _, proc = tiny
    tok, stats = proc.tokenizer, pseudo.ParseStats()
    image_id = tok.convert_tokens_to_ids("<image>")
    ok = _gen(tok, "Question: Is there text?\nAnswer: no")
    with_id = Generation("", ok.token_ids[:3] + [image_id] + ok.token_ids[3:], [-0.1] * (len(ok.token_ids) + 1))
    pieces = ["Question: What is <", "image", "> here?\nAnswer: no"]  # plain tokens spelling it
    ids = [t for piece in pieces for t in tok(piece, add_special_tokens=False)["input_ids"]]
    assert image_id not in ids
    spelled = Generation("", ids, [-0.1] * len(ids))
    eos_text = _gen(tok, "Question: Is it </s> red?\nAnswer: no")
    got = [pseudo.score_generation(tok, g, 0, 48, stats) for g in (ok, with_id, spelled, eos_text)]
    assert got[0] is not None and got[1:] == [None, None, None]
    assert stats.special == 3


def test_truncated_and_malformed_are_counted(tiny):
    _, proc = tiny
    tok, stats = proc.tokenizer, pseudo.ParseStats()
    long = _gen(tok, "Question: Is there text?\nAnswer: no")
    assert pseudo.score_generation(tok, long, 0, len(long.token_ids), stats) is None
    assert pseudo.score_generation(tok, _gen(tok, "Answer: no"), 0, 48, stats) is None
    assert (stats.truncated, stats.malformed, stats.sampled) == (1, 1, 2)


def test_dedup_keeps_the_most_confident_per_image_and_question():
    C = pseudo.Candidate
    cands = [C(0, "Is there text?", "no", 0.5, 1, 0.1), C(0, "is there  TEXT", "yes", 0.9, 1, 0.1),
             C(1, "Is there text?", "no", 0.2, 1, 0.1), C(0, "How many polyps?", "1", 0.3, 1, 0.1)]
    stats = pseudo.ParseStats()
    out = pseudo.dedup(cands, stats)
    assert [(c.image_index, c.answer) for c in out] == [(0, "yes"), (0, "1"), (1, "no")]
    assert (stats.duplicate, stats.kept) == (1, 3)


def test_confidence_is_geometric_mean_of_answer_tokens_under_teacher_forcing(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    img = Image.new("RGB", (64, 64), (180, 90, 90))
    target = "Question: What color is the abnormality?\nAnswer: pink, red"
    batch = models.encode(proc, [img], [pseudo.QA_INSTRUCTION], [target])
    with torch.no_grad():
        logits = model(**batch).logits[0]  # (T, V)
    labels = batch["labels"][0]
    pos = (labels != -100).nonzero().flatten()[:-1]  # target tokens, eos left out
    ids = labels[pos].tolist()
    lps = logits[pos - 1].log_softmax(-1).gather(-1, labels[pos, None]).flatten().tolist()
    cand = pseudo.score_generation(tok, Generation(target, ids, lps), 7, 48, pseudo.ParseStats())
    n_prefix = len(tok("Question: What color is the abnormality?\nAnswer:", add_special_tokens=False)["input_ids"])
    assert tok.decode(ids[n_prefix:]).strip() == "pink, red"
    assert cand.n_answer_tokens == len(ids) - n_prefix
    assert cand.confidence == pytest.approx(math.exp(sum(lps[n_prefix:]) / len(lps[n_prefix:])))
    assert cand.question_confidence != pytest.approx(cand.confidence)
    assert (cand.image_index, cand.question, cand.answer) == (7, "What color is the abnormality?", "pink, red")


def test_choose_mode_picks_the_most_likely_seed_answer_and_scores_its_tokens(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    imgs = [Image.new("RGB", (64, 64), c) for c in ((180, 90, 90), (40, 160, 60))]
    q = "What type of procedure is the image taken from?"
    choices = {q: ["colonoscopy", "gastroscopy", "no"], "Is there text?": ["yes", "no"]}

    def answer_logprobs(img, question, answer):  # teacher forcing, end of turn included
        target = pseudo.format_qa(question, answer)
        batch = models.encode(proc, [img], [pseudo.QA_INSTRUCTION], [target])
        with torch.no_grad():
            logits = model(**batch).logits[0]
        labels = batch["labels"][0]
        pos = (labels != -100).nonzero().flatten()
        n_prefix = len(tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"])
        pos = pos[n_prefix:]
        return logits[pos - 1].log_softmax(-1).gather(-1, labels[pos, None]).flatten().tolist()

    stats = pseudo.ParseStats()
    cfg = pseudo.PseudoConfig(answer_mode="choose", batch_size=2, k=2)  # 4 rows per forward
    pv = models.pixel_values(proc, imgs)
    got = pseudo.choose_known(model, proc, pv, [10, 11], [[q, "Is there text?"], [q]], choices,
                              cfg, stats)
    assert stats.sampled == 3 and stats.kept == 3
    assert sorted((c.image_index, c.question) for c in got) == [(10, "Is there text?"), (10, q), (11, q)]
    for c in got:
        img = imgs[c.image_index - 10]
        scored = {a: answer_logprobs(img, c.question, a) for a in choices[c.question]}
        best = max(scored, key=lambda a: sum(scored[a]))
        assert c.answer == best
        lps = scored[best]
        assert c.n_answer_tokens == len(lps)
        assert c.confidence == pytest.approx(math.exp(sum(lps) / len(lps)), rel=1e-4)
    with pytest.raises(ValueError, match="answer_mode 'choose' needs question_mode 'known'"):
        pseudo.PseudoConfig(answer_mode="choose", question_mode="sample")


def test_sampled_candidates_score_only_their_answer_tokens(tiny):
    model, proc = tiny
    img = Image.new("RGB", (64, 64), (180, 90, 90))
    gens = models.generate(model, proc, [img], [pseudo.QA_INSTRUCTION], do_sample=True,
                           num_return_sequences=8, seed=3, max_new_tokens=24)[0]
    for g in gens:  # whatever the model wrote, the span logic must be self-consistent
        text = proc.tokenizer.decode(g.token_ids)
        first = pseudo.answer_start_token(proc.tokenizer, g.token_ids, len(text) // 2)
        assert len(proc.tokenizer.decode(g.token_ids[:first])) <= len(text) // 2 or first == 0


def test_confidence_cut_keeps_top_fraction_or_threshold():
    conf = [0.9, 0.1, 0.5, 0.7, 0.3]
    assert pseudo.confidence_cut(conf, keep_top=0.6) == 0.5
    assert pseudo.confidence_cut(conf, keep_top=1.0) == 0.1
    assert pseudo.confidence_cut(conf, keep_top=0.0) == math.inf
    assert pseudo.confidence_cut([], keep_top=0.6) == math.inf
    assert pseudo.confidence_cut(conf, min_confidence=0.42) == 0.42


def test_precision_by_bin_counts_hallucinated_questions_as_wrong():
    pairs = [{"image_id": i, "question": "Is there text?", "answer": "yes" if i >= 2 else "no",
              "confidence": i / 10} for i in range(4)]
    pairs.append({"image_id": 9, "question": "Made up?", "answer": "x", "confidence": 0.95})
    truth = {(i, "is there text"): "yes" for i in range(4)}
    bins = pseudo.precision_by_bin(pairs, truth, bins=2)
    assert [b["n"] for b in bins] == [2, 3]
    assert bins[0]["precision"] == 0.0 and bins[1]["precision"] == pytest.approx(2 / 3)
    assert bins[1]["precision_known"] == 1.0 and bins[1]["n_known"] == 2


def test_precision_per_question_bins_by_rank_within_each_question():
    """Two questions on different confidence scales: by confidence the sure-but-wrong yes/no
    pairs fill the top bin; by rank within each question each question's best pairs do."""
    colour = [{"image_id": i, "question": "What color?", "answer": "red" if i % 2 else "pink",
               "confidence": 0.2 + i / 100} for i in range(4)]          # ranks: 0.125 .. 0.875
    text = [{"image_id": i, "question": "Is there text?", "answer": "yes" if i >= 2 else "no",
             "confidence": 0.9 + i / 100} for i in range(4)]
    truth = {**{(i, "what color"): "red" for i in range(4)}, **{(i, "is there text"): "no" for i in range(4)}}
    assert pseudo.rank_in_question(colour + text) == [0.125, 0.375, 0.625, 0.875] * 2
    by_conf = pseudo.precision_by_bin(colour + text, truth, bins=2)
    assert [b["precision"] for b in by_conf] == [0.5, 0.5]
    assert by_conf[1]["lo"] == 0.9 and by_conf[1]["hi"] == 0.93
    by_rank = pseudo.precision_by_bin(colour + text, truth, bins=2, per_question=True)
    assert [b["n"] for b in by_rank] == [4, 4]
    assert [b["lo"] for b in by_rank] == [0.125, 0.625] and by_rank[1]["hi"] == 0.875
    # low ranks: colour 0 (pink, wrong), 1 (red, right); text 0, 1 (no, right)
    assert [b["precision"] for b in by_rank] == [0.75, 0.25]


def test_known_questions_only_keeps_and_rewords_known_ones(tiny):
    _, proc = tiny
    tok, stats = proc.tokenizer, pseudo.ParseStats()
    gens = [[_gen(tok, "Question: is there TEXT\nAnswer: no"),
             _gen(tok, "Question: Is there a made-up thing?\nAnswer: yes")]]
    known = {pseudo.question_key("Is there text?"): "Is there text?"}
    out = pseudo.candidates_from_generations(tok, gens, [0], 48, stats, known)
    assert [(c.question, c.answer) for c in out] == [("Is there text?", "no")]
    assert stats.unknown_question == 1 and stats.kept == 1


def test_answer_form_with_caption_context_scores_the_question_as_the_prompt(tiny):
    """G's answer stream: the caption, then the question, is the prompt and the answer alone
    the reply; choose_known picks what teacher forcing in that form ranks first."""
    model, proc = tiny
    imgs = [Image.new("RGB", (64, 64), c) for c in ((180, 90, 90), (40, 160, 60))]
    q = "What color is the abnormality?"
    choices = {q: ["red", "pink, red", "green"]}
    captions = ["A colonoscopy frame with a red polyp in the center.", None]
    assert pseudo.known_prompt(q, "answer", captions[0]) == (f"{captions[0]}\n{q}", "")
    assert pseudo.known_prompt(q, "answer", "  ") == (q, "")
    assert pseudo.known_prompt(q, "generate", "A frame.") == (
        f"A frame.\n{pseudo.QA_INSTRUCTION}", f"Question: {q}\nAnswer:")
    with pytest.raises(ValueError, match="form must be"):
        pseudo.known_prompt(q, "vqa")

    def logprobs(img, caption, answer):
        batch = models.encode(proc, [img], [pseudo.with_context(caption, q)], [answer])
        with torch.no_grad():
            logits = model(**batch).logits[0]
        labels = batch["labels"][0]
        pos = (labels != -100).nonzero().flatten()
        return logits[pos - 1].log_softmax(-1).gather(-1, labels[pos, None]).flatten().tolist()

    cfg = pseudo.PseudoConfig(answer_mode="choose", batch_size=2, k=1, caption_choices=False)
    got = pseudo.choose_known(model, proc, models.pixel_values(proc, imgs), [0, 1], [[q], [q]],
                              choices, cfg, pseudo.ParseStats(), form="answer", contexts=captions)
    assert len(got) == 2
    for c in got:
        scored = {a: logprobs(imgs[c.image_index], captions[c.image_index], a) for a in choices[q]}
        best = max(scored, key=lambda a: sum(scored[a]))
        assert c.answer == best
        assert c.confidence == pytest.approx(math.exp(sum(scored[best]) / len(scored[best])), rel=1e-4)
    # the caption is read: with it the ranking of the answers of image 0 moves
    alone = pseudo.choose_known(model, proc, models.pixel_values(proc, imgs[:1]), [0], [[q]],
                                choices, cfg, pseudo.ParseStats(), form="answer")
    assert alone[0].confidence != pytest.approx(got[0].confidence if got[0].image_index == 0
                                                else got[1].confidence)


def test_a_long_caption_is_cut_at_a_word_in_gs_prompt():
    short = "A polyp in the lower-left."
    assert pseudo.with_context(short, "Q?") == f"{short}\nQ?"
    assert pseudo.with_context("  a \n b ", "Q?") == "a b\nQ?"  # whitespace collapsed
    assert pseudo.with_context(None, "Q?") == "Q?"
    long = " ".join(f"word{i}" for i in range(2000))
    context, text = pseudo.with_context(long, "Q?").rsplit("\n", 1)
    assert text == "Q?" and len(context) <= pseudo.CONTEXT_CHARS
    assert long.startswith(context + " ") and len(context) > pseudo.CONTEXT_CHARS - 10
    assert pseudo.with_context("x" * 900, "Q?", limit=100) == "x" * 100 + "\nQ?"  # no space


def test_named_at_finds_whole_phrases_only():
    assert pseudo.named_at("A polyp in the Upper-Left.", "upper-left") == (15, 25)
    assert pseudo.named_at("A polyp in the upper-center.", "center") is None  # part of a place
    assert pseudo.named_at("A polyp at >20mm.", ">20mm") == (11, 16)
    assert pseudo.named_at("A red polyp.", "") is None


def test_caption_choices_keeps_the_named_answers_or_all():
    places = ["upper-left", "center", "lower-right"]
    assert pseudo.caption_choices(places, "A polyp in the upper-left and an instrument in the "
                                          "center.") == ["upper-left", "center"]
    assert pseudo.caption_choices(places, "A polyp in the upper-center.") == places  # none named
    assert pseudo.caption_choices(places, None) == places
    # yes/no never count as named: "no" in "no bleeding" says nothing about the question
    assert pseudo.caption_choices(["yes", "no", "polyp"], "A frame, no bleeding.") == ["yes", "no", "polyp"]
    assert pseudo.caption_choices(["no", "polyp"], "A small polyp, no bleeding.") == ["polyp"]
    # a listed answer is named when each item is, and then outranks its parts
    colours = ["red", "white", "red, white", "pink, red"]
    assert pseudo.caption_choices(colours, "Red and white inflamed mucosa.") == ["red, white"]
    assert pseudo.caption_choices(colours, "A red polyp.") == ["red"]
    assert pseudo.caption_choices(colours, "A red polyp on white light, pink mucosa.") == [
        "red, white", "pink, red"]


def test_choose_mode_takes_the_answer_the_caption_names(tiny):
    """With caption_choices, G chooses among the answers the caption names: a caption naming
    one answer gets that answer at confidence 1; one naming several, G's likeliest of them at
    its share of their probability; one naming none, every choice as before."""
    model, proc = tiny
    img = Image.new("RGB", (64, 64), (180, 90, 90))
    q = "What color is the abnormality?"
    choices = {q: ["red", "green", "blue"]}
    pv = models.pixel_values(proc, [img])

    def score(caption, answer):
        batch = models.encode(proc, [img], [pseudo.with_context(caption, q)], [answer])
        with torch.no_grad():
            logits = model(**batch).logits[0]
        labels = batch["labels"][0]
        pos = (labels != -100).nonzero().flatten()
        lps = logits[pos - 1].log_softmax(-1).gather(-1, labels[pos, None]).flatten()
        return float(lps.sum()), math.exp(float(lps.mean()))

    on, off = (pseudo.PseudoConfig(answer_mode="choose", k=1, caption_choices=c) for c in (True, False))
    picks_off = set()
    for colour in choices[q]:
        caption = f"A frame with a {colour} polyp."
        got = pseudo.choose_known(model, proc, pv, [0], [[q]], choices, on, pseudo.ParseStats(),
                                  form="answer", contexts=[caption])
        assert [c.answer for c in got] == [colour] and got[0].confidence == 1.0  # the caption's word
        picks_off |= {c.answer for c in pseudo.choose_known(
            model, proc, pv, [0], [[q]], choices, off, pseudo.ParseStats(), form="answer",
            contexts=[caption])}
    assert len(picks_off) < 3  # without the rule G does not follow every caption
    got = pseudo.choose_known(model, proc, pv, [0], [[q]], choices, on, pseudo.ParseStats(),
                              form="answer", contexts=["A green polyp."], reliability={q: 0.8})
    assert got[0].answer == "green" and got[0].confidence == pytest.approx(0.8)
    # two named: G's choice between them, confident by its share of their probability
    caption = "A frame with a red and green polyp."
    got = pseudo.choose_known(model, proc, pv, [0], [[q]], choices, on, pseudo.ParseStats(),
                              form="answer", contexts=[caption])
    sums = {a: score(caption, a)[0] for a in ("red", "green")}
    best = max(sums, key=sums.get)
    assert got[0].answer == best
    assert got[0].confidence == pytest.approx(1 / sum(math.exp(v - sums[best]) for v in sums.values()),
                                              rel=1e-4)
    # a caption naming none: every choice, scored by the geometric mean of the answer's tokens
    caption = "A frame with a polyp."
    got = pseudo.choose_known(model, proc, pv, [0], [[q]], choices, on, pseudo.ParseStats(),
                              form="answer", contexts=[caption])
    best = max(choices[q], key=lambda a: score(caption, a)[0])
    assert got[0].answer == best
    assert got[0].confidence == pytest.approx(score(caption, best)[1], rel=1e-4)


def test_caption_reliability_is_how_often_named_answers_held_the_truth_on_seed_images():
    q, where = "What color is the abnormality?", "Where is it?"
    choices = {q: ["red", "pink", "red, white"], where: ["center", "upper-left"],
               "Is there text?": ["yes", "no"]}
    captions = {1: "A red polyp.", 2: "Red and white mucosa.", 3: "A pink polyp.", 4: "A polyp.",
                5: "A polyp in the center and one in the upper-left."}
    rows = [{"image_id": 1, "question": q, "answer": "red"},             # named, right
            {"image_id": 2, "question": q, "answer": "white, red"},      # named as a list, right
            {"image_id": 3, "question": q, "answer": "red"},             # named, wrong
            {"image_id": 4, "question": q, "answer": "red"},             # not named: not counted
            {"image_id": 5, "question": where, "answer": "upper-left"},  # among the two named
            {"image_id": 1, "question": "Is there text?", "answer": "no"}]
    got = pseudo.caption_reliability(rows, captions, choices)
    assert got == {q: (2 + 1) / (3 + 2), where: (1 + 1) / (1 + 2), "Is there text?": 0.5}


def test_demo_report_prints_both_precision_tables():
    from leaml.methods.report import format_precision
    bins = [{"bin": 0, "lo": 0.125, "hi": 0.375, "n": 4, "n_known": 3, "precision": 0.5,
             "precision_known": 2 / 3}]
    by_conf = format_precision(bins, 0)
    assert "by confidence (seed 0" in by_conf and "conf 0.125-0.375: n=    4  precision  50.0%" in by_conf
    by_rank = format_precision(bins, 0, per_question=True)
    assert "by confidence rank within its question" in by_rank and "rank 0.125-0.375" in by_rank
    assert "(of answerable questions: 67%)" in by_rank
