"""metrics.py against hand-computed values (no model, milliseconds).

Run: python -m pytest tests/test_eval_metrics.py -q
"""
import json
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import config  # noqa: E402
import metrics  # noqa: E402
import rewards  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A small annotation in the public V-STAR layout (bboxes in the released flat form)
# ---------------------------------------------------------------------------------------------


def vstar_dict(**over):
    d = {
        "vid": "clip0", "domain": "Objects", "fps": 30, "width": 640, "height": 360,
        "frame_count": 300, "question": "What does the man pick up?", "chain": "<think>..</think>",
        "object": "man", "answer": "a red cup",
        "temporal_question": "When does the man pick up the cup?", "timestamps": [2, 5],
        "spatial_question": "Where is the man between 2 and 5 seconds?",
        "spatial_question_2": "Where is the man who picks up the cup?",
        "bboxes": [
            {"timestamp": 2, "frame_index": 60, "xmin": 0, "ymin": 0, "xmax": 100, "ymax": 100},
            {"timestamp": 3, "frame_index": 90, "xmin": 100, "ymin": 100, "xmax": 200, "ymax": 200},
        ],
    }
    d.update(over)
    return d


def write_json(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


# ---------------------------------------------------------------------------------------------
# AM / LGM: the published check
# ---------------------------------------------------------------------------------------------


def test_published_check_from_means():
    s = metrics.vstar_scores(0.61, 0.245, 0.240, 0.254, 0.060)
    assert round(s["mAM"], 2) == 33.65
    assert round(s["mLGM"], 2) == 46.56
    assert s["Acc"] == pytest.approx(61.0)
    # by hand: AM_1 = (61 + 24.5 + 25.4) / 3, AM_2 = (61 + 24 + 6) / 3
    assert s["AM_1"] == pytest.approx(110.9 / 3)
    assert s["AM_2"] == pytest.approx(91.0 / 3)
    lgm1 = -(math.log(0.39) + math.log(0.755) + math.log(0.746)) / 3
    assert s["LGM_1"] == pytest.approx(100 * lgm1)


def test_published_check_through_per_sample_summary():
    # 100 samples whose means are exactly the published ones
    per = [{"what": float(i < 61), "tiou_1": 0.245, "tiou_2": 0.240, "viou_1": 0.254,
            "viou_2": 0.060} for i in range(100)]
    s = metrics.vstar_summary(per)
    assert s["n"] == 100
    for k, v in {"Acc": 61.0, "mtIoU_1": 24.5, "mtIoU_2": 24.0, "mvIoU_1": 25.4,
                 "mvIoU_2": 6.0, "mAM": 33.65, "mLGM": 46.56}.items():
        assert round(s[k], 2) == v, k


# ---------------------------------------------------------------------------------------------
# tIoU, vIoU, R@IoU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred,gt,want", [
    ((2, 6), (4, 8), 2 / 6),     # overlap 2, hull 6
    ((4, 8), (4, 8), 1.0),
    ((0, 10), (4, 6), 0.2),
    ((0, 1), (2, 3), 0.0),       # disjoint
    ((6, 2), (2, 6), 0.0),       # reversed prediction: no overlap (as the official scorer)
    (None, (2, 6), 0.0),
    ((3, 3), (3, 3), 0.0),       # zero-length hull
])
def test_temporal_iou(pred, gt, want):
    assert metrics.temporal_iou(pred, gt) == pytest.approx(want)


def test_visual_iou_small_cases():
    frames = [metrics.VStarFrame(time=1.0, box=[0, 0, 10, 10]), metrics.VStarFrame(time=2.0, box=[0, 0, 10, 10])]
    # frame 1 exact; frame 2 best of two boxes is half the gt (IoU 0.5)
    pred = {1.0: [[0, 0, 10, 10]], 2.0: [[50, 50, 60, 60], [0, 0, 5, 10]]}
    assert metrics.visual_iou(frames, pred) == pytest.approx(0.75)
    # a frame with no predicted box counts 0
    assert metrics.visual_iou(frames, {1.0: [[0, 0, 10, 10]]}) == pytest.approx(0.5)
    # a time 0.3 s off still meets its frame; 0.8 s off does not
    assert metrics.visual_iou(frames, {1.3: [[0, 0, 10, 10]]}) == pytest.approx(0.5)
    assert metrics.visual_iou(frames, {0.2: [[0, 0, 10, 10]], 2.8: [[0, 0, 10, 10]]}) == 0.0
    assert metrics.visual_iou(frames, {}) == 0.0


def test_temporal_grounding_by_hand():
    gts = [(0, 10)] * 4
    preds = [(0, 10), (0, 5), (2, 6), None]   # tIoU 1.0, 0.5, 0.4, 0
    m = metrics.temporal_grounding_metrics(preds, gts)
    assert m["R@0.3"] == pytest.approx(75.0)
    assert m["R@0.5"] == pytest.approx(50.0)  # >= threshold counts
    assert m["R@0.7"] == pytest.approx(25.0)
    assert m["mIoU"] == pytest.approx(47.5)


# ---------------------------------------------------------------------------------------------
# Parsers: times and timed boxes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s,want", [
    ("12.5", 12.5), ("12.5s", 12.5), ("12 seconds", 12.0), (7, 7.0), ("1:05", 65.0),
    ("01:05", 65.0), ("1:02:03", 3723.0), ("0:07.5", 7.5), ("<t>12.5</t>s", 12.5),
    ("abc", None), ("", None), (None, None), ("-3", None), ("nan", None), (float("inf"), None),
    (True, None), ([1], None),
])
def test_parse_time_string(s, want):
    assert metrics.parse_time_string(s) == want


@pytest.mark.parametrize("text,want", [
    ("From <t>2.0</t>s to <t>4.5</t>s", (2.0, 4.5)),
    ("<think>look</think><answer>From <t>2.0</t>s to <t>4.5</t>s</answer>", (2.0, 4.5)),
    ("[2.0, 4.5]", (2.0, 4.5)),
    ("From 0:05 to 1:10", (5.0, 70.0)),
    ("The event happens between 3 and 7 seconds.", (3.0, 7.0)),
    ([1, "0:02"], (1.0, 2.0)),
    ("no idea", None), ("", None), (None, None), ("1, 2, 3", None),
])
def test_parse_time_span(text, want):
    assert metrics.parse_time_span(text) == want


@pytest.mark.parametrize("pred,want", [
    ('{"3": [1, 2, 3, 4]}', {3.0: [[1, 2, 3, 4]]}),
    ('{"3": [[1, 2, 3, 4], [5, 6, 7, 8]], "4.5": [0, 0, 1, 1]}',
     {3.0: [[1, 2, 3, 4], [5, 6, 7, 8]], 4.5: [[0, 0, 1, 1]]}),
    ('{"0:03": [1, 2, 3, 4]}', {3.0: [[1, 2, 3, 4]]}),
    ('[{"3": [1, 2, 3, 4]}, {"4": [5, 6, 7, 8]}]', {3.0: [[1, 2, 3, 4]], 4.0: [[5, 6, 7, 8]]}),
    ('[{"frame": 60, "bbox": [1, 2, 3, 4]}]', {2.0: [[1, 2, 3, 4]]}),     # 60 / 30 fps
    ('{"frame": 90, "bbox": [1, 2, 3, 4]}', {3.0: [[1, 2, 3, 4]]}),
    ('[{"time": "0:02", "box": [1, 2, 3, 4]}]', {2.0: [[1, 2, 3, 4]]}),
    ('{"2_60": {"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}}', {2.0: [[1, 2, 3, 4]]}),
    ('[[2, [1, 2, 3, 4]]]', {2.0: [[1, 2, 3, 4]]}),
    ("<answer>```json\n{'2': [1, 2, 3, 4]}\n```</answer>", {2.0: [[1, 2, 3, 4]]}),
    ('{"2": [1, 2, 3, 4], "3": [5, 6', {2.0: [[1, 2, 3, 4]]}),             # cut off mid-answer
    ('[{"2": [1, 2, 3, 4]}, {"3": [5, 6, 7', {2.0: [[1, 2, 3, 4]]}),       # closers innermost first
    ({"2": [1, 2, 3, 4]}, {2.0: [[1, 2, 3, 4]]}),                          # already decoded
    ("[1, 2, 3, 4]", {}),                                                   # no time: dropped
    ('{"2": [1, 2, "x", 4]}', {}), ('{"2": [1, 2, 3]}', {}), ("garbage", {}), ("", {}),
    (None, {}), (42, {}),
])
def test_parse_timed_boxes(pred, want):
    assert metrics.parse_timed_boxes(pred, fps=30) == want


def test_parse_timed_boxes_reads_our_claim_grammar():
    text = ("<answer><obj>man</obj><box>[1,2,3,4]</box>at<t>2.0</t>s and "
            "<obj>man</obj><box>[5,6,7,8]</box><box>[0,0,9,9]</box>at<t>3.0</t>s</answer>")
    assert metrics.parse_timed_boxes(text) == {2.0: [[1, 2, 3, 4]], 3.0: [[5, 6, 7, 8], [0, 0, 9, 9]]}


# ---------------------------------------------------------------------------------------------
# V-STAR loader, oracle, garbage
# ---------------------------------------------------------------------------------------------


def test_load_vstar_both_bbox_forms(tmp_path):
    readme_form = vstar_dict(bboxes=[{"2_60": {"xmin": 0, "ymin": 0, "xmax": 100, "ymax": 100}},
                                     {"3_90": {"xmin": 1, "ymin": 1, "xmax": 2, "ymax": 2}}])
    no_ts = vstar_dict(bboxes=[{"frame_index": 45, "xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}])
    path = write_json(tmp_path, "v.json", [vstar_dict(), readme_form, no_ts])
    a, b, c = metrics.load_vstar(path)
    assert a.timestamps == (2.0, 5.0) and a.duration == 10.0
    assert [(f.time, f.frame_index, f.box) for f in a.frames] == \
        [(2.0, 60, [0, 0, 100, 100]), (3.0, 90, [100, 100, 200, 200])]
    assert [(f.time, f.frame_index) for f in b.frames] == [(2.0, 60), (3.0, 90)]
    assert c.frames[0].time == 1.5                               # frame_index / fps
    assert a.extra == {}


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("timestamps"), "timestamps"),
    (lambda d: d.pop("spatial_question_2"), "spatial_question_2"),
    (lambda d: d.update(fps=0), "fps"),
    (lambda d: d.update(timestamps=[5, 2]), "timestamps"),
    (lambda d: d.update(timestamps="2-5"), "timestamps"),
    (lambda d: d.update(bboxes=[]), "bboxes"),
    (lambda d: d["bboxes"][1].pop("xmax"), "bboxes[1]"),
    (lambda d: d.update(answer=None), "answer"),
])
def test_missing_field_names_file_index_and_field(tmp_path, mutate, field):
    bad = vstar_dict()
    mutate(bad)
    path = write_json(tmp_path, "broken.json", [vstar_dict(), bad])
    with pytest.raises(ValueError) as e:
        metrics.load_vstar(path)
    msg = str(e.value)
    assert path in msg and "sample 1" in msg and f"'{field}'" in msg


def test_load_vstar_not_a_list_or_empty(tmp_path):
    with pytest.raises(ValueError, match="bad.json"):
        metrics.load_vstar(write_json(tmp_path, "bad.json", {"vid": "x"}))
    with pytest.raises(ValueError, match="empty.json: no samples"):
        metrics.load_vstar(write_json(tmp_path, "empty.json", []))
    (tmp_path / "cut.json").write_text('[{"vid": ')
    with pytest.raises(ValueError, match="cut.json"):
        metrics.load_vstar(str(tmp_path / "cut.json"))


def test_oracle_scores_the_maximum(tmp_path):
    path = write_json(tmp_path, "v.json", [vstar_dict(), vstar_dict(vid="clip1", timestamps=[0.5, 9.5])])
    per = [metrics.score_vstar_sample(s, metrics.vstar_oracle_answers(s)) for s in metrics.load_vstar(path)]
    summary = metrics.vstar_summary(per)
    for k in ("Acc", "mtIoU_1", "mtIoU_2", "mvIoU_1", "mvIoU_2", "AM_1", "AM_2", "mAM"):
        assert summary[k] == pytest.approx(100.0), k
    assert math.isfinite(summary["mLGM"]) and summary["mLGM"] > 1000  # clamped, not inf


def test_oracle_boxes_in_model_pixels_are_rescaled():
    s = metrics.vstar_sample_from_dict(vstar_dict())
    # the model saw a 320 x 180 frame: half the annotation's size
    where = json.dumps({str(f.time): [v / 2 for v in f.box] for f in s.frames})
    answers = {"what": "a red cup", "when1": "[2, 5]", "where1": where, "where2": where, "when2": "[2, 5]"}
    out = metrics.score_vstar_sample(s, answers, pred_size=(320, 180))
    assert out["viou_1"] == pytest.approx(1.0) and out["viou_2"] == pytest.approx(1.0)
    unscaled = metrics.score_vstar_sample(s, answers)
    assert unscaled["viou_1"] < 1.0


def test_partial_prediction_by_hand():
    s = metrics.vstar_sample_from_dict(vstar_dict())   # gt span [2, 5]; boxes at 2 s and 3 s
    out = metrics.score_vstar_sample(s, {
        "what": "<answer>A red cup.</answer>",
        "when1": "From <t>3.0</t>s to <t>6.0</t>s",           # overlap 2 / hull 4
        "where1": '{"2": [0, 0, 100, 50]}',                      # 0.5 at 2 s, nothing at 3 s
        "where2": "garbage", "when2": "From 0:01 to 0:03"})     # overlap 1 / hull 4
    assert out["what"] == 1.0
    assert out["tiou_1"] == pytest.approx(0.5) and out["tiou_2"] == pytest.approx(0.25)
    assert out["viou_1"] == pytest.approx(0.25) and out["viou_2"] == 0.0
    assert out["parsed"]["span_2"] == (1.0, 3.0)


GARBAGE = ["", None, "<think>", "<answer></answer>", "{{{[[", "From soon to later", 17,
           "1:" + "9" * 5000, "9" * 400 + " to " + "9" * 400, "[" * 5000, "{" * 5000 + "]" * 7,
           "<answer>From <t>x</t>s to <t></t>s</answer>", '{"2": "left"}', [None, None], {"a": 1}]


@pytest.mark.parametrize("g", GARBAGE)
def test_garbage_predictions_score_zero_without_raising(g):
    s = metrics.vstar_sample_from_dict(vstar_dict())
    out = metrics.score_vstar_sample(s, dict.fromkeys(metrics.VSTAR_ANSWERS, g))
    assert (out["what"], out["tiou_1"], out["tiou_2"], out["viou_1"], out["viou_2"]) == (0, 0, 0, 0, 0)


def test_pluggable_judge():
    s = metrics.vstar_sample_from_dict(vstar_dict())
    seen = []
    judge = lambda q, ref, cand: seen.append((q, ref, cand)) or cand == "mug"  # noqa: E731
    answers = {**dict.fromkeys(metrics.VSTAR_ANSWERS, ""), "what": "<answer>mug</answer>"}
    assert metrics.score_vstar_sample(s, answers, judge=judge)["what"] == 1.0
    assert seen == [(s.question, "a red cup", "mug")]


@pytest.mark.parametrize("ref,cand,want", [
    ("a red cup", "The red cup.", True),      # normalized exact
    ("B", "(B)", True), ("B", "B. a dog", True), ("B", "C", False),
    ("the man in the blue shirt picks up a red cup", "the man in the blue shirt picks up a cup", True),
    ("a red cup", "a green bottle", False), ("a red cup", "", False),
])
def test_default_judge(ref, cand, want):
    assert metrics.default_judge("q", ref, cand) is want


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def mcq_records():
    opts = ["A. red", "B. blue", "C. green", "D. none"]
    mk = lambda ans, task, dur: {"question_id": "q", "question": "colour?", "options": opts,  # noqa: E731
                                 "answer": ans, "task_type": task, "duration": dur}
    return [mk("A", "Counting Problem", "short"), mk("B", "Counting Problem", "short"),
            mk("C", "OCR Problems", "long"), mk("D", "OCR Problems", "long"),
            mk("A", "OCR Problems", "short")]


def test_mcq_accuracy_per_category():
    letters = ["A", "(C)", "<think>hm</think><answer>C. green</answer>", "", "A) red"]
    m = metrics.mcq_accuracy(mcq_records(), letters)   # hits: 1, 0, 1, 0, 1
    assert m["Acc"] == pytest.approx(60.0) and m["n"] == 5
    assert m["Acc[task_type=Counting Problem]"] == pytest.approx(50.0)
    assert m["Acc[task_type=OCR Problems]"] == pytest.approx(200 / 3)
    assert m["Acc[duration=short]"] == pytest.approx(200 / 3)
    assert m["Acc[duration=long]"] == pytest.approx(50.0)


def test_mcq_garbage_and_errors(tmp_path):
    assert metrics.mcq_accuracy(mcq_records(), [None, 3, "", "<answer>", "zzz"])["Acc"] == 0.0
    with pytest.raises(ValueError, match="4 predictions"):
        metrics.mcq_accuracy(mcq_records(), ["A"] * 4)
    recs = mcq_records()
    del recs[2]["options"]
    path = write_json(tmp_path, "mme.json", recs)
    with pytest.raises(ValueError) as e:
        metrics.load_mcq(path)
    assert path in str(e.value) and "sample 2" in str(e.value) and "'options'" in str(e.value)
    assert len(metrics.load_mcq(write_json(tmp_path, "ok.json", mcq_records()))) == 5


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def test_format_markdown_table(tmp_path):
    t = metrics.format_markdown_table({"sft": {"Acc": 61.0, "mAM": 33.654, "n": 10},
                                  "rl": {"Acc": 62.5, "mLGM": 46.56, "n": 10}})
    lines = t.splitlines()
    assert lines[0] == "| checkpoint | Acc | mAM | n | mLGM |"
    assert lines[2] == "| sft | 61.00 | 33.65 | 10 | - |"
    assert lines[3] == "| rl | 62.50 | - | 10 | 46.56 |"
    a = write_json(tmp_path, "a.json", {"Acc": 1.0})
    assert metrics.compare_summaries([a]).splitlines()[-1] == f"| {a} | 1.00 |"


# ---------------------------------------------------------------------------------------------
# STGR split: rewards components + accuracy
# ---------------------------------------------------------------------------------------------
W = H = 112


def stgr_records():
    kf = [{"idx": 2, "time": 1.0, "path": "k2.png"}, {"idx": 6, "time": 3.0, "path": "k6.png"}]
    items = {"2": {"red circle": [[0.1, 0.1, 0.4, 0.4]]}, "6": {"red circle": [[0.5, 0.5, 0.9, 0.9]]}}
    base = {"source": "synth", "video_path": "v.mp4", "key_frames": [], "key_items": {}}
    return [
        dict(base, id="st", task="temporal-spatial free-form QA", question="What colour moves?",
             answer="red", key_frames=kf, key_items=items),
        dict(base, id="tq", task="temporal QA", question="When does it move?", answer="[1.0, 3.0]"),
        dict(base, id="mc", task="General video QA MCQ", question="Which? A. red B. blue",
             answer="A", key_frames=kf, key_items=items),
        dict(base, id="tm", task="temporal QA (MCQ)", question="When? A. .. B. ..",
             answer="B\n[1.0, 3.0]"),
    ]


def test_score_stgr_ground_truth_and_garbage():
    recs = stgr_records()
    ctx = rewards.RewardContext(frame_width=W, frame_height=H, progress=1.0)
    gt = [rewards.ground_truth_completion(r, ctx) for r in recs]
    best = metrics.score_stgr(recs, gt, ctx)
    assert best["Acc"] == pytest.approx(100.0) and best["n"] == 4
    assert best["Acc[task=temporal QA]"] == pytest.approx(100.0)
    assert best["TG/mIoU"] == pytest.approx(100.0) and best["TG/R@0.7"] == pytest.approx(100.0)
    reward_keys = [k for k in best if k.startswith("reward/") and k != "reward/total"]
    assert sorted(reward_keys) == ["reward/answer", "reward/format", "reward/spatial",
                                   "reward/temporal_iou", "reward/temporal_point",
                                   "reward/temporal_segment"]
    assert all(best[k] == pytest.approx(1.0) for k in reward_keys)
    worst = metrics.score_stgr(recs, ["", None, "<answer>zzz</answer>", "garbage"], ctx)
    assert worst["Acc"] == 0.0 and worst["TG/mIoU"] == 0.0
    assert all(worst[k] == 0.0 for k in reward_keys + ["reward/total"])


def test_stgr_accuracy_split_by_hard_and_easy():
    """Records that say how they were drawn (synth's meta.hard) get Acc[hard] and Acc[easy];
    records without it (real data) add neither."""
    recs = stgr_records()
    for r, hard in zip(recs, (True, True, False, None)):
        if hard is not None:
            r["meta"] = {"hard": hard}
    ctx = rewards.RewardContext(frame_width=W, frame_height=H, progress=1.0)
    gt = [rewards.ground_truth_completion(r, ctx) for r in recs]
    # right on the first hard one and the easy one, wrong on the second hard one and the unmarked one
    s = metrics.score_stgr(recs, [gt[0], "<answer>zzz</answer>", gt[2], ""], ctx)
    assert s["Acc[hard]"] == pytest.approx(50.0) and s["Acc[easy]"] == pytest.approx(100.0)
    assert s["Acc"] == pytest.approx(50.0)
    plain = metrics.score_stgr(stgr_records(), gt, ctx)
    assert "Acc[hard]" not in plain and "Acc[easy]" not in plain


MCQ_OPTIONS = ["red", "blue", "green", "yellow"]  # the right one: blue, option B


@pytest.mark.parametrize("completion, expected", [
    # (names one option, the think's letter is its, the answer repeats the think's letter, names the right one)
    ("<think>The <obj>red circle</obj> turns. So it turns blue. That is option B.</think><answer>B</answer>", (1, 1, 1, 1)),
    ("<think>The red circle turns. So it turns blue, option B.</think><answer>B</answer>", (1, 1, 1, 1)),
    ("<think>So it turns blue. That is option C.</think><answer>C</answer>", (1, 0, 1, 1)),       # the lookup missed
    ("<think>So it turns BLUE. That is option B.</think><answer>D</answer>", (1, 1, 0, 1)),       # the copy missed
    ("<think>So it turns green. That is option C.</think><answer>C</answer>", (1, 1, 1, 0)),      # wrong word, right lookup
    ("<think>So it turns blue or green. That is option B.</think><answer>B</answer>", (0, 0, 1, 0)),  # hedged
    ("<think>The red circle turns. That is option A.</think><answer>A</answer>", (1, 1, 1, 0)),   # the sentence before
    ("<think>So it turns bluish. That is option B.</think><answer>B</answer>", (0, 0, 1, 0)),     # whole words only
    ("<think>So it turns blue.</think><answer>B</answer>", (1, 0, 0, 1)),                         # no letter in the think
    ("<answer>B</answer>", (0, 0, 0, 0)), ("", (0, 0, 0, 0)), (None, (0, 0, 0, 0)),
])
def test_mcq_letter_check_by_hand(completion, expected):
    """Where an MCQ answer goes wrong: the think's words, its letter, the answer's copy of it."""
    got = metrics.mcq_letter_check(MCQ_OPTIONS, "blue", completion)
    keys = ("mcq/names_one", "mcq/letter_of_named", "mcq/answer_is_think_letter", "mcq/names_right")
    assert tuple(got[k] for k in keys) == expected
    assert metrics.mcq_letter_check(None, "blue", completion) == {}  # real records carry no options


def test_mcq_letter_check_in_the_stgr_summary():
    """MCQ records with options in meta (synth's) get mcq/... in the summary, x100 over them; others none."""
    recs = stgr_records()
    recs[2]["meta"] = {"options": ["red", "blue"], "answer_text": "red"}
    ctx = rewards.RewardContext(frame_width=W, frame_height=H, progress=1.0)
    said = "<think>So it is red. That is option B.</think><answer>B</answer>"
    s = metrics.score_stgr(recs, ["", "", said, ""], ctx)
    assert s["mcq/names_one"] == s["mcq/names_right"] == s["mcq/answer_is_think_letter"] == pytest.approx(100.0)
    assert s["mcq/letter_of_named"] == 0.0 and s["Acc[task=General video QA MCQ]"] == 0.0
    assert not any(k.startswith("mcq/") for k in metrics.score_stgr(stgr_records(), ["", "", said, ""], ctx))


def test_stgr_accuracy_and_temporal_iou_per_event():
    """Records that name their event (synth's meta.event) get Acc[event=..] (and on free-form tasks
    Acc[free-form,event=..]) and, on temporal tasks, TG/mIoU[event=..]; a record without one counts
    only in the totals."""
    recs = stgr_records()
    for r, event in zip(recs, ("stop", "stop", "turn", None)):
        if event is not None:
            r["meta"] = {"event": event}
    ctx = rewards.RewardContext(frame_width=W, frame_height=H, progress=1.0)
    gt = [rewards.ground_truth_completion(r, ctx) for r in recs]
    # free-form right, temporal QA wrong (no span: tIoU 0), MCQ right, temporal MCQ right (no event)
    s = metrics.score_stgr(recs, [gt[0], "<answer>zzz</answer>", gt[2], gt[3]], ctx)
    assert s["Acc[event=stop]"] == pytest.approx(50.0) and s["Acc[event=turn]"] == pytest.approx(100.0)
    # the free-form record alone: right (the MCQ turn record has no free-form count)
    assert s["Acc[free-form,event=stop]"] == pytest.approx(100.0) and "Acc[free-form,event=turn]" not in s
    assert s["TG/mIoU[event=stop]"] == pytest.approx(0.0) and s["TG/mIoU"] == pytest.approx(50.0)
    assert not any(k.endswith("[event=turn]") and k.startswith("TG/") for k in s)
    assert not any("event=" in k for k in metrics.score_stgr(stgr_records(), gt, ctx))


def test_spatial_links_pool_claims_by_hand():
    """spatial/...: shares pooled over claims, not averaged per record: 3 of 4 claims at a key
    frame's time, 2 of those 3 naming its object, their box scores (0.5 + 1.0) / 2."""
    per = [{"spatial/claims": 3, "spatial/gated": 2, "spatial/named": 1, "spatial/box": 0.5, "spatial/truth": 2},
           {"spatial/claims": 1, "spatial/gated": 1, "spatial/named": 1, "spatial/box": 1.0, "spatial/truth": 4},
           {"correct": 1.0}]   # a record without key frames (a temporal one) is not counted
    assert metrics.spatial_links(per) == pytest.approx({"spatial/claims": 2.0, "spatial/truth": 3.0,
                                                        "spatial/gated": 75.0, "spatial/named": 200 / 3,
                                                        "spatial/box": 75.0})
    assert metrics.spatial_links([{"correct": 1.0}]) == {}
    none_gated = [{"spatial/claims": 2, "spatial/gated": 0, "spatial/named": 0, "spatial/box": 0, "spatial/truth": 1}]
    assert metrics.spatial_links(none_gated)["spatial/named"] == 0.0   # nothing to divide: 0, not a crash


# ---------------------------------------------------------------------------------------------
# A V-STAR file written by synth.py loads and the oracle scores 100 on it
# ---------------------------------------------------------------------------------------------


def test_synth_vstar_file_loads_and_oracle_is_perfect(tmp_path):
    try:
        import synth
    except ImportError as e:  # synth.py is written concurrently; absent means nothing to check
        pytest.skip(f"synth.py not importable: {e!r}")
    synth.generate(config.Config(data_dir=str(tmp_path), n_train=0, n_val=0, n_test=4, synth_workers=1))
    samples = metrics.load_vstar(str(tmp_path / "vstar_test.json"))
    assert len(samples) == 4
    summary = metrics.vstar_summary([metrics.score_vstar_sample(s, metrics.vstar_oracle_answers(s)) for s in samples])
    for k in ("Acc", "mtIoU_1", "mtIoU_2", "mvIoU_1", "mvIoU_2", "mAM"):
        assert summary[k] == pytest.approx(100.0), k
    # the completions SFT learns the chains from (training grammar: think, then answer) score 100 too
    gold = metrics.vstar_summary([metrics.score_vstar_sample(s, metrics.vstar_gold_completions(s)) for s in samples])
    for k in ("Acc", "mtIoU_1", "mtIoU_2", "mvIoU_1", "mvIoU_2", "mAM"):
        assert gold[k] == pytest.approx(100.0), k
    assert all(rewards.parse_completion(c).first_answer for c in metrics.vstar_gold_completions(samples[0]).values())
    # and the STGR test split written beside it: its own reasoning traces score 100
    recs = json.loads((tmp_path / "test.json").read_text())
    ctx = rewards.RewardContext(frame_width=synth.SIZE, frame_height=synth.SIZE, progress=1.0)
    stgr = metrics.score_stgr(recs, [r["reasoning_process"] for r in recs], ctx)
    assert stgr["Acc"] == pytest.approx(100.0)
    # ... every claim at a key frame's time, naming its object, boxing it exactly
    for k in ("spatial/gated", "spatial/named", "spatial/box"):
        assert stgr[k] == pytest.approx(100.0), k
    # each trace's first box moved to a corner: the same times and names, boxes that miss
    corner = metrics.score_stgr(recs, [re.sub(r"<box>\[[^]]*\]", "<box>[0, 0, 1, 1]", r["reasoning_process"], count=1)
                                       for r in recs], ctx)
    assert corner["spatial/gated"] == corner["spatial/named"] == pytest.approx(100.0)
    assert corner["spatial/box"] < 100.0


def test_best_constant_span_is_the_frame_blind_yardstick_by_hand():
    """One span for every question, chosen knowing the answers: [1, 3] scores (1 + 1 + 1/3) / 3 on
    [1, 3], [1, 3], [2, 4]; the grid reaches the latest end; STGR and V-STAR summaries carry it."""
    assert metrics.best_constant_span([(1, 3), (1, 3), (2, 4)], grid_s=1.0) == (pytest.approx(7 / 9), 1.0, 3.0)
    assert metrics.best_constant_span([(1.5, 2.5)], grid_s=1.0) == (pytest.approx(0.5), 1.0, 3.0)   # grid up to 3
    assert metrics.best_constant_span([(1.5, 2.5)], grid_s=0.5) == (pytest.approx(1.0), 1.5, 2.5)
    assert metrics.best_constant_span([None]) is None and metrics.best_constant_span([]) is None
    assert metrics.best_constant_span([(0, 600)], grid_s=0.25, max_steps=4) == (pytest.approx(1.0), 0.0, 600.0)  # 150 s steps
    rows = [{"task": "temporal QA", "correct": 0.0, "pred_span": None, "gt_span": g} for g in ((1, 3), (1, 3), (2, 4))]
    s = metrics.stgr_summary(rows)
    assert s["TG/mIoU"] == 0.0 and s["TG/mIoU_blind"] == pytest.approx(700 / 9)
    per = [{"what": 0.0, "tiou_1": 0.0, "tiou_2": 0.0, "viou_1": 0.0, "viou_2": 0.0, "gt_span": g}
           for g in ((1, 3), (1, 3), (2, 4))]
    assert metrics.vstar_summary(per)["mtIoU_blind"] == pytest.approx(700 / 9)
    assert "mtIoU_blind" not in metrics.vstar_summary([{k: v for k, v in p.items() if k != "gt_span"} for p in per])
