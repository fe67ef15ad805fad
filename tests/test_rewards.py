"""Tests for rewards.py: hand-computed tables for every reward and mode, the published gaming
cases, symmetric gating, odd records, property tests over random junk and random well-formed
completions, parse timing, and the ground-truth completion earning the maximum.

Run: python -m pytest tests/test_rewards.py -q
"""
import math
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards as R  # noqa: E402

OURS, REL = R.RewardConfig(), R.RewardConfig.released()
CTX = R.RewardContext(frame_width=100, frame_height=100, progress=0.0)  # 0.1 normalized = 10 px
LATE = R.RewardContext(frame_width=100, frame_height=100, progress=1.0)  # sigma = 1

# Spatio-temporal record. Pixels at 100x100: man@1s [10,10,30,30]; at 3s man [50,50,70,70] +
# [80,80,90,90] (two regions) and red car [0,0,20,10].
ST = {"id": "st", "task": "temporal-spatial free-form QA", "question": "q",
      "answer": "the man walks to the red car",
      "key_frames": [{"idx": 0, "time": 1.0, "path": "a.jpg"}, {"idx": 4, "time": 3.0, "path": "b.jpg"}],
      "key_items": {"0": {"man": [[0.1, 0.1, 0.3, 0.3]]},
                    "4": {"man": [[0.5, 0.5, 0.7, 0.7], [0.8, 0.8, 0.9, 0.9]],
                          "red car": [[0.0, 0.0, 0.2, 0.1]]}}}
ONE = {**ST, "key_frames": [{"idx": 0, "time": 5.0, "path": "a.jpg"}],
       "key_items": {"0": {"man": [[0.1, 0.1, 0.3, 0.3]]}}}  # one key frame at 5 s
TQA = {"id": "tq", "task": "temporal QA", "question": "q", "answer": "[2.0, 6.0]"}
TMCQ = {"id": "tm", "task": "temporal QA (MCQ)", "question": "q", "answer": "C\n[2.0, 6.0]"}
VQA = {"id": "vq", "task": "visual QA", "question": "q", "image_size": [200, 100],
       "answer": "<obj>cup</obj><box>[20, 10, 60, 50]</box>"}  # -> [10, 10, 30, 50] at 100x100
MCQ = {"id": "mc", "task": "General video QA MCQ", "question": "q", "answer": "B"}
FREE = {"id": "ff", "task": "General video QA Free-form", "question": "q", "answer": "a dog runs"}
STMCQ = {**ST, "id": "stm", "task": "General video QA MCQ", "answer": "D"}
ALL_RECORDS = [ST, ONE, TQA, TMCQ, VQA, MCQ, FREE, STMCQ]

MAN0 = "<obj>man</obj><box>[10, 10, 30, 30]</box>at<t>1.0</t>s"  # a perfect claim


def c(think, answer="the man walks to the red car"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def claim(name, boxes, t):
    return f"<obj>{name}</obj>" + "".join(f"<box>{list(b)}</box>" for b in boxes) + f"at<t>{t}</t>s"


# ---------------------------------------------------------------------------------------------
# Small metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,want", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),
    ([0, 0, 2, 2], [1, 0, 3, 2], 1 / 3),
    ([0, 0, 4, 4], [1, 1, 3, 3], 0.25),
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),          # touching edges
    ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),
    ([2, 2, 0, 0], [0, 0, 2, 2], 0.0),          # inverted
    ([0, 0, 0, 2], [0, 0, 0, 2], 0.0),          # empty
    ([1, 2, 3], [1, 2, 3, 4], 0.0),             # wrong arity
    ([0, 0, math.inf, 2], [0, 0, 2, 2], 0.0),
    (None, [0, 0, 1, 1], 0.0),
])
def test_box_iou(a, b, want):
    assert R.box_iou(a, b) == pytest.approx(want)


@pytest.mark.parametrize("a,b,want", [
    ((0, 10), (5, 15), 5 / 15), ((2, 6), (2, 6), 1.0), ((0, 1), (2, 3), 0.0),
    ((2, 2), (2, 2), 0.0), ((5, 1), (0, 10), 0.0), (None, (0, 1), 0.0), ((0, 4), (1, 2), 0.25),
])
def test_segment_iou(a, b, want):
    assert R.segment_iou(a, b) == pytest.approx(want)


@pytest.mark.parametrize("pred,ref,skip,want", [
    ("the cat sat", "The cat sat!", True, 1.0),
    ("a b", "a c", True, (0.5 + 0.0 + 0.5) / 3),
    ("cat sat mat", "cat mat", True, (0.8 + 0.0 + 0.8) / 3),
    ("cat", "cat", True, 1.0),            # one-word reference: ROUGE-2 left out
    ("cat", "cat", False, 2 / 3),         # the release scores it 2/3
    ("", "cat", True, 0.0),
    ("b a", "a b", True, (1.0 + 0.0 + 0.5) / 3),  # LCS 1 of 2
])
def test_rouge(pred, ref, skip, want):
    assert R.rouge_f1_mean(pred, ref, skip_empty_bigrams=skip) == pytest.approx(want)


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[B]", "B"), ("Correct Option: B", "B"),
    ("  Correct Option:  (C) ", "C"), ("From <t>1</t>s to <t>2</t>s\nCorrect Option: D", "D"),
    ("B\n[1.0, 2.0]", "B"), ("b", None), ("B C", None), ("BC", None), ("B. the cat", None),
    ("Correct Option: A Correct Option: B", None), ("", None), (None, None), ("(B", None),
])
def test_parse_letter(text, want):
    assert R.parse_letter(text) == want


@pytest.mark.parametrize("text,want", [
    ("From <t>2.0</t>s to <t>4.5</t>s", (2.0, 4.5)),
    ("From <t> 2 </t>s to <t>3</t>s", (2.0, 3.0)),
    ("[1, 3]", (1.0, 3.0)), ("B\n[1.5, 2]", (1.5, 2.0)),
    ("From <t>5</t>s to <t>2</t>s", None),                 # inverted
    ("<t>1</t> <t>2</t> <t>3</t>", None),                  # three times: a hedge
    ("[1, 2] or [3, 4]", None), ("<t>1e3</t>s to <t>2</t>s", None), ("<t>-1</t> <t>2</t>", None),
    ("", None), (None, None), ("[[1, 2]]", (1.0, 2.0)), ("[1, 2, 3]", None),
])
def test_parse_span(text, want):
    assert R.parse_span(text) == want


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------

def test_parser_grammar_variants():
    p = R.parse_completion(c("a <obj> red  car </obj> <box>[1,2,3,4]</box>\n<box>[ 5, 6, 7, 8 ]</box> at <t> 2.5 </t>s "
                             "b <obj>man</obj><box>[1,2,3]</box>at<t>x</t>s <obj>cup</obj> no box "
                             "<obj>dog</obj><box>[1,2,3,4]</box> later <t>9</t>"))
    assert p.well_formed and p.answer == "the man walks to the red car"
    assert [(x.name, x.boxes, x.time, x.n_boxes) for x in p.claims] == [
        ("red car", [[1, 2, 3, 4], [5, 6, 7, 8]], 2.5, 2),
        ("man", [], None, 1),                    # malformed box and time: a claim scored 0
        ("dog", [[1, 2, 3, 4]], None, 1)]        # the 't' is not after 'at': no time
    assert p.think_times == [2.5, 9.0] and p.n_bad_times == 1
    assert p.n_think_boxes == 4 and len(p.think_boxes) == 3


@pytest.mark.parametrize("text,think,answer,well", [
    ("<think>a</think><answer>b</answer>", "a", "b", True),
    ("  <think>a</think>\n<answer> b </answer>\n", "a", "b", True),
    ("<think>a</think>", "a", None, False),                                   # no answer
    ("<answer>b</answer>", None, "b", False),                                 # no think
    ("<answer>b</answer><think>a</think>", "a", None, False),                 # out of order
    ("<think>a</think><answer>b</answer><answer>c</answer>", "a", None, False),  # two answers
    ("<think>a</think><think>c</think><answer>b</answer>", None, None, False),
    ("x<think>a</think><answer>b</answer>", "a", "b", False),                 # junk outside
    ("<think>a <obj>m</think><answer>b</answer>", "a <obj>m", "b", False),    # unpaired inside
    ("<think>a <obj><box></obj></box></think><answer>b</answer>", None, None, None),  # nested
    ("<think><answer>b</answer></think>", "<answer>b</answer>", None, False),  # answer inside think
    ("</think>a<think><answer>b</answer>", None, None, False),
    ("", None, None, False), ("<think>a</thi", None, None, False),
])
def test_parser_structure(text, think, answer, well):
    p = R.parse_completion(text)
    if well is None:
        assert not p.well_formed
        return
    assert (p.think, p.answer, p.well_formed) == (think, answer, well)


@pytest.mark.parametrize("body", [
    "<t>" + "9" * 400 + "</t>", "<t>٣</t>", "<t>1e400</t>", "<t>nan</t>", "<t>inf</t>", "<t>-2</t>",
    "<t>1.2.3</t>", "<t></t>", "<t><t>2</t></t>",
])
def test_parser_bad_times_are_dropped_and_counted(body):
    p = R.parse_completion(c(body))
    assert p.think_times == [] or body == "<t><t>2</t></t>"
    assert all(math.isfinite(t) for t in p.think_times)


@pytest.mark.parametrize("box", ["[1,2,3]", "[[1,2,3,4]]", "[" * 500 + "]" * 500, "[1,2,3,4,5]",
                                 "[a,b,c,d]", "[1,2,3," + "4" * 400 + "]", "1,2,3,4", "[١,2,3,4]"])
def test_parser_bad_boxes(box):
    p = R.parse_completion(c(f"<obj>man</obj><box>{box}</box>at<t>1.0</t>s"))
    assert p.claims[0].boxes == [] and p.claims[0].n_boxes == 1


# ---------------------------------------------------------------------------------------------
# Rewards, hand-computed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rec,ans,cfg,want", [
    (MCQ, "B", OURS, 1.0), (MCQ, "(B)", OURS, 1.0), (MCQ, "[B]", OURS, 1.0), (MCQ, "B.", OURS, 1.0),
    (MCQ, "Correct Option: B", OURS, 1.0), (MCQ, "A", OURS, 0.0), (MCQ, "A B", OURS, 0.0),
    (TMCQ, "From <t>2.0</t>s to <t>6.0</t>s\nCorrect Option: C", OURS, 1.0),
    (TMCQ, "From <t>2.0</t>s to <t>6.0</t>s\nCorrect Option: B", OURS, 0.0),
    (TMCQ, "From <t>2.0</t>s to <t>6.0</t>s\nC", OURS, 0.0),
    (FREE, "a dog runs", OURS, 1.0), (FREE, "a cat runs", OURS, (2 / 3 + 0 + 2 / 3) / 3),
    (TQA, "From <t>4.0</t>s to <t>8.0</t>s", OURS, 2 / 6), (TQA, "[2, 6]", OURS, 1.0),
    (TQA, "From <t> 2.0 </t>s to <t>6.0</t>s", OURS, 1.0),
    (TQA, "From <t> 2.0 </t>s to <t>6.0</t>s", REL, 0.0),   # the release's strict reader
    (TQA, "From <t>2.0</t>s to <t>6.0</t>s", REL, 1.0),
    (VQA, "<obj>cup</obj><box>[10, 10, 30, 50]</box>", OURS, 1.0),
    (VQA, "<obj>cup</obj><box>[10, 10, 30, 30]</box>", OURS, 0.5),
    (VQA, "<box>[10, 10, 30, 50]</box><box>[60, 60, 90, 90]</box>", OURS, 2 / 3),  # spare box costs
    (VQA, "<box>[10, 10, 30, 50]</box><box>[60, 60, 90, 90]</box>", REL, 1.0),     # release: first box
    (VQA, "<box>[60, 60, 90, 90]</box><box>[10, 10, 30, 50]</box>", REL, 0.0),
])
def test_answer_reward(rec, ans, cfg, want):
    assert R.answer_reward(c("x", ans), rec, CTX, cfg) == pytest.approx(want)


@pytest.mark.parametrize("ans,want", [
    ("From <t>2.0</t>s to <t>6.0</t>s\nCorrect Option: B", 1.0),
    ("From <t>4.0</t>s to <t>8.0</t>s\nCorrect Option: C", 2 / 6),
    ("Correct Option: C", 0.0),
])
def test_temporal_iou_reward(ans, want):
    assert R.temporal_iou_reward(c("x", ans), TMCQ, CTX, OURS) == pytest.approx(want)


@pytest.mark.parametrize("rec,text,cfg,want", [
    (ST, c(MAN0), OURS, 1.0), (ST, c("no claims"), OURS, 0.5), (ST, "<think>" + MAN0 + "</think>", OURS, 0.0),
    (ST, c(MAN0) + "<answer>x</answer>", OURS, 0.0), (ST, c(MAN0) + "<answer>x</answer>", REL, 1.0),
    (ST, "<answer>a</answer><think>" + MAN0 + "</think>", OURS, 0.0),
    (ST, "<answer>a</answer><think>" + MAN0 + "</think>", REL, 1.0),  # the release ignores order
    (ST, c(MAN0 + "<obj>x"), OURS, 0.0), (ST, c(MAN0 + "<obj>x"), REL, 0.0),
    (ST, c("<obj>man</obj> <box>[1,2,3,4]</box> <t>1.0</t>"), OURS, 0.5),   # tags but no claim
    (ST, c("<obj>man</obj> <box>[1,2,3,4]</box> <t>1.0</t>"), REL, 1.0),    # release counts tags
    (TQA, c("from <t>2</t>s to <t>3</t>s", "[2, 3]"), OURS, 1.0), (TQA, c("at <t>2</t>s", "[2, 3]"), OURS, 0.5),
    (VQA, c("look", "<obj>cup</obj><box>[1, 2, 3, 4]</box>"), OURS, 1.0), (VQA, c("look", "cup"), OURS, 0.5),
    (FREE, c("plain words", "a dog"), OURS, 1.0), (MCQ, c("plain", "B"), REL, 1.0),
    (STMCQ, c("plain", "D"), OURS, 0.5), (STMCQ, c("plain", "D"), REL, 1.0),  # release: General QA is always 1
])
def test_format_reward(rec, text, cfg, want):
    assert R.format_reward(text, rec, CTX, cfg) == pytest.approx(want)


def _ctx(p):
    return R.RewardContext(100, 100, p)


@pytest.mark.parametrize("think,ctx,cfg,want", [
    ("<t>1.0</t>s <t>2.0</t>s", _ctx(0.0), OURS, (1 + math.exp(-1 / 32)) / 2),   # sigma 4
    ("<t>2.0</t>s", _ctx(0.5), OURS, math.exp(-1 / 8)),                          # sigma 2
    ("<t>2.0</t>s", _ctx(0.74), OURS, math.exp(-1 / (2 * 1.04 ** 2))),            # sigma 1.04
    ("<t>2.0</t>s", _ctx(0.75), OURS, math.exp(-0.5)),                            # sigma 1
    ("<t>5.0</t>s", _ctx(1.0), OURS, math.exp(-2)),                               # nearest key 3 s
    ("<t>1.0</t> <t>1.0</t> <t>5.0</t>", LATE, OURS, (1 + math.exp(-2)) / 2),    # repeat counts once
    ("<t>1.0</t> <t>1.0</t> <t>5.0</t>", LATE, REL, (2 + math.exp(-2)) / 3),
    ("<t>1.0</t> <t>abc</t>", LATE, OURS, 0.5), ("<t>1.0</t> <t>abc</t>", LATE, REL, 1.0),
    ("no times", LATE, OURS, 0.0),
])
def test_temporal_point(think, ctx, cfg, want):
    assert R.temporal_point_reward(c(think), ST, ctx, cfg) == pytest.approx(want)


def test_temporal_point_needs_an_answer_in_ours_only():
    text = "<think><t>1.0</t>s</think>"
    assert R.temporal_point_reward(text, ST, LATE, OURS) == 0.0
    assert R.temporal_point_reward(text, ST, LATE, REL) == 1.0


@pytest.mark.parametrize("think,cfg,want", [
    ("<t>1</t> <t>2</t> <t>4</t> <t>6</t> <t>7</t>", OURS, 3 / 5),   # ends included
    ("<t>4</t> <t>4</t> <t>9</t>", OURS, 1 / 2), ("<t>4</t> <t>4</t> <t>9</t>", REL, 2 / 3),
    ("<t>4</t> <t>x</t>", OURS, 1 / 2), ("none", OURS, 0.0),
])
def test_temporal_segment(think, cfg, want):
    assert R.temporal_segment_reward(c(think, "[2, 6]"), TQA, CTX, cfg) == pytest.approx(want)
    assert R.temporal_segment_reward(c(think, "[2, 6]"), TMCQ, CTX, cfg) == pytest.approx(want)


MAN4 = [[50, 50, 70, 70], [80, 80, 90, 90]]
NONE_ID = R.RewardConfig(identity="none")


@pytest.mark.parametrize("think,cfg,want", [
    (MAN0, OURS, 1.0), (MAN0, REL, 1.0),
    (claim("man", [[10, 10, 30, 50]], 1.0), OURS, 0.5),                   # IoU 400 / 800
    (claim("man", MAN4, 3.0), OURS, 1.0),                                  # multi-region
    (claim("man", MAN4[:1], 3.0), OURS, 2 / 3), (claim("man", MAN4[:1], 3.0), REL, 0.5),
    (claim("man", MAN4[::-1], 3.0), OURS, 1.0),
    # identity
    (claim("woman", [[10, 10, 30, 30]], 1.0), OURS, 0.0), (claim("woman", [[10, 10, 30, 30]], 1.0), REL, 1.0),
    (claim("", [[10, 10, 30, 30]], 1.0), OURS, 0.0), (claim("", [[10, 10, 30, 30]], 1.0), REL, 1.0),
    (claim("the Man", [[10, 10, 30, 30]], 1.0), OURS, 1.0), (claim("tall man", [[10, 10, 30, 30]], 1.0), OURS, 1.0),
    (claim("the man", [[10, 10, 30, 30]], 1.0), R.RewardConfig(identity="strict"), 0.0),
    (claim(" Man ", [[10, 10, 30, 30]], 1.0), R.RewardConfig(identity="strict"), 1.0),
    (claim("dog", [[10, 10, 30, 30]], 1.0), NONE_ID, 1.0),
    (claim("red", [[0, 0, 20, 10]], 3.0), OURS, 1.0),                     # shared word
    # object aggregation: identity none at 3 s matches man (1.0 with both boxes) and red car (0)
    (claim("x", MAN4, 3.0), NONE_ID, 0.5), (claim("x", MAN4, 3.0), R.RewardConfig(identity="none", object_agg="max"), 1.0),
    # claim normalization: wrong name / off-key time / no time cost under "all" only
    (MAN0 + claim("dog", [[10, 10, 30, 30]], 1.0), OURS, 0.5),
    (MAN0 + claim("dog", [[10, 10, 30, 30]], 1.0), R.RewardConfig(claim_norm="matched"), 1.0),
    (MAN0 + claim("man", [[10, 10, 30, 30]], 10.0), OURS, 0.5), (MAN0 + claim("man", [[10, 10, 30, 30]], 10.0), REL, 1.0),
    (MAN0 + "<obj>man</obj><box>[10,10,30,30]</box>", OURS, 0.5),
    (MAN0 + "<obj>man</obj><box>[1,2,3]</box>at<t>1.0</t>s", OURS, 0.5),   # one malformed claim costs one claim
    ("no claims", OURS, 0.0),
])
def test_spatial(think, cfg, want):
    assert R.spatial_reward(c(think), ST, CTX, cfg) == pytest.approx(want)


@pytest.mark.parametrize("t,want", [(5.0, 1.0), (4.0, 1.0), (6.0, 1.0), (3.99, 0.0), (6.01, 0.0),
                                    (3.0, 0.0), (7.0, 0.0), (0.0, 0.0)])
def test_temporal_gate_is_symmetric(t, want):
    for cfg in (OURS, REL):
        assert R.spatial_reward(c(claim("man", [[10, 10, 30, 30]], t)), ONE, CTX, cfg) == want


def test_gate_picks_nearest_key_frame():
    # 1.9 s is 0.9 from 1 s and 1.1 from 3 s: the man at 1 s, not the one at 3 s
    assert R.spatial_reward(c(claim("man", [[10, 10, 30, 30]], 1.9)), ST, CTX, OURS) == 1.0
    assert R.spatial_reward(c(claim("man", MAN4, 2.1)), ST, CTX, OURS) == 1.0
    assert R.spatial_reward(c(claim("man", MAN4, 2.1)), ST, CTX, R.RewardConfig(tau_seconds=0.5)) == 0.0


def test_visual_qa_spatial():
    think = "<box>[10, 10, 30, 50]</box> <box>[60, 60, 90, 90]</box>"
    assert R.spatial_reward(c(think, "cup"), VQA, CTX, OURS) == pytest.approx(2 / 3)
    assert R.spatial_reward(c(think, "cup"), VQA, CTX, REL) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Gaming: none of the published tricks pays under our default rules
# ---------------------------------------------------------------------------------------------
GRID = [[x, y, x + 10, y + 10] for x in range(0, 100, 10) for y in range(0, 100, 10)]
HONEST = c(MAN0 + " then " + claim("man", MAN4, 3.0) + " near " + claim("red car", [[0, 0, 20, 10]], 3.0))
rnd = random.Random(0)
RANDOM_BOXES = [[x, y, x + 5, y + 5] for x, y in ((rnd.randrange(40, 90), rnd.randrange(40, 90)) for _ in range(99))]


@pytest.mark.parametrize("name,gamed,strict", [
    ("100-box grid", c(claim("man", GRID, 1.0)), True),
    ("honest plus random boxes", c(claim("man", [[10, 10, 30, 30]] + RANDOM_BOXES[:3], 1.0)), True),
    ("honest plus 99 random boxes", c(claim("man", [[10, 10, 30, 30]] + RANDOM_BOXES, 1.0)), True),
    ("grid split into claims", c("".join(claim("man", [b], 1.0) for b in GRID)), True),
    ("repeated claim", c(MAN0 * 10), False),
    ("repeat to dilute an error", c(claim("man", [[60, 60, 90, 90]], 1.0) + MAN0 * 9), True),
    ("near-duplicate repeats", c(MAN0 + "".join(claim("man", [[10 + k, 10, 30 + k, 30]], 1.0) for k in range(1, 9))), True),
    ("extra wrong names", c(MAN0 + claim("dog", [[10, 10, 30, 30]], 1.0) + claim("cat", [[1, 1, 5, 5]], 1.0)), True),
    ("off-key times", c(MAN0 + claim("man", [[10, 10, 30, 30]], 9.0) + " <t>12.0</t>s"), True),
    ("empty name", c(claim("", [[10, 10, 30, 30]], 1.0)), True),
    ("man vs woman", c(claim("woman", [[10, 10, 30, 30]], 1.0)), True),
    ("think with no answer", "<think>" + MAN0 + "</think>", True),
    ("several answer blocks", c(MAN0, "a man") + "<answer>the man walks to the red car</answer>", True),
    ("tags out of order", "<answer>the man walks to the red car</answer><think>" + MAN0 + "</think>", True),
])
def test_gaming_does_not_pay(name, gamed, strict):
    honest = R.score_completion(c(MAN0), ST, CTX, OURS)
    got = R.score_completion(gamed, ST, CTX, OURS)
    assert got["spatial"] <= honest["spatial"] + 1e-12, name
    assert got["total"] <= honest["total"] + 1e-12, name
    if strict:
        assert got["total"] < honest["total"] - 1e-3, name


def test_release_rules_are_gameable_as_published():
    """The released rules pay the tricks (documents why ours are the default)."""
    grid = R.score_completion(c(claim("man", [[10, 10, 30, 30]] + RANDOM_BOXES, 1.0)), ST, CTX, REL)
    assert grid["spatial"] == pytest.approx(1.0)
    dilute = c(claim("man", [[60, 60, 90, 90]], 1.0) + MAN0 * 9)
    assert R.spatial_reward(dilute, ST, CTX, REL) == pytest.approx(0.9)
    assert R.spatial_reward(c(claim("woman", [[10, 10, 30, 30]], 1.0)), ST, CTX, REL) == 1.0


def test_full_honest_completion_beats_partial_gaming():
    h = R.score_completion(HONEST, ST, CTX, OURS)
    assert h["spatial"] == pytest.approx(1.0) and h["format"] == 1.0


# ---------------------------------------------------------------------------------------------
# Applicability, odd records, group table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rec,names", [
    (ST, {"answer", "format", "temporal_point", "spatial"}),
    (STMCQ, {"answer", "format", "temporal_point", "spatial"}),
    (TQA, {"answer", "format", "temporal_segment"}),
    (TMCQ, {"answer", "temporal_iou", "format", "temporal_segment"}),
    (VQA, {"answer", "format", "spatial"}), (MCQ, {"answer", "format"}), (FREE, {"answer", "format"}),
])
def test_applicable_rewards_only(rec, names):
    got = R.score_completion(c("x"), rec, CTX, OURS)
    assert set(got) == names | {"total"}
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))


@pytest.mark.parametrize("rec,reward,reason", [
    ({**ST, "key_frames": []}, "spatial", "no or odd key_frames"),
    ({**ST, "key_frames": []}, "temporal_point", "no or odd key_frames"),
    ({**ST, "key_items": {"0": ST["key_items"]["0"]}}, "spatial", "key frame missing from key_items"),
    ({**ST, "key_frames": [{"idx": 0, "time": "1.0"}]}, "temporal_point", "no or odd key_frames"),
    ({**ST, "key_items": {"0": {"man": [[0.1, "a", 0.3, 0.3]]}, "4": {}}}, "spatial", "odd key_items boxes"),
    ({**TQA, "answer": "[3, 3]"}, "answer", "odd or empty gt span"),
    ({**TQA, "answer": 7}, "temporal_segment", "odd or empty gt span"),
    ({**MCQ, "answer": "maybe"}, "answer", "gt answer is not a letter"),
    ({**VQA, "image_size": None}, "answer", "odd visual QA answer box or image_size"),
    ({**FREE, "answer": "?!"}, "answer", "gt free-form answer is empty"),
    ({**FREE, "task": "dance"}, "answer", "unknown task"),
])
def test_odd_records_score_zero_with_a_reason(rec, reward, reason):
    text = R.ground_truth_completion(ST, CTX).replace("the man walks to the red car", "B")
    got = R.score_completion(text, rec, CTX, OURS)
    assert got[reward] == 0.0 and got[reward].reason == reason      # the reason comes with the score
    assert R.skip_reasons(got)[reason] >= 1                          # once per reward that could not read it
    table = R.score_group([text, text], rec, CTX, OURS)
    assert R.skip_reasons(table)[reason] == 2 * R.skip_reasons(got)[reason]   # per call: no global tally


def test_odd_context_is_a_reason():
    got = R.score_completion(R.ground_truth_completion(ST, CTX), ST, R.RewardContext(0, 100), OURS)
    assert got["spatial"] == 0.0 and R.skip_reasons(got)["odd frame size in context"] == 1
    assert not R.skip_reasons(R.score_completion(R.ground_truth_completion(ST, CTX), ST, CTX, OURS))
    got = R.score_completion(c("<t>1.0</t>"), ST, R.RewardContext(100, 100, float("nan")), OURS)
    assert math.isfinite(got["total"])


def test_score_group():
    texts = [R.ground_truth_completion(TMCQ, CTX), "junk", c("x", "Correct Option: C")]
    table = R.score_group(texts, TMCQ, CTX, OURS)
    assert set(table) == {"answer", "temporal_iou", "format", "temporal_segment", "total"}
    assert table["total"][0] == 4.0 and table["total"][1] == 0.0 and table["answer"][2] == 1.0
    assert all(len(v) == 3 for v in table.values())


# ---------------------------------------------------------------------------------------------
# The perfect completion earns the maximum on every applicable reward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rec", ALL_RECORDS)
@pytest.mark.parametrize("cfg", [OURS, REL], ids=["ours", "released"])
@pytest.mark.parametrize("progress", [0.0, 0.9])
def test_ground_truth_completion_is_perfect(rec, cfg, progress):
    ctx = R.RewardContext(100, 100, progress)
    got = R.score_completion(R.ground_truth_completion(rec, ctx), rec, ctx, cfg)
    assert all(v == pytest.approx(1.0) for k, v in got.items() if k != "total"), got
    assert got["total"] == pytest.approx(len(got) - 1)


def test_ground_truth_completion_at_another_frame_size():
    ctx = R.RewardContext(448, 252, 0.3)
    for rec in ALL_RECORDS:
        got = R.score_completion(R.ground_truth_completion(rec, ctx), rec, ctx, OURS)
        assert got["total"] == pytest.approx(len(got) - 1), (rec["id"], got)


# ---------------------------------------------------------------------------------------------
# Properties: random junk and random well-formed completions stay in range, never raise
# ---------------------------------------------------------------------------------------------
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<obj>", "</obj>", "<box>", "</box>", "<t>",
          "</t>", "at", "s", " ", "\n", "[", "]", ",", "1", "2.5", "-3", "9" * 50, "man", "woman", "red car",
          "B", "(C)", "Correct Option:", "From", "to", "٣", "é", "<", ">", "/", ".", "nan", "inf", "[1,2,3,4]"]
CFGS = [OURS, REL, R.RewardConfig(identity="none", object_agg="max"), R.RewardConfig(identity="strict", claim_norm="matched")]


def _check(scores):
    for k, v in scores.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
        if k != "total":
            assert 0.0 <= v <= 1.0, (k, v)
    assert scores["total"] == pytest.approx(sum(v for k, v in scores.items() if k != "total"))


def test_random_junk_stays_in_range():
    rng = random.Random(1234)
    for i in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 80)))
        if i % 50 == 0:
            text = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(10_000))  # 10k chars of junk
        for rec in ALL_RECORDS:
            _check(R.score_completion(text, rec, R.RewardContext(100, 100, rng.random()), CFGS[i % 4]))


def _random_well_formed(rng):
    names = ["man", "red car", "woman", "dog", "", "the man"]
    parts = []
    for _ in range(rng.randrange(0, 6)):
        boxes = []
        for _ in range(rng.randrange(1, 4)):
            x, y = rng.randrange(-10, 100), rng.randrange(-10, 100)
            boxes.append([x, y, x + rng.randrange(-5, 50), y + rng.randrange(-5, 50)])
        parts.append(claim(rng.choice(names), boxes, round(rng.uniform(0, 8), 1)))
        parts.append(rng.choice([" and ", f" then <t>{rng.uniform(0, 8):.1f}</t>s ", " "]))
    answer = rng.choice(["B", "Correct Option: C", "From <t>1.0</t>s to <t>4.0</t>s\nCorrect Option: C",
                         "a dog runs", "[2, 5]", "<obj>cup</obj><box>[10, 10, 30, 50]</box>", "the man"])
    return c("".join(parts), answer)


def test_random_well_formed_stays_in_range():
    rng = random.Random(7)
    for i in range(400):
        text = _random_well_formed(rng)
        assert R.parse_completion(text).well_formed
        for rec in ALL_RECORDS:
            got = R.score_completion(text, rec, R.RewardContext(100, 100, rng.random()), CFGS[i % 4])
            _check(got)
            assert got["format"] in (0.5, 1.0) or CFGS[i % 4] is REL


def test_parse_completion_never_raises_on_non_strings():
    for x in (None, 3, b"<think>", ["<think>"]):
        p = R.parse_completion(x)
        assert p.think is None and p.answer is None and not p.well_formed


# ---------------------------------------------------------------------------------------------
# Speed: a 768-token adversarial completion parses and scores in well under 10 ms
# ---------------------------------------------------------------------------------------------

def _adversarial():
    boxes = "".join(f"<box>[{i},{i},{i + 9},{i + 9}]</box>" for i in range(120))  # many boxes ...
    return ("<think>" + "<obj>man</obj>" + boxes + "at<t>" + "9" * 400 + "</t" +   # ... broken tail
            "<obj>" * 50 + "[" * 200 + "<box>[1,2,3,4" * 40 + "</think><answer>" + "<t>1" * 50)


def _best_time(fn, reps=20):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_adversarial_completion_is_fast():
    text = _adversarial()
    assert len(text) > 3000  # ~768 tokens
    parse_s = _best_time(lambda: R.parse_completion(text))
    score_s = _best_time(lambda: R.score_completion(text, ST, CTX, OURS))
    assert parse_s < 0.05 and score_s < 0.05, (parse_s, score_s)


def test_parse_is_linear():
    small, big = _adversarial(), _adversarial() * 8
    t_small = _best_time(lambda: R.parse_completion(small), 5)
    t_big = _best_time(lambda: R.parse_completion(big), 5)
    assert t_big < 8 * 4 * t_small + 0.01  # 8x the text: far from the 64x of quadratic work


def test_config_rejects_unknown_modes():
    for bad in ({"identity": "sof"}, {"object_agg": "avg"}, {"claim_norm": "some"},
                {"box_matching": "hungarian"}, {"tau_seconds": -1.0}, {"sigma_final": 0.0}):
        with pytest.raises(ValueError):
            R.RewardConfig(**bad)
