"""Evaluation metrics, pure: V-STAR-style grounded QA, multiple-choice video QA, temporal grounding, STGR.

Owns: annotation loaders, parsers for what a model writes (times, spans, timed boxes), per-sample
scores, summaries and the markdown table. No model, no files written: eval.py runs a checkpoint
and calls these. Leaves completion parsing (tags, letters, spans, claims) and the reward
components to rewards.py, and coordinate / time conventions to data.py.

Metrics (V-STAR's definitions for V-STAR):
- V-STAR: What accuracy; When tIoU and Where vIoU for chain 1 (when then where) and chain 2
  (where then when); AM_c = (Acc + mtIoU_c + mvIoU_c) / 3, LGM_c = -mean(ln(1 - x)); mAM, mLGM the
  means over the two chains. Everything reported x100.
- Multiple choice (VideoMME-style JSON: question, options, answer letter): accuracy, broken down by
  every category-like field the records carry (task_type, duration, domain, ...).
- Temporal grounding (Charades-STA style): R@0.3 / 0.5 / 0.7 and mIoU, x100.
- STGR synthetic split: accuracy per task plus the mean of every rewards.py component that applies,
  and where the spatial reward is lost: claims at a key frame's time, naming its object, their boxes.

Bad input policy: a prediction with no answer, or with times / boxes that do not parse, scores 0
and never raises; an annotation file with a missing or malformed field raises ValueError naming
the file, the sample index and the field.

Test: python -m pytest tests/test_eval_metrics.py -q
"""
import ast
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import data
import rewards

# =============================================================================================
# Small shared helpers
# =============================================================================================


def answer_text(text):
    """The answer part of a completion ('' when it has tags but no answer block); plain text
    passes through. Reads the first <answer> block, as the official V-STAR scorer does; the
    stricter structure rules of the training rewards are not an evaluation concern."""
    if not isinstance(text, str):
        return ""
    if data.ANSWER_OPEN not in text and data.THINK_OPEN not in text:
        return text.strip()
    answer = rewards.parse_completion(text).first_answer
    return answer.strip() if isinstance(answer, str) else ""


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _finite_number(x):
    """x as a float when it is a real finite number (or a numeric string), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


# V-STAR tIoU = overlap / (max end - min start); None or a reversed span scores 0 (rewards.py
# implements exactly that definition; the official scorer does not swap a reversed span either).
temporal_iou = rewards.segment_iou


def best_constant_span(spans, grid_s=0.25, until=None, max_steps=64):
    """The frame-blind yardstick of a set of true spans: the one answer span, ends on a grid from 0 to
    `until` (default the latest true end) in steps of grid_s (coarser where that would take more than
    max_steps steps: long real videos), whose mean tIoU against them is highest, chosen knowing them.
    An answer that ignores the video hardly beats it on these spans (only off the grid), so a temporal
    score is the model reading the video by as much as it is above it.
    -> (mean tIoU, start, end), or None without spans."""
    spans = [tuple(s) for s in spans if s is not None]
    if not spans:
        return None
    top = max(e for _, e in spans) if until is None else until
    steps = math.ceil(top / grid_s - 1e-9)
    if steps > max_steps:
        steps, grid_s = max_steps, top / max_steps
    grid = [k * grid_s for k in range(steps + 1)]
    return max((_mean(temporal_iou((a, b), s) for s in spans), a, b)
               for i, a in enumerate(grid) for b in grid[i + 1:])


# =============================================================================================
# Parsing what a model writes: times and timed boxes (never raise; None / {} means unparseable)
# =============================================================================================
_CLOCK = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)$")  # h:mm:ss or m:ss (fractional secs ok)
_TIME_TOKEN = re.compile(r"(?:\d+:)?\d+:\d+(?:\.\d+)?|\d+(?:\.\d+)?")
_SECONDS_SUFFIX = re.compile(r"\s*(?:s|sec|secs|second|seconds)\.?$")


def parse_time_string(s):
    """One time -> seconds (float) or None. Accepts 12.5, '12.5', '12.5s', '1:05', '1:02:03',
    '<t>12.5</t>s'. Negative, infinite or unreadable times give None."""
    if not isinstance(s, str):
        v = _finite_number(s)
        return v if v is not None and v >= 0 else None
    t = s.strip().lower().replace(data.T_OPEN, "").replace(data.T_CLOSE, "")
    t = _SECONDS_SUFFIX.sub("", t).strip()
    m = _CLOCK.match(t)
    if m:  # float, not int: a 5000-digit "minute" must give None, not int()'s ValueError
        h, mm, ss = (float(g or 0) for g in m.groups())
        v = h * 3600 + mm * 60 + ss
        return v if math.isfinite(v) else None
    v = _finite_number(t)
    return v if v is not None and v >= 0 else None


def parse_time_span(text):
    """A predicted (start, end) in seconds, or None. rewards.parse_span reads our grammar
    ('From <t>s</t>s to <t>e</t>s', '[s, e]'); what it misses (m:ss clocks, 's - e') falls back to
    the official V-STAR rule: exactly two time tokens in the answer."""
    if isinstance(text, (list, tuple)):  # already a span, e.g. read back from a predictions file
        vals = [parse_time_string(x) for x in text]
        return tuple(vals) if len(vals) == 2 and None not in vals else None
    answer = answer_text(text)
    if not answer:
        return None
    span = rewards.parse_span(answer)
    if span is not None:
        return (float(span[0]), float(span[1]))
    tokens = [parse_time_string(tok) for tok in _TIME_TOKEN.findall(answer)]
    tokens = [t for t in tokens if t is not None]
    return (tokens[0], tokens[1]) if len(tokens) == 2 else None


def _as_box(v):
    """[x1, y1, x2, y2] floats from a list or a {xmin, ymin, xmax, ymax} dict, else None."""
    if isinstance(v, dict):
        if all(k in v for k in ("xmin", "ymin", "xmax", "ymax")):
            v = [v["xmin"], v["ymin"], v["xmax"], v["ymax"]]
        else:
            v = next((v[k] for k in ("bbox", "box", "bbox_2d") if k in v), None)
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    box = [_finite_number(x) for x in v]
    return box if None not in box else None


def _as_boxes(v):
    """One box or a list of boxes -> list of boxes (the unreadable ones dropped)."""
    box = _as_box(v)
    if box is not None:
        return [box]
    if isinstance(v, (list, tuple)):
        return [b for b in (_as_box(x) for x in v) if b is not None]
    return []


_TIME_KEYS = ("time", "timestamp", "t", "second", "sec")
_FRAME_KEYS = ("frame", "frame_index", "frame_id", "frame_idx")


def _key_time(key):
    """A dict key -> seconds. V-STAR writes '{timestamp}_{frame_index}' keys: keep the time."""
    if isinstance(key, str) and "_" in key:
        key = key.split("_")[0]
    return parse_time_string(key)


def _entry_time(entry, fps):
    """The time of a {'frame': i, 'bbox': ...}-style entry; frame indices become i / fps."""
    for k in _TIME_KEYS:
        if k in entry:
            return parse_time_string(entry[k])
    for k in _FRAME_KEYS:
        if k in entry:
            i = parse_time_string(entry[k])
            return i / fps if (i is not None and fps) else i
    return None


def _close_brackets(s):
    """Append the closers a cut-off answer is missing, innermost first ('[{"3": [1, 2' -> ..]}])."""
    stack = []
    for ch in s:
        if ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
    return s + "".join(reversed(stack))


def _load_loose_json(text):
    """The first JSON object / array in text (```json fences, single quotes, missing closers)."""
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    body = m.group(1) if m else text
    m = re.search(r"[\[{][\s\S]*[\]}]|[\[{][\s\S]*", body)
    if not m:
        return None
    s = _close_brackets(m.group(0))
    for load in (json.loads, ast.literal_eval, lambda x: json.loads(x.replace("'", '"'))):
        try:
            return load(s)
        except Exception:  # any parse failure means "try the next reader"; never raise
            continue
    return None


def _claims_to_timed_boxes(text):
    """Our grammar inside an answer: <obj>x</obj><box>[..]</box>at<t>3.0</t>s."""
    parsed = rewards.parse_completion(
        f"{data.THINK_OPEN}{text}{data.THINK_CLOSE}{data.ANSWER_OPEN}x{data.ANSWER_CLOSE}")
    out = defaultdict(list)
    for claim in parsed.claims:
        if claim.time is not None:
            out[float(claim.time)].extend(_as_boxes(list(claim.boxes)))
    return dict(out)


def parse_timed_boxes(pred, fps=None):
    """Predicted boxes -> {seconds: [[x1, y1, x2, y2], ...]}; {} when nothing parses.

    pred is a completion / answer string or an already-decoded object. Accepted shapes:
    {"3": [x1, y1, x2, y2]}, {"3": [[..], [..]]}, {"3_90": {"xmin": .., ...}}, [{"3": [..]}, ...],
    [{"frame": 90, "bbox": [..]}, ...] (frame indices / fps when fps is given, else taken as
    seconds), [{"time": 3, "box": [..]}], [[3, [..]], ...], and <obj>/<box>/<t> claims. Boxes
    without a time cannot be matched to a frame and are dropped (the official scorer does too)."""
    if isinstance(pred, str):
        text = answer_text(pred)
        if data.BOX_OPEN in text:
            return _claims_to_timed_boxes(text)
        pred = _load_loose_json(text)
    out = defaultdict(list)
    if isinstance(pred, dict):
        if any(k in pred for k in _TIME_KEYS + _FRAME_KEYS):
            pred = [pred]  # a single {'frame': i, 'bbox': ...} entry
        else:
            for k, v in pred.items():
                t = _key_time(k)
                if t is not None:
                    out[t].extend(_as_boxes(v))
            return {t: b for t, b in out.items() if b}
    if not isinstance(pred, (list, tuple)):
        return {}
    for entry in pred:
        if isinstance(entry, dict) and any(k in entry for k in _TIME_KEYS + _FRAME_KEYS):
            t = _entry_time(entry, fps)
            if t is not None:
                out[t].extend(_as_boxes(entry))
        elif isinstance(entry, dict):
            for t, boxes in parse_timed_boxes(entry, fps).items():
                out[t].extend(boxes)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and _as_box(entry) is None:
            t = parse_time_string(entry[0])  # [time, box] pairs
            if t is not None:
                out[t].extend(_as_boxes(entry[1]))
    return {t: b for t, b in out.items() if b}


# =============================================================================================
# V-STAR: annotation layout, per-sample scores, summary
# =============================================================================================
# Public layout (V-STaR-Bench/V-STaR, V_STaR_test.json: a JSON list, one object per video QA):
#   vid, domain, fps, width, height, frame_count, question, chain, object, answer,
#   temporal_question, timestamps [start_s, end_s], spatial_question (chain 1),
#   spatial_question_2 (chain 2), bboxes: pixel boxes of the width x height video, one per
#   annotated frame, either [{"timestamp": t, "frame_index": i, "xmin", "ymin", "xmax", "ymax"}]
#   (the released file, what the official scorer reads) or [{"{t}_{i}": {"xmin", ...}}] (README).
VSTAR_REQUIRED = ("vid", "fps", "width", "height", "frame_count", "question", "answer",
                  "temporal_question", "timestamps", "spatial_question", "spatial_question_2",
                  "bboxes")


@dataclass
class VStarFrame:
    time: float             # seconds from the start of the video
    box: list               # [x1, y1, x2, y2] pixels of the width x height video
    frame_index: int = None  # native-fps frame index, when the annotation gives one


@dataclass
class VStarSample:
    vid: str
    fps: float
    width: int
    height: int
    frame_count: int
    question: str           # What
    answer: str
    temporal_question: str  # When
    timestamps: tuple       # (start, end) seconds
    spatial_question: str   # Where, chain 1 (asked after When)
    spatial_question_2: str  # Where, chain 2 (asked before When)
    frames: list            # [VStarFrame], the ground-truth boxes
    domain: str = ""
    object: str = ""
    chain: str = ""
    extra: dict = field(default_factory=dict)  # unknown keys, kept for the predictions file

    @property
    def duration(self):
        return self.frame_count / self.fps


def _bad(path, i, name, why):
    return ValueError(f"{path}: sample {i}: field '{name}' {why}")


def _vstar_frames(raw, fps, path, i):
    """The bboxes field in either published form -> [VStarFrame], checked."""
    if not isinstance(raw, list) or not raw:
        raise _bad(path, i, "bboxes", "must be a non-empty list")
    frames = []
    for j, entry in enumerate(raw):
        where = f"bboxes[{j}]"
        if not isinstance(entry, dict):
            raise _bad(path, i, where, "must be an object")
        if "xmin" in entry:  # {"timestamp": t, "frame_index": k, "xmin": ...}
            t = parse_time_string(entry.get("timestamp"))
            k = _finite_number(entry.get("frame_index"))
            k = int(k) if k is not None else None
            if t is None and k is not None:
                t = k / fps
            box = _as_box(entry)
        elif len(entry) == 1:  # {"{t}_{k}": {"xmin": ...}}
            (key, value), = entry.items()
            t, box = _key_time(key), _as_box(value)
            parts = str(key).split("_")
            k = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        else:
            raise _bad(path, i, where, "has neither xmin/ymin/xmax/ymax nor one '{t}_{i}' key")
        if t is None:
            raise _bad(path, i, where, "has no readable timestamp (or frame_index with fps)")
        if box is None:
            raise _bad(path, i, where, "has no readable xmin/ymin/xmax/ymax box")
        frames.append(VStarFrame(time=t, box=box, frame_index=k))
    return frames


def vstar_sample_from_dict(d, path="<records>", i=0):
    """One annotation object -> VStarSample; ValueError naming path, index and field."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: sample {i}: must be a JSON object, got {type(d).__name__}")
    for name in VSTAR_REQUIRED:
        if name not in d or d[name] is None:
            raise _bad(path, i, name, "is missing")
    nums = {k: _finite_number(d[k]) for k in ("fps", "width", "height", "frame_count")}
    for k, v in nums.items():
        if v is None or v <= 0:
            raise _bad(path, i, k, f"must be a positive number, got {d[k]!r}")
    ts = d["timestamps"]
    span = tuple(parse_time_string(x) for x in ts) if isinstance(ts, (list, tuple)) else ()
    if len(span) != 2 or None in span or span[1] < span[0]:
        raise _bad(path, i, "timestamps", f"must be [start, end] seconds, got {ts!r}")
    for k in ("question", "answer", "temporal_question", "spatial_question", "spatial_question_2"):
        if not isinstance(d[k], str):
            raise _bad(path, i, k, f"must be a string, got {type(d[k]).__name__}")
    known = set(VSTAR_REQUIRED) | {"domain", "object", "chain"}
    return VStarSample(
        vid=str(d["vid"]), fps=nums["fps"], width=int(nums["width"]), height=int(nums["height"]),
        frame_count=int(nums["frame_count"]), question=d["question"], answer=d["answer"],
        temporal_question=d["temporal_question"], timestamps=span,
        spatial_question=d["spatial_question"], spatial_question_2=d["spatial_question_2"],
        frames=_vstar_frames(d["bboxes"], nums["fps"], path, i),
        domain=str(d.get("domain") or ""), object=str(d.get("object") or ""),
        chain=str(d.get("chain") or ""), extra={k: v for k, v in d.items() if k not in known})


def _read_json_list(path):
    """A JSON list (or JSON lines) from path; ValueError naming the file otherwise."""
    text = data.read_text(path)
    try:
        items = data.parse_json(text, path)
    except data.DataError:
        try:
            items = [data.parse_json(line, path) for line in text.splitlines() if line.strip()]
        except data.DataError as e:
            raise ValueError(f"neither a JSON list nor JSON lines: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{path}: no samples")  # an empty test set would report zeros silently
    return items


def load_vstar(path):
    """A V-STAR annotation file (public layout) -> [VStarSample]."""
    return [vstar_sample_from_dict(d, path, i) for i, d in enumerate(_read_json_list(path))]


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s):
    """Lower case, no punctuation, no articles, single spaces: for exact-match judging."""
    s = re.sub(r"[^\w\s]", " ", str(s).lower())
    return " ".join(_ARTICLES.sub(" ", s).split())


_LEADING_LETTER = re.compile(r"\s*[\(\[]?([A-Z])(?:[\)\]\.:]|\s|$)")


def read_letter(text):
    """The option letter of a prediction: rewards.parse_letter's forms ('B', '(B)', 'Correct
    Option: B'), or a capital letter opening the answer before its option text ('C. green',
    '(C) green'), which is how VideoMME-style answers often come back."""
    ans = answer_text(text)
    letter = rewards.parse_letter(ans)
    if letter is None:
        m = _LEADING_LETTER.match(ans)
        letter = m.group(1) if m else None
    return letter


def default_judge(question, reference, candidate, rouge_threshold=0.5):
    """Is the candidate answer correct? Option letters compare as letters; otherwise normalized
    exact match, or mean ROUGE-1/2/L F1 >= rouge_threshold. (V-STAR itself asks a 72B LLM for a
    0-3 score and counts >= 2; no judge model runs here, so this is the offline stand-in. Any
    callable (question, reference, candidate) -> bool plugs in instead.)"""
    if not candidate or not str(candidate).strip():
        return False
    ref_letter = rewards.parse_letter(str(reference))
    if ref_letter is not None:
        return read_letter(candidate) == ref_letter
    if normalize_answer(candidate) == normalize_answer(reference):
        return True
    return rewards.rouge_f1_mean(candidate, reference) >= rouge_threshold


def visual_iou(frames, timed_boxes, time_tol=0.5):
    """V-STAR vIoU: mean over ground-truth frames of the best IoU among the boxes predicted for
    that frame (0 when none). A prediction belongs to a frame when its time is within time_tol
    seconds: with whole-second annotations and whole-second keys that is the official exact-key
    match, and it still lets '3.0' meet 3."""
    if not frames:
        return 0.0
    scores = []
    for fr in frames:
        cands = [b for t, boxes in timed_boxes.items() if abs(t - fr.time) <= time_tol + 1e-9
                 for b in boxes]
        scores.append(max((rewards.box_iou(b, fr.box) for b in cands), default=0.0))
    return _mean(scores)


def _rescale(timed_boxes, pred_size, width, height):
    """Boxes written on the frame the model saw (pred_size = (w, h)) -> the annotation's pixels."""
    if not pred_size:
        return timed_boxes
    sx, sy = width / pred_size[0], height / pred_size[1]
    return {t: [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
            for t, boxes in timed_boxes.items()}


VSTAR_ANSWERS = ("what", "when1", "where1", "where2", "when2")


def score_vstar_sample(sample, answers, judge=default_judge, pred_size=None, time_tol=0.5):
    """Scores of one V-STAR sample from the five model outputs (completions or bare answers),
    answers = {"what", "when1", "where1", "where2", "when2": text}.

    Chain 1 asks When then Where (when1, where1); chain 2 asks Where then When (where2, when2).
    pred_size = (w, h) of the frames the model saw when its boxes are in those pixels (boxes get
    rescaled to the annotation's width x height), None when they already are. Never raises on
    predictions. Returns the scores (what, tiou_1, tiou_2, viou_1, viou_2, each in [0, 1]) and
    the parsed predictions under 'parsed' (for the per-sample predictions file)."""
    what = answer_text(answers["what"])
    span1, span2 = parse_time_span(answers["when1"]), parse_time_span(answers["when2"])
    boxes1, boxes2 = [_rescale(parse_timed_boxes(t, sample.fps), pred_size, sample.width,
                               sample.height) for t in (answers["where1"], answers["where2"])]
    correct = bool(judge(sample.question, sample.answer, what)) if what else False
    return {
        "what": float(correct),
        "tiou_1": temporal_iou(span1, sample.timestamps),
        "tiou_2": temporal_iou(span2, sample.timestamps),
        "viou_1": visual_iou(sample.frames, boxes1, time_tol),
        "viou_2": visual_iou(sample.frames, boxes2, time_tol),
        "gt_span": tuple(sample.timestamps),
        "parsed": {"what": what, "span_1": span1, "span_2": span2,
                   "boxes_1": {str(t): b for t, b in sorted(boxes1.items())},
                   "boxes_2": {str(t): b for t, b in sorted(boxes2.items())}},
    }


LGM_EPS = 1e-6  # ln(1 - x) is -inf at x = 1 (a perfect score); clamp so the table stays finite


def vstar_scores(acc, mtiou_1, mtiou_2, mviou_1, mviou_2):
    """AM / LGM from the five means (fractions in [0, 1]); every value returned is x100."""
    lg = lambda x: math.log(max(1.0 - x, LGM_EPS))  # noqa: E731
    am = [(acc + t + v) / 3 for t, v in ((mtiou_1, mviou_1), (mtiou_2, mviou_2))]
    lgm = [-(lg(acc) + lg(t) + lg(v)) / 3 for t, v in ((mtiou_1, mviou_1), (mtiou_2, mviou_2))]
    out = {"Acc": acc, "mtIoU_1": mtiou_1, "mtIoU_2": mtiou_2, "mvIoU_1": mviou_1,
           "mvIoU_2": mviou_2, "AM_1": am[0], "AM_2": am[1], "mAM": _mean(am),
           "LGM_1": lgm[0], "LGM_2": lgm[1], "mLGM": _mean(lgm)}
    return {k: 100.0 * v for k, v in out.items()}


def vstar_summary(per_sample):
    """Per-sample score dicts (score_vstar_sample) -> the V-STAR table row, x100, plus n."""
    mean = lambda k: _mean(s[k] for s in per_sample)  # noqa: E731
    out = vstar_scores(mean("what"), mean("tiou_1"), mean("tiou_2"), mean("viou_1"),
                       mean("viou_2"))
    out["n"] = len(per_sample)
    blind = best_constant_span([s["gt_span"] for s in per_sample if "gt_span" in s])
    if blind is not None:  # the best one When answer for every sample, chosen knowing the answers
        out["mtIoU_blind"] = 100.0 * blind[0]
    return out


# The five turns of a V-STAR sample in the order they can be asked: turn -> (the sample's
# questions asked so far, the earlier turns whose answers come between them). Chain 1 asks When
# then Where, chain 2 Where then When; both open with What.
VSTAR_TURNS = {
    "what": (("question",), ()),
    "when1": (("question", "temporal_question"), ("what",)),
    "where2": (("question", "spatial_question_2"), ("what",)),
    "where1": (("question", "temporal_question", "spatial_question"), ("what", "when1")),
    "when2": (("question", "spatial_question_2", "temporal_question"), ("what", "where2")),
}


def _span_text(s, e):
    t = lambda x: f"{data.T_OPEN}{data.format_seconds(x)}{data.T_CLOSE}"  # noqa: E731
    return f"From {t(s)}s to {t(e)}s"


def vstar_oracle_answers(sample):
    """What a perfect model would write for the five questions (for checking the scorer)."""
    when = _span_text(*sample.timestamps)
    where = json.dumps({str(fr.time): fr.box for fr in sample.frames})
    return {"what": sample.answer, "when1": when, "where1": where, "where2": where, "when2": when}


def vstar_gold_completions(sample):
    """The five turns' completions in the training grammar (SFT on V-STAR-style chains; boxes in
    pixels of the annotation's width x height). When and Where think with the object's first and
    last annotated boxes; Where answers with every annotated box at its time."""
    name = sample.object or "object"
    claim = lambda fr: (f"{data.OBJ_OPEN}{name}{data.OBJ_CLOSE}"  # noqa: E731
                        f"{data.BOX_OPEN}[{','.join(str(round(v)) for v in fr.box)}]{data.BOX_CLOSE}"
                        f"at{data.T_OPEN}{data.format_seconds(fr.time)}{data.T_CLOSE}s")
    ends = [sample.frames[0], sample.frames[-1]] if len(sample.frames) > 1 else sample.frames
    think = f"{data.THINK_OPEN}{' '.join(claim(fr) for fr in ends)}{data.THINK_CLOSE}"
    what = f"{sample.chain or data.THINK_OPEN + data.THINK_CLOSE}{data.ANSWER_OPEN}{sample.answer}{data.ANSWER_CLOSE}"
    when = f"{think}{data.ANSWER_OPEN}{_span_text(*sample.timestamps)}{data.ANSWER_CLOSE}"
    where = f"{think}{data.ANSWER_OPEN}{' '.join(claim(fr) for fr in sample.frames)}{data.ANSWER_CLOSE}"
    return {"what": what, "when1": when, "where1": where, "where2": where, "when2": when}


# =============================================================================================
# Multiple-choice video QA (VideoMME-style: question, options, answer letter)
# =============================================================================================
# VideoMME rows: video_id, duration (short/medium/long), domain, sub_category, url, videoID,
# question_id, task_type, question, options ["A. ...", ...], answer "A". Our STGR MCQ records carry
# `task` and an answer "B" (or "B\n[s, e]" for temporal MCQ).
MCQ_CATEGORY_KEYS = ("category", "task_type", "task", "duration", "domain")


def load_mcq(path):
    """A VideoMME-style JSON list -> records, checked for question / options / answer."""
    records = _read_json_list(path)
    for i, r in enumerate(records):
        for name in ("question", "options", "answer"):
            if not isinstance(r, dict) or name not in r or r[name] in (None, ""):
                raise _bad(path, i, name, "is missing")
        if rewards.parse_letter(str(r["answer"])) is None:
            raise _bad(path, i, "answer", f"is not an option letter: {r['answer']!r}")
    return records


def mcq_accuracy(records, letters):
    """Accuracy (x100) of predicted letters (or completions) against records' answer letters,
    overall and per value of every category-like field present ('Acc[task_type=Counting]')."""
    if len(records) != len(letters):
        raise ValueError(f"{len(records)} records but {len(letters)} predictions")
    hits, groups = [], defaultdict(list)
    for i, (r, pred) in enumerate(zip(records, letters)):
        gt = rewards.parse_letter(str(r.get("answer", "")))
        if gt is None:
            raise ValueError(f"record {i} ('{r.get('id', r.get('question_id', '?'))}'): field "
                             f"'answer' is not an option letter: {r.get('answer')!r}")
        hit = float(read_letter(pred) == gt)
        hits.append(hit)
        for key in MCQ_CATEGORY_KEYS:
            if r.get(key) not in (None, ""):
                groups[f"Acc[{key}={r[key]}]"].append(hit)
    out = {"Acc": 100.0 * _mean(hits), "n": len(hits)}
    out.update({k: 100.0 * _mean(v) for k, v in sorted(groups.items())})
    return out


# =============================================================================================
# Temporal grounding (Charades-STA style)
# =============================================================================================
TG_THRESHOLDS = (0.3, 0.5, 0.7)


def load_grounding(path):
    """A Charades-STA-style JSON list: {video, query (or sentence), span (or timestamp) [s, e]}."""
    rows = _read_json_list(path)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: sample {i}: must be a JSON object")
        for name, keys in (("video", ("video", "video_path")), ("query", ("query", "sentence")),
                           ("span", ("span", "timestamp"))):
            if not any(r.get(k) not in (None, "") for k in keys):
                raise _bad(path, i, name, f"is missing (one of {keys})")
        span = r.get("span", r.get("timestamp"))
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(_finite_number(x) is not None for x in span)
                and span[0] < span[1]):
            raise _bad(path, i, "span", f"must be [start, end] seconds with start < end, got {span!r}")
    return rows


def temporal_grounding_metrics(pred_spans, gt_spans):
    """R@1 at tIoU >= 0.3 / 0.5 / 0.7 and mean tIoU, all x100. A None prediction counts 0."""
    if len(pred_spans) != len(gt_spans):
        raise ValueError(f"{len(pred_spans)} predictions but {len(gt_spans)} ground truths")
    ious = [temporal_iou(p, g) for p, g in zip(pred_spans, gt_spans)]
    out = {f"R@{th}": 100.0 * _mean(iou >= th for iou in ious) for th in TG_THRESHOLDS}
    out["mIoU"] = 100.0 * _mean(ious)
    return out


# =============================================================================================
# STGR synthetic split: accuracy + every rewards.py component that applies
# =============================================================================================
ACC_IOU = 0.5  # a span / box answer counts as correct at IoU >= 0.5 (the usual R@0.5)


def stgr_correct(record, completion, judge=default_judge):
    """Is the answer right? MCQ: letter; temporal QA: tIoU >= 0.5; visual QA: box IoU >= 0.5
    (via rewards' answer score, which is that IoU); free-form: the What judge."""
    task, answer = record.get("task", ""), answer_text(completion)
    if not answer:
        return False
    if task in rewards.MCQ_TASKS:
        return read_letter(answer) == rewards.parse_letter(str(record["answer"]))
    if task == "temporal QA":
        gt = rewards.parse_span(str(record["answer"]))
        return temporal_iou(parse_time_span(answer), gt) >= ACC_IOU
    if task == "visual QA":
        return None  # decided from the reward's answer component in score_stgr
    return bool(judge(record.get("question", ""), str(record["answer"]), answer))


def first_object(text):
    """The first <obj>name</obj> of a text, whitespace-collapsed and lower-case; None without one.
    Two finds, so linear in the text whatever it holds."""
    start = text.find(data.OBJ_OPEN)
    end = text.find(data.OBJ_CLOSE, start + len(data.OBJ_OPEN)) if start >= 0 else -1
    return " ".join(text[start + len(data.OBJ_OPEN):end].split()).lower() if end >= 0 else None


_THINK_LETTER = re.compile(r"option\s*\(?([A-D])\b")


def mcq_letter_check(options, truth, completion):
    """Where an MCQ answer goes wrong, for a record whose options are known (synthetic records keep
    them in meta): does the think's last sentence before its "option X" name exactly one option
    ('mcq/names_one'), is X that option's letter ('mcq/letter_of_named'), does the answer block say
    X again ('mcq/answer_is_think_letter'), and is the one option named the right one
    ('mcq/names_right': what a perfect word-to-letter lookup would score). -> dict of 0/1 floats
    ({} without options). Whole-word, case-insensitive matches."""
    if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
        return {}
    parsed = rewards.parse_completion(completion if isinstance(completion, str) else "")
    think = parsed.first_think or ""
    said = list(_THINK_LETTER.finditer(think))
    before = think[:said[-1].start()] if said else think
    pieces = [p for p in re.split(r"(?<=[.!?])\s+", before.strip()) if p] or [""]
    names = lambda text: [i for i, o in enumerate(options)
                          if re.search(r"(?<!\w)" + re.escape(o.strip()) + r"(?!\w)", text, re.IGNORECASE)]
    # the letter's own sentence up to the letter ("So it turns red, option B"), else the one before
    # it ("So it turns red. That is option B"); without a letter, the think's last sentence
    named = names(pieces[-1])
    if not named and said and len(pieces) > 1:
        named = names(pieces[-2])
    letter = said[-1].group(1) if said else None
    answer = read_letter(completion)  # the answer's letter, read as the accuracy reads it
    one = len(named) == 1
    return {"mcq/names_one": float(one),
            "mcq/letter_of_named": float(one and letter == chr(ord("A") + named[0])),
            "mcq/answer_is_think_letter": float(letter is not None and answer == letter),
            "mcq/names_right": float(one and options[named[0]] == truth)}


def score_stgr_sample(record, completion, ctx, cfg=None, judge=default_judge):
    """One STGR record: 'correct' (0/1), the rewards.py components that apply ('reward/<name>',
    reward scale), where the gold trace names an object 'first_name' (1 when the completion's first
    <obj> is the gold trace's first) and, on temporal tasks, the predicted and true spans."""
    cfg = cfg if cfg is not None else rewards.RewardConfig()
    text = completion if isinstance(completion, str) else ""
    scores = rewards.score_completion(text, record, ctx, cfg)
    hit = stgr_correct(record, text, judge)
    if hit is None:  # visual QA: the answer reward is the box IoU
        hit = float(scores.get("answer", 0.0)) >= ACC_IOU
    out = {"task": record.get("task", ""), "correct": float(hit)}
    meta = record.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("hard"), bool):  # synthetic records say how they were drawn
        out["hard"] = meta["hard"]
    if isinstance(meta, dict) and isinstance(meta.get("event"), str):  # ... and which event they ask about
        out["event"] = meta["event"]
    out.update({f"reward/{k}": float(v) for k, v in scores.items()
                if _finite_number(v) is not None})
    out.update({f"spatial/{k}": v for k, v in rewards.spatial_breakdown(text, record, ctx, cfg).items()})
    if record.get("task") in rewards.MCQ_TASKS and isinstance(meta, dict):
        out.update(mcq_letter_check(meta.get("options"), meta.get("answer_text"), text))
    gold = first_object(record.get("reasoning_process") or "")
    if gold is not None:  # does the free answer name first the object the gold trace starts from?
        out["first_name"] = float(first_object(text) == gold)
    if record.get("task") in data.TEMPORAL_TASKS:
        out["pred_span"] = parse_time_span(text)
        out["gt_span"] = rewards.parse_span(str(record.get("answer", "")))
    return out


def stgr_summary(per_sample):
    """Per-sample dicts (score_stgr_sample) -> Acc (x100, overall, per task and, where records say
    it, on hard and easy samples, per event, and per event on the free-form tasks alone, whose answer
    is in words, not an option letter to look up), 'name/first' (x100, over records whose trace names
    an object), 'mcq/...' (x100 over the MCQ records whose options are known: mcq_letter_check),
    temporal grounding on the temporal tasks ('TG/...', x100; its mIoU also per event),
    and each reward's mean over the records where it applies (reward scale, not x100)."""
    by_task, comps = defaultdict(list), defaultdict(list)
    for s in per_sample:
        by_task[f"Acc[task={s['task']}]"].append(s["correct"])
        if "hard" in s:
            by_task[f"Acc[{'hard' if s['hard'] else 'easy'}]"].append(s["correct"])
        if "event" in s:
            by_task[f"Acc[event={s['event']}]"].append(s["correct"])
            if s["task"] in rewards.FREE_FORM_TASKS:  # the answer in words: no option letter to look up
                by_task[f"Acc[free-form,event={s['event']}]"].append(s["correct"])
        for k, v in s.items():
            if k.startswith("reward/"):
                comps[k].append(v)
            elif k.startswith("mcq/"):  # x100 over the MCQ records whose options are known
                by_task[k].append(v)
    out = {"Acc": 100.0 * _mean(s["correct"] for s in per_sample), "n": len(per_sample)}
    out.update({k: 100.0 * _mean(v) for k, v in sorted(by_task.items())})
    named = [s["first_name"] for s in per_sample if "first_name" in s]
    if named:
        out["name/first"] = 100.0 * _mean(named)
    out.update(spatial_links(per_sample))
    spans = [(s["pred_span"], s["gt_span"]) for s in per_sample if "gt_span" in s]
    if spans:
        tg = temporal_grounding_metrics([p for p, _ in spans], [g for _, g in spans])
        out.update({f"TG/{k}": v for k, v in tg.items()})
        blind = best_constant_span([g for _, g in spans])
        if blind is not None:  # the best one span for every question, chosen knowing the answers
            out["TG/mIoU_blind"] = 100.0 * blind[0]
        by_event = defaultdict(list)
        for s in per_sample:
            if "gt_span" in s and "event" in s:
                by_event[s["event"]].append(temporal_iou(s["pred_span"], s["gt_span"]))
        out.update({f"TG/mIoU[event={e}]": 100.0 * _mean(v) for e, v in sorted(by_event.items())})
    out.update({k: _mean(v) for k, v in sorted(comps.items())})
    return out


def spatial_links(per_sample):
    """Where the spatial reward is lost, pooled over the records with a breakdown
    (rewards.spatial_breakdown, 'spatial/<k>' in each sample): 'spatial/claims' and 'spatial/truth'
    per record; 'spatial/gated' (claims within tau of a key frame, x100 of the claims),
    'spatial/named' (naming an object there, x100 of the gated) and 'spatial/box' (their mean box
    score, x100). A perfect trace scores 100 on the last three; {} without breakdowns."""
    rows = [s for s in per_sample if "spatial/claims" in s]
    if not rows:
        return {}
    total = {k: sum(s[f"spatial/{k}"] for s in rows) for k in ("claims", "gated", "named", "box", "truth")}
    share = lambda a, b: 100.0 * total[a] / total[b] if total[b] else 0.0
    return {"spatial/claims": total["claims"] / len(rows), "spatial/truth": total["truth"] / len(rows),
            "spatial/gated": share("gated", "claims"), "spatial/named": share("named", "gated"),
            "spatial/box": share("box", "named")}


def forced_box_summary(pairs):
    """Teacher-forced box reading (eval.forced_spans): [(predicted box text, gold box text)] ->
    'forced_box/mIoU' (x100; a prediction the rewards' box reader rejects scores 0),
    'forced_box/IoU50' (share with IoU >= 0.5, x100) and 'forced_box/n'; {} without boxes."""
    ious = []
    for pred, gold in pairs:
        g = rewards.parse_box(gold)
        if g is None:  # a gold trace box that is not four numbers: nothing to score against
            continue
        p = rewards.parse_box(pred)
        ious.append(rewards.box_iou(p, g) if p is not None else 0.0)
    if not ious:
        return {}
    return {"forced_box/mIoU": 100.0 * _mean(ious), "forced_box/IoU50": 100.0 * _mean(x >= 0.5 for x in ious),
            "forced_box/n": len(ious)}


def forced_name_summary(pairs):
    """Teacher-forced naming (eval.forced_spans): [(predicted name, gold name)] -> 'forced_name/acc'
    (x100, exact after collapsing whitespace, any case) and 'forced_name/n'; {} without names."""
    same = [" ".join(p.split()).lower() == " ".join(g.split()).lower() for p, g in pairs]
    return {"forced_name/acc": 100.0 * _mean(same), "forced_name/n": len(same)} if same else {}


def forced_pointer_summary(shares):
    """Where one attention head looks from the gold claims (eval.forced_spans with --eval_pointer_layer):
    [(share on the claim's box, share on its frame)] -> 'forced_pointer/box' and 'forced_pointer/frame'
    (mean shares, x100) and 'forced_pointer/n'; {} without claims."""
    if not shares:
        return {}
    return {"forced_pointer/box": 100.0 * _mean(b for b, _ in shares),
            "forced_pointer/frame": 100.0 * _mean(f for _, f in shares), "forced_pointer/n": len(shares)}


def score_stgr(records, completions, ctx, cfg=None, judge=default_judge):
    """Summary of one checkpoint on an STGR split (see stgr_summary). ctx is one
    rewards.RewardContext for every record, or a list with one per record."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    ctxs = ctx if isinstance(ctx, (list, tuple)) else [ctx] * len(records)
    return stgr_summary([score_stgr_sample(r, t, c, cfg, judge)
                         for r, t, c in zip(records, completions, ctxs)])


# =============================================================================================
# Tables
# =============================================================================================


def _cell(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    return str(v) if isinstance(v, int) else f"{v:.2f}"


def format_markdown_table(summaries):
    """{checkpoint name: summary dict} -> a markdown table: one row per checkpoint, one column
    per metric (union of keys in first-seen order; '-' where a checkpoint lacks one)."""
    cols = []
    for s in summaries.values():
        cols += [k for k in s if k not in cols and not isinstance(s[k], (dict, list))]
    lines = ["| checkpoint | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(_cell(s.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def compare_summaries(paths):
    """Summary JSON files (as written by an eval run) -> one markdown table, rows named by path."""
    summaries = {}
    for p in paths:
        with open(p) as f:
            summaries[p] = json.load(f)
    return format_markdown_table(summaries)
