"""Perception probe: how fast can the tiny model learn to find and name objects in one frame?

    python probe.py                                         # 5 minutes of training, eval every 30 s
    python probe.py --max_steps=400 --train_seconds=1e9 --eval_steps=100   # by steps (busy machine)
    python probe.py --train_seconds=1800 --save=true --out=runs/perception  # long run, model saved at each eval

Owns: single synthetic frames rendered in memory (synth.py's world: shapes on a position-coloured
background by default, --background=flat for synth.py's grey; fresh samples every step), the
perception tasks in the project's output grammar, a plain next-token training loop on them, and a
held-out greedy curve written to {out}/curve.json and {out}/curve.png. train.py's perception stage
(--stage=pretrain) trains the run's own model on the same tasks (training_sample, encode, evaluate).
  find    "Where is the red circle?"  -> <obj>red circle</obj><box>[x1,y1,x2,y2]</box>
  marked  a frame with one object circled, spotlit or left lit by darkening (prompt.py draws
          them), "Which object is marked?" -> <obj>blue square</obj>
  at      a whole clip (synth.py's scenes, every frame after its time, as SFT shows a video),
          "Where is the red circle at 2.5s?" -> <obj>red circle</obj><box>[..]</box>at<t>2.5</t>s
          (--at_weight; off by default): the traces' claim, the frame chosen by its time
  when    a whole clip, synth.py's temporal question for its event, "When is the red circle
          visible?" -> From <t>2.5</t>s to <t>4.0</t>s (--when_weight; off by default)
  qa      a whole clip, synth.py's free-form question for its event, "Which object stops moving
          for a while?" -> <answer>red circle</answer> (--qa_weight; off by default): can the
          answer itself be read from the frames, given plenty of clips? (qa_blind_acc: each
          event's most common answer on the held-out clips, the frame-blind yardstick)
  letter  synth.py's MCQ question with its four options, the trace given up to "So it turns red.
          That is option" -> " B.</think><answer>B</answer>" (--letter_weight; off by default):
          the option letter of the word the trace named, a text lookup
Boxes are integer pixels of the frame the model sees, as everywhere in the project.
The model is model.build_tiny_model's (the real Qwen2.5-VL class); its tokenizer may give every
coordinate value one token (--value_tokens; --value_init=ordinal starts their embeddings ordered,
--value_sigma trains them on a soft target over nearby values), its vision tower may use smaller
patches (--patch_size=7: 64 image tokens per 112x112 frame instead of 16).
Binding aids (--bind_weight, --attend_weight: extra losses during training, the model unchanged)
stand in for what pretraining gives a real model: image tokens whose text-model states say what
they show and whether the question or mark points at them, and one attention head that looks from
the answer at the object meant; with them boxes are learned with distractors. --motion_weight does
for clips what --bind_weight does for frames, and adds what changed since the previous shown frame
(moved how far, stood still, appeared, changed colour): what a video model's pretraining gives
its image tokens, and what the events are made of. --text_steps first
trains the text model alone on the same questions asked in words (no frame); --text_mix adds such a
batch to every frame step. --recall_steps trains it first on in-context recall over random symbols
(`k . v` entries, then `k ? v` queries: the match-and-copy skill a real LM brings from text
pretraining; --recall_attend points one head at the answer). --init starts from a saved model
instead of a fresh one (the committed checkpoint is two runs: frames from scratch, then frames and
words from that model; README). Every round's numbers are in docs/perception.md.
Metrics on held-out frames (their own seed), greedy: box mean IoU (an unparseable box counts 0),
share of boxes with IoU >= 0.5, marked-object accuracy (exact name). The clock counts training
only; evaluations are timed apart.

Test: python -m pytest tests/test_probe.py -q
"""
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass

import torch

import data
import metrics
import model
import prompt
import rewards
import synth


@dataclass
class ProbeConfig:
    out: str = "runs/probe"       # curve.json, curve.png, the model (with --save)
    seed: int = 0                 # model init and training samples; held-out frames use seed + 10_000
    train_seconds: float = 300.0  # training budget, wall seconds (evaluation not counted)
    max_steps: int = 0            # also stop after this many steps (0: the time budget only)
    batch_size: int = 32          # frames per optimizer step
    lr: float = 2e-3
    vision_lr_mult: float = 1.0   # vision tower + merger learning rate = lr * this
    warmup: int = 20              # linear warmup steps, then constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # tasks
    find_weight: float = 1.0      # task mix: probability weights of find / marked samples
    marked_weight: float = 1.0
    list_weight: float = 0.0      # "What objects are in the frame?" -> every object and its box, left to right
    at_weight: float = 0.0        # "Where is the red circle at 2.5s?" on a clip (synth.py's scenes, SFT's layout)
                                  # -> the trace's claim <obj>..</obj><box>..</box>at<t>2.5</t>s
    at_question_first: bool = False  # at: the question before the frames (image tokens can read it), not SFT's layout
    at_curriculum_steps: int = 0  # > 0: an at clip shows the asked frame and few others at first, all from this step on
    when_weight: float = 0.0      # "When is the red circle visible?" on a clip (synth.tell's temporal question, its
                                  # event's span) -> From <t>2.5</t>s to <t>4.0</t>s; the layout of at_question_first
    when_events: str = "stop,turn,colour,appear,meet"  # the when task's events (synth.EVENTS)
    when_curriculum_steps: int = 0  # > 0: a when clip shows the span's first and last frames and few others at first,
                                  # all from this step on
    when_answer: str = "span"     # span (From <t>2.5</t>s to <t>4.0</t>s) | trace (the TG trace SFT teaches: a claim
                                  # at the span's start, one at its end, then the span as the answer)
    qa_weight: float = 0.0        # "Which object stops moving for a while?" on a clip (synth.tell's question for its
                                  # event) -> <answer>red circle</answer>, the answer alone; the layout of at_question_first
    qa_events: str = "stop,turn,colour,appear,meet"  # the qa task's events (synth.EVENTS)
    qa_answer: str = "answer"     # answer (the answer block alone) | trace (the free-form record's whole completion:
                                  # grounded claims at the key frames, then the answer; the attend aid skips it)
    qa_curriculum_steps: int = 0  # > 0: a qa clip shows the trace's key frames (just before and during the event) and few
                                  # others at first, all from this step on
    letter_weight: float = 0.0    # synth's MCQ question with its four lettered options, the record's trace given up to
                                  # "So it turns red. That is option" -> " B.</think><answer>B</answer>": the option
                                  # letter of the word the trace named (a text lookup, on a clip in SFT's layout)
    question_at: str = ""         # the saved model's prompt layout for SFT, RL and eval (data.QUESTION_AT, written to
                                  # its preprocessor_config.json); empty keeps the init's (a fresh model: after)
    find_answer: str = "name_box"  # find's target: name_box (<obj>name</obj><box>..</box>) | box (the box alone)
    text_objects_steps: int = 0   # > 0: find questions list every object and its box as text for these first steps
    marks: str = "red_circle,darken,spotlight"  # prompt.py drawings used by the marked task
    max_distractors: int = 4      # distractors per frame: uniform in 0..this
    min_radius: float = 6.0       # object radius in pixels: uniform in min..max (synth.py's hard 6-9, easy 10-13)
    max_radius: float = 13.0      # (a frame of 112 px; merged image tokens are 28 px)
    distinct_colours: bool = False  # every object its own colour (so at most 3 distractors): colour alone identifies
    curriculum_steps: int = 0     # > 0: the cap on distractors grows from 1 to max over these steps
    prompt: str = "short"           # short (the frame, then the question) | question_first | full (the SFT layout)
    background: str = "gradient"  # gradient (colour says where a pixel is; synth.render) | flat grey
    value_sigma: float = 0.0      # > 0: a value token's target is a Gaussian over nearby values
    # model (model.TinyModelConfig fields)
    value_tokens: int = 113       # > 0: one token per integer 0..value_tokens-1; 0: one per digit
    value_init: str = "random"    # random | ordinal (nearby values have nearby embeddings; no gain seen)
    num_layers: int = 4           # text layers
    patch_size: int = 14          # 7 gives 4x the image tokens of 14 on the same frame
    frame_pixels: int = 112 * 112
    vision_hidden_size: int = 96
    vision_depth: int = 2
    # dense vision pretraining (a stand-in for a pretrained vision encoder)
    aux_steps: int = 0            # > 0: first train the vision tower + merger alone this many steps on dense cell targets
    aux_lr: float = 3e-3          # learning rate of those steps
    aux_weight: float = 0.0       # > 0: keep the dense loss, at this weight, during the text training (single-frame samples)
    aux_head_only: bool = False   # the aux_steps train the linear head alone, the tower frozen: a linear probe of
                                  # what the tower's features already hold (with --init: a saved model's tower)
    # text-only pretraining (a stand-in for a pretrained language model's lookup skill)
    text_steps: int = 0           # > 0: first train the text model alone this many steps on the tasks in words:
                                  # no frame, the objects listed as text after the question (text_sample)
    text_batch: int = 32          # questions per text-only step
    text_mix: bool = False        # every frame step also trains on text_batch questions in words (loss added):
                                  # the lookup-and-copy skill SFT needs (name the asked object), kept beside frames
    recall_steps: int = 0         # > 0: first (before text_steps) train the text model alone this many steps on
                                  # in-context recall over random symbols (recall_sample): every target a lookup
    recall_symbols: int = 16      # recall's alphabet: the tokenizer's first this many ordinary tokens (>= 8)
    recall_key_len: int = 1       # symbols per recall key, each drawn at random (with 2, one of the two symbols
                                  # still tells the entry apart in 94% of queries over 16 symbols)
    recall_batch: int = 32        # recall sequences per step
    recall_seconds: float = 0.0   # > 0: also stop recall after this many training seconds
    recall_attend: float = 0.0    # > 0: the aid on recall: head 0 of attend_layer learns to look from each query's
                                  # '?' at its entry's value, at this weight (eager attention)
    recall_mix: bool = False      # every text_steps step also trains on recall_batch // 2 recall sequences
    init: str = ""                # a saved model folder (probe --save, or checkpoints/...) to start from instead of
                                  # a fresh model; the shape flags above are then the folder's
    # binding aids (what pretraining gives a real model: image tokens that know what they show, a head
    # that looks at the object the question means); extra losses only, the model and its answers unchanged
    bind_weight: float = 0.0      # > 0: a linear head (dropped afterwards) on the text model's states at the image
                                  # tokens after layer bind_layer learns each cell's object class and box, and which
                                  # cell the mark (marked) or the question (find, --prompt=question_first) points at
    bind_layer: int = 2           # 1..num_layers
    attend_weight: float = 0.0    # > 0: head 0 of layer attend_layer learns to attend, from every answer position of
                                  # find and marked, to the target's image token, from a when answer's start (end)
                                  # time to the span's first (last) frame, and from a qa answer to the answer's
                                  # object in the key frames (eager attention for the text model)
    attend_layer: int = 3         # 1..num_layers
    motion_weight: float = 0.0    # > 0: on clips, the bind head (states after bind_layer) learns every shown frame's cells:
                                  # class and box, and what changed since the previous shown frame (displacement, still,
                                  # new, recoloured): a stand-in for a video model's pretraining (motion_targets)
    track_weight: float = 0.0     # > 0 (with motion_weight): head 0 of layer track_layer learns to attend from each object's
                                  # image token in a clip frame to its token in the previous shown frame, so the motion
                                  # is a difference of two states (eager attention)
    track_layer: int = 1          # 1..num_layers; not attend_layer when both aids are on (both use head 0)
    # evaluation
    eval_every: float = 30.0      # training seconds between held-out evaluations
    eval_steps: int = 0           # > 0: evaluate every this many steps instead (for loaded machines)
    eval_frames: int = 100        # held-out frames per task
    eval_frozen: bool = False     # every held-out clip shows its first frame throughout (the frame-blind control:
                                  # what a model answers that does not read the clip's changes)
    log_every: int = 25           # steps between training-loss lines (per task)
    save: bool = False            # save the model to {out}/model (safetensors) at every evaluation
    threads: int = 1              # torch CPU threads (1 is much faster when the cores are shared)
    device: str = "cpu"           # cpu | cuda | cuda:1 ...: where the model trains (frames are drawn on the CPU)


CHOICES = {"prompt": ("short", "full", "question_first"), "background": ("flat", "gradient"), "value_init": ("ordinal", "random"),
           "find_answer": ("name_box", "box"), "question_at": ("",) + data.QUESTION_AT, "when_answer": ("span", "trace"),
           "qa_answer": ("answer", "trace")}
NAMES = [(c, k) for c in synth.COLOURS for k in synth.KINDS]  # the 12 object names
TASKS = ("find", "marked", "list", "at", "when", "qa", "letter")
CLIP_TASKS = ("at", "when", "qa", "letter")  # shown as a video in SFT's layout
FIRST_STEPS = 4  # the first steps' losses kept in curve.json
FIND_Q, MARKED_Q, LIST_Q = "Where is the {}?", "Which object is marked?", "What objects are in the frame?"
AT_Q = "Where is the {} at {}s?"
RECALL_ENTRIES = (3, 8)  # key/value entries in a recall sequence: uniform in this range


def parse_args(argv):
    """`--field=value` overrides, each checked against the field's type."""
    cfg = ProbeConfig()
    fields = {f.name for f in dataclasses.fields(cfg)}
    for arg in argv:
        key, eq, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: expected --field=value with field one of {sorted(fields)}")
        kind = type(getattr(cfg, key))
        try:
            parsed = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise SystemExit(f"--{key} expects {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, parsed)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)!r}: expected one of {allowed}")
    for key in ("bind_layer", "attend_layer", "track_layer"):
        if not 1 <= getattr(cfg, key) <= cfg.num_layers:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: expected a text layer, 1..{cfg.num_layers}")
    if cfg.track_weight > 0 and (cfg.motion_weight <= 0 or (cfg.attend_weight > 0 and cfg.track_layer == cfg.attend_layer)):
        raise SystemExit("--track_weight needs --motion_weight (its targets) and a --track_layer other than --attend_layer")
    if cfg.recall_key_len not in (1, 2, 3) or cfg.recall_symbols < RECALL_ENTRIES[1]:
        raise SystemExit(f"--recall_symbols={cfg.recall_symbols}, --recall_key_len={cfg.recall_key_len}: expected "
                         f"keys of 1-3 symbols and at least {RECALL_ENTRIES[1]} symbols (a sequence's distinct values)")
    check_events(cfg.when_events, "--when_events")
    check_events(cfg.qa_events, "--qa_events")
    for mark in cfg.marks.split(","):
        if mark not in prompt.VISUAL_PROMPTS or mark in ("raw", "frame_numbers"):
            raise SystemExit(f"--marks: {mark!r} does not mark an object; use red_circle, darken, spotlight")
    return cfg


# ---------------------------------------------------------------------------------------------
# Frames and samples
# ---------------------------------------------------------------------------------------------

def sample_frame(rng, n_distractors, background="flat", radius=(6.0, 13.0), distinct_colours=False):
    """One 112x112 frame: a target and up to n distractors, all names distinct, boxes 3 px apart.

    Returns (uint8 (3, H, W), shapes); shapes[0] is the target (drawn on top).
    """
    shapes, one = [], torch.ones(1, dtype=torch.bool)
    if distinct_colours:  # one object per colour: the colour alone says which object a name means
        names = [(c, rng.choice(synth.KINDS)) for c in rng.sample(sorted(synth.COLOURS), n_distractors + 1)]
    else:
        names = rng.sample(NAMES, n_distractors + 1)
    for colour, kind in names:
        for _ in range(30):  # a distractor that finds no free place is dropped
            r = round(rng.uniform(*radius), 1)
            m = r + 1
            pos = torch.tensor([[rng.uniform(m, synth.SIZE - m), rng.uniform(m, synth.SIZE - m)]])
            if synth.clear_of(pos, r, kind, one, shapes):
                shapes.append(synth.Shape(kind, r, pos, [colour], one))
                break
    scene = synth.Scene(1 / synth.FPS, shapes, "", (0.0, 0.0), "", False, 0)  # one frame
    return synth.render(scene, background)[0], shapes


@dataclass
class Sample:
    task: str           # find | marked | list | at | when | qa | letter
    frame: torch.Tensor  # uint8 (3, H, W), visual prompt drawn for marked
    question: str
    name: str           # the target's name
    box: list           # the target's normalized xyxy box
    objects: list = None  # every object in the frame as (name, normalized box), the target first
    clip: tuple = None  # at, when, qa, letter: (shown frames uint8 (T, 3, H, W), their times, the duration, the asked time)
    span: tuple = None  # when: the event's (start, end) in seconds
    trace: str = None   # when / qa with when_answer / qa_answer=trace: the TG / free-form record's completion;
                        # letter: the MCQ record's completion after `lead`
    answer: str = None  # qa: the question's answer (synth.tell's free-form answer); letter: the right option letter
    event: str = None   # when, qa: the clip's event (synth.EVENTS)
    keys: list = None   # qa: (shown frame index, normalized box) of the answer's object where the trace looks
    lead: str = None    # letter: the assistant turn's first words, given in the prompt (the trace up to its letter)
    tracks: list = None  # clips: per shown frame, every object of the scene as (name, normalized box), None where
                         # it is not visible (the motion aid's targets: what changed since the previous shown frame)


def clip_sample(rng, cfg, most_frames=None):
    """The at task: a synthetic clip (synth.make_scene, hard or easy at even odds, rendered in memory
    and shown at data.sample_times, as SFT sees a video), one shown time and one object visible then.
    The object is named as it looks at that time (a colour event renames it), as in the traces.
    most_frames: show only the asked frame and random others up to this many, in time order."""
    scene = synth.make_scene(rng, rng.random() < 0.5)
    times = data.sample_times(scene.duration)
    k = rng.randrange(len(times))
    if most_frames is not None and most_frames < len(times):
        keep = sorted([k] + rng.sample([i for i in range(len(times)) if i != k], most_frames - 1))
        times, k = [times[i] for i in keep], keep.index(k)
    frames = synth.render(scene, cfg.background)[[synth.frame_of(t) for t in times]]
    f = synth.frame_of(times[k])
    shape = rng.choice([sh for sh in scene.shapes if sh.visible[f]])
    name, box = shape.name(f), shape.box(f)
    objects = [(sh.name(f), sh.box(f)) for sh in scene.shapes if sh.visible[f]]
    return Sample("at", frames[k], AT_Q.format(name, data.format_seconds(times[k])), name, box, objects,
                  (frames, times, scene.duration, times[k]), tracks=scene_tracks(scene, times))


def scene_tracks(scene, times):
    """Per shown time, every shape of the scene as (its name then, its normalized box then), None where
    it is not visible; shapes in the scene's order (the target first)."""
    frames = [synth.frame_of(t) for t in times]
    return [[(sh.name(f), sh.box(f)) if sh.visible[f] else None for sh in scene.shapes] for f in frames]


def event_scene(rng, events, flag):
    """A synth.make_scene scene (hard or easy at even odds) whose event is in the comma list `events`;
    check_events' stop naming `flag` for an unknown event (the draw would never end)."""
    check_events(events, flag)
    events = events.split(",")
    scene = synth.make_scene(rng, rng.random() < 0.5)
    while scene.event not in events:
        scene = synth.make_scene(rng, rng.random() < 0.5)
    return scene


def when_sample(rng, cfg, most_frames=None):
    """The when task: a synthetic clip whose event is one of cfg.when_events, shown as SFT sees a
    video, asked the temporal (TG) question synth.py writes for it; the answer is the event's span.
    most_frames: show only the span's first and last frames (synth puts both on shown times) and
    random others up to this many, in time order."""
    scene = event_scene(rng, cfg.when_events, "--when_events")
    times = data.sample_times(scene.duration)
    if most_frames is not None and most_frames < len(times):
        ends = {span_frame(times, t) for t in scene.span}
        rest = [i for i in range(len(times)) if i not in ends]
        keep = sorted(ends | set(rng.sample(rest, max(0, most_frames - len(ends)))))
        times = [times[i] for i in keep]
    frames = synth.render(scene, cfg.background)[[synth.frame_of(t) for t in times]]
    f, target = synth.frame_of(times[0]), scene.shapes[0]
    objects = [(sh.name(f), sh.box(f)) for sh in scene.shapes if sh.visible[f]]   # in the first frame shown
    story = synth.tell(scene)
    trace = synth.completion(story.when_think, synth.span_text(*scene.span)) if cfg.when_answer == "trace" else None
    return Sample("when", frames[0], story.when, target.name(0), target.box(0), objects,
                  (frames, times, scene.duration, None), scene.span, trace, event=scene.event,
                  tracks=scene_tracks(scene, times))


def qa_sample(rng, cfg, most_frames=None):
    """The qa task: a synthetic clip whose event is one of cfg.qa_events, shown whole as SFT sees a
    video, asked synth.py's free-form question about it (which object stops, which way it turns, what
    colour it turns, which object appears, what it touches); the answer is synth's, alone (with
    qa_answer=trace, the free-form record's whole completion: claims, then that answer). The
    question itself, unlike SFT's, comes with no trace to copy: it tests whether the answer can be
    read from the frames at all, given plenty of clips. most_frames: show only the trace's key frames
    and random others up to this many, in time order."""
    scene = event_scene(rng, cfg.qa_events, "--qa_events")
    times, target, story = data.sample_times(scene.duration), scene.shapes[0], synth.tell(scene)
    if most_frames is not None and most_frames < len(times):
        key = {span_frame(times, t) for t, _ in story.keys}
        rest = [i for i in range(len(times)) if i not in key]
        times = [times[i] for i in sorted(key | set(rng.sample(rest, max(0, most_frames - len(key)))))]
    frames = synth.render(scene, cfg.background)[[synth.frame_of(t) for t in times]]
    trace = synth.completion(story.think, story.answer) if cfg.qa_answer == "trace" else None
    keys = [(span_frame(times, t), objs[-1].box(synth.frame_of(t)))   # the object the answer is about (meet: the
            for t, objs in story.keys if t >= scene.span[0]]         # one touched), from the event on
    return Sample("qa", frames[0], story.question, target.name(0), target.box(0), None,
                  (frames, times, scene.duration, None), scene.span, trace, story.answer, scene.event, keys,
                  tracks=scene_tracks(scene, times))


def letter_sample(rng, cfg):
    """The letter task: synth's MCQ question about a clip's event with its four lettered options
    (synth.mcq), the MCQ record's trace given up to its last words ("... So it turns red. That is
    option"), and the rest as the target (" B.</think><answer>B</answer>"): find the word the trace
    named among the options, say its letter, and say it again as the answer. A text skill: the
    clip (shown whole, as SFT shows a video) does not say which option is meant, the trace's word
    does; it is there so the lookup is learned across a record's frames. SFT's models, given a
    validation MCQ record's gold trace up to there, wrote the right letter twice about one time in
    ten (docs/perception.md, session 18)."""
    scene, question, lead, rest, letter = mcq_lead(rng)
    times, target = data.sample_times(scene.duration), scene.shapes[0]
    frames = synth.render(scene, cfg.background)[[synth.frame_of(t) for t in times]]
    return Sample("letter", frames[0], question, target.name(0), target.box(0), None,
                  (frames, times, scene.duration, None), scene.span, rest, letter, scene.event, lead=lead,
                  tracks=scene_tracks(scene, times))


def mcq_lead(rng):
    """A random clip's event as an MCQ record, cut before its letter -> (scene, the question with
    its options, the completion up to "That is option", the rest, the right letter). Its options are
    drawn (shuffled) whatever train's --mcq_options says: this task is the text lookup itself."""
    scene = synth.make_scene(rng, rng.random() < 0.5)
    story = synth.tell(scene)
    question, letter, _ = synth.mcq(story, rng, "drawn")
    full = synth.completion(synth.mcq_think(story, letter), letter)
    lead = f"{data.THINK_OPEN}{story.think} {synth.MCQ_LEAD}"
    return scene, question, lead, full[len(lead):], letter


def span_frame(times, t):
    """Index of the shown time nearest t (a span end is a shown time: synth.make_scene)."""
    return min(range(len(times)), key=lambda i: abs(times[i] - t))


def make_sample(rng, cfg, task, n_distractors, most_frames=None):
    if task == "at":
        return clip_sample(rng, cfg, most_frames)
    if task == "when":
        return when_sample(rng, cfg, most_frames)
    if task == "qa":
        return qa_sample(rng, cfg, most_frames)
    if task == "letter":
        return letter_sample(rng, cfg)
    frame, shapes = sample_frame(rng, n_distractors, cfg.background, (cfg.min_radius, cfg.max_radius),
                                 cfg.distinct_colours)
    target = shapes[0]
    name, box = target.name(0), target.box(0)
    objects = [(s.name(0), s.box(0)) for s in shapes]
    if task == "find":
        return Sample(task, frame, FIND_Q.format(name), name, box, objects)
    if task == "list":
        return Sample(task, frame, LIST_Q, name, box, objects)
    mark = rng.choice(cfg.marks.split(","))
    frame = prompt.apply_visual_prompt(mark, [frame], [[box]], None)[0]
    return Sample(task, frame, MARKED_Q, name, box, objects)


def distractor_cap(cfg, step):
    """Curriculum: the most distractors a training frame may have at this step."""
    if cfg.curriculum_steps <= 0:
        return cfg.max_distractors
    return min(cfg.max_distractors, 1 + int(step / cfg.curriculum_steps * cfg.max_distractors))


def training_sample(rng, cfg, step):
    weights = (cfg.find_weight, cfg.marked_weight, cfg.list_weight, cfg.at_weight, cfg.when_weight, cfg.qa_weight,
               cfg.letter_weight)
    task = rng.choices(TASKS, weights=weights)[0]
    most_frames, steps = None, {"at": cfg.at_curriculum_steps, "when": cfg.when_curriculum_steps,
                                "qa": cfg.qa_curriculum_steps}.get(task, 0)
    if steps > 0 and step < steps:  # the fewest frames at step 0 (the asked one; the span's two ends; the key
        fewest = {"at": 1, "when": 2, "qa": 1}[task]   # frames, which qa_sample always keeps), all at the end
        most_frames = fewest + step * (data.FrameConfig.max_frames - fewest) // steps
    sample = make_sample(rng, cfg, task, rng.randint(0, distractor_cap(cfg, step)), most_frames)
    if task == "find" and step < cfg.text_objects_steps:
        sample.question = f"{objects_as_text(rng, sample)}\n{sample.question}"
    return sample


def objects_as_text(rng, sample):
    """Every object in the frame with its pixel box, in random order: a lookup the text model can
    learn from its context alone, before it must find the same things among image tokens."""
    size = (sample.frame.shape[-1], sample.frame.shape[-2])
    listed = rng.sample(sample.objects, len(sample.objects))
    return "Objects: " + "; ".join(f"{n} {pixel_box(b, size)}" for n, b in listed)


def text_sample(rng, cfg):
    """The find and marked questions asked about objects listed in words, no frame: "Where is the
    blue square?" with "Objects: red circle [10,20,30,40]; blue square [50,8,70,28]" -> the blue
    square's claim; "Which object is marked?" with one listed object preceded by "marked" -> its name.
    Looking a name up in the context is what a from-scratch text model is slowest at (probe rounds
    3-4); here it can be learned without a frame (the vision tower does not run, though a listing of
    five boxes is as many tokens as a frame). With cfg.letter_weight, also the letter task in words
    alone (an MCQ question and its record's trace up to the letter; no frame, no listing).
    -> (task, prompt text, target text, the assistant turn's given first words or "")."""
    task = rng.choices(("find", "marked", "letter"), weights=(cfg.find_weight, cfg.marked_weight, cfg.letter_weight))[0]
    if task == "letter":
        _, question, lead, rest, _ = mcq_lead(rng)
        return task, question, rest, lead
    names = [f"{c} {k}" for c, k in rng.sample(NAMES, rng.randint(0, cfg.max_distractors) + 1)]
    boxes = []
    for _ in names:
        r = rng.uniform(cfg.min_radius, cfg.max_radius)
        cx, cy = rng.uniform(r + 1, synth.SIZE - r - 1), rng.uniform(r + 1, synth.SIZE - r - 1)
        boxes.append([(cx - r) / synth.SIZE, (cy - r) / synth.SIZE, (cx + r) / synth.SIZE, (cy + r) / synth.SIZE])
    size = (synth.SIZE, synth.SIZE)
    listed = ["marked " * (task == "marked" and k == 0) + f"{n} {pixel_box(b, size)}" for k, (n, b) in
              enumerate(zip(names, boxes))]
    listed = rng.sample(listed, len(listed))  # the target (first) anywhere in the list
    question = (FIND_Q.format(names[0]) if task == "find" else MARKED_Q) + "\nObjects: " + "; ".join(listed)
    answer = claim(names[0], boxes[0], size) if task == "find" else f"{data.OBJ_OPEN}{names[0]}{data.OBJ_CLOSE}"
    return task, question, answer, ""


def text_batch_ids(tokenizer, items, device):
    """text_sample results -> (ids (B, L), attention mask (B, L), target mask (B, L) at the positions whose
    next token is a target token), in prompt_parts' chat layout with the frame left out (the given first
    words, if any, end the prompt), right-padded."""
    one = lambda part: ([tokenizer.convert_tokens_to_ids(part)] if isinstance(part, data.Special)
                        else model.encode_text(tokenizer, part))   # as model.tokenize_prompt reads a part
    rows = []
    for _, question, answer, lead in items:
        parts = prompt_parts(question, "short") + ([lead] if lead else [])
        prompt_ids = [i for part in parts if not isinstance(part, int) for i in one(part)]
        rows.append((prompt_ids, one(answer) + one(data.Special(data.IM_END))))
    L = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    mask, predicts = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L, dtype=torch.bool)
    for b, (p, t) in enumerate(rows):
        ids[b, :len(p) + len(t)] = torch.tensor(p + t)
        mask[b, :len(p) + len(t)] = 1
        predicts[b, len(p) - 1:len(p) + len(t) - 1] = True
    return ids.to(device), mask.to(device), predicts.to(device)


def text_loss(vlm, tokenizer, items, device):
    """Next-token loss on text_sample items (no frame: the vision tower does not run)
    -> (mean NLL per target token, (B,) True where the answer was right token for token, teacher-forced)."""
    ids, mask, predicts = text_batch_ids(tokenizer, items, device)
    logits = vlm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets, at = ids[:, 1:], predicts[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits[at], targets[at])
    return nll, ~((logits.argmax(-1) != targets) & at).any(1)


def text_optimizer(cfg, vlm):
    """AdamW over the text model alone (the vision tower and merger untouched), warmup then constant: the
    optimizer of the text-only steps. -> (its parameters, optimizer, schedule)."""
    params = [p for n, p in vlm.named_parameters() if "visual" not in n]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    return params, opt, sched


def text_update(loss, params, opt, sched, grad_clip):
    """One text-only optimizer step on loss: gradients zeroed first, their norm clipped."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def pretrain_text(cfg, vlm, tokenizer, rng, clock, log):
    """cfg.text_steps steps of next-token loss on text_sample questions, the text model alone (no frame:
    the vision tower does not run). Logs the loss and the share of answers right token for token
    (teacher-forced argmax) per task."""
    params, opt, sched = text_optimizer(cfg, vlm)
    alphabet = recall_alphabet(tokenizer, cfg.recall_symbols) if cfg.recall_mix else None
    layer = cfg.attend_layer if cfg.recall_attend > 0 else 0
    stats = []
    for step in range(1, cfg.text_steps + 1):
        t0, c0 = time.time(), time.process_time()
        items = [text_sample(rng, cfg) for _ in range(cfg.text_batch)]
        nll, right = text_loss(vlm, tokenizer, items, cfg.device)
        loss = nll
        if cfg.recall_mix:
            seqs = [recall_sample(rng, *alphabet, cfg.recall_key_len) for _ in range(cfg.recall_batch // 2)]
            recall_nll, aid, _ = recall_loss(vlm, seqs, tokenizer.pad_token_id, cfg.device, layer)
            loss = loss + recall_nll + (cfg.recall_attend * aid if aid is not None else 0.0)
        text_update(loss, params, opt, sched, cfg.grad_clip)
        clock["wall"] += time.time() - t0
        clock["cpu"] += time.process_time() - c0
        for (task, *_), r in zip(items, right.tolist()):
            stats.append((task, nll.item(), float(r)))
        if step % cfg.log_every == 0 or step == cfg.text_steps:
            right = {t: [r for k, _, r in stats if k == t] for t in ("find", "marked", "letter")}
            acc = " ".join(f"{t} exact {sum(v) / len(v):.2f}" for t, v in right.items() if v)
            log(f"[probe] text step {step:5d} {clock['wall']:6.0f}s loss {sum(s[1] for s in stats) / len(stats):.3f} {acc}")
            stats = []


def recall_alphabet(tokenizer, n):
    """The recall task's alphabet -> (its n symbols: the tokenizer's first ordinary tokens, never one of
    the task's own marks; the marks' ids: '.', '?', newline)."""
    marks = [model.encode_text(tokenizer, m) for m in (".", "?", "\n")]
    if any(len(m) != 1 for m in marks):
        raise ValueError(f"recall needs '.', '?' and a newline to be one token each; the tokenizer gives {marks}")
    marks = [m[0] for m in marks]
    special = set(tokenizer.all_special_ids)
    symbols = [i for i in range(len(tokenizer)) if i not in special and i not in marks]
    if len(symbols) < n:
        raise SystemExit(f"--recall_symbols={n}: the tokenizer has {len(symbols)} ordinary tokens besides '.', '?' "
                         f"and the newline")
    return symbols[:n], marks


def recall_sample(rng, symbols, marks, key_len=1, entries=None):
    """One in-context associative recall sequence (a stand-in for the text pretraining that gives a real
    LM its match-and-copy heads: every target is a lookup, none can be guessed from the symbols).
    n entries `v . k NL` (the value first, as an MCQ option's letter stands before its words) or
    `k . v NL` (half the sequences each way), n distinct keys of key_len symbols drawn at random (they
    may share a symbol, but one symbol mostly still tells them apart) and n distinct values, then n
    queries `k ? v NL` whose keys are drawn with replacement, so the last query cannot be answered by
    elimination.
    -> (token ids, [(position that predicts the value, the entry's value position, value)])."""
    dot, ask, nl = marks
    n = rng.randint(*(entries or RECALL_ENTRIES))
    if key_len == 1:
        keys = [(s,) for s in rng.sample(symbols, n)]
    else:
        keys = []
        while len(keys) < n:
            key = tuple(rng.choice(symbols) for _ in range(key_len))
            keys += [key] if key not in keys else []
    values = rng.sample(symbols, n)
    value_first = rng.random() < 0.5
    ids, value_at = [], {}
    for k, v in zip(keys, values):
        value_at[k] = len(ids) + (0 if value_first else key_len + 1)
        ids += [v, dot, *k, nl] if value_first else [*k, dot, v, nl]
    queries = []
    for _ in range(n):
        j = rng.randrange(n)
        queries.append((len(ids) + key_len, value_at[keys[j]], values[j]))
        ids += [*keys[j], ask, values[j], nl]
    return ids, queries


def recall_loss(vlm, seqs, pad_id, device, attend_layer=0):
    """Next-token loss on every query's value (the only targets) of recall_sample sequences, the text model
    alone; with attend_layer, the aid: -log of head 0's attention in that layer from each query's '?' at its
    entry's value (eager attention). -> (mean NLL, mean aid loss or None, (Q,) bool: each value right,
    argmax teacher-forced, which for a one-token answer is the greedy answer)."""
    L = max(len(ids) for ids, _ in seqs)
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, (ids, _) in enumerate(seqs):
        x[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), 1
    flat = [(b, a, src, v) for b, (_, queries) in enumerate(seqs) for a, src, v in queries]
    rows, at, source, target = (torch.tensor(column, device=device) for column in zip(*flat))
    out = vlm(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False,
              output_attentions=attend_layer > 0)
    logits = out.logits[rows, at].float()                                   # (Q, V)
    nll = torch.nn.functional.cross_entropy(logits, target)
    aid = None
    if attend_layer:
        weight = out.attentions[attend_layer - 1][rows, 0, at, source]        # head 0, query '?' -> entry's value
        aid = -weight.float().clamp_min(1e-9).log().mean()
    return nll, aid, logits.argmax(-1) == target


def recall_accuracy(vlm, seqs, pad_id, device, batch=64):
    """Share of the queries of `seqs` whose value the model gives (greedy), in batches, no gradient."""
    with torch.no_grad():
        right = torch.cat([recall_loss(vlm, seqs[k:k + batch], pad_id, device)[2]
                           for k in range(0, len(seqs), batch)])
    return right.float().mean().item()


def pretrain_recall(cfg, vlm, tokenizer, clock, log):
    """cfg.recall_steps steps (or cfg.recall_seconds of training) of in-context recall (recall_sample), the
    text model alone, with the aid at cfg.recall_attend. Logs the loss and the share of values right on
    each window's training sequences (fresh ones, scored before they are learned from), and on 256
    held-out sequences (their own seed) at the end and every cfg.eval_steps steps if set.
    -> the last held-out accuracy."""
    symbols, marks = recall_alphabet(tokenizer, cfg.recall_symbols)
    rng, held = random.Random(f"recall-train-{cfg.seed}"), random.Random(f"recall-held-{cfg.seed}")
    heldout = [recall_sample(held, symbols, marks, cfg.recall_key_len) for _ in range(256)]
    params, opt, sched = text_optimizer(cfg, vlm)
    layer = cfg.attend_layer if cfg.recall_attend > 0 else 0
    before = recall_accuracy(vlm, heldout, tokenizer.pad_token_id, cfg.device)
    aid_text = f"aid {cfg.recall_attend:g}" + (f" (layer {layer} head 0)" if layer else "")
    log(f"[probe] recall: {len(symbols)} symbols, keys of {cfg.recall_key_len}, {cfg.recall_batch} sequences a step, "
        f"{aid_text}; held-out before training {before:.3f}")
    stats, acc = [], None
    for step in range(1, cfg.recall_steps + 1):
        t0, c0 = time.time(), time.process_time()
        seqs = [recall_sample(rng, symbols, marks, cfg.recall_key_len) for _ in range(cfg.recall_batch)]
        nll, aid, right = recall_loss(vlm, seqs, tokenizer.pad_token_id, cfg.device, layer)
        loss = nll + cfg.recall_attend * aid if aid is not None else nll
        text_update(loss, params, opt, sched, cfg.grad_clip)
        clock["wall"] += time.time() - t0
        clock["cpu"] += time.process_time() - c0
        stats.append((nll.item(), aid.item() if aid is not None else 0.0, right.float().mean().item()))
        last = step == cfg.recall_steps or 0 < cfg.recall_seconds <= clock["wall"]
        if step % cfg.log_every == 0 or last:
            mean = [sum(col) / len(stats) for col in zip(*stats)]
            line = f"[probe] recall step {step:6d} {clock['wall']:6.0f}s loss {mean[0]:.3f} right {mean[2]:.3f}"
            line += f" aid {mean[1]:.3f}" if layer else ""
            if last or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0):
                acc = recall_accuracy(vlm, heldout, tokenizer.pad_token_id, cfg.device)
                line += f" held-out {acc:.3f}"
            log(line)
            stats = []
        if last:
            break
    return acc


def check_events(events, flag):
    """Stop with a message naming the flag unless `events` is a comma list of synth.EVENTS (an unknown
    event would make when_sample's draw loop forever)."""
    if not set(events.split(",")) <= set(synth.EVENTS):
        raise SystemExit(f"{flag}={events!r}: expected a comma list of {', '.join(synth.EVENTS)}")


def answer_tokens(cfg):
    """Greedy tokens an evaluation decodes: a when or qa trace is about 100 tokens, every other answer a few."""
    traces = (cfg.when_weight > 0 and cfg.when_answer == "trace") or (cfg.qa_weight > 0 and cfg.qa_answer == "trace")
    return 160 if traces else 32


def held_out(cfg):
    """A fixed set of eval frames per task, from a seed no training frame uses."""
    rng = random.Random(f"probe-eval-{cfg.seed + 10_000}")
    tasks = ("find", "marked") + tuple(t for t in ("at", "when", "qa", "letter") if getattr(cfg, f"{t}_weight") > 0)
    samples = [make_sample(rng, cfg, task, rng.randint(0, cfg.max_distractors))
               for task in tasks for _ in range(cfg.eval_frames)]
    return [frozen(s) for s in samples] if cfg.eval_frozen else samples


def frozen(sample):
    """The same sample with every shown frame of its clip replaced by the first (single frames pass)."""
    if sample.clip is None:
        return sample
    frames = sample.clip[0]
    tracks = [sample.tracks[0]] * len(sample.tracks) if sample.tracks else sample.tracks   # what is shown: no change
    return dataclasses.replace(sample, clip=(frames[:1].expand_as(frames).clone(),) + tuple(sample.clip[1:]), tracks=tracks)


def blind_span(samples, grid_s=0.25):
    """The when task's frame-blind yardstick: the one span (ends on a grid_s-second grid) that scores
    best on these very clips, chosen knowing their answers. No answer that ignores the frames can beat
    it on them, so a held-out when tIoU above it is the model reading the clip.
    -> (mean tIoU, start, end), or None when no sample is a when clip."""
    when = [s for s in samples if s.task == "when"]
    if not when:
        return None
    return metrics.best_constant_span([s.span for s in when], grid_s, until=max(s.clip[2] for s in when))


def blind_answer(samples):
    """The qa task's frame-blind yardstick: each event's most common answer on these very clips (one
    constant answer per question type, chosen knowing the answers); its accuracy on them. A model
    must beat it to be reading the clips (a question-reader can do a little better on colour clips,
    whose answer is never the colour the question names). -> accuracy, or None without qa clips."""
    qa = [s for s in samples if s.task == "qa"]
    if not qa:
        return None
    best = {}
    for event in {s.event for s in qa}:
        answers = [s.answer for s in qa if s.event == event]
        best[event] = max(sorted(set(answers)), key=answers.count)
    return sum(s.answer == best[s.event] for s in qa) / len(qa)


def prompt_parts(question, style):
    """The chat prompt as data.render_prompt parts: one frame (index 0) and the question."""
    if style == "full":
        return data.render_prompt(question, [0.0], 1 / synth.FPS)
    # Chat tokens as data.Special parts: every plain str part is tokenized as text.
    sp = data.Special
    if style == "question_first":  # the image tokens come after the question, so they can attend to it
        return [sp(data.IM_START), "user\n", question, "\n", 0, sp(data.IM_END), "\n", sp(data.IM_START), "assistant\n"]
    return [sp(data.IM_START), "user\n", 0, question, sp(data.IM_END), "\n", sp(data.IM_START), "assistant\n"]


def pixel_box(box, frame_size):
    """A normalized box as '[x1,y1,x2,y2]' in integer pixels of the frame the model sees."""
    return "[" + ",".join(str(v) for v in data.norm_box_to_pixels(box, *frame_size)) + "]"


def claim(name, box, frame_size):
    """One object in the project's grammar: <obj>name</obj><box>[x1,y1,x2,y2]</box>."""
    return f"{data.OBJ_OPEN}{name}{data.OBJ_CLOSE}{data.BOX_OPEN}{pixel_box(box, frame_size)}{data.BOX_CLOSE}"


def target_text(sample, frame_size, find_answer="name_box"):
    """The answer: marked names the object; find names it and gives its box (or, with find_answer
    box, gives the box alone: no name to copy from the question first); list names and boxes every
    object, left to right by box centre; at names and boxes the object and says the time asked; when
    gives the event's span as the temporal answers do (or the whole TG trace, when the sample has one);
    qa gives the answer block (or the free-form record's whole completion, when the sample has one);
    letter the MCQ trace's end after its lead (the letter, then the answer block)."""
    if sample.task == "letter":
        return sample.trace
    if sample.task == "when":
        return sample.trace or synth.span_text(*sample.span)
    if sample.task == "qa":
        return sample.trace or f"{data.ANSWER_OPEN}{sample.answer}{data.ANSWER_CLOSE}"
    if sample.task == "at":
        t = data.format_seconds(sample.clip[3])
        return f"{claim(sample.name, sample.box, frame_size)}at{data.T_OPEN}{t}{data.T_CLOSE}s"
    if sample.task == "marked":
        return f"{data.OBJ_OPEN}{sample.name}{data.OBJ_CLOSE}"
    if sample.task == "list":
        order = sorted(sample.objects, key=lambda o: o[1][0] + o[1][2])
        return "".join(claim(n, b, frame_size) for n, b in order)
    if find_answer == "box":
        return f"{data.BOX_OPEN}{pixel_box(sample.box, frame_size)}{data.BOX_CLOSE}"
    return claim(sample.name, sample.box, frame_size)


def clip_layout(cfg):
    """Where a clip's question goes (data.QUESTION_AT): before the frames with --at_question_first,
    else where Qwen2.5-VL's layout puts it, after them."""
    return "before" if cfg.at_question_first else "after"


def encode(sample, tokenizer, vision, style, device="cpu", find_answer="name_box", layout="after"):
    """Sample -> (model.Prompt, target ids ending in <|im_end|>), both on device. A clip (at, when, qa)
    is in SFT's prompt with the question at `layout` (data.render_prompt's question_at)."""
    if sample.task in CLIP_TASKS:
        frames, times, duration, _ = sample.clip
        parts = data.render_prompt(sample.question, times, duration, question_at=layout)
        parts += [sample.lead] if sample.lead else []   # the assistant turn's given first words
        model_in = model.tokenize_prompt(tokenizer, parts, frames, vision)
    else:
        model_in = model.tokenize_prompt(tokenizer, prompt_parts(sample.question, style), sample.frame[None], vision)
    text = target_text(sample, model_in.frame_size, find_answer) + data.IM_END
    return model_in.to(device), torch.tensor(tokenizer.encode(text, add_special_tokens=False), device=device)


# ---------------------------------------------------------------------------------------------
# Scoring a greedy answer
# ---------------------------------------------------------------------------------------------

_OBJ = re.compile(r"<obj>(.*?)</obj>")
_BOX = re.compile(r"<box>\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                  r"\s*(-?\d+(?:\.\d+)?)\s*\]</box>")


def parse_answer(text):
    """(object name or None, pixel box [x1, y1, x2, y2] or None) from the first claim in text."""
    obj, box = _OBJ.search(text), _BOX.search(text)
    return (obj.group(1).strip() if obj else None), ([float(v) for v in box.groups()] if box else None)


def box_iou(a, b):
    """IoU of two xyxy boxes; 0 for an empty or inverted box."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def name_parts(said, truth):
    """An object name's two words scored apart: (colour right, kind right) as floats, or None when
    the true answer is not a '<colour> <kind>' name (a direction, a colour). A missing or one-word
    answer gets each word it does hold."""
    truth_words = (truth or "").split()
    if len(truth_words) != 2 or truth_words[0] not in synth.COLOURS or truth_words[1] not in synth.KINDS:
        return None
    words = (said or "").split()
    return float(truth_words[0] in words[:1]), float(truth_words[1] in words[-1:])


def score(sample, text, frame_size):
    """One greedy answer -> {'iou': ...} (find, at, when: temporal) or {'correct': ...} (marked, qa), plus 'parsed';
    a marked answer, and a qa answer that is an object name, also 'colour_ok' and 'kind_ok' (name_parts)."""
    if sample.task == "when":  # the rewards' reader and tIoU, as the TG answers are scored (a trace's answer block)
        span = rewards.parse_span(rewards.parse_completion(text).answer if data.ANSWER_OPEN in text else text)
        return {"parsed": span is not None, "iou": rewards.segment_iou(span, sample.span)}
    if sample.task == "qa":  # the rewards' reader; an exact answer (names, colours, directions are closed sets)
        answer = rewards.parse_completion(text).answer
        said = (answer or "").strip()
        parts = name_parts(said, sample.answer)
        return {"parsed": answer is not None, "correct": float(said == sample.answer),
                **({"colour_ok": parts[0], "kind_ok": parts[1]} if parts else {})}
    if sample.task == "letter":  # right: the trace's letter and the answer are both the word's option
        parsed = rewards.parse_completion(sample.lead + text)
        said = f"{synth.MCQ_LEAD} {sample.answer}."
        return {"parsed": parsed.answer is not None,
                "correct": float(parsed.answer == sample.answer and (parsed.think or "").endswith(said))}
    name, box = parse_answer(text)
    if sample.task == "marked":
        colour_ok, kind_ok = name_parts(name, sample.name)
        return {"parsed": name is not None, "correct": float(name == sample.name),
                "colour_ok": colour_ok, "kind_ok": kind_ok}
    gt = data.norm_box_to_pixels(sample.box, *frame_size, rounded=False)  # pixels of the seen frame
    return {"parsed": box is not None, "iou": box_iou(box, gt) if box else 0.0,
            "name_ok": float(name == sample.name)}


@torch.no_grad()
def evaluate(vlm, tokenizer, vision, samples, style, max_new_tokens=32, device="cpu", batch=32,
             layout="after"):
    """Greedy answers on the held-out samples, `batch` decoded together (the same tokens as one at a
    time; a clip's question at `layout`) -> metrics dict."""
    how = model.Sampling(max_new_tokens, model.stop_token_ids(vlm, tokenizer), tokenizer.pad_token_id, 0.0, 1.0,
                         tuple(model.vision_token_ids(tokenizer)))
    inputs = [encode(s, tokenizer, vision, style, device, layout=layout)[0] for s in samples]
    outs = model.generate_groups(vlm, inputs, 1, how, None, batch)
    rows, examples = [], []
    for s, model_in, (ids, mask, _) in zip(samples, inputs, outs):
        text = tokenizer.decode(ids[0][mask[0]], skip_special_tokens=True)
        rows.append((s.task, score(s, text, model_in.frame_size)))
        if len(examples) < 4 or (s.task == "marked" and len(examples) < 6):
            examples.append(text)
    find = [r for t, r in rows if t == "find"]
    marked = [r for t, r in rows if t == "marked"]
    at = [r for t, r in rows if t == "at"]
    when = [r for t, r in rows if t == "when"]
    qa = [(s.event, r) for s, (t, r) in zip(samples, rows) if t == "qa"]
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    clips = {"at_miou": mean([r["iou"] for r in at]), "at_iou50": mean([float(r["iou"] >= 0.5) for r in at]),
             "at_name_acc": mean([r["name_ok"] for r in at])} if at else {}
    if when:
        clips.update(when_tiou=mean([r["iou"] for r in when]), when_iou50=mean([float(r["iou"] >= 0.5) for r in when]))
    letter = [r["correct"] for t, r in rows if t == "letter"]
    if letter:
        clips["letter_acc"] = mean(letter)
    if qa:
        clips["qa_acc"] = mean([r["correct"] for _, r in qa])
        named = [r for _, r in qa if "kind_ok" in r]  # the answers that are object names, word by word
        if named:
            clips.update(qa_colour_acc=mean([r["colour_ok"] for r in named]), qa_kind_acc=mean([r["kind_ok"] for r in named]))
        clips.update({f"qa_acc[{e}]": mean([r["correct"] for ev, r in qa if ev == e]) for e in sorted({e for e, _ in qa})})
    return {**clips, "box_miou": mean([r["iou"] for r in find]),
            "box_iou50": mean([float(r["iou"] >= 0.5) for r in find]),
            "marked_acc": mean([r["correct"] for r in marked]),
            "marked_colour_acc": mean([r["colour_ok"] for r in marked]),  # its name's two words apart: the tiny
            "marked_kind_acc": mean([r["kind_ok"] for r in marked]),      # tower sees colour before shape
            "find_name_acc": mean([r["name_ok"] for r in find]),
            "parsed": mean([float(r["parsed"]) for _, r in rows]), "examples": examples}


# ---------------------------------------------------------------------------------------------
# Dense vision targets: what a pretrained vision encoder would already know about each image token
# ---------------------------------------------------------------------------------------------

NAME_INDEX = {f"{c} {k}": i for i, (c, k) in enumerate(NAMES)}
AUX_OUT = len(NAMES) + 1 + 4 + 1  # per cell: object class (or none), its box, marked or not
MOTION_OUT = 5  # per cell of a clip's frame, after AUX_OUT in the bind head: dx, dy, still, new, recoloured
STILL = 1e-3    # a displacement under this (normalized; 0.1 px of 112) is standing still


def cell_index(box, gh, gw):
    """The merged image token (row-major in a gh x gw grid) whose cell holds a normalized box's centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(cy * gh), gh - 1) * gw + min(int(cx * gw), gw - 1)


def dense_targets(sample, gh, gw):
    """Targets for the gh x gw merged image tokens (row-major, the order the merger emits them).

    A cell owns the object whose box centre lies in it (the target wins a shared cell): a frame is
    a clip of one, so motion_targets' rule. The target owns its own cell, which marked flags.
    Returns (class (gh*gw,) long, len(NAMES) for none; normalized box (gh*gw, 4); marked (gh*gw,))."""
    cls, box = motion_targets([sample.objects], gh, gw)[:2]
    marked = torch.zeros(gh * gw)
    if sample.task == "marked":
        marked[cell_index(sample.objects[0][1], gh, gw)] = 1.0
    return cls, box, marked


def motion_targets(tracks, gh, gw):
    """Targets for every shown frame's gh x gw cells (frames in order, each row-major, the order the
    merger emits them): a cell owns the object whose box centre lies in it (the earliest in the
    frame's list wins a shared cell: the target), and says what changed for that object since the
    previous shown frame.

    Returns (class (F*cells,) long, len(NAMES) for none; box (F*cells, 4); move (F*cells, MOTION_OUT):
    centre displacement dx, dy (normalized), still (max |d| < STILL), new (not visible before),
    recoloured (its colour changed); moved (F*cells,) bool: the cell's object was visible in the
    previous shown frame (dx, dy, still, recoloured are defined); fresh (F*cells,) bool: a frame
    before it exists (new is defined); source (F*cells,) long: where moved, the cell (in the same
    numbering) of that object in the previous frame, else -1)."""
    n_cells = gh * gw
    cls = torch.full((len(tracks) * n_cells,), len(NAMES), dtype=torch.long)
    box, move = torch.zeros(len(cls), 4), torch.zeros(len(cls), MOTION_OUT)
    moved, fresh = torch.zeros(len(cls), dtype=torch.bool), torch.zeros(len(cls), dtype=torch.bool)
    source = torch.full((len(cls),), -1, dtype=torch.long)
    centre = lambda b: torch.tensor([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    for k, objects in enumerate(tracks):
        for j in reversed(range(len(objects))):
            if objects[j] is None:
                continue
            name, b = objects[j]
            cell = k * n_cells + cell_index(b, gh, gw)
            cls[cell], box[cell], move[cell], moved[cell], source[cell] = NAME_INDEX[name], torch.tensor(b), 0.0, False, -1
            fresh[cell] = k > 0
            before = tracks[k - 1][j] if k > 0 else None
            if k > 0 and before is None:
                move[cell, 3] = 1.0
            elif before is not None:
                d = centre(b) - centre(before[1])
                move[cell, :2], move[cell, 2] = d, float(d.abs().max() < STILL)
                move[cell, 4], moved[cell] = float(name.split()[0] != before[0].split()[0]), True
                source[cell] = (k - 1) * n_cells + cell_index(before[1], gh, gw)
    return cls, box, move, moved, fresh, source


def balanced_bce(logits, targets):
    """Binary cross-entropy with logits, the mean over positives and the mean over negatives averaged
    (a rare class, a still or new or recoloured cell, weighs as much as the common one)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    parts = [bce[targets > 0.5].mean(), bce[targets <= 0.5].mean()]
    parts = [x for x in parts if not x.isnan()]
    return sum(parts) / len(parts)


def motion_loss(o, tracks, gh, gw, attn=None):
    """The motion aid on one clip: o = the bind head on its image tokens (F*cells, AUX_OUT + MOTION_OUT).
    Class cross-entropy on every cell, box L1 (x10) where an object is, and on those cells with a
    frame before: new (a logit, balanced_bce), and where the object was there before, displacement
    L1 (x10) and still and recoloured logits (balanced_bce). attn (F*cells, F*cells): one head's
    attention among the clip's image tokens; with it, the track aid: -log of its weight, from each
    moved cell, on the object's cell in the previous frame. -> (loss, the track aid's loss (0 without
    attn), {counts of still cells called still and of moving cells called moving, the displacement's
    mean L1})"""
    n, bce = len(NAMES) + 1, balanced_bce
    cls, box, move, moved, fresh, source = (x.to(o.device) for x in motion_targets(tracks, gh, gw))
    own = cls < len(NAMES)
    m = o[:, AUX_OUT:]
    loss = torch.nn.functional.cross_entropy(o[:, :n], cls) + (o[own, n:n + 4] - box[own]).abs().mean() * 10
    if fresh.any():
        loss = loss + bce(m[fresh, 3], move[fresh, 3])
    if moved.any():
        loss = (loss + (m[moved, :2] - move[moved, :2]).abs().mean() * 10 + bce(m[moved, 2], move[moved, 2])
                + bce(m[moved, 4], move[moved, 4]))
    track = 0.0
    if attn is not None and moved.any():
        track = -attn[moved.nonzero()[:, 0], source[moved]].clamp_min(1e-9).log().mean()
    still, going = moved & (move[:, 2] > 0), moved & (move[:, 2] == 0)
    stats = {"still_hits": int((m[still, 2] > 0).sum()), "still": int(still.sum()),
             "going_hits": int((m[going, 2] <= 0).sum()), "going": int(going.sum()),
             "move_l1": (m[moved, :2] - move[moved, :2]).abs().mean().item() if moved.any() else 0.0}
    return loss, track, stats


def dense_loss(vlm, head, prompts, samples):
    """The vision tower + merger alone, a linear head per merged token: class cross-entropy on every
    cell, box L1 (x10) on cells that own an object, marked-or-not on marked frames' owning cells.
    -> (loss, {'cls_acc': on owning cells, 'box_l1': mean normalized L1})"""
    visual = vlm.model.visual
    grid = torch.cat([p.image_grid_thw for p in prompts])
    feats = visual(torch.cat([p.pixel_values for p in prompts]), grid_thw=grid).pooler_output  # (cells, D)
    out = head(feats)                                                                     # (cells, AUX_OUT)
    m = visual.spatial_merge_size
    targets = [dense_targets(s, int(g[1]) // m, int(g[2]) // m) for s, g in zip(samples, grid)]
    cls, box, marked = (torch.cat(t).to(out.device) for t in zip(*targets))
    own = cls < len(NAMES)
    n = len(NAMES) + 1
    loss_cls = torch.nn.functional.cross_entropy(out[:, :n], cls)
    loss_box = (out[own, n:n + 4] - box[own]).abs().mean() * 10
    on_marked = own & torch.tensor([s.task == "marked" for s, t in zip(samples, targets) for _ in t[0]],
                                   device=out.device)
    loss_marked = (torch.nn.functional.binary_cross_entropy_with_logits(out[on_marked, -1], marked[on_marked])
                   if on_marked.any() else out.sum() * 0)
    guess, truth = out[own, :n].argmax(1), cls[own]
    kinds = len(synth.KINDS)  # NAMES is colour-major: index = colour * kinds + kind
    colour_ok = guess // kinds == truth // kinds  # a 'none' guess has no colour: wrong
    stats = {"cls_acc": (guess == truth).float().mean().item(), "colour_acc": colour_ok.float().mean().item(),
             # the kind where the colour is right (a 'none' guess would read as a kind by index)
             "kind_acc": (guess[colour_ok] == truth[colour_ok]).float().mean().nan_to_num(0).item(),
             "box_l1": (out[own, n:n + 4] - box[own]).abs().mean().item()}
    return loss_cls + loss_box + loss_marked, stats


def time_rows(ids, open_id, close_id, frames, box_id=None):
    """(answer index, frame) for every token inside the n-th <t>..</t> of an answer's ids, paired with
    frames[n]: the when task's start time with the span's first frame, its end time with the last.
    With box_id (<box>), a claim's box opens its time's group early: `<box>[..]</box>at<t>3.0</t>s`
    is one group, since a claim's box is read in the frame at its time."""
    pairs, n, inside = [], 0, False
    for j, i in enumerate(ids):
        if i in (open_id, box_id):
            inside = inside or n < len(frames)
        elif i == close_id:
            n, inside = n + 1, False
        elif inside:
            pairs.append((j, frames[n]))
    return pairs


def binding_loss(out, types, batch, samples, head, cfg, merge, time_tags=None):
    """The binding aids' losses from one forward (model.plain_forward with the hidden states and/or
    attentions asked for), per frame, averaged over the batch:
      bind    head(state after layer bind_layer) at each image token: class cross-entropy and box L1
              (x10) as in dense_loss, plus a pointer: a cross-entropy over the frame's cells, whose
              answer is the target's cell, where the token can know it (the mark is drawn; or the
              question came first); the list task has no single target and gets no pointer
      attend  -log of head 0's attention (layer attend_layer) on the target's image token, averaged
              over the answer positions of find and marked; for when (with time_tags, the ids of <t>,
              </t> and <box>), -log of its attention summed over the image tokens of the span's first frame
              from the positions that predict the start time, of its last frame for the end time (a
              trace's: each claim's time and the answer's, the start's first); for qa, -log of its
              attention summed over the image tokens that show the answer's object in the trace's key
              frames from the event on (Sample.keys), averaged over the answer positions
      motion  on a clip (Sample.tracks), the same head (with MOTION_OUT more outputs) on every shown
              frame's image tokens: motion_loss
      track   -log of head 0's attention (layer track_layer) from each moved object's token on its
              token in the previous frame (motion_loss, given that head's attention)
    -> (loss, {'bind_ptr_acc': share of pointers right, 'attend_nll': mean attend loss; with motion
        'still_bacc' (balanced accuracy of the still logit), 'move_l1'; with track 'track_nll'})"""
    n, dev = len(NAMES) + 1, types.device
    states = (out.hidden_states[cfg.bind_layer] if cfg.bind_weight > 0 or cfg.motion_weight > 0
              else None)  # [0] is the embeddings
    attn = out.attentions[cfg.attend_layer - 1][:, 0] if cfg.attend_weight > 0 else None  # (B, L, L), head 0
    tracking = out.attentions[cfg.track_layer - 1][:, 0] if cfg.track_weight > 0 else None
    bind, attend, hits, pointed, attended = 0.0, 0.0, 0, 0, 0
    motion, track, moving = 0.0, 0.0, {"still_hits": 0, "still": 0, "going_hits": 0, "going": 0, "move_l1": [], "track_nll": []}
    for b, (s, (p, t)) in enumerate(zip(samples, batch)):
        g = p.image_grid_thw[0]                                       # a clip's frames share one grid
        gh, gw = int(g[1]) // merge, int(g[2]) // merge
        cells = (types[b] == 1).nonzero()[:, 0]                       # positions of the frame's image tokens
        target = cell_index(s.box, gh, gw)
        if cfg.motion_weight > 0 and s.tracks is not None:   # a clip: every shown frame's cells, in order
            among = tracking[b][cells][:, cells] if tracking is not None else None
            loss_m, loss_t, st = motion_loss(head(states[b, cells]), s.tracks, gh, gw, among)
            motion, track = motion + loss_m, track + loss_t
            for key in ("still_hits", "still", "going_hits", "going"):
                moving[key] += st[key]
            moving["move_l1"].append(st["move_l1"])
            moving["track_nll"].append(float(loss_t))
        if cfg.bind_weight > 0 and s.task not in CLIP_TASKS:   # per-cell targets are a single frame's
            cls, box, _ = (x.to(dev) for x in dense_targets(s, gh, gw))
            o = head(states[b, cells])                                # (cells, AUX_OUT [+ MOTION_OUT])
            own = cls < len(NAMES)
            bind = bind + torch.nn.functional.cross_entropy(o[:, :n], cls) + (o[own, n:n + 4] - box[own]).abs().mean() * 10
            if s.task == "marked" or (s.task == "find" and cfg.prompt == "question_first"):
                bind = bind + torch.nn.functional.cross_entropy(o[None, :, n + 4], torch.tensor([target], device=dev))
                hits, pointed = hits + int(o[:, n + 4].argmax() == target), pointed + 1
        if attn is not None and s.task in ("find", "marked"):
            rows = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=dev)   # the positions that predict the answer
            attend = attend - attn[b, rows, cells[target]].clamp_min(1e-9).log().mean()
            attended += 1
        if attn is not None and s.task == "when" and time_tags is not None:
            n_cells = gh * gw  # every frame of a clip has the same grid
            ends = [span_frame(s.clip[1], x) for x in s.span]   # a trace's two claims, then its answer: ends twice
            t_open, t_close, box_open = time_tags
            pairs = time_rows(t.tolist(), t_open, t_close, ends * 2 if s.trace else ends,
                              box_id=box_open if s.trace else None)
            if pairs:
                mass = torch.stack([attn[b, len(p) - 1 + j, cells[k * n_cells:(k + 1) * n_cells]].sum() for j, k in pairs])
                attend = attend - mass.clamp_min(1e-9).log().mean()
                attended += 1
        if attn is not None and s.task == "qa" and not s.trace:   # the answer alone: every row predicts it
            shown = sorted({k * gh * gw + c for k, box in s.keys
                            for c in model.box_cells(data.norm_box_to_pixels(box, *p.frame_size, rounded=False), p.frame_size, gh, gw)})
            rows = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=dev)
            attend = attend - attn[b, rows][:, cells[shown]].sum(-1).clamp_min(1e-9).log().mean()
            attended += 1
    loss = (cfg.bind_weight * bind + cfg.attend_weight * attend + cfg.motion_weight * motion
            + cfg.track_weight * track) / len(samples)
    attend_nll = attend.detach().item() / attended if attended else 0.0
    stats = {"bind_ptr_acc": hits / max(pointed, 1), "attend_nll": attend_nll}
    if cfg.motion_weight > 0:  # still cells are rare (a stop's span, a meet's touch): a balanced accuracy
        stats.update(still_bacc=(moving["still_hits"] / max(moving["still"], 1) + moving["going_hits"] / max(moving["going"], 1)) / 2,
                     move_l1=sum(moving["move_l1"]) / max(len(moving["move_l1"]), 1))
    if cfg.track_weight > 0:
        stats["track_nll"] = sum(moving["track_nll"]) / max(len(moving["track_nll"]), 1)
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------

def tokenizer_corpus(seed=0, n=400):
    """Text like the main job's tokenizer corpus (synth questions and traces) plus this probe's."""
    rng = random.Random(f"probe-corpus-{seed}")
    texts = ["".join(p for p in data.render_prompt("", data.sample_times(8.0), 8.0) if isinstance(p, str))] * 50
    for _ in range(n):
        story = synth.tell(synth.make_scene(rng, rng.random() < 0.5))
        texts.append(f"{story.question} {synth.completion(story.think, story.answer)}")
    names = [f"{c} {k}" for c, k in NAMES]
    texts += [f"{FIND_Q.format(x)} {MARKED_Q} {LIST_Q} {data.OBJ_OPEN}{x}{data.OBJ_CLOSE}" for x in names] * 10
    return texts


def build_model(cfg, out_dir):
    mc = model.TinyModelConfig(value_tokens=cfg.value_tokens, value_init=cfg.value_init, num_layers=cfg.num_layers,
                               patch_size=cfg.patch_size,
                               frame_pixels=cfg.frame_pixels, vision_hidden_size=cfg.vision_hidden_size,
                               vision_depth=cfg.vision_depth)
    if mc.vision_hidden_size % mc.vision_heads:
        mc.vision_heads = mc.vision_hidden_size // 32
    model.build_tiny_model(out_dir, tokenizer_corpus(cfg.seed), mc, seed=cfg.seed)
    return load_for_run(cfg, out_dir)


def load_for_run(cfg, folder):
    vlm, tokenizer, vision = model.load_policy(folder, cfg.device)
    if cfg.question_at:  # the layout the model's users will prompt it with, saved beside its weights
        vision.question_at = cfg.question_at
        vision.save(folder)
    if cfg.attend_weight > 0 or cfg.track_weight > 0 or cfg.recall_attend > 0:  # SDPA returns no attention weights
        vlm.set_attn_implementation("eager")
    return vlm, tokenizer, vision


def start_from(cfg, out_dir):
    """cfg.init's model (config, tokenizer, weights) copied to out_dir and loaded from there, so --save
    writes beside the same config and tokenizer."""
    if not os.path.isfile(os.path.join(cfg.init, "config.json")):
        raise SystemExit(f"--init={cfg.init}: no config.json there; expected a saved model folder")
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(cfg.init, out_dir, ignore=shutil.ignore_patterns("curve.json", "curve.png"))
    return load_for_run(cfg, out_dir)


def make_optimizer(cfg, vlm, head=None, bind_head=None):
    """AdamW with the vision tower and merger (and the dense head) in their own group (lr * vision_lr_mult);
    the binding head trains with the text model."""
    vision = list(vlm.model.visual.parameters()) + (list(head.parameters()) if head is not None else [])
    ids = {id(p) for p in vision}
    rest = [p for p in vlm.parameters() if id(p) not in ids] + (list(bind_head.parameters()) if bind_head else [])
    opt = torch.optim.AdamW([{"params": rest, "lr": cfg.lr},
                             {"params": vision, "lr": cfg.lr * cfg.vision_lr_mult}],
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    return opt, sched


def value_targets(tokenizer, n, sigma):
    """(token id -> value, soft targets (n, n)): row u is a Gaussian over values around u."""
    ids = tokenizer.convert_tokens_to_ids([str(v) for v in range(n)])
    v = torch.arange(n, dtype=torch.float32)
    soft = torch.softmax(-(v[:, None] - v[None]) ** 2 / (2 * sigma ** 2), dim=1)  # (n, n)
    return {i: k for k, i in enumerate(ids)}, torch.tensor(ids), soft


def token_losses(vlm, hidden, targets, values=None):
    """Per-sample, per-token losses (list of 1-D tensors) from the hidden states that predict each
    target (model.plain_hidden): next-token NLL, or with `values` (value_targets' result)
    cross-entropy to a soft target over nearby values at value tokens."""
    if values is None:
        return [-model.token_logprobs(vlm, h, t) for h, t in zip(hidden, targets)]
    value_of, ids, soft = values
    out = []
    for h, t in zip(hidden, targets):
        logp = torch.log_softmax(vlm.lm_head(h).float(), dim=-1)                # (C, V)
        nll = -logp.gather(1, t[:, None])[:, 0]                                   # (C,)
        at = [k for k, tok in enumerate(t.tolist()) if tok in value_of]
        if at:
            q = soft[[value_of[t[k].item()] for k in at]]                          # (n_at, n)
            soft_ce = -(q * logp[at][:, ids]).sum(1)
            nll = nll.index_put((torch.tensor(at),), soft_ce)
        out.append(nll)
    return out


def train_step(vlm, opt, sched, batch, grad_clip, values=None, dense=None, binding=None, words=None):
    """One optimizer step on a list of (prompt, target ids); dense = (head, samples, weight) adds the
    dense vision loss on the batch's single-frame samples, binding = (head, samples, cfg, tokenizer)
    the binding aids' losses (binding_loss), words = (tokenizer, text_sample items, device) the same
    tasks asked in words (text_loss; its value in stats).

    Returns (mean loss per target token, each sample's mean loss per token, binding stats or {})."""
    prompts, targets = [p for p, _ in batch], [t for _, t in batch]
    stats = {}
    if binding is None:
        hidden = model.plain_hidden(vlm, prompts, targets)
    else:
        head, samples, cfg, tokenizer = binding
        out, types = model.plain_forward(vlm, prompts, targets, output_hidden_states=cfg.bind_weight > 0 or cfg.motion_weight > 0,
                                         output_attentions=cfg.attend_weight > 0 or cfg.track_weight > 0)
        hidden = model.completion_rows(out.last_hidden_state, prompts, targets)
        tags = tuple(tokenizer.convert_tokens_to_ids([data.T_OPEN, data.T_CLOSE, data.BOX_OPEN]))
        extra, stats = binding_loss(out, types, batch, samples, head, cfg, vlm.model.visual.spatial_merge_size, tags)
    losses = token_losses(vlm, hidden, targets, values)
    text = sum(l.sum() for l in losses) / sum(len(t) for t in targets)
    loss = text + extra if binding is not None else text
    if dense is not None:  # on the batch's single frames: a clip's cells have no one frame's objects
        head, samples, weight = dense
        keep = [i for i, s in enumerate(samples) if s.clip is None]
        if keep:
            loss = loss + weight * dense_loss(vlm, head, [prompts[i] for i in keep], [samples[i] for i in keep])[0]
    if words is not None:
        nll, _ = text_loss(vlm, *words)
        loss, stats = loss + nll, {**stats, "words": nll.item()}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vlm.parameters(), grad_clip)
    opt.step()
    sched.step()
    return text.item(), [l.mean().item() for l in losses], stats


def write_plot(curve, path):
    """Held-out metrics against steps and against training seconds, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, x, label in ((axes[0], "step", "optimizer steps"), (axes[1], "train_s", "training seconds")):
        xs = [r[x] for r in curve]
        for key, style in (("box_miou", "-o"), ("box_iou50", "--s"), ("marked_acc", "-^"), ("at_miou", "-v"),
                           ("when_tiou", "-D"), ("when_blind_tiou", ":")):
            if key in curve[-1]:
                ax.plot(xs, [r[key] for r in curve], style, ms=3, label=key)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out, greedy")
    load = sum(r["load"] for r in curve) / len(curve)
    fig.suptitle(f"{curve[-1]['samples']} samples; mean 1-min load average at evaluations {load:.1f}", fontsize=9)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_row(vlm, tokenizer, vision, evalset, cfg, step, clock, losses):
    """One point of the curve: held-out metrics plus where training stands."""
    vlm.eval()
    t0 = time.time()
    m = evaluate(vlm, tokenizer, vision, evalset, cfg.prompt, device=cfg.device,
                 max_new_tokens=answer_tokens(cfg), layout=clip_layout(cfg))
    vlm.train()
    row = {"step": step, "samples": step * cfg.batch_size, "train_s": round(clock["wall"], 1),
           "cpu_s": round(clock["cpu"], 1), "loss": round(sum(losses) / max(len(losses), 1), 4),
           "eval_s": round(time.time() - t0, 1), "load": round(os.getloadavg()[0], 2),
           **{k: round(v, 4) for k, v in m.items() if k != "examples"}}
    return row, m["examples"]


def save_curve(cfg, curve, clock, step, first_losses=(), first_dense_losses=()):
    """curve.json and curve.png, rewritten at every evaluation so a stopped run keeps its curve.
    first_losses: the text loss of each of the first steps, and first_dense_losses the dense loss of
    each of the first --aux_steps (a fingerprint of the run: the probe is deterministic, so the same
    command gives the same numbers; the dense ones can be checked without the run's thousands of steps)."""
    result = {"config": dataclasses.asdict(cfg), "s_per_step": clock["wall"] / max(step, 1),
              "cpu_s_per_step": clock["cpu"] / max(step, 1), "first_losses": list(first_losses),
              "first_dense_losses": list(first_dense_losses), "curve": curve}
    with open(os.path.join(cfg.out, "curve.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_plot(curve, os.path.join(cfg.out, "curve.png"))
    return result


def pretrain_vision(cfg, vlm, head, tokenizer, vision, rng, clock, log):
    """cfg.aux_steps steps of the dense loss on the vision tower + merger + head alone (the text
    model does not run: a step costs a small share of a full one). -> the first steps' losses."""
    visual = vlm.model.visual
    params = list(head.parameters()) + ([] if cfg.aux_head_only else list(visual.parameters()))
    visual.requires_grad_(not cfg.aux_head_only)  # frozen: no gradient flows into the tower at all
    opt = torch.optim.AdamW(params, lr=cfg.aux_lr, betas=(0.9, 0.95))
    stats, first = [], []
    for step in range(1, cfg.aux_steps + 1):
        t0, c0 = time.time(), time.process_time()
        samples = [training_sample(rng, cfg, 0) for _ in range(cfg.batch_size)]
        prompts = [encode(s, tokenizer, vision, cfg.prompt, cfg.device)[0] for s in samples]
        loss, st = dense_loss(vlm, head, prompts, samples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        clock["wall"] += time.time() - t0
        clock["cpu"] += time.process_time() - c0
        stats.append((loss.item(), st["cls_acc"], st["colour_acc"], st["kind_acc"], st["box_l1"]))
        if step <= FIRST_STEPS:
            first.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.aux_steps:
            mean = [sum(x) / len(stats) for x in zip(*stats)]
            log(f"[probe] dense step {step:5d} {clock['wall']:6.0f}s loss {mean[0]:.3f} cell class acc "
                f"{mean[1]:.2f} (colour {mean[2]:.2f}, kind where the colour is right {mean[3]:.2f}) box L1 {mean[4]:.3f}")
            stats = []
    visual.requires_grad_(True)
    return first


def run(cfg, log=print):
    """Train for the budget, evaluating every cfg.eval_every training seconds. -> the curve."""
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vlm, tokenizer, vision = (start_from(cfg, os.path.join(cfg.out, "model")) if cfg.init
                              else build_model(cfg, os.path.join(cfg.out, "model")))
    vlm.train()
    log(f"[probe] {sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters, "
        f"vocab {len(tokenizer)}, load {os.getloadavg()[0]:.1f}")
    head = None
    if cfg.aux_steps > 0 or cfg.aux_weight > 0:
        head = torch.nn.Linear(vlm.config.vision_config.out_hidden_size, AUX_OUT).to(cfg.device)
    bind_head = None
    if cfg.bind_weight > 0 or cfg.motion_weight > 0:  # reads the text model's states at image tokens (dropped with the run)
        width = AUX_OUT + (MOTION_OUT if cfg.motion_weight > 0 else 0)   # without motion, the head of earlier runs
        bind_head = torch.nn.Linear(vlm.config.text_config.hidden_size, width).to(cfg.device)
    opt, sched = make_optimizer(cfg, vlm, head if cfg.aux_weight > 0 else None, bind_head)
    rng, evalset = random.Random(f"probe-train-{cfg.seed}"), held_out(cfg)
    blind, blind_qa = blind_span(evalset), blind_answer(evalset)
    if blind:
        log(f"[probe] when: the best frame-blind span on the held-out clips ({blind[1]:g}-{blind[2]:g} s) "
            f"scores tIoU {blind[0]:.3f}")
    if blind_qa is not None:
        log(f"[probe] qa: each event's most common answer on the held-out clips scores {blind_qa:.3f}")
    values = value_targets(tokenizer, cfg.value_tokens, cfg.value_sigma) if cfg.value_sigma > 0 else None
    curve, clock, next_eval, step, losses, first = [], {"wall": 0.0, "cpu": 0.0}, 0.0, 0, [], []
    if cfg.recall_steps > 0:
        pretrain_recall(cfg, vlm, tokenizer, clock, log)
    if cfg.text_steps > 0:
        pretrain_text(cfg, vlm, tokenizer, rng, clock, log)
    dense_first = pretrain_vision(cfg, vlm, head, tokenizer, vision, rng, clock, log) if cfg.aux_steps > 0 else []
    next_eval = clock["wall"]
    task_loss = {t: [] for t in TASKS}  # per-sample token-mean losses since the last log line
    aid_stats = []  # the binding aids' stats since the last log line
    while True:
        done = clock["wall"] >= cfg.train_seconds or (cfg.max_steps and step >= cfg.max_steps)
        due = step % cfg.eval_steps == 0 if cfg.eval_steps > 0 else clock["wall"] >= next_eval
        if due or done:
            row, examples = eval_row(vlm, tokenizer, vision, evalset, cfg, step, clock, losses)
            if blind:
                row["when_blind_tiou"] = blind[0]
            if blind_qa is not None:
                row["qa_blind_acc"] = blind_qa
            curve.append(row)
            result = save_curve(cfg, curve, clock, step, first, dense_first)
            if cfg.save:
                save_model(vlm, os.path.join(cfg.out, "model"))
            losses, next_eval = [], clock["wall"] + cfg.eval_every
            at = (f" at mIoU {row['at_miou']:.3f} IoU>=.5 {row['at_iou50']:.2f} name {row['at_name_acc']:.2f}"
                  if "at_miou" in row else "")
            at += f" when tIoU {row['when_tiou']:.3f} IoU>=.5 {row['when_iou50']:.2f}" if "when_tiou" in row else ""
            at += "".join(f" {k} {v:.2f}" for k, v in row.items() if k.startswith(("qa_acc", "qa_colour", "qa_kind", "letter_acc")))
            log(f"[probe] step {step:5d} {row['train_s']:6.0f}s loss {row['loss']:.3f} box mIoU {row['box_miou']:.3f} "
                f"IoU>=.5 {row['box_iou50']:.2f} marked {row['marked_acc']:.2f} "
                f"(colour {row['marked_colour_acc']:.2f}, kind {row['marked_kind_acc']:.2f}) name {row['find_name_acc']:.2f} "
                f"parsed {row['parsed']:.2f}{at} (eval {row['eval_s']}s, load {row['load']}) e.g. {examples[0]!r}")
        if done:
            break
        t0, c0 = time.time(), time.process_time()
        samples = [training_sample(rng, cfg, step) for _ in range(cfg.batch_size)]
        dense = (head, samples, cfg.aux_weight) if cfg.aux_weight > 0 else None
        batch = [encode(s, tokenizer, vision, cfg.prompt, cfg.device, cfg.find_answer, clip_layout(cfg))
                 for s in samples]
        binding = ((bind_head, samples, cfg, tokenizer) if cfg.bind_weight > 0 or cfg.attend_weight > 0 or cfg.motion_weight > 0
                   else None)
        words = (tokenizer, [text_sample(rng, cfg) for _ in range(cfg.text_batch)], cfg.device) if cfg.text_mix else None
        loss, per_sample, stats = train_step(vlm, opt, sched, batch, cfg.grad_clip, values, dense, binding, words)
        aid_stats.append(stats)
        clock["wall"] += time.time() - t0
        clock["cpu"] += time.process_time() - c0
        losses.append(loss)
        if len(first) < FIRST_STEPS:
            first.append(loss)
        for s, v in zip(samples, per_sample):
            task_loss[s.task].append(v)
        step += 1
        if step % cfg.log_every == 0:
            mean = {k: sum(v) / max(len(v), 1) for k, v in task_loss.items()}
            aids = "".join(f" {k} {sum(a[k] for a in aid_stats) / len(aid_stats):.3f}" for k in aid_stats[-1])
            log(f"[probe] step {step:5d} {clock['wall']:6.0f}s loss find {mean['find']:.3f} marked {mean['marked']:.3f} "
                f"list {mean['list']:.3f} at {mean['at']:.3f} when {mean['when']:.3f} qa {mean['qa']:.3f} "
                f"letter {mean['letter']:.3f}{aids}")
            task_loss, aid_stats = {t: [] for t in TASKS}, []
    log(f"[probe] {step} steps in {clock['wall']:.0f}s training: {result['s_per_step']:.2f} s/step wall, "
        f"{result['cpu_s_per_step']:.2f} s/step of process CPU time")
    return result


def save_model(vlm, folder):
    """The weights into folder/model.safetensors (build_model wrote the config and tokenizer there),
    written beside it and moved into place, so a run stopped at any instant keeps its last evaluation's model.
    Saved at a fresh model's scale (model.rescale_residual on a copy: the same function, the weight
    sizes SFT's learning rate suits; the run itself trains on unchanged)."""
    tmp = folder + ".tmp"
    saved = copy.deepcopy(vlm)
    model.rescale_residual(saved)
    saved.save_pretrained(tmp)
    os.replace(os.path.join(tmp, "model.safetensors"), os.path.join(folder, "model.safetensors"))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:])
    torch.set_num_threads(cfg.threads)
    run(cfg)
