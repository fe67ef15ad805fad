"""Rewards: the verifiable signal of grounded video RL (VisionCoach, after Open-o3-Video).

Owns: the one parser of what the model writes (parse_completion; REFERENCE.md section 3), every
reward, the per-completion dict and the per-group table, the two rule sets (RewardConfig() ours,
RewardConfig.released() the release's; rules_config serves --reward_rules), and
ground_truth_completion (the perfect completion built from a record, for tests, eval's oracle
check and scripts). Leaves tags, task names and the box conversion to data.py, advantages to
grpo.py. Pure Python: no torch, no prints.

Test: python -m pytest tests/test_rewards.py -q

Rewards. Every value is a float in [0, 1]; "total" is their plain (unweighted) sum, so it lies in
[0, number of applicable rewards]. A reward that does not apply to a task is ABSENT from the dict
(not 0), so totals compare per task; the release returned 0 instead, which gives the same sum.
  answer            every task. MCQ ("General video QA MCQ", "temporal QA (MCQ)"): 1 if the letter
                    matches (B, B., (B), [B], Correct Option: B) else 0. Free-form ("temporal-spatial
                    free-form QA", "General video QA Free-form"): mean of ROUGE-1/2/L F1 over
                    stemmed words. "temporal QA": tIoU of the answered span. "visual QA": box IoU,
                    one-to-one F1 over the answered boxes (so listing several boxes costs).
  temporal_iou      "temporal QA (MCQ)": tIoU of the answered span (the letter is `answer`).
  format            every task: 1 well-formed and grounded, 0.5 well-formed only, 0 otherwise.
                    Grounded: spatio-temporal, one claim with name, box and time; temporal tasks,
                    two or more think times; visual QA, one named box; other tasks, a non-empty think.
  temporal_point    spatio-temporal records ("temporal-spatial free-form QA", and "General video
                    QA *" records that carry key frames and key items): think times paired one to
                    one with key-frame times, closest first, each pair paying exp(-d^2 / 2 sigma^2),
                    summed and divided by (#times + #key frames) / 2; sigma = 4 (1 - p) while
                    progress p < 3/4, else 1.
  temporal_segment  "temporal QA", "temporal QA (MCQ)": fraction of think times inside the span.
  spatial           spatio-temporal records: claims gated to the nearest key frame within tau
                    (symmetric), objects matched by name, boxes scored (see below), claim score =
                    mean (or max) over its objects, summed and divided by (#claims + #true (key
                    frame, object) pairs) / 2. "visual QA": think boxes against the answer's box.
A perfect completion scores 1 on each; every true object left unclaimed, every key frame left
without a time and every spare claim or time lowers its reward.

Departures from the release. Each [switch] is a RewardConfig field; released() sets every one to
the release's behaviour, so released() reproduces the release's numbers except where listed under 11.
  1. Boxes: one-to-one greedy matching scored like an F1, 2 * sum(IoU) / (#claimed + #true), so a
     grid of boxes or honest-plus-random boxes costs (release: mean over true boxes of the best
     IoU among any claimed boxes; answer box: the first one). [box_matching]
  2. Recall: spatial divides by (claims + true objects) / 2 and temporal point pairs times with key
     frames one to one, so leaving grounding out costs (release: spatial by matched claims only,
     which makes wrong names, off-key times and spare guesses free and one confident claim tie the
     whole trace; temporal point the mean over think times, so one right time ties them all).
     [claim_norm, point_match]
  3. Each (key frame, object) is credited to one claim, its best; verbatim repeats collapse to
     one claim; repeated think times count once. Repetition cannot dilute errors. [credit_once,
     dedupe_times]
  4. Names match on stemmed whole words minus stop words and never when empty; a claim may leave
     words of the object's name out ("car" for "red car") but not add any, so "dog cat man" or
     "man or dog" is a hedge, not a name ("man" is not "woman"); an exact name wins over a
     shorter one (release: substring either way or any shared word, so "" and hedges match).
     [whole_words]
  5. Structure: think and answer must each appear exactly once, in that order, with only
     whitespace around them; otherwise the answer (if out of order or repeated) and every
     grounding reward pay nothing, including a think with no answer (release: first match of
     each, counts of tags). Format: an empty think is not grounded, on any task (release: 1.0 on
     General video QA whatever the think). [strict_structure]
  6. Grounding rewards and format pay only when the task's reader parses the answer (a letter, a
     word, a span, a box): `<answer>.</answer>` after a grounded think earns nothing (release:
     the think's rewards whatever the answer). [readable_answer]
  7. Malformed times, boxes and claims count in denominators with score 0 (release: dropped or
     the whole list lost). [count_malformed]
  8. ROUGE-2 is left out of the mean when the reference has one word (release: a perfect
     one-word answer scores 2/3). [rouge_skip_bigrams]
  9. Number reading: ours rounds ground-truth boxes to whole pixels as the model writes them (so
     the best writable box scores 1), reads only plain unquoted numbers in boxes, and treats a
     negative claim time as malformed; the temporal gate allows 1e-6 s of float error (16.1 - 15.1
     is 1.0000000000000018). The release: exact boxes, quoted numbers ("12") read, negative times
     gated like any other, no tolerance. [round_gt, quoted_numbers, negative_times, tau_tolerance]
 10. Letters: `Correct Option: B` counts for plain MCQ too, a bare letter counts for temporal MCQ,
     and two option lines are a hedge scored 0 (release: plain MCQ compares the whole answer,
     temporal MCQ reads only the text after the first `Correct Option:`, so it grades the first
     of two and a bare letter scores 0). Grounding rewards also apply to "General video QA"
     records with key items (release: only the free-form spatio-temporal task). [mcq_reader,
     general_grounding]
 11. Kept in released() too, on purpose: one tolerant parser reads think times and claims
     (whitespace inside tags, `at <t>`, an optional `s`; numbers are plain ASCII decimals of at
     most 32 characters; the release's regexes need `at<t>..</t>s` verbatim, drop a list whose one
     time float() rejects, take unicode digits, and can match across tag boundaries); ROUGE is
     ours, with the light `stem` below instead of the Porter stemmer (the same on regular
     inflections, no dependency); odd records score Skip(reason), a 0.0 that says why
     (skip_reasons reads them back per call), instead of raising or printing (the release
     crashed or printed).
"""
import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import data

REWARD_NAMES = ("answer", "temporal_iou", "format", "temporal_point", "temporal_segment", "spatial")
FREE_FORM_TASKS = ("temporal-spatial free-form QA", "General video QA Free-form")
MCQ_TASKS = ("General video QA MCQ", "temporal QA (MCQ)")


@dataclass
class RewardContext:
    frame_width: int          # pixels of the frame the model saw (its boxes are in these pixels)
    frame_height: int
    progress: float = 0.0     # training progress in [0, 1] (drives the temporal-point sigma)


@dataclass
class RewardConfig:
    tau_seconds: float = 1.0          # a claim gates to a key frame within +-tau seconds
    tau_tolerance: float = 1e-6       # added to tau: |16.1 - 15.1| is 1.0000000000000018 (release: 0)
    identity: str = "soft"            # soft | strict | none: how claim names meet object names
    whole_words: bool = True          # names compare as stemmed words minus stop words, a name may
                                      # leave words out but not add any; False: release substring
    object_agg: str = "mean"          # mean | max over the objects one claim matched
    claim_norm: str = "f1"            # f1 | all | matched: the spatial denominator (claims + true
                                      # objects) / 2, claims, or matched claims (release)
    point_match: str = "one_to_one"   # one_to_one (times <-> key frames, F1-like) | nearest (release)
    box_matching: str = "one_to_one"  # one_to_one (greedy, F1-like) | best_iou (release)
    credit_once: bool = True          # one claim per (key frame, object); verbatim repeats collapse
    dedupe_times: bool = True         # a think time written twice counts once
    strict_structure: bool = True     # one think then one answer; grounding needs both
    readable_answer: bool = True      # grounding and format pay only for an answer the task's reader parses
    count_malformed: bool = True      # bad times / boxes / claims count in denominators as 0
    rouge_skip_bigrams: bool = True   # one-word reference: ROUGE-2 left out, not scored 0
    round_gt: bool = True             # ground-truth boxes rounded to whole pixels, like the model's (release: no)
    mcq_reader: str = "ours"          # ours (parse_letter) | release (see _read_letter)
    quoted_numbers: bool = False      # release: a box may write its numbers in quotes ("12")
    negative_times: bool = False      # release: a claim at a negative time is gated like any other
    general_grounding: bool = True    # grounding rewards on "General video QA" records with key items
    sigma_start: float = 4.0          # temporal-point sigma = sigma_start * (1 - p) ...
    sigma_final: float = 1.0          # ... then sigma_final once p >= sigma_switch
    sigma_switch: float = 0.75

    def __post_init__(self):  # a typo in a mode must fail here, loudly, not fall back in the RL step
        for name, allowed in (("identity", ("soft", "strict", "none")), ("object_agg", ("mean", "max")),
                              ("claim_norm", ("f1", "all", "matched")),
                              ("point_match", ("one_to_one", "nearest")),
                              ("box_matching", ("one_to_one", "best_iou")), ("mcq_reader", ("ours", "release"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RewardConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not (min(self.tau_seconds, self.tau_tolerance) >= 0 and self.sigma_final > 0 and self.sigma_start > 0):
            raise ValueError("RewardConfig: tau_seconds and tau_tolerance must be >= 0 and sigmas > 0")

    @classmethod
    def released(cls):
        """The rules the VisionCoach release trained with (avg, soft, matched, symmetric gate)."""
        return cls(tau_tolerance=0.0, identity="soft", whole_words=False, object_agg="mean",
                   claim_norm="matched", point_match="nearest", box_matching="best_iou", credit_once=False,
                   dedupe_times=False, strict_structure=False, readable_answer=False, count_malformed=False,
                   rouge_skip_bigrams=False, round_gt=False, mcq_reader="release", quoted_numbers=True,
                   negative_times=True, general_grounding=False)


REWARD_RULES = ("ours", "released")


def rules_config(rules="ours", identity=None) -> RewardConfig:
    """The RewardConfig of --reward_rules (ours | released); identity (soft | strict | none), when
    given, overrides the name rule of either set (the release ran with soft)."""
    if rules not in REWARD_RULES:
        raise ValueError(f"reward rules {rules!r}; expected one of {REWARD_RULES}")
    cfg = RewardConfig.released() if rules == "released" else RewardConfig()
    return dataclasses.replace(cfg, identity=identity) if identity else cfg


@dataclass
class Claim:
    name: str                     # whitespace-collapsed, as written ('' when empty)
    boxes: list                   # valid pixel xyxy boxes as written (4 finite numbers each)
    time: float | None            # seconds, None when absent, malformed or negative
    n_boxes: int = 0              # boxes written, malformed ones included
    box_texts: list = field(default_factory=list)  # each box's text as written (other readers)
    raw_time: float | None = None  # the time as written, any sign (the release gates negatives)


@dataclass
class Parsed:
    think: str | None             # the one think block (None: missing, repeated or broken)
    answer: str | None            # the one answer block after it, stripped (None likewise)
    claims: list                  # Claims in the (first) think block
    think_times: list             # valid <t> values in the (first) think block, in order
    well_formed: bool             # exactly think then answer, whitespace around, tags paired
    n_bad_times: int = 0          # malformed <t> contents in the think block
    think_boxes: list = field(default_factory=list)  # every valid box in the think block
    n_think_boxes: int = 0        # every box written in the think block
    think_box_texts: list = field(default_factory=list)  # each think box's text as written
    first_think: str | None = None   # release view: first <think> to the next </think>
    first_answer: str | None = None  # release view: first <answer> to the next </answer>, stripped
    counts: dict = field(default_factory=dict)        # tag -> count in the whole text
    think_counts: dict = field(default_factory=dict)  # tag -> count in first_think
    text: str = ""


# ---------------------------------------------------------------------------------------------
# The parser: one linear pass finds every tag; small fixed-size checks read their contents
# ---------------------------------------------------------------------------------------------
# An alternation of literal tags has no nested quantifier, so finditer is linear in the text.
_TAG_RE = re.compile("|".join(re.escape(t) for t in data.GROUNDING_TAGS))
_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)  # ASCII: no unicode digits
_MAX_NUM_CHARS = 32  # longer "numbers" (e.g. 400 digits) are malformed, not inf
_PAIRS = ((data.OBJ_OPEN, data.OBJ_CLOSE), (data.BOX_OPEN, data.BOX_CLOSE), (data.T_OPEN, data.T_CLOSE))
_CLOSE_OF = dict(_PAIRS)


def _tokens(text):
    """[(tag, start, end)] for every tag in text, in order."""
    return [(m.group(), m.start(), m.end()) for m in _TAG_RE.finditer(text)]


def _number(s):
    """A plain decimal string -> finite float, else None."""
    s = s.strip()
    if len(s) > _MAX_NUM_CHARS or not _NUM_RE.fullmatch(s):
        return None
    v = float(s)
    return v if math.isfinite(v) else None


def _box(s, quoted=False):
    """'[x1, y1, x2, y2]' -> [4 floats] or None (wrong arity, nesting, junk). quoted: a number
    may also be written as a JSON string, '"12"' (the release read boxes with json and float)."""
    s = s.strip()
    if len(s) > 4 * (_MAX_NUM_CHARS + 6) or not (s.startswith("[") and s.endswith("]")):
        return None
    vals = [v.strip() for v in s[1:-1].split(",")]
    if quoted:
        vals = [v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v for v in vals]
    vals = [_number(v) for v in vals]
    return vals if len(vals) == 4 and None not in vals else None


def _time(s):
    v = _number(s)
    return v if v is not None and v >= 0 else None


def _pairs_of(text, toks, kind):
    """Contents of adjacent (open, close) tag pairs of one kind: [(content, open_i)]."""
    close = _CLOSE_OF[kind]
    return [(text[toks[i][2]:toks[i + 1][1]], i) for i in range(len(toks) - 1)
            if toks[i][0] == kind and toks[i + 1][0] == close]


def _claims(text, toks):
    """Claims: <obj>name</obj> then one or more <box>..</box> (whitespace between), then
    optionally `at <t>x</t>`. An <obj> without a box is a mention, not a claim."""
    claims = []
    for name, i in _pairs_of(text, toks, data.OBJ_OPEN):
        j, texts = i + 2, []
        while (j + 1 < len(toks) and toks[j][0] == data.BOX_OPEN and toks[j + 1][0] == data.BOX_CLOSE
               and not text[toks[j - 1][2]:toks[j][1]].strip()):
            texts.append(text[toks[j][2]:toks[j + 1][1]])
            j += 2
        if not texts:
            continue
        t = None
        if (j + 1 < len(toks) and toks[j][0] == data.T_OPEN and toks[j + 1][0] == data.T_CLOSE
                and text[toks[j - 1][2]:toks[j][1]].strip() == "at"):
            t = _number(text[toks[j][2]:toks[j + 1][1]])
        boxes = [b for b in map(_box, texts) if b is not None]
        claims.append(Claim(name=" ".join(name.split()), boxes=boxes, time=t if t is None or t >= 0 else None,
                            n_boxes=len(texts), box_texts=texts, raw_time=t))
    return claims


def _balanced(toks):
    """Grounding tags come as open, close, open, close ... of the same kind (no nesting)."""
    if len(toks) % 2:
        return False
    return all(toks[k][0] in _CLOSE_OF and toks[k + 1][0] == _CLOSE_OF[toks[k][0]]
               for k in range(0, len(toks), 2))


def _first_block(text, open_tag, close_tag):
    a = text.find(open_tag)
    b = text.find(close_tag, a + len(open_tag)) if a >= 0 else -1
    return (a, b) if b >= 0 else None


def parse_completion(text: str) -> Parsed:
    """THE parser. Linear in len(text); never raises; malformed pieces are dropped or counted."""
    text = text if isinstance(text, str) else ""
    toks = _tokens(text)
    counts = Counter(t for t, _, _ in toks)
    pos = {tag: [s for t, s, _ in toks if t == tag] for tag in
           (data.THINK_OPEN, data.THINK_CLOSE, data.ANSWER_OPEN, data.ANSWER_CLOSE)}
    # 1. release views: first think block, first answer block
    ft, fa = _first_block(text, data.THINK_OPEN, data.THINK_CLOSE), \
        _first_block(text, data.ANSWER_OPEN, data.ANSWER_CLOSE)
    first_think = text[ft[0] + len(data.THINK_OPEN):ft[1]] if ft else None
    first_answer = text[fa[0] + len(data.ANSWER_OPEN):fa[1]].strip() if fa else None
    # 2. strict views: exactly one of each, think closed before the answer opens
    one_think = len(pos[data.THINK_OPEN]) == 1 and len(pos[data.THINK_CLOSE]) == 1 and ft is not None
    think = first_think if one_think else None
    one_answer = len(pos[data.ANSWER_OPEN]) == 1 and len(pos[data.ANSWER_CLOSE]) == 1 and fa is not None
    in_order = not (pos[data.THINK_OPEN] or pos[data.THINK_CLOSE]) or (
        one_think and fa is not None and fa[0] > ft[1])
    answer = first_answer if one_answer and in_order else None
    # 3. items inside the (first) think block
    tt = [t for t in toks if ft and ft[0] < t[1] < ft[1]]
    times = [_time(c) for c, _ in _pairs_of(text, tt, data.T_OPEN)]
    box_texts = [c for c, _ in _pairs_of(text, tt, data.BOX_OPEN)]
    boxes = [_box(c) for c in box_texts]
    well = think is not None and answer is not None and _well_formed(text, toks, ft, fa)
    return Parsed(think=think, answer=answer, claims=_claims(text, tt),
                  think_times=[t for t in times if t is not None], well_formed=well,
                  n_bad_times=times.count(None), think_boxes=[b for b in boxes if b is not None],
                  n_think_boxes=len(boxes), think_box_texts=box_texts, first_think=first_think,
                  first_answer=first_answer, counts=dict(counts),
                  think_counts=dict(Counter(t for t, _, _ in tt)), text=text)


def _well_formed(text, toks, ft, fa):
    """Only whitespace around the two blocks; grounding tags paired inside each block."""
    outside = (text[:ft[0]], text[ft[1] + len(data.THINK_CLOSE):fa[0]],
               text[fa[1] + len(data.ANSWER_CLOSE):])
    if any(s.strip() for s in outside):
        return False
    inner_think = [t for t in toks if ft[0] < t[1] < ft[1]]
    inner_answer = [t for t in toks if fa[0] < t[1] < fa[1]]
    return _balanced(inner_think) and _balanced(inner_answer)


# ---------------------------------------------------------------------------------------------
# Answer readers and small metrics
# ---------------------------------------------------------------------------------------------
_LETTER_RE = re.compile(r"\(([A-Z])\)|\[([A-Z])\]|([A-Z])\.?")
_BRACKET_RE = re.compile(r"\[([^\[\]]{0,100})\]")  # bounded class, no nesting: linear
_OPTION = "Correct Option:"
_RELEASE_NUM_RE = re.compile(r"\d+\.?\d*", re.ASCII)  # only ever run on <= 32 characters


def parse_letter(answer_text) -> str | None:
    """'B', 'B.', '(B)', '[B]', 'Correct Option: B' (once), or a ground truth 'B\\n[s, e]'."""
    if not isinstance(answer_text, str):
        return None
    s = answer_text
    k = s.find(_OPTION)
    if k >= 0:
        if s.find(_OPTION, k + 1) >= 0:
            return None  # two options written: a hedge, not an answer
        s = s[k + len(_OPTION):]
    s = s.strip()
    head, _, rest = s.partition("\n")
    if rest and parse_span(rest) is not None:  # the temporal-MCQ record form 'B\n[s, e]'
        s = head.strip()
    m = _LETTER_RE.fullmatch(s)
    return next(g for g in m.groups() if g) if m else None


def _read_letter(ans, task, cfg):
    """The answered letter under cfg.mcq_reader. ours: parse_letter. release: the whole answer
    (temporal MCQ: the text after the first 'Correct Option:', to the next one) must be B, B.,
    (B) or [B]; a bare letter gives nothing on temporal MCQ, a second option line is ignored."""
    if cfg.mcq_reader == "ours":
        return parse_letter(ans)
    if task == "temporal QA (MCQ)":
        parts = ans.split(_OPTION, 2)
        if len(parts) < 2:
            return None
        ans = parts[1]
    m = _LETTER_RE.fullmatch(ans.strip())
    return next(g for g in m.groups() if g) if m else None


def parse_box(box_text) -> list[float] | None:
    """The inside of <box>...</box>, '[x1,y1,x2,y2]': 4 finite floats, else None (the rewards' reader)."""
    return _box(box_text) if isinstance(box_text, str) else None


def parse_span(answer_text) -> tuple[float, float] | None:
    """'From <t>s</t>s to <t>e</t>s' (exactly two times) or one '[s, e]'; None unless 0 <= s <= e."""
    if not isinstance(answer_text, str):
        return None
    toks = _tokens(answer_text)
    if any(t == data.T_OPEN for t, _, _ in toks):
        vals = [_time(c) for c, _ in _pairs_of(answer_text, toks, data.T_OPEN)]
    else:
        spans = [[_time(v) for v in m.group(1).split(",")] for m in _BRACKET_RE.finditer(answer_text)]
        spans = [v for v in spans if len(v) == 2 and None not in v]
        vals = spans[0] if len(spans) == 1 else []
    if len(vals) != 2 or None in vals or vals[0] > vals[1]:
        return None
    return (vals[0], vals[1])


def _released_span(answer_text):
    """The release's reader: first `<t>a</t>s to <t>b</t>s` with plain digits; None if b < a."""
    toks = _tokens(answer_text)
    for k in range(len(toks) - 3):
        if [t for t, _, _ in toks[k:k + 4]] != [data.T_OPEN, data.T_CLOSE, data.T_OPEN, data.T_CLOSE]:
            continue
        a, b = (answer_text[toks[k][2]:toks[k + 1][1]], answer_text[toks[k + 2][2]:toks[k + 3][1]])
        ok = all(len(x) <= _MAX_NUM_CHARS and _RELEASE_NUM_RE.fullmatch(x) for x in (a, b))
        if ok and answer_text[toks[k + 1][2]:toks[k + 2][1]] == "s to " \
                and answer_text[toks[k + 3][2]:toks[k + 3][2] + 1] == "s":
            return (float(a), float(b)) if float(b) >= float(a) else None
    return None


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes; inverted, empty, non-finite or non-4 boxes give 0."""
    try:
        ax1, ay1, ax2, ay2 = (float(v) for v in a)
        bx1, by1, bx2, by2 = (float(v) for v in b)
    except (TypeError, ValueError):
        return 0.0
    if not all(math.isfinite(v) for v in (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)):
        return 0.0
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def segment_iou(a, b) -> float:
    """tIoU = overlap / (max end - min start); None, inverted or zero-length union gives 0."""
    if a is None or b is None:
        return 0.0
    (s1, e1), (s2, e2) = a, b
    if not all(math.isfinite(v) for v in (s1, e1, s2, e2)) or e1 < s1 or e2 < s2:
        return 0.0
    union = max(e1, e2) - min(s1, s2)
    return max(0.0, min(e1, e2) - max(s1, s2)) / union if union > 0 else 0.0


# A light stemmer: a few English suffix rules, enough to equate the inflections an answer uses
# (cups / cup, picked / picks / picking / pick, stopped / stops, boxes / box, carried / carry).
# The first rule whose suffix matches and leaves a stem of 3+ letters with a vowel wins.
_SUFFIXES = (("ies", "y"), ("ied", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("s", ""))
_KEEP = {"s": ("ss", "us", "is"), "ed": ("eed",)}  # glass, bus, this, speed: not inflections


def stem(word) -> str:
    """Light suffix-stripping stemmer (ours, not Porter): 'picked' -> 'pick', 'boxes' -> 'box'."""
    w = word
    for suffix, repl in _SUFFIXES:
        base = w[:len(w) - len(suffix)] + repl
        if not w.endswith(suffix) or w.endswith(_KEEP.get(suffix, ())) or len(base) < 3 \
                or not any(ch in "aeiouy" for ch in base):
            continue
        w = base
        if suffix in ("ing", "ed") and len(w) >= 4 and w[-1] == w[-2] and w[-1] not in "aeiouylsz":
            w = w[:-1]  # stopped -> stopp -> stop; fall, kiss and buzz keep theirs
        break
    return w[:-1] if w.endswith("e") and len(w) >= 4 else w  # move / moved / moves -> mov


def _rouge_tokens(s, stemmed=True):
    toks = re.sub(r"[^a-z0-9]+", " ", s.lower()).split()  # rouge_score's tokenizer
    return [stem(t) for t in toks] if stemmed else toks


def _f1(overlap, n_pred, n_ref):
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs(a, b):
    row = [0] * (len(b) + 1)  # one DP row: O(len(a) * len(b)) time, O(len(b)) memory
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_f1_mean(pred, ref, skip_empty_bigrams=True, stemmed=True) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (written here; words through `stem`). With
    skip_empty_bigrams, a one-word reference is scored on ROUGE-1 and ROUGE-L only."""
    p = _rouge_tokens(pred if isinstance(pred, str) else "", stemmed)
    r = _rouge_tokens(ref if isinstance(ref, str) else "", stemmed)
    scores = [_f1(sum((Counter(p) & Counter(r)).values()), len(p), len(r)),
              _f1(_lcs(p, r), len(p), len(r))]
    if len(r) >= 2 or not skip_empty_bigrams:
        bp, br = Counter(zip(p, p[1:])), Counter(zip(r, r[1:]))
        scores.append(_f1(sum((bp & br).values()), max(len(p) - 1, 0), max(len(r) - 1, 0)))
    return sum(scores) / len(scores)


def _greedy_total(pairs):
    """[(score, i, j)] -> summed score of a greedy one-to-one matching, best pairs first
    (first listed on ties), positive scores only."""
    used_i, used_j, total = set(), set(), 0.0
    for s, i, j in sorted(pairs, key=lambda x: -x[0]):
        if s > 0 and i not in used_i and j not in used_j:
            used_i.add(i), used_j.add(j)
            total += s
    return total


def _matched_f1(pred, gt, n_pred):
    """Greedy one-to-one matching by IoU; 2 * sum(IoU) / (n_pred + len(gt)): spares cost."""
    total = _greedy_total([(box_iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)])
    return 2 * total / (n_pred + len(gt)) if n_pred + len(gt) else 0.0


def _box_score(pred, n_pred, gt, cfg):
    if not gt:
        return 0.0
    if cfg.box_matching == "best_iou":  # release: per true box, its best claimed box
        return sum(max((box_iou(p, g) for p in pred), default=0.0) for g in gt) / len(gt)
    return _matched_f1(pred, gt, n_pred if cfg.count_malformed else len(pred))


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
_STOP = frozenset("a an the of in on at to with and or is are this that its his her their".split())


def _words(name):
    return re.sub(r"[^\w]+", " ", name.lower()).split()


def _content(words):
    """Stemmed words minus stop words (all of them when only stop words are left)."""
    return {stem(w) for w in words if w not in _STOP} or {stem(w) for w in words}


def names_match(pred, gt, cfg):
    """Does a claimed name denote a true object? identity none | strict | soft (see cfg).
    Soft, whole words: the claim's words are among the object's ('car' or 'red car' for 'red
    car'), never more: 'dog man' for 'man' is two guesses, not one name."""
    if cfg.identity == "none":
        return True
    if not cfg.whole_words:  # the release's rule, substring either way
        p, g = pred.lower().strip(), gt.lower().strip()
        if cfg.identity == "strict":
            return p == g
        return p == g or p in g or g in p or bool(set(p.split()) & set(g.split()))
    p, g = _words(pred), _words(gt)
    if not p or not g:
        return False
    if cfg.identity == "strict":
        return p == g
    return _content(p) <= _content(g)


# ---------------------------------------------------------------------------------------------
# Records: what applies, and the ground truth read defensively (odd -> None + counted reason)
# ---------------------------------------------------------------------------------------------

class Skip(float):
    """0.0 from a reward that could not read its record, carrying why (never raises)."""

    def __new__(cls, reason):
        value = super().__new__(cls, 0.0)
        value.reason = reason
        return value


def _skip(reason):
    return Skip(reason)


def skip_reasons(scores):
    """Counter of the Skip reasons in a score dict or a group table ({name: [floats]})."""
    values = [v for x in scores.values() for v in (x if isinstance(x, list) else [x])]
    return Counter(v.reason for v in values if isinstance(v, Skip))


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def is_spatiotemporal(record, general=True):
    """Free-form spatio-temporal QA, or (general) a General video QA record with key items."""
    task = record.get("task")
    if task == "temporal-spatial free-form QA":
        return True
    return general and isinstance(task, str) and task.startswith("General video QA") \
        and bool(record.get("key_frames")) and bool(record.get("key_items"))


def applicable_rewards(record, cfg=RewardConfig()):
    """Names of the rewards that apply to this record, in REWARD_NAMES order."""
    task = record.get("task") if isinstance(record, dict) else None
    st = isinstance(record, dict) and is_spatiotemporal(record, cfg.general_grounding)
    on = {"answer": True, "format": True, "temporal_iou": task == "temporal QA (MCQ)",
          "temporal_point": st, "temporal_segment": task in data.TEMPORAL_TASKS,
          "spatial": st or task == "visual QA"}
    return [n for n in REWARD_NAMES if on[n]]


def _ctx_ok(ctx):
    w, h = getattr(ctx, "frame_width", None), getattr(ctx, "frame_height", None)
    return _num(w) is not None and _num(h) is not None and w > 0 and h > 0


def _key_frames(record):
    """[(time, idx)] or None when key_frames is missing or odd."""
    kfs = record.get("key_frames")
    if not isinstance(kfs, list) or not kfs:
        return None
    out = []
    for kf in kfs:
        t = _num(kf.get("time")) if isinstance(kf, dict) else None
        idx = kf.get("idx") if isinstance(kf, dict) else None
        if t is None or t < 0 or not isinstance(idx, int) or isinstance(idx, bool):
            return None
        out.append((t, idx))
    return out


def _grounding_truth(record, ctx, rounded=True):
    """[(time, {name: [pixel boxes]})] per key frame, or a reason string."""
    kfs, items = _key_frames(record), record.get("key_items")
    if kfs is None:
        return "no or odd key_frames"
    if not isinstance(items, dict) or not items:
        return "no or odd key_items"
    if not _ctx_ok(ctx):
        return "odd frame size in context"
    frames = []
    for t, idx in kfs:
        objects = items.get(str(idx))
        if not isinstance(objects, dict):
            return "key frame missing from key_items"
        pix = {}
        for name, boxes in objects.items():
            if not isinstance(name, str) or not isinstance(boxes, list) or not all(
                    isinstance(b, list) and len(b) == 4 and all(_num(v) is not None for v in b) for b in boxes):
                return "odd key_items boxes"
            pix[name] = [data.norm_box_to_pixels(b, ctx.frame_width, ctx.frame_height, rounded) for b in boxes]
        frames.append((t, pix))
    return frames


def _gt_span(record):
    span = parse_span(record.get("answer")) if isinstance(record.get("answer"), str) else None
    return span if span is not None and span[1] > span[0] else None


def _gt_answer_box(record, ctx, rounded=True):
    """The visual-QA answer box (pixels of image_size) in the model's frame pixels, or None."""
    ans, size = record.get("answer"), record.get("image_size")
    if not isinstance(ans, str) or not _ctx_ok(ctx) or not isinstance(size, (list, tuple)) \
            or len(size) != 2 or not all(_num(v) and v > 0 for v in size):
        return None
    toks = _tokens(ans)
    boxes = [_box(c) for c, _ in _pairs_of(ans, toks, data.BOX_OPEN)]
    if not boxes or boxes[0] is None:
        return None
    norm = data.pixel_box_to_norm(boxes[0], size[0], size[1])
    return data.norm_box_to_pixels(norm, ctx.frame_width, ctx.frame_height, rounded)


# ---------------------------------------------------------------------------------------------
# Rewards. Each takes the completion text (or an already Parsed one) and returns a float in [0, 1].
# ---------------------------------------------------------------------------------------------

def _parsed(text):
    return text if isinstance(text, Parsed) else parse_completion(text)


def _answer_of(p, cfg):
    return p.answer if cfg.strict_structure else p.first_answer


def _readable(ans, record, cfg):
    """Does the task's reader get an answer out of this text? A letter (MCQ), a word (free-form),
    a span (temporal QA), a box (visual QA), anything non-blank (other tasks)."""
    task = record.get("task")
    if task in MCQ_TASKS:
        return _read_letter(ans, task, cfg) is not None
    if task in FREE_FORM_TASKS:
        return bool(_rouge_tokens(ans))
    if task == "temporal QA":
        return (parse_span(ans) if cfg.strict_structure else _released_span(ans)) is not None
    if task == "visual QA":
        return any(b is not None for b in _answer_boxes(ans, cfg))
    return bool(ans.strip())


def _grounding_may_pay(p, record, cfg, need_answer):
    """May the think block's grounding pay? Ours: one think AND one answer that the task's reader
    parses (a dummy answer after a grounded think earns nothing); the release: a think (and an
    answer for the spatial reward)."""
    if cfg.strict_structure:
        ok = p.think is not None and p.answer is not None
    else:
        ok = p.first_think is not None and (p.first_answer is not None or not need_answer)
    if ok and cfg.readable_answer:
        ans = _answer_of(p, cfg)
        ok = ans is not None and _readable(ans, record, cfg)
    return ok


def _answer_boxes(ans, cfg):
    """Every box in the answer text, None where malformed."""
    return [_box(c, cfg.quoted_numbers) for c, _ in _pairs_of(ans, _tokens(ans), data.BOX_OPEN)]


def answer_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """MCQ letter, free-form ROUGE, temporal QA tIoU, visual QA box IoU (see module doc)."""
    p, task = _parsed(text), record.get("task")
    ans = _answer_of(p, cfg)
    if ans is None:
        return 0.0
    if task in MCQ_TASKS:
        gt = parse_letter(record.get("answer"))
        if gt is None:
            return _skip("gt answer is not a letter")
        return float(_read_letter(ans, task, cfg) == gt)
    if task in FREE_FORM_TASKS:
        ref = record.get("answer")
        if not isinstance(ref, str) or not _rouge_tokens(ref):
            return _skip("gt free-form answer is empty")
        return rouge_f1_mean(ans, ref, skip_empty_bigrams=cfg.rouge_skip_bigrams)
    if task == "temporal QA":
        return _tiou(ans, record, cfg)
    if task == "visual QA":
        gt = _gt_answer_box(record, ctx, cfg.round_gt)
        if gt is None:
            return _skip("odd visual QA answer box or image_size")
        boxes = _answer_boxes(ans, cfg)
        if cfg.box_matching == "best_iou":  # release: the first answered box
            return box_iou(boxes[0], gt) if boxes and boxes[0] is not None else 0.0
        return _box_score([b for b in boxes if b is not None], len(boxes), [gt], cfg)
    return _skip("unknown task")


def _tiou(ans, record, cfg):
    gt = _gt_span(record)
    if gt is None:
        return _skip("odd or empty gt span")
    pred = parse_span(ans) if cfg.strict_structure else _released_span(ans)
    return segment_iou(pred, gt)


def temporal_iou_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """Temporal MCQ: tIoU of the answered span, its own reward beside the letter."""
    ans = _answer_of(_parsed(text), cfg)
    return 0.0 if ans is None else _tiou(ans, record, cfg)


def format_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """1 well-formed and grounded, 0.5 well-formed only, 0 otherwise (ours: also 0 when the
    task's reader cannot parse the answer, and an empty think is not grounded)."""
    p = _parsed(text)
    ans = _answer_of(p, cfg)
    if cfg.readable_answer and (ans is None or not _readable(ans, record, cfg)):
        return 0.0
    if not cfg.strict_structure:
        return _released_format(p, record)
    if not p.well_formed:
        return 0.0
    task = record.get("task")
    if not p.think.strip():
        grounded = False  # <think></think> is no reasoning, whatever the task
    elif is_spatiotemporal(record, cfg.general_grounding):
        grounded = any(c.name and c.boxes and c.time is not None for c in p.claims)
    elif task in data.TEMPORAL_TASKS:
        grounded = len(p.think_times) >= 2
    elif task == "visual QA":
        named = p.claims + _claims(p.answer, _tokens(p.answer))
        grounded = any(c.name and c.boxes for c in named)
    else:
        grounded = True
    return 1.0 if grounded else 0.5


_RELEASE_BOX_RE = re.compile(r"\[.*\]")  # fullmatch: [ ... ] on one line (the release's `\[.*?\]`)


def _released_format(p, record):
    """The release's counting rule (first blocks, paired tag counts)."""
    c, tc, task = p.counts, p.think_counts, record.get("task") or ""
    if p.first_think is None or p.first_answer is None:
        return 0.0
    if any(c.get(o, 0) != c.get(k, 0) for o, k in ((data.THINK_OPEN, data.THINK_CLOSE),
                                                   (data.ANSWER_OPEN, data.ANSWER_CLOSE))):
        return 0.0
    if any(tc.get(o, 0) != tc.get(k, 0) for o, k in _PAIRS):
        return 0.0
    grounded = all(tc.get(o, 0) > 0 for o, _ in _PAIRS)
    if task in data.TEMPORAL_TASKS:
        grounded = tc.get(data.T_OPEN, 0) >= 2
    if task == "visual QA":  # anywhere in the text: <obj>word</obj><box>[...]</box>
        toks, text = _tokens(p.text), p.text
        grounded = grounded or any(
            [t for t, _, _ in toks[k:k + 4]] == [data.OBJ_OPEN, data.OBJ_CLOSE, data.BOX_OPEN, data.BOX_CLOSE]
            and toks[k + 1][2] == toks[k + 2][1] and re.fullmatch(r"\w+", text[toks[k][2]:toks[k + 1][1]])
            and _RELEASE_BOX_RE.fullmatch(text[toks[k + 2][2]:toks[k + 3][1]])
            for k in range(len(toks) - 3))
    return 1.0 if grounded or "General video QA" in task else 0.5


def _sigma(progress, cfg):
    p = _num(progress)
    p = 0.0 if p is None else min(1.0, max(0.0, p))
    s = cfg.sigma_start * (1 - p) if p < cfg.sigma_switch else cfg.sigma_final
    return max(s, 1e-6)  # a zero sigma from an odd config must not divide by zero


def _think_times(p, cfg):
    times = list(dict.fromkeys(p.think_times)) if cfg.dedupe_times else list(p.think_times)
    return times, len(times) + (p.n_bad_times if cfg.count_malformed else 0)


def temporal_point_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """Think times against key-frame times, g(d) = exp(-d^2 / 2 sigma^2). one_to_one: each key
    frame pairs with at most one time (closest pairs first), 2 * sum g / (#times + #key frames),
    so a key frame left without a time costs like a stray time; nearest: mean over think times
    of g(distance to the nearest key frame)."""
    p = _parsed(text)
    if not _grounding_may_pay(p, record, cfg, need_answer=False):
        return 0.0
    kfs = _key_frames(record)
    if kfs is None:
        return _skip("no or odd key_frames")
    times, n = _think_times(p, cfg)
    s = _sigma(getattr(ctx, "progress", 0.0), cfg)
    g = lambda d: math.exp(-d * d / (2 * s * s))  # noqa: E731
    if cfg.point_match == "nearest":
        return sum(g(min(abs(t - k) for k, _ in kfs)) for t in times) / n if n else 0.0
    keys = sorted({k for k, _ in kfs})
    pairs = [(g(abs(t - k)), i, j) for i, t in enumerate(times) for j, k in enumerate(keys)]
    return 2 * _greedy_total(pairs) / (n + len(keys))


def temporal_segment_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """Fraction of think times inside the ground-truth span (ends included)."""
    gt = _gt_span(record)
    if gt is None:  # read first: an odd record is reported whatever the completion
        return _skip("odd or empty gt span")
    p = _parsed(text)
    if not _grounding_may_pay(p, record, cfg, need_answer=False):
        return 0.0
    times, n = _think_times(p, cfg)
    return sum(gt[0] <= t <= gt[1] for t in times) / n if n else 0.0


def spatial_reward(text, record, ctx, cfg=RewardConfig()) -> float:
    """Spatio-temporal: gated, name-matched, box-scored claims (denominator: cfg.claim_norm).
    Visual QA: the think block's boxes against the answer's box."""
    p = _parsed(text)
    if not _grounding_may_pay(p, record, cfg, need_answer=True):
        return 0.0
    if record.get("task") == "visual QA":
        gt = _gt_answer_box(record, ctx, cfg.round_gt)
        if gt is None:
            return _skip("odd visual QA answer box or image_size")
        boxes = p.think_boxes
        if cfg.quoted_numbers:
            boxes = [b for b in (_box(s, True) for s in p.think_box_texts) if b is not None]
        if cfg.box_matching == "best_iou":  # release: the best think box
            return max((box_iou(b, gt) for b in boxes), default=0.0)
        return _box_score(boxes, p.n_think_boxes, [gt], cfg)
    frames = _grounding_truth(record, ctx, cfg.round_gt)
    if isinstance(frames, str):
        return _skip(frames)
    return _spatial_claims(p.claims, frames, cfg)


def _read_claim(c, cfg):
    """The claim with its numbers read by cfg's rules (the release: quoted numbers, negative times)."""
    if not (cfg.quoted_numbers or cfg.negative_times):
        return c
    boxes = [b for b in (_box(s, cfg.quoted_numbers) for s in c.box_texts) if b is not None]
    return dataclasses.replace(c, boxes=boxes, time=c.raw_time if cfg.negative_times else c.time)


def _scored_claims(claims, cfg):
    """The claims the spatial reward scores: numbers read by cfg's rules, then (release) malformed
    ones dropped or (ours) verbatim repeats made one."""
    claims = [_read_claim(c, cfg) for c in claims]
    if not cfg.count_malformed:  # release: a claim with a bad time or box never parsed
        claims = [c for c in claims if c.time is not None and c.boxes and c.n_boxes == len(c.boxes)]
    if cfg.credit_once:  # verbatim repeats are one claim
        seen = {}
        for c in claims:
            seen.setdefault((c.name.lower(), c.time, tuple(map(tuple, c.boxes)), c.n_boxes), c)
        claims = list(seen.values())
    return claims


def _n_true(frames):
    """The true (key frame, object) slots a complete trace claims: objects with a box there."""
    return sum(1 for _, objects in frames for boxes in objects.values() if boxes)


def _spatial_claims(claims, frames, cfg):
    """Sum of claim scores over the claim_norm denominator. f1: (claims + true objects) / 2, so a
    true (key frame, object) left unclaimed costs like a spare claim."""
    claims = _scored_claims(claims, cfg)
    if not claims:
        return 0.0
    per_claim = [_object_scores(c, frames, cfg) for c in claims]  # [{slot: score}]
    if cfg.credit_once:  # each (frame, object) slot pays its best claim only (first on ties)
        best = {}
        for i, scores in enumerate(per_claim):
            for slot, s in scores.items():
                if slot not in best or s > per_claim[best[slot]][slot]:
                    best[slot] = i
        per_claim = [{k: (s if best[k] == i else 0.0) for k, s in sc.items()} for i, sc in enumerate(per_claim)]
    agg = max if cfg.object_agg == "max" else (lambda v: sum(v) / len(v))
    matched = [agg(list(sc.values())) for sc in per_claim if sc]
    n_true = _n_true(frames)
    denom = {"f1": (len(claims) + n_true) / 2, "all": len(claims), "matched": max(1, len(matched))}
    return sum(matched) / denom[cfg.claim_norm]


def _gated_frame(claim, frames, cfg):
    """Index of the key frame a claim gates to: the nearest within tau (the earlier listed one on
    ties); None without a time or a box, or with no key frame near."""
    if claim.time is None or not claim.boxes:
        return None
    tau = cfg.tau_seconds + cfg.tau_tolerance  # times are decimals: 16.1 - 15.1 > 1.0 in floats
    near = [(abs(t - claim.time), k) for k, (t, _) in enumerate(frames) if abs(t - claim.time) <= tau]
    return min(near)[1] if near else None


def _object_scores(claim, frames, cfg):
    """{(frame index, object name): box score} for the objects this claim matches."""
    k = _gated_frame(claim, frames, cfg)
    if k is None:
        return {}
    objects = frames[k][1]
    names = [n for n in objects if names_match(claim.name, n, cfg)]
    if cfg.whole_words and cfg.identity == "soft":  # an exact name beats a shared word
        exact = [n for n in names if _words(n) == _words(claim.name)]
        names = exact or names
    return {(k, n): _box_score(claim.boxes, claim.n_boxes, objects[n], cfg) for n in names if objects[n]}


def spatial_breakdown(text, record, ctx, cfg=RewardConfig()) -> dict:
    """Which link of a claim the spatial reward loses on a spatio-temporal record, for eval's
    'spatial/...' columns: {'claims': the claims it scores, 'gated': those within tau of a key
    frame, 'named': of those, the ones naming an object in that frame, 'box': those ones' box
    scores summed (each its best object), 'truth': the true (key frame, object) slots}. Before the
    reward's other rules (the answer gate, one claim paid per slot, the denominator), so a low
    reward reads as wrong times, wrong names or loose boxes. {} where there are no key frames to
    check (other tasks, visual QA, odd truth)."""
    if not isinstance(record, dict) or not is_spatiotemporal(record, cfg.general_grounding):
        return {}
    frames = _grounding_truth(record, ctx, cfg.round_gt)
    if isinstance(frames, str):
        return {}
    claims = _scored_claims(_parsed(text).claims, cfg)
    scores = [_object_scores(c, frames, cfg) for c in claims]
    return {"claims": len(claims), "gated": sum(_gated_frame(c, frames, cfg) is not None for c in claims),
            "named": sum(bool(s) for s in scores), "box": sum(max(s.values()) for s in scores if s),
            "truth": _n_true(frames)}


# ---------------------------------------------------------------------------------------------
# Completion and group scoring
# ---------------------------------------------------------------------------------------------
_REWARD_FNS = {"answer": answer_reward, "temporal_iou": temporal_iou_reward, "format": format_reward,
               "temporal_point": temporal_point_reward, "temporal_segment": temporal_segment_reward,
               "spatial": spatial_reward}


def score_completion(text, record, ctx, cfg=RewardConfig()) -> dict:
    """{reward name: value} for every applicable reward, plus "total" (their sum)."""
    if not isinstance(record, dict):
        return {"total": _skip("record is not a dict")}
    p = parse_completion(text)
    out = {name: _as_float(_REWARD_FNS[name](p, record, ctx, cfg)) for name in applicable_rewards(record, cfg)}
    out["total"] = sum(out.values())
    return out


def _as_float(value):
    return value if isinstance(value, Skip) else float(value)


def score_group(texts, record, ctx, cfg=RewardConfig()) -> dict:
    """Per-reward table for the G completions of one prompt: {name: [G floats]} (+ "total")."""
    rows = [score_completion(t, record, ctx, cfg) for t in texts]
    names = list(rows[0]) if rows else applicable_rewards(record, cfg) + ["total"]
    return {n: [r[n] for r in rows] for n in names}


# ---------------------------------------------------------------------------------------------
# The perfect completion, built from the record (tests, eval's oracle check, scripts)
# ---------------------------------------------------------------------------------------------

def _fmt_time(t):
    s = data.format_seconds(t)  # the house format, unless one decimal would move the time
    return s if float(s) == t else repr(float(t))


def _fmt_box(b):
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else repr(float(v)) for v in b) + "]"


def _claim_text(name, boxes, t):
    boxes = "".join(f"{data.BOX_OPEN}{_fmt_box(b)}{data.BOX_CLOSE}" for b in boxes)
    at = f"at{data.T_OPEN}{_fmt_time(t)}{data.T_CLOSE}s" if t is not None else ""
    return f"{data.OBJ_OPEN}{name}{data.OBJ_CLOSE}{boxes}{at}"


def _span_text(span):
    s, e = (f"{data.T_OPEN}{_fmt_time(v)}{data.T_CLOSE}s" for v in span)
    return f"From {s} to {e}"


def ground_truth_completion(record, ctx) -> str:
    """'<think>..</think><answer>..</answer>' that earns the maximum on every applicable reward
    (for a record the rewards can read; an odd record gives a plain completion)."""
    task, answer, think = record.get("task"), str(record.get("answer", "")), "I watch the video."
    if is_spatiotemporal(record):  # every object of every key frame, in time order
        frames, kfs = _grounding_truth(record, ctx), _key_frames(record)
        if isinstance(frames, list):
            claims = [_claim_text(name, boxes, t) for (t, _), (_, objects) in
                      sorted(zip(kfs, frames), key=lambda x: x[0][0]) for name, boxes in objects.items()]
            think = "I see " + ", then ".join(claims) + "."
    span = _gt_span(record) if task in data.TEMPORAL_TASKS else None
    if span is not None:
        answer, think = _span_text(span), f"The event runs {_span_text(span).lower()}."
    if task in MCQ_TASKS:
        letter = parse_letter(record.get("answer")) or ""
        answer = f"{answer}\n{_OPTION} {letter}" if task == "temporal QA (MCQ)" else letter
    box = _gt_answer_box(record, ctx) if task == "visual QA" else None
    if box is not None:
        names = [n for n, _ in _pairs_of(answer, _tokens(answer), data.OBJ_OPEN)]
        answer = _claim_text(names[0] if names else "object", [box], None)
        think = f"The target is {answer}."
    return f"{data.THINK_OPEN}{think}{data.THINK_CLOSE}{data.ANSWER_OPEN}{answer}{data.ANSWER_CLOSE}"
