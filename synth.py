"""Synthetic grounded videos: the embedded default dataset, in the real STGR layout.

Owns: a deterministic generator of short clips (gradient or grey background, moving coloured shapes,
distractors, one event in time per clip: stop, turn, colour change, appear, meet), rendered with
tensor masks, encoded with torchcodec, plus STGR records (data.py's layout) whose
reasoning_process is a grounded trace built from ground truth, and a V-STAR-style annotation of
every clip (the test split's is the V-STAR benchmark; the train split's teaches SFT the chains).
Leaves loading / validation to data.py and scoring to rewards.py and eval.py.
Background: --background=gradient (the default), whose colour says where a pixel is (a model
without absolute position embeddings can then read an object's place from what is around it), or
flat grey (every set before session 9).
Difficulty: each sample is hard with probability --difficulty (meta.hard says which). Hard: 3-5
distractors, 3 in 4 sharing the target's colour or kind, radius 6-9 px, 6-8 s clips. Easy: 1-2
distractors of another colour and kind, radius 10-13 px, 4-6 s.
MCQ options: --mcq_options=fixed (the default) lists the four colours, the four directions, or the
answer's kind in the four colours, always in that order, so the answer's word says its letter;
drawn shuffles the answer among three of its wrong answers (the letter is then a lookup in the text).

Run:  python synth.py --data_dir=data/synth --n_train=1600 --n_val=200 --n_test=200 --seed=0 \
          --difficulty=0.5         (the config's fields, config.py; `python train.py` runs it too)
Test: python -m pytest tests/test_synth.py -q

Output under --data_dir (all media paths in the JSON are relative to it):
  train.json / val.json / test.json   STGR records + "meta" (event, span, hard, options, ...)
  videos/{id}.mp4                     112x112 (the model's default size), 4 fps, 4-8 s, h264 yuv420p
  frames/{id}_{idx}.png               the exact rendered key frame; idx = frame index at 4 fps
  vstar_{split}.json                  one V-STAR annotation per clip of the split (videos/{vid}.mp4)
V-STAR layout written (V-STaR-Bench/V-STaR, V_STaR_test.json, a JSON list, one object per clip):
  vid, domain, fps, width, height, frame_count (frames of the video), question (What), chain
  ("<think>...</think>" reasoning), object (name of the boxed object), answer,
  temporal_question (When), timestamps [start_s, end_s], spatial_question (Where, chain 1: asked
  after When), spatial_question_2 (Where, chain 2: asked before When), bboxes: a list with one box
  per annotated frame, {"timestamp": whole seconds, "frame_index": int, "xmin", "ymin", "xmax",
  "ymax"} in pixels of the width x height video. This flat form is what the released file and the
  official scorer use (the scorer matches str(timestamp) against whole-second keys, hence int
  seconds); the V-STaR README shows a nested variant [{"{timestamp}_{frame_index}": {xmin, ...}}].
"""
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import torch
from PIL import Image

import config
from data import (ANSWER_CLOSE, ANSWER_OPEN, BOX_CLOSE, BOX_OPEN, OBJ_CLOSE, OBJ_OPEN, T_CLOSE,
                  T_OPEN, THINK_CLOSE, THINK_OPEN, format_seconds, norm_box_to_pixels, sample_times)

# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------
SIZE = 112          # stored frame width = height, the model's default view (a multiple of 28)
FPS = 4             # stored frame rate; the model samples 2 fps, so every other frame is shown
BACKGROUND = 128    # grey
COLOURS = {"red": (220, 50, 50), "green": (40, 170, 60), "blue": (50, 90, 230),
           "yellow": (235, 205, 40)}
KINDS = ("circle", "square", "triangle")
HALF = {"circle": 1.0, "square": 0.85, "triangle": 1.0}  # box half-size / radius (equal areas-ish)
DIRECTIONS = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}
EVENTS = ("stop", "turn", "colour", "appear", "meet")
TASKS = {"ff": "temporal-spatial free-form QA", "mcq": "General video QA MCQ",
         "tg": "temporal QA"}
TASK_WEIGHTS = {"ff": 0.4, "mcq": 0.3, "tg": 0.3}
LETTERS = "ABCD"
MCQ_LEAD = "That is option"  # an MCQ trace's last sentence: "... So it turns red. That is option B."
# crf 10 keeps flat colours within a few levels after decode (plain yuv420p High profile, what
# any player reads). x264's lookahead made the bytes vary run to run even on one thread;
# without it (and on one thread, one process per core) the same seed gives the same file.
ENCODE = dict(codec="libx264", pixel_format="yuv420p", crf=10, preset="veryfast",
              extra_options={"threads": 1, "rc-lookahead": 0})


def split_seeds(seed):
    """Each split has its own seed, so test scenes never repeat training scenes."""
    return {"train": seed, "val": seed + 20_000, "test": seed + 10_000}


# ---------------------------------------------------------------------------------------------
# Scenes: shapes with per-frame position, colour and visibility
# ---------------------------------------------------------------------------------------------
@dataclass
class Shape:
    kind: str
    radius: float
    pos: torch.Tensor       # (N, 2) centre x, y in pixels
    colours: list           # N colour names (a colour change is just a different name)
    visible: torch.Tensor   # (N,) bool

    def name(self, f):
        return f"{self.colours[f]} {self.kind}"

    def box(self, f):
        """Normalized xyxy box of the drawn shape at frame f (rounded: what the JSON stores)."""
        h = self.radius * HALF[self.kind]
        x, y = self.pos[f].tolist()
        box = [(x - h) / SIZE, (y - h) / SIZE, (x + h) / SIZE, (y + h) / SIZE]
        return [round(min(max(v, 0.0), 1.0), 4) for v in box]


@dataclass
class Scene:
    duration: float
    shapes: list            # [target, partner (meet only), distractors...]
    event: str
    span: tuple             # (s, e) seconds; the event's state holds on frames s <= t <= e
    extra: str              # new colour (colour), direction (turn), else ""
    hard: bool
    n_similar: int

    @property
    def n_frames(self):
        return round(self.duration * FPS)


def frame_of(t):
    return round(t * FPS)


def half_seconds(lo, hi):
    """Multiples of 0.5 s in [lo, hi]."""
    return [k / 2 for k in range(math.ceil(lo * 2), math.floor(hi * 2) + 1)]


def anchor_range(parts):
    """parts: [(offsets (N, 2), margin)] sharing one anchor point. Per axis (lo, hi) such that
    anchor + offsets stays margin pixels inside the frame, or None if impossible."""
    lo = torch.stack([m - off.min(0).values for off, m in parts]).max(0).values  # (2,)
    hi = torch.stack([SIZE - m - off.max(0).values for off, m in parts]).min(0).values  # (2,)
    return None if bool((lo > hi).any()) else (lo.tolist(), hi.tolist())


def path_from_velocity(vel):
    """Per-frame velocity (N, 2) -> offsets (N, 2); frame f sits at sum of vel[:f]."""
    return torch.cat([torch.zeros(1, 2), vel[:-1].cumsum(0)])


def target_velocity(event, n, fs, fe, speed, rng):
    """Per-frame velocity of the target (N, 2) and the event's extra word (direction)."""
    if event in ("turn", "meet"):  # axis-aligned, so 'up' / 'touch' read unambiguously
        d1, d2 = rng.sample(sorted(DIRECTIONS), 2)
        v1, v2 = torch.tensor(DIRECTIONS[d1]), torch.tensor(DIRECTIONS[d2])
    else:
        a = rng.uniform(0, 2 * math.pi)
        v1, d2 = torch.tensor([math.cos(a), math.sin(a)]), ""
    f = torch.arange(n)[:, None]
    if event == "stop":     # move, still on frames fs..fe, move on
        vel = torch.where((f >= fs) & (f < fe), 0.0, v1)
    elif event == "turn":   # move d1, then d2 on fs..fe, then still
        vel = torch.where(f < fs, v1, torch.where(f < fe, v2, 0.0))
    elif event == "meet":   # approach, touch on fs..fe, back off
        vel = torch.where(f < fs, v1, torch.where(f < fe, 0.0, -v1))
    else:                   # colour, appear: plain straight motion
        vel = v1.expand(n, 2)
    return vel * speed / FPS, d2


def bounce_path(n, radius, rng):
    """A distractor: straight motion at a random angle, bouncing off the walls. (N, 2)"""
    m, length = radius + 1, SIZE - 2 * (radius + 1)
    start = torch.tensor([rng.uniform(m, SIZE - m), rng.uniform(m, SIZE - m)])
    a, speed = rng.uniform(0, 2 * math.pi), rng.uniform(6, 16) / FPS
    u = (start - m + torch.arange(n)[:, None] * speed * torch.tensor([math.cos(a), math.sin(a)]))
    u = torch.remainder(u, 2 * length)
    return m + torch.where(u <= length, u, 2 * length - u)


def clear_of(path, radius, kind, vis, shapes):
    """True if a shape on this path never comes within 3 px of any placed shape's box."""
    h = radius * HALF[kind]
    for s in shapes:
        gap = h + s.radius * HALF[s.kind] + 3
        d = (path - s.pos).abs()  # (N, 2)
        near = (d[:, 0] < gap) & (d[:, 1] < gap) & vis & s.visible
        if bool(near.any()):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Scene sampling (all randomness from one random.Random, so a seed fixes the sample)
# ---------------------------------------------------------------------------------------------
def pick_combos(rng, hard, target, forbidden, k):
    """k distractor (colour, kind) pairs; hard ones mostly share colour or kind with the target."""
    t_colour, t_kind = target
    all_combos = [(c, kd) for c in COLOURS for kd in KINDS if (c, kd) not in forbidden]
    similar = [ck for ck in all_combos if (ck[0] == t_colour) != (ck[1] == t_kind)]
    other = [ck for ck in all_combos if ck[0] != t_colour and ck[1] != t_kind]
    picks = []
    for _ in range(k):
        pool = similar if (hard and rng.random() < 0.75) or not other else other
        picks.append((rng.choice(pool), pool is similar))
    return picks


def plan_target(rng, event, n, fs, fe, radius, kind, p_radius, p_kind):
    """Target path (and the partner's fixed centre for 'meet'), or None if it cannot fit."""
    speed = rng.uniform(10, 16)
    for _ in range(6):  # shrink the speed until the path fits in the frame
        vel, d2 = target_velocity(event, n, fs, fe, speed, rng)
        off = path_from_velocity(vel)
        if event == "meet":  # anchor = partner centre; the target stops touching its side
            unit = vel[0] / vel[0].norm()
            gap = radius * HALF[kind] + p_radius * HALF[p_kind] + 1
            off = off - off[fs] - unit * gap
            parts = [(off, radius + 1), (torch.zeros(1, 2), p_radius + 1)]
        else:
            parts = [(off, radius + 1)]
        rng_ = anchor_range(parts)
        if rng_ is not None:
            (lx, ly), (hx, hy) = rng_
            anchor = torch.tensor([rng.uniform(lx, hx), rng.uniform(ly, hy)])
            return anchor + off, anchor, d2
        speed *= 0.75
    return None


def make_scene(rng, hard):
    """One clip: the target with its event, a partner for 'meet', and distractors."""
    duration = rng.choice(half_seconds(6.0, 8.0) if hard else half_seconds(4.0, 6.0))
    n = round(duration * FPS)
    event = rng.choice(EVENTS)
    # span ends are frames the model is shown (2 fps), so every key and think time is one too;
    # s >= 1 leaves a shown frame before the event, e <= last shown frame
    shown = sample_times(duration)
    s = rng.choice([t for t in shown if 1.0 <= t <= duration - 1.5])
    e = rng.choice([t for t in shown if s + 1.0 <= t <= s + 3.0])
    fs, fe = frame_of(s), frame_of(e)
    r_lo, r_hi = (6.0, 9.0) if hard else (10.0, 13.0)
    size = lambda: round(rng.uniform(r_lo, r_hi), 1)
    colour, kind, radius = rng.choice(sorted(COLOURS)), rng.choice(KINDS), size()
    new_colour = rng.choice([c for c in sorted(COLOURS) if c != colour])
    p_colour, p_kind, p_radius = colour, kind, size()
    while (p_colour, p_kind) == (colour, kind):
        p_colour, p_kind = rng.choice(sorted(COLOURS)), rng.choice(KINDS)
    plan = None
    while plan is None:
        plan = plan_target(rng, event, n, fs, fe, radius, kind, p_radius, p_kind)
    path, anchor, direction = plan
    frames = torch.arange(n)
    colours = [new_colour if event == "colour" and fs <= f <= fe else colour for f in range(n)]
    visible = (frames >= fs) & (frames <= fe) if event == "appear" else torch.ones(n, dtype=bool)
    shapes = [Shape(kind, radius, path, colours, visible)]
    forbidden = {(colour, kind), (new_colour, kind)}  # names stay unique whatever the event
    if event == "meet":
        shapes.append(Shape(p_kind, p_radius, anchor.expand(n, 2).clone(), [p_colour] * n,
                            torch.ones(n, dtype=bool)))
        forbidden.add((p_colour, p_kind))
    k = rng.randint(3, 5) if hard else rng.randint(1, 2)
    n_similar = add_distractors(rng, shapes, pick_combos(rng, hard, (colour, kind), forbidden, k),
                                n, (r_lo, r_hi))
    return Scene(duration, shapes, event, (s, e), new_colour if event == "colour" else direction,
                 hard, n_similar)


def add_distractors(rng, shapes, combos, n, radii):
    """Place each distractor on a bouncing path clear of every placed shape (drop if none fits)."""
    n_similar, always = 0, torch.ones(n, dtype=bool)
    for (c, kd), is_similar in combos:
        radius = round(rng.uniform(*radii), 1)
        for _ in range(30):
            path = bounce_path(n, radius, rng)
            if clear_of(path, radius, kd, always, shapes):
                shapes.append(Shape(kd, radius, path, [c] * n, always))
                n_similar += is_similar
                break
    return n_similar


# ---------------------------------------------------------------------------------------------
# Rendering and encoding
# ---------------------------------------------------------------------------------------------
def shape_mask(kind, pos, radius, xs, ys):
    """(N, H, W) bool mask of one shape in every frame, from the pixel-centre grid."""
    dx = xs - pos[:, 0, None, None]  # (N, H, W)
    dy = ys - pos[:, 1, None, None]
    if kind == "circle":
        return dx * dx + dy * dy <= radius * radius
    if kind == "square":
        h = radius * HALF["square"]
        return (dx.abs() <= h) & (dy.abs() <= h)
    # triangle, apex up: half-width grows from 0 at the apex to radius at the base
    return (dy >= -radius) & (dy <= radius) & (dx.abs() <= (dy + radius) / 2)


def gradient_background(size=SIZE):
    """uint8 (3, H, W): red grows left to right, blue top to bottom, green fixed. Qwen2.5-VL has
    rotary positions only, so on flat grey a patch's features cannot say where the patch is; here
    the background itself does. No object colour lies on it (red and blue stay in 96..160)."""
    ramp = torch.arange(size, dtype=torch.float32) / size
    bg = torch.empty(3, size, size)
    bg[0] = 96 + 64 * ramp[None, :]
    bg[1] = BACKGROUND
    bg[2] = 96 + 64 * ramp[:, None]
    return bg.round().to(torch.uint8)


def render(scene, background):
    """The clip as uint8 (N, 3, H, W); the target is drawn last, on top.

    background: flat (grey) | gradient (gradient_background); the default is the config's."""
    n = scene.n_frames
    if background not in ("flat", "gradient"):
        raise ValueError(f"render: background={background!r}: expected flat or gradient")
    if background == "flat":
        frames = torch.full((n, 3, SIZE, SIZE), BACKGROUND, dtype=torch.uint8)
    else:
        frames = gradient_background(SIZE)[None].repeat(n, 1, 1, 1)
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")  # (H, W)
    for shape in reversed(scene.shapes):
        mask = shape_mask(shape.kind, shape.pos, shape.radius, xs, ys)
        mask = mask & shape.visible[:, None, None]  # (N, H, W)
        rgb = torch.tensor([COLOURS[c] for c in shape.colours], dtype=torch.uint8)  # (N, 3)
        frames = torch.where(mask[:, None], rgb[:, :, None, None], frames)
    return frames


def encode(frames, path):
    # imported here so that rendering in memory (probe.py, the perception stage) needs no codec
    from torchcodec.encoders import VideoEncoder
    VideoEncoder(frames, frame_rate=FPS).to_file(str(path), **ENCODE)


# ---------------------------------------------------------------------------------------------
# Language: questions, grounded reasoning, answers
# ---------------------------------------------------------------------------------------------
def claim(shape, t):
    """One grounded claim in the completion grammar, box in pixels of the stored frame."""
    f = frame_of(t)
    x1, y1, x2, y2 = norm_box_to_pixels(shape.box(f), SIZE, SIZE)
    return (f"{OBJ_OPEN}{shape.name(f)}{OBJ_CLOSE}{BOX_OPEN}[{x1},{y1},{x2},{y2}]{BOX_CLOSE}"
            f"at{T_OPEN}{format_seconds(t)}{T_CLOSE}s")


@dataclass
class Story:
    question: str       # free-form / MCQ stem
    answer: str         # free-form answer
    wrong: list         # candidate wrong answers for MCQ options
    keys: list          # [(time, [shape, ...])] key frames and their key objects
    think: str          # grounded reasoning for the free-form / MCQ question
    when: str           # temporal question about the event span
    when_think: str     # grounded reasoning for the temporal question (claims at s and e)
    phrase: str         # "<name> ..." for the chain-2 where question


def tell(scene):
    """Ground-truth questions and traces for the clip's event."""
    (s, e), T = scene.span, scene.shapes[0]
    n = T.name(0)
    names = list(dict.fromkeys(sh.name(0) for sh in scene.shapes[1:]))
    others = [f"{c} {k}" for c in COLOURS for k in KINDS]
    wrong_names = names + [x for x in others if x not in names]
    wrong_names = [x for x in wrong_names if x != n]
    if scene.event == "stop":
        return Story("Which object stops moving for a while?", n, wrong_names,
                     [(s - 0.5, [T]), (s, [T]), (e, [T])],
                     f"{claim(T, s - 0.5)} the {n} is moving. {claim(T, s)} it stops, and "
                     f"{claim(T, e)} it is still in the same place. So the {n} stops.",
                     f"When does the {n} stop moving?",
                     f"{claim(T, s)} the {n} stops moving. {claim(T, e)} it is still in the same "
                     f"place, and then it moves again.", "stays still")
    if scene.event == "turn":
        d = scene.extra
        return Story(f"Which way does the {n} move after it turns?", d,
                     [x for x in DIRECTIONS if x != d], [(s, [T]), (e, [T])],
                     f"{claim(T, s)} the {n} changes direction. {claim(T, e)} it has moved {d}. "
                     f"So after the turn it moves {d}.",
                     f"When does the {n} move {d}?",
                     f"{claim(T, s)} the {n} starts moving {d}. {claim(T, e)} it reaches its "
                     f"last place and stops.", f"moves {d}")
    if scene.event == "colour":
        c1, c2 = T.colours[0], scene.extra
        return Story(f"What colour does the {n} turn into?", c2,
                     [c for c in COLOURS if c != c2], [(s - 0.5, [T]), (s, [T])],
                     f"{claim(T, s - 0.5)} the {T.kind} is {c1}. {claim(T, s)} the same "
                     f"{T.kind} is {c2}. So it turns {c2}.",
                     f"When is the {n} coloured {c2}?",
                     f"{claim(T, s)} the {T.kind} has turned {c2}. {claim(T, e)} it is still "
                     f"{c2}, and then it turns back to {c1}.", f"is {c2}")
    if scene.event == "appear":
        return Story("Which object appears after the video starts?", n, wrong_names,
                     [(s, [T]), (e, [T])],
                     f"The {n} is not there at first. {claim(T, s)} it appears, and "
                     f"{claim(T, e)} it is still there. So the {n} appears.",
                     f"When is the {n} visible?",
                     f"{claim(T, s)} the {n} appears. {claim(T, e)} it is still visible, and "
                     f"then it disappears.", "is visible")
    P = scene.shapes[1]  # meet
    p = P.name(0)
    return Story(f"Which object does the {n} touch?", p, [x for x in wrong_names if x != p],
                 [(s, [T, P])],
                 f"{claim(T, s)} the {n} comes next to {claim(P, s)} and they touch. So the {n} "
                 f"touches the {p}.",
                 f"When does the {n} touch the {p}?",
                 f"{claim(T, s)} the {n} reaches the {p}. {claim(T, e)} they still touch, and "
                 f"then the {n} moves away.", f"touches the {p}")


def completion(think, answer):
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def span_text(s, e):
    return f"From {T_OPEN}{format_seconds(s)}{T_CLOSE}s to {T_OPEN}{format_seconds(e)}{T_CLOSE}s"


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def key_fields(sid, story, frames, out):
    """key_frames + key_items for the story's key times; writes the key-frame PNGs."""
    key_frames, key_items = [], {}
    for t, objs in story.keys:
        f = frame_of(t)
        path = f"frames/{sid}_{f}.png"
        Image.fromarray(frames[f].permute(1, 2, 0).numpy()).save(out / path)
        key_frames.append({"idx": f, "time": t, "path": path})
        key_items[str(f)] = {o.name(f): [o.box(f)] for o in objs}
    return key_frames, key_items


def fixed_options(answer):
    """The four options of --mcq_options=fixed for an answer, always in the same order: the four
    colours, the four directions, or the answer's kind in the four colours ("red circle", "green
    circle", ...). The answer's own word then says its letter (red: A), so the letter needs no
    lookup in the text, a skill a real VLM brings from text pretraining and the tiny model does not
    learn in our budgets (docs/perception.md, sessions 18, 26 and 27)."""
    if answer in COLOURS:
        return list(COLOURS)
    if answer in DIRECTIONS:
        return list(DIRECTIONS)
    return [f"{c} {answer.split()[-1]}" for c in COLOURS]


def mcq(story, rng, options_rule):
    """Question with four lettered options, and the correct letter. options_rule: drawn (the answer
    and three of its wrong answers, shuffled) | fixed (fixed_options). Both draw the same random
    numbers, so the clips after this one do not depend on the rule."""
    options = [story.answer] + rng.sample(story.wrong[:6], 3)
    rng.shuffle(options)
    if options_rule == "fixed":
        options = fixed_options(story.answer)
    elif options_rule != "drawn":
        raise ValueError(f"mcq: options_rule={options_rule!r}: expected drawn or fixed")
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    question = story.question + "\nOptions:\n" + "\n".join(lines)
    return question, LETTERS[options.index(story.answer)], options


def mcq_think(story, letter):
    """An MCQ record's think: the free-form trace, then the option its answer is (a text lookup)."""
    return f"{story.think} {MCQ_LEAD} {letter}."


def record_meta(scene, split, difficulty):
    """Extra facts for eval and analysis (loaders ignore unknown keys)."""
    return {"difficulty": difficulty, "hard": scene.hard, "event": scene.event,
            "span": list(scene.span), "duration": scene.duration, "fps": FPS,
            "n_frames": scene.n_frames, "width": SIZE, "height": SIZE,
            "target": scene.shapes[0].name(0),
            "n_distractors": len(scene.shapes) - 1 - (scene.event == "meet"),
            "n_similar": scene.n_similar, "radius": scene.shapes[0].radius, "split": split}


def build_record(sid, split, scene, story, frames, task, rng, out, difficulty, mcq_options):
    """One STGR record of the given task about the clip (writes its key-frame PNGs); mcq_options:
    how an MCQ record's options are chosen (mcq)."""
    s, e = scene.span
    meta = record_meta(scene, split, difficulty)
    rec = {"id": sid, "source": "synth", "task": TASKS[task], "video_path": f"videos/{sid}.mp4"}
    if task == "tg":
        rec.update(question=story.when, answer=f"[{format_seconds(s)}, {format_seconds(e)}]",
                   reasoning_process=completion(story.when_think, span_text(s, e)),
                   key_frames=[], key_items={})
    else:
        key_frames, key_items = key_fields(sid, story, frames, out)
        if task == "mcq":
            question, letter, options = mcq(story, rng, mcq_options)
            think = mcq_think(story, letter)
            rec.update(question=question, answer=letter,
                       reasoning_process=completion(think, letter))
            meta.update(options=options, answer_text=story.answer)
        else:
            rec.update(question=story.question, answer=story.answer,
                       reasoning_process=completion(story.think, story.answer))
        rec.update(key_frames=key_frames, key_items=key_items)
    rec["meta"] = meta
    return rec


def vstar_entry(sid, scene, story):
    """The clip as one V-STAR annotation (layout in the module docstring)."""
    (s, e), T = scene.span, scene.shapes[0]
    boxes = []
    for k in range(math.ceil(s), math.floor(e) + 1):  # whole seconds, as V-STAR annotates
        x1, y1, x2, y2 = norm_box_to_pixels(T.box(frame_of(k)), SIZE, SIZE)
        boxes.append({"timestamp": k, "frame_index": frame_of(k),
                      "xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2})
    return {"vid": sid, "domain": "synthetic shapes", "fps": FPS, "width": SIZE, "height": SIZE,
            "frame_count": scene.n_frames, "question": story.question,
            "chain": f"{THINK_OPEN}{story.think}{THINK_CLOSE}", "object": T.name(0),
            "answer": story.answer, "temporal_question": story.when,
            "timestamps": [s, e], "spatial_question": f"Where is the {T.name(0)} during that time?",
            "spatial_question_2": f"Where is the {T.name(0)} while it {story.phrase}?",
            "bboxes": boxes}


def make_sample(job):
    """Worker: one clip -> files on disk, its record and (test split) its V-STAR entry."""
    split, i, split_seed, difficulty, background, mcq_options, out = job
    rng = random.Random(f"synth-{split_seed}-{i}")  # str seeds hash with sha512: stable
    sid = f"{split}_{i:05d}"
    hard = rng.random() < difficulty
    scene = make_scene(rng, hard)
    story = tell(scene)
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    frames = render(scene, background)
    out = Path(out)
    encode(frames, out / f"videos/{sid}.mp4")
    rec = build_record(sid, split, scene, story, frames, task, rng, out, difficulty, mcq_options)
    # a later run checks these against its own flags (train.check_drawn)
    rec["meta"].update(background=background, mcq_options=mcq_options)
    return rec, vstar_entry(sid, scene, story)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _init_worker():
    torch.set_num_threads(1)  # two processes on two cores: no oversubscription


def write_json(path, items):
    Path(path).write_text(json.dumps(items, indent=1) + "\n")


def generate(cfg):
    """Write every split under cfg.data_dir; returns {split: [records]} (plus 'vstar': the test
    split's V-STAR annotations).

    cfg is the one config (config.Config): data_dir, n_train, n_val, n_test, seed (train; val uses
    seed + 20_000, test seed + 10_000), difficulty, background, mcq_options and synth_workers (1:
    inline) are read.
    """
    out = Path(cfg.data_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    seeds, sizes = split_seeds(cfg.seed), {"train": cfg.n_train, "val": cfg.n_val,
                                           "test": cfg.n_test}
    jobs = [(sp, i, seeds[sp], cfg.difficulty, cfg.background, cfg.mcq_options, str(out))
            for sp in sizes for i in range(sizes[sp])]
    if cfg.synth_workers > 1:
        with Pool(cfg.synth_workers, initializer=_init_worker) as pool:
            results = pool.map(make_sample, jobs, chunksize=16)
    else:
        results = [make_sample(j) for j in jobs]
    result, vstar = {sp: [] for sp in sizes}, {sp: [] for sp in sizes}
    for (sp, *_), (rec, vs) in zip(jobs, results):
        result[sp].append(rec)
        vstar[sp].append(vs)
    for sp, recs in result.items():
        write_json(out / f"{sp}.json", recs)
        write_json(out / f"vstar_{sp}.json", vstar[sp])
    result["vstar"] = vstar["test"]
    return result


def main(argv=None):
    cfg = config.parse_args(sys.argv[1:] if argv is None else argv, prog="synth.py")
    t0 = time.time()
    result = generate(cfg)
    dt = time.time() - t0
    for sp in ("train", "val", "test"):
        recs = result[sp]
        hard = sum(r["meta"]["hard"] for r in recs) / max(len(recs), 1)
        tasks = Counter(r["task"] for r in recs)
        print(f"{sp}: {len(recs)} records, hard share {hard:.3f}, tasks {dict(tasks)}")
    print(f"vstar_test: {len(result['vstar'])} clips")
    print(f"generated {sum(len(result[s]) for s in ('train', 'val', 'test'))} samples into "
          f"{cfg.data_dir} in {dt:.1f} s ({cfg.synth_workers} workers)")


if __name__ == "__main__":
    main()
