"""STGR data: records, media, frames and the prompt the model sees.

Owns: the facts every other file imports (output tags, box conventions, frame times, the limits a
data file may ask for), reading JSON safely, loading and validating STGR records (one media root,
or one per `source`), the one resolver and opener of media files, decoding videos (torchcodec) and
images (PIL) into uint8 frames, the header-only media check run before training, the skip-and-count
rule for a file that still fails mid-run, and the chat prompt with `Frame i at t s:` interleaving.
Leaves pixel tensors -> model inputs to model.py and scoring to rewards.py. Importing it needs the
standard library only (rewards.py is pure Python): the functions that decode import torch.

Times. Every time in a record (key_frames.time, temporal answers), a prompt and a completion is in
seconds from the first frame of the video stream: t = pts - (pts of the stream's first frame). A
clip whose stream starts at 2.5 s (cut from a longer one) shows its first frame at t = 0.

Test: python -m pytest tests/test_data.py tests/test_real_data.py
"""
import json
import math
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Facts shared by every file (one place each)
# ---------------------------------------------------------------------------------------------
# Output grammar (REFERENCE.md section 3). The model writes
#   <think> ... <obj>name</obj><box>[x1,y1,x2,y2]</box>at<t>12.3</t>s ... </think><answer> ... </answer>
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
OBJ_OPEN, OBJ_CLOSE = "<obj>", "</obj>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
T_OPEN, T_CLOSE = "<t>", "</t>"
GROUNDING_TAGS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, OBJ_OPEN, OBJ_CLOSE,
                  BOX_OPEN, BOX_CLOSE, T_OPEN, T_CLOSE]

# What a data file may ask for. A record past a limit is refused at load, naming file, record and
# field; FrameConfig checks the command line's frame settings against the same numbers.
MAX_TEXT_CHARS = {"question": 8192, "answer": 8192, "reasoning_process": 16384}
MAX_ID_CHARS = 256
MAX_KEY_FRAMES = 16                  # key frames per record (each may add a frame to the prompt)
MAX_SECONDS = 24 * 3600.0            # key-frame times and answer spans
MAX_IMAGE_SIDE = 16384               # image_size, pixels per side
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a larger image file is refused before it is decoded
MAX_FRAMES = 256                     # the most frames FrameConfig.max_frames may ask for
MAX_FRAME_PIXELS = 1024 * 28 * 28    # frames and key-frame images are shrunk to at most this many
MAX_INT_DIGITS = 18                  # a longer integer in a JSON file is refused, not parsed

# Boxes. Ground truth (key_items) is normalized xyxy in [0, 1]; the model reads and writes integer
# pixels xyxy of the resized frame it sees (width x height in pixels). These two functions are the
# only place the two conventions meet.


def norm_box_to_pixels(box, width, height, rounded=True):
    """Normalized [x1, y1, x2, y2] in [0, 1] -> pixels of a width x height frame: integers (what a
    trace writes), or exact floats with rounded=False (a true box to score against)."""
    x1, y1, x2, y2 = box
    exact = [x1 * width, y1 * height, x2 * width, y2 * height]
    return [round(v) for v in exact] if rounded else exact


def pixel_box_to_norm(box, width, height):
    """Pixel [x1, y1, x2, y2] of a width x height frame -> normalized floats (not clipped)."""
    x1, y1, x2, y2 = box
    return [x1 / width, y1 / height, x2 / width, y2 / height]


# Frame times. Like Qwen's video sampler, n = duration * fps clamped to [min_frames, max_frames]
# and the n frames spread over the WHOLE video: frame i is the one playing at i * duration / n
# (the start of the i-th of n equal slots), so a long video is seen at a lower rate, never cut.
# A clip sampled at its own fps (n = duration * fps) lands on the grid i / fps. Qwen takes
# linspace over first..last frame instead, and rounds n to an even number for its 2-frame video
# patches; frames go in here as images, one each, so neither is needed. The times shown to the
# model are the decoded frames' own times (see load_video_sample), not these targets.


def sample_times(duration, fps=2.0, min_frames=4, max_frames=16):
    """Seconds (from the first frame) at which frames are taken: n evenly spaced slot starts."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    n = max(min_frames, min(max_frames, max(1, int(math.floor(duration * fps + 1e-6)))))
    return [i * duration / n for i in range(n)]


def format_seconds(t):
    """How a time is written in prompts and completions: one decimal, e.g. 3.0."""
    return f"{t:.1f}"


# Qwen's chat tokens, as text (model.py maps them to ids).
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

TASKS = ("temporal-spatial free-form QA", "temporal QA", "temporal QA (MCQ)", "visual QA",
         "General video QA MCQ", "General video QA Free-form")
TEMPORAL_TASKS = ("temporal QA", "temporal QA (MCQ)")
IMAGE_TASKS = ("visual QA",)  # a record of these tasks has image_path + image_size, every other video_path

SYSTEM_PROMPT = ("You answer questions about videos. First think inside <think></think>, grounding each "
                 "claim as <obj>name</obj><box>[x1,y1,x2,y2]</box>at<t>seconds</t>s (box in pixels of the "
                 "frame); then give the final answer inside <answer></answer>.")


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


def _fail(where, field, msg):
    raise DataError(f"{where}: field '{field}': {msg}")


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def origin(rec):
    """'file: record i (id=...)' for a loaded record; every error about it starts with this."""
    return rec.get("_origin") or f"record id={rec.get('id')!r}"


# ---------------------------------------------------------------------------------------------
# Boxes inside SFT reasoning traces (REFERENCE.md section 2)
# ---------------------------------------------------------------------------------------------
# Spatio-temporal traces write normalized floats (<box>[0.41,0.22,0.58,0.93]</box>), visual-QA
# traces integer pixels of the original image. Both become integer pixels of the frame the model
# sees. A box is read as normalized when its four numbers lie in [0, 1] and one is written with a
# decimal point, as pixels of the source when they lie inside it; anything else is refused.
_BOX_TAG = re.compile(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), re.DOTALL)
_BOX_LIST = re.compile(r"\s*\[([^\[\]]*)\]\s*")
_DECIMAL = re.compile(r"\d{1,9}(?:\.\d{0,12})?")


def trace_box(content, source_size):
    """The text between <box> and </box> -> ('norm' | 'pixel', [4 floats]) or (None, why).

    source_size (width, height) bounds a pixel box; None when not known yet (a video before decode).
    """
    m = _BOX_LIST.fullmatch(content)
    items = [s.strip() for s in m.group(1).split(",")] if m else []
    if len(items) != 4 or not all(_DECIMAL.fullmatch(s) for s in items):
        return None, "is not [x1, y1, x2, y2] with 4 non-negative decimal numbers"
    box = [float(s) for s in items]
    if not (box[0] < box[2] and box[1] < box[3]):
        return None, "is inverted or empty (need x1 < x2 and y1 < y2)"
    if box[2] <= 1 and box[3] <= 1 and any("." in s for s in items):
        return "norm", box
    if source_size is None or (box[2] <= source_size[0] and box[3] <= source_size[1]):
        return "pixel", box
    return None, (f"is neither normalized [0, 1] floats nor pixels of the {source_size[0]}x{source_size[1]} "
                  f"source")


def check_trace_boxes(text, source_size, where, field="reasoning_process"):
    """[(match, kind, box)] for every box of a trace; DataError naming the record and field for a
    box that fits neither convention (source_size None: pixel boxes are not bounded yet)."""
    if text.count(BOX_OPEN) != len(_BOX_TAG.findall(text)):
        _fail(where, field, f"a {BOX_OPEN} without its {BOX_CLOSE}")
    out = []
    for m in _BOX_TAG.finditer(text):
        kind, box = trace_box(m.group(1), source_size)
        if kind is None:
            _fail(where, field, f"box {m.group(0)!r} {box}")
        out.append((m, kind, box))
    return out


def trace_to_frame_pixels(text, source_size, frame_size, where, field="reasoning_process"):
    """A trace with every box in integer pixels of the frame the model sees (frame_size (W, H)):
    normalized boxes -> round(x * W), pixel boxes of source_size (W, H) -> rescaled."""
    pieces, pos = [], 0
    for m, kind, box in check_trace_boxes(text, source_size, where, field):
        norm = box if kind == "norm" else pixel_box_to_norm(box, *source_size)
        x1, y1, x2, y2 = norm_box_to_pixels(norm, *frame_size)
        pieces += [text[pos:m.start()], f"{BOX_OPEN}[{x1},{y1},{x2},{y2}]{BOX_CLOSE}"]
        pos = m.end()
    return "".join(pieces) + text[pos:]


# ---------------------------------------------------------------------------------------------
# Records: read JSON safely, validate, resolve media under the (per-source) root
# ---------------------------------------------------------------------------------------------

def _bounded_int(s):
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def _no_constant(name):
    raise ValueError(f"{name} is not a number a data file may hold")


def parse_json(text, path):
    """JSON text -> value; DataError naming `path` for anything but plain, bounded JSON."""
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # raised by the two hooks above
        raise DataError(f"{path}: {e}") from None


def read_text(path):
    """A UTF-8 text file -> str; DataError naming the file and the first bad byte otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def read_json(path):
    return parse_json(read_text(path), path)


def parse_data_roots(spec, json_path):
    """--data_root -> {source name or None (every other source): absolute root}.

    '' -> the JSON file's folder; '/data' -> one root; 'a=/data/a,b=/data/b' -> one root per
    `source`, and a plain entry among them ('a=/x,/y') is the root of every other source.
    """
    if not spec:
        return {None: os.path.realpath(os.path.dirname(os.path.abspath(json_path)))}
    if os.path.isdir(spec) or "=" not in spec:
        return {None: os.path.realpath(spec)}
    roots = {}
    for entry in spec.split(","):
        name, eq, root = entry.rpartition("=") if "=" in entry else ("", "", entry)
        key = name.strip() or None
        if key in roots or (eq and key is None) or not root.strip():
            raise DataError(f"--data_root={spec!r}: bad or repeated entry {entry!r} "
                            f"(expected source=/path, comma separated, plus at most one plain /path)")
        roots[key] = os.path.realpath(root.strip())
    return roots


def load_records(json_path, data_root=None):
    """Read an STGR JSON list, validate every record, resolve media paths under its root.

    data_root: '' / None (the JSON's folder), one root, or 'source=/root,...' (parse_data_roots);
    a dict from parse_data_roots is taken as is. Returns the records with `video_path` /
    `image_path` and key-frame `path`s replaced by absolute paths checked to stay inside the root,
    and `_origin` ('file: record i (id=...)') for error messages. Raises DataError naming the
    file, the record and the field on any problem.
    """
    records = read_json(json_path)
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{json_path}: no records (an empty list)")
    roots = data_root if isinstance(data_root, dict) else parse_data_roots(data_root, json_path)
    out = [validate_record(r, roots, f"{json_path}: record {i}") for i, r in enumerate(records)]
    check_unique_ids(out, json_path)
    return out


def check_unique_ids(records, path):
    """Ids key the selector's predictions as text: 1 and "1" are the same id."""
    seen = {}
    for i, rec in enumerate(records):
        key = str(rec["id"])
        if key in seen:
            raise DataError(f"{path}: records {seen[key]} and {i} share the id {key!r} "
                            f"(ids compare as text, so 1 and \"1\" collide)")
        seen[key] = i


def check_enough_records(records, batch_size, path):
    if len(records) < batch_size:
        raise DataError(f"{path}: {len(records)} records, fewer than one batch (batch_size={batch_size})")


def _root_for(roots, rec, where):
    if isinstance(roots, str):
        return roots
    source = rec.get("source")
    root = roots.get(source) if isinstance(source, str) and source in roots else roots.get(None)
    if root is None:
        _fail(where, "source", f"no media root for source {source!r}; --data_root names "
                               f"{sorted(k for k in roots if k)} and no default root")
    return root


def validate_record(rec, roots, where="record"):
    """Check one record's keys, types and limits; return a copy with media paths resolved."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    where = f"{where} (id={repr(rec.get('id', '?'))[:80]})"
    for key in ("id", "task", "question", "answer"):
        if key not in rec:
            _fail(where, key, "missing")
    _check_id(rec["id"], where)
    _check_texts(rec, where)
    if rec["task"] not in TASKS:
        _fail(where, "task", f"unknown task {rec['task']!r}; expected one of {TASKS}")
    rec = dict(rec, _origin=where)
    root = _root_for(roots, rec, where)
    if rec["task"] in IMAGE_TASKS:
        _check_image_record(rec, root, where)
    else:
        if "image_path" in rec or "video_path" not in rec:
            _fail(where, "video_path", f"a {rec['task']!r} record needs video_path (image_path is for {IMAGE_TASKS})")
        rec["video_path"] = resolve_media(root, rec["video_path"], where, "video_path")
    rec["key_frames"] = _check_key_frames(rec.get("key_frames", []), root, where)
    rec["key_items"] = _check_key_items(rec.get("key_items", {}), where)
    for i, kf in enumerate(rec["key_frames"]):
        if rec["key_items"] and str(kf["idx"]) not in rec["key_items"]:
            _fail(where, f"key_frames[{i}].idx", f"key frame {kf['idx']} has no entry in key_items")
    if rec["task"] in TEMPORAL_TASKS:
        span = parse_gt_span(rec["answer"])
        if span is None:
            _fail(where, "answer", f"temporal task needs '[start, end]' seconds, got {rec['answer']!r}")
        if not MAX_SECONDS >= span[1] > span[0] >= 0:
            _fail(where, "answer", f"empty or inverted span, or one past {MAX_SECONDS:.0f} s: {list(span)}")
    if rec.get("reasoning_process"):  # a video's pixel boxes are bounded once its size is known
        check_trace_boxes(rec["reasoning_process"], rec.get("image_size"), where)
    return rec


def _check_texts(rec, where):
    for key, limit in MAX_TEXT_CHARS.items():
        if key in rec and not isinstance(rec[key], str):
            _fail(where, key, f"expected a string, got {type(rec[key]).__name__}")
        if len(rec.get(key, "")) > limit:
            _fail(where, key, f"{len(rec[key])} characters, more than {limit}")


def _check_id(rid, where):
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        _fail(where, "id", f"expected a string or an integer, got {type(rid).__name__}")
    if not 0 < len(str(rid)) <= MAX_ID_CHARS:
        _fail(where, "id", f"expected 1 to {MAX_ID_CHARS} characters")


def _check_image_record(rec, root, where):
    """visual QA: image_path, image_size [W, H] and an answer box in pixels of that image."""
    if "video_path" in rec or "image_path" not in rec:
        _fail(where, "image_path", f"a {rec['task']!r} record needs image_path (and no video_path)")
    size = rec.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              and 0 < v <= MAX_IMAGE_SIDE for v in size)):
        _fail(where, "image_size", f"expected [width, height] pixels in 1..{MAX_IMAGE_SIDE}, got {size!r}")
    boxes = _BOX_TAG.findall(rec["answer"])
    kind, why = trace_box(boxes[0], size) if boxes else (None, "has no <box>[x1, y1, x2, y2]</box>")
    if kind != "pixel":
        _fail(where, "answer", f"the answer box {why if kind is None else 'must be pixels of image_size'}")
    if rec.get("key_frames"):
        _fail(where, "key_frames", "an image record has no key frames")
    rec["image_path"] = resolve_media(root, rec["image_path"], where, "image_path")


def resolve_media(root, rel, where, field):
    """Media path relative to the data root -> canonical absolute path; refuses paths that escape
    the root. The one resolver of media paths: every reader opens what it returns (open_media)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        _fail(where, field, f"expected a relative path string, got {rel!r}")
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([path, root]) != root:
        _fail(where, field, f"path {rel!r} escapes the data root {root}")
    return path


def _check_key_frames(key_frames, root, where):
    if not isinstance(key_frames, list):
        _fail(where, "key_frames", f"expected a list, got {type(key_frames).__name__}")
    if len(key_frames) > MAX_KEY_FRAMES:
        _fail(where, "key_frames", f"{len(key_frames)} key frames, more than {MAX_KEY_FRAMES}")
    out, seen = [], set()
    for i, kf in enumerate(key_frames):
        if not isinstance(kf, dict):
            _fail(where, f"key_frames[{i}]", "expected an object {idx, time, path}")
        idx = kf.get("idx")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            _fail(where, f"key_frames[{i}].idx", f"expected an integer >= 0, got {idx!r}")
        if idx in seen:
            _fail(where, f"key_frames[{i}].idx", f"key frame {idx} appears twice")
        seen.add(idx)
        if not _number(kf.get("time")) or not 0 <= kf["time"] <= MAX_SECONDS:
            _fail(where, f"key_frames[{i}].time", f"expected seconds in [0, {MAX_SECONDS:.0f}], got {kf.get('time')!r}")
        kf = dict(kf)
        if "path" in kf:
            kf["path"] = resolve_media(root, kf["path"], where, f"key_frames[{i}].path")
        out.append(kf)
    return out


def _check_key_items(key_items, where):
    if not isinstance(key_items, dict):
        _fail(where, "key_items", f"expected an object, got {type(key_items).__name__}")
    for idx, objects in key_items.items():
        if not isinstance(objects, dict):
            _fail(where, f"key_items[{idx}]", "expected {object_name: [[x1, y1, x2, y2], ...]}")
        for name, boxes in objects.items():
            field = f"key_items[{idx}][{name!r}]"
            if not name.strip():
                _fail(where, field, "empty object name")
            if not isinstance(boxes, list) or not boxes:
                _fail(where, field, "expected a non-empty list of boxes")
            for j, box in enumerate(boxes):
                check_norm_box(box, where, f"{field}[{j}]")
    return key_items


def check_norm_box(box, where, field):
    """A ground-truth box must be 4 numbers, normalized to [0, 1], with x1 < x2 and y1 < y2."""
    if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
        _fail(where, field, f"expected [x1, y1, x2, y2] numbers, got {box!r}")
    if not all(0.0 <= v <= 1.0 for v in box):
        _fail(where, field, f"box {box} is outside [0, 1] (boxes are normalized xyxy)")
    if not (box[0] < box[2] and box[1] < box[3]):
        _fail(where, field, f"box {box} is inverted or empty (need x1 < x2 and y1 < y2)")


_SPAN = re.compile(r"\[\s*(-?\d{1,9}(?:\.\d{1,9})?)\s*,\s*(-?\d{1,9}(?:\.\d{1,9})?)\s*\]")


def parse_gt_span(answer):
    """Ground-truth '[s, e]' (or 'B\\n[s, e]') seconds -> (s, e), or None."""
    m = _SPAN.search(answer)
    return (float(m.group(1)), float(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------
# Media files: opened once, through the resolver's path, and read from that handle
# ---------------------------------------------------------------------------------------------

def open_media(path, where, field):
    """A binary handle on a media file resolve_media returned.

    Refuses a missing file, anything but a regular file (a FIFO would block the run) and, where
    /proc shows it, a file whose real location is no longer `path` (swapped for a symlink since it
    was validated): what is read is what was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        _fail(where, field, f"file not found: {path}")
    except OSError as e:
        _fail(where, field, f"cannot open {path} ({e.strerror})")
    f = os.fdopen(fd, "rb")
    proc = f"/proc/self/fd/{fd}"
    real = os.readlink(proc) if os.path.islink(proc) else path
    if not stat.S_ISREG(os.fstat(fd).st_mode) or real != path:
        f.close()
        _fail(where, field, f"{path} is not a regular file inside the data root" +
              (f" (it now resolves to {real})" if real != path else ""))
    return f


def fit_size(height, width, max_pixels):
    """(height, width) shrunk, aspect kept, to at most max_pixels; never enlarged."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def shrink(frames, max_pixels):
    """uint8 (N, 3, H, W) -> uint8 frames of at most max_pixels each, resized in uint8 (no float copy)."""
    import torch.nn.functional as F
    size = fit_size(frames.shape[-2], frames.shape[-1], max_pixels)
    if size == tuple(frames.shape[-2:]):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True)


@contextmanager
def open_image(path, where, field):
    """`with open_image(...) as im:` a PIL image of a media file, only its header read so far."""
    from PIL import Image
    with open_media(path, where, field) as f:
        try:
            im = Image.open(f)
        except Exception as e:  # PIL raises several types on unreadable files
            _fail(where, field, f"cannot read image {path} ({e})")
        if im.width * im.height > MAX_IMAGE_PIXELS:
            _fail(where, field, f"{im.width}x{im.height} image is larger than {MAX_IMAGE_PIXELS} pixels")
        yield im


def image_tensor(im, size, where, field):
    """An opened PIL image -> uint8 (3, H, W) at size (H, W), resized in uint8 before any copy."""
    import torch
    from PIL import Image
    h, w = size
    try:
        rgb = im.convert("RGB")
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), Image.BILINEAR, reducing_gap=2.0)
        arr = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except Exception as e:  # a header that reads but a body that does not
        _fail(where, field, f"cannot decode image {im.filename or ''} ({e})")
    return arr.view(h, w, 3).permute(2, 0, 1).contiguous()


def read_image(path, where="image", field="path", max_pixels=MAX_FRAME_PIXELS):
    """uint8 (3, H, W) from an image file, shrunk to at most max_pixels."""
    with open_image(path, where, field) as im:
        return image_tensor(im, fit_size(im.height, im.width, max_pixels), where, field)


@dataclass
class VideoInfo:
    """A video stream as the model's times see it (times: see the module docstring)."""
    begin: float       # stream time (pts) of the first frame, seconds
    duration: float    # seconds from the first frame to the end of the last
    width: int         # pixels of the frames as decoded (rotation applied)
    height: int


def video_decoder(f, path, where, header_only=False):
    """A torchcodec decoder on an open handle and the stream's VideoInfo.

    header_only reads the container's header (milliseconds, for check_media). Otherwise the
    stream is scanned (no decoding) for its real first and last frame times, and a file holding
    much less than its header says (cut short in a copy) is refused instead of being shown as a
    shorter video.
    """
    from torchcodec.decoders import VideoDecoder
    try:
        decoder = VideoDecoder(f, seek_mode="approximate" if header_only else "exact")
        m = decoder.metadata
    except Exception as e:  # torchcodec raises RuntimeError / ValueError on unreadable files
        _fail(where, "video_path", f"cannot decode {path} ({e})")
    header = m.duration_seconds_from_header
    if header_only:
        begin, duration = m.begin_stream_seconds_from_header or 0.0, header or m.duration_seconds
    else:
        begin, end = m.begin_stream_seconds_from_content, m.end_stream_seconds_from_content
        duration = (end - begin) if begin is not None and end is not None else None
        if duration and header and duration < header - max(1.0, 0.05 * header):
            _fail(where, "video_path", f"truncated file: its header says {header:.2f} s but it holds frames "
                                       f"for {duration:.2f} s: {path}")
    if not (duration and duration > 0 and m.num_frames and m.width and m.height):
        _fail(where, "video_path", f"empty video (no frames or no duration): {path}")
    return decoder, VideoInfo(float(begin or 0.0), float(duration), int(m.width), int(m.height))


def decode_frames(decoder, info, times, max_pixels, path, where):
    """The frames playing at `times` (seconds from the first frame) and their own times.

    Decoded a few at a time and shrunk to max_pixels before the next few, so a 4K video never
    holds more than ~64 MB of full-size frames. Times that fall on one frame give it once.
    -> (uint8 (N, 3, h, w) tensor, [seconds]).
    """
    import torch
    last = info.duration - 1e-6                              # nothing plays at the end time itself
    chunk = max(1, (64 << 20) // (3 * info.width * info.height))
    frames, shown = [], []
    for k in range(0, len(times), chunk):
        seconds = [info.begin + min(max(t, 0.0), last) for t in times[k:k + chunk]]
        try:
            batch = decoder.get_frames_played_at(seconds=seconds)
        except Exception as e:
            _fail(where, "video_path", f"cannot decode the frames at {[round(s, 3) for s in seconds]} s of "
                                       f"{path} ({e})")
        for frame, pts in zip(shrink(batch.data, max_pixels), batch.pts_seconds.tolist()):
            if not shown or pts - info.begin > shown[-1] + 1e-9:
                frames.append(frame)
                shown.append(pts - info.begin)
    return torch.stack(frames), shown


# ---------------------------------------------------------------------------------------------
# A record -> what the model is shown
# ---------------------------------------------------------------------------------------------

@dataclass
class FrameConfig:
    fps: float = 2.0             # frames per second sampled from the video (fewer when it is long)
    min_frames: int = 4
    max_frames: int = 16
    max_pixels: int = MAX_FRAME_PIXELS  # frames are decoded and shrunk to at most this many pixels

    def __post_init__(self):
        if not (_number(self.fps) and 0 < self.fps <= 60):
            raise ValueError(f"fps={self.fps}: expected a number in (0, 60]")
        if not (isinstance(self.min_frames, int) and isinstance(self.max_frames, int)
                and 1 <= self.min_frames <= self.max_frames <= MAX_FRAMES):
            raise ValueError(f"min_frames={self.min_frames}, max_frames={self.max_frames}: "
                             f"expected 1 <= min_frames <= max_frames <= {MAX_FRAMES}")
        if not (isinstance(self.max_pixels, int) and 28 * 28 <= self.max_pixels <= MAX_FRAME_PIXELS):
            raise ValueError(f"max_pixels={self.max_pixels}: expected {28 * 28} to {MAX_FRAME_PIXELS}")


@dataclass
class VideoSample:
    """What the model is shown: frames in time order, their times, where the key frames are."""
    frames: object           # (N, 3, H, W) uint8 torch tensor
    times: list              # seconds from the first frame, one per frame, non-decreasing
    key_positions: dict      # key-frame idx -> position in frames
    duration: float          # seconds; None for an image (one frame, no time)
    source_size: tuple = None  # (width, height) of the stored video / image (pixel boxes refer to it)


KEY_FRAME_SNAP = 0.05  # a key frame this close to a sampled frame's time takes that frame's place


def load_video_sample(rec, fc=FrameConfig()):
    """Decode a record's media: a video at fc's rate with its key-frame images put in at their
    times, or an image (visual QA) as a one-frame sample. Errors name the file, record and field.

    Each key frame replaces the sampled frame within KEY_FRAME_SNAP s of its time (one key frame
    per sampled frame) or is inserted in time order. A key-frame time up to the video's end is
    valid (one exactly at the end shows the last frame); later is an error.
    """
    import torch
    if "image_path" in rec:
        return load_image_sample(rec, fc)
    where, path = origin(rec), rec["video_path"]
    with open_media(path, where, "video_path") as f:
        decoder, info = video_decoder(f, path, where)
        frames, times = decode_frames(decoder, info, sample_times(info.duration, fc.fps, fc.min_frames,
                                                                  fc.max_frames), fc.max_pixels, path, where)
        keys = [(kf["time"], kf["idx"], _key_image(kf, i, decoder, info, frames.shape[-2:], fc, path, where))
                for i, kf in enumerate(rec.get("key_frames", []))]
    order = place_key_frames(times, sorted(keys, key=lambda k: k[0]))
    images = dict(enumerate(frames))
    images.update({("key", idx): image for _, idx, image in keys})
    stacked = torch.stack([images[s] for _, s in order])
    key_positions = {s[1]: p for p, (_, s) in enumerate(order) if isinstance(s, tuple)}
    return VideoSample(stacked, [t for t, _ in order], key_positions, info.duration, (info.width, info.height))


def _key_image(kf, i, decoder, info, size, fc, path, where):
    """A key frame's image at the size of the decoded frames: its own file (same shape as the
    video's frames, or refused), or the video's frame at that time when it has no file."""
    if kf["time"] > info.duration + 1e-3:
        _fail(where, f"key_frames[{i}].time", f"{kf['time']} s is past the video's end ({info.duration:.2f} s)")
    if "path" not in kf:
        return decode_frames(decoder, info, [kf["time"]], fc.max_pixels, path, where)[0][0]
    field = f"key_frames[{i}].path"
    with open_image(kf["path"], where, field) as im:
        check_same_shape((im.width, im.height), (info.width, info.height), where, field)
        return image_tensor(im, tuple(size), where, field)


def check_same_shape(image_size, video_size, where, field, tolerance=0.02):
    """A key-frame image must be a frame of the video: same aspect ratio, same orientation."""
    (wi, hi), (wv, hv) = image_size, video_size
    if abs(wi * hv - hi * wv) > tolerance * wv * hi:
        _fail(where, field, f"key-frame image is {wi}x{hi} but the video's frames are {wv}x{hv} "
                            f"(another aspect ratio or orientation; it would be stretched)")


def place_key_frames(times, keys):
    """Sampled frame times + [(time, idx, _)] key frames sorted by time -> [(time, slot)] in time
    order; slot is a sampled frame's index or ("key", idx)."""
    slots = [(t, j) for j, t in enumerate(times)]
    taken, extra = set(), []
    for t, idx, _ in keys:
        near = [j for j, s in enumerate(times) if j not in taken and abs(s - t) < KEY_FRAME_SNAP]
        if near:
            j = min(near, key=lambda j: abs(times[j] - t))
            taken.add(j)
            slots[j] = (t, ("key", idx))
        else:
            extra.append((t, ("key", idx)))
    return sorted(slots + extra, key=lambda s: s[0])   # stable: a sampled frame first at equal times


def load_image_sample(rec, fc=FrameConfig()):
    """A visual-QA record's image as a one-frame sample; its size must be the record's image_size."""
    where, path = origin(rec), rec["image_path"]
    with open_image(path, where, "image_path") as im:
        size = (im.width, im.height)
        if list(size) != list(rec["image_size"]):
            _fail(where, "image_size", f"{rec['image_size']} but {path} is {size[0]}x{size[1]}")
        image = image_tensor(im, fit_size(im.height, im.width, fc.max_pixels), where, "image_path")
    return VideoSample(image[None], [0.0], {}, None, size)


# ---------------------------------------------------------------------------------------------
# Before and during a run: check every file's header, skip (and count) a file that still fails
# ---------------------------------------------------------------------------------------------

def media_problem(rec):
    """None, or the first problem with a record's media that the files' headers show."""
    where = origin(rec)
    try:
        if "image_path" in rec:
            with open_image(rec["image_path"], where, "image_path") as im:
                size = (im.width, im.height)
            if list(size) != list(rec["image_size"]):
                _fail(where, "image_size", f"{rec['image_size']} but the image is {size[0]}x{size[1]}")
        else:
            with open_media(rec["video_path"], where, "video_path") as f:
                _, info = video_decoder(f, rec["video_path"], where, header_only=True)
            size = (info.width, info.height)
            for i, kf in enumerate(rec.get("key_frames", [])):
                if kf["time"] > info.duration + 1e-3:
                    _fail(where, f"key_frames[{i}].time", f"{kf['time']} s is past the video's end "
                                                          f"({info.duration:.2f} s)")
                if "path" in kf:
                    with open_image(kf["path"], where, f"key_frames[{i}].path") as im:
                        check_same_shape((im.width, im.height), size, where, f"key_frames[{i}].path")
        if rec.get("reasoning_process"):
            check_trace_boxes(rec["reasoning_process"], size, where)
    except DataError as e:
        return str(e)
    return None


def check_media(records, workers=8, show=50):
    """Header-only check of every record's files before a run starts (a few ms a record): one
    DataError listing every record with a problem, so a bad file fails now, not at step 900."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(media_problem, records) if p]
    if problems:
        more = f"\n  ... and {len(problems) - show} more" if len(problems) > show else ""
        raise DataError(f"{len(problems)} of {len(records)} records have media problems (fix or drop them):\n  "
                        + "\n  ".join(problems[:show]) + more)


def skip_bad_sample(counts, limit, error):
    """A sample whose media failed mid-run (after check_media passed): count it in `counts`
    (a Counter that goes into the metrics), log the error (it names file and record), and stop
    the run once more than `limit` have failed."""
    counts["bad_sample"] += 1
    print(f"[data] skipped a sample ({counts['bad_sample']} so far, at most {limit}): {error}", flush=True)
    if counts["bad_sample"] > limit:
        raise DataError(f"more than {limit} samples failed to load during the run (max_bad_samples); "
                        f"last: {error}") from error


def check_prompt_length(n_tokens, limit, where):
    if n_tokens > limit:
        _fail(where, "question", f"the prompt has {n_tokens} tokens, more than max_prompt_tokens={limit} "
                                 f"(fewer frames, a smaller max_pixels or a shorter question)")


# ---------------------------------------------------------------------------------------------
# The prompt the model sees
# ---------------------------------------------------------------------------------------------

class Special(str):
    """A chat control token placed by the prompt template. Data text is never read as one: model.py
    maps a Special to its single id and tokenizes every other piece with specials as plain text."""


QUESTION_AT = ("after", "before", "both")  # where a video's question goes in the chat prompt


def render_prompt(question, times, duration, system=SYSTEM_PROMPT, history=(), question_at="after"):
    """Chat prompt as parts: text (str), chat tokens (Special) and frame indices (int).

    <|im_start|>system ... <|im_end|> <|im_start|>user "Frame 1 at 0.0s:" [frame 0] "Frame 2 at
    0.5s:" [frame 1] ... "The video is in total 6.0 seconds." question <|im_end|>, then the
    assistant turn opens. An image (duration None) is one frame without a time. history: earlier
    (answer, next question) turns of a multi-turn chat (V-STAR's chains), in order.
    question_at (a video's question; one of QUESTION_AT): after the frames (Qwen2.5-VL's layout),
    before them (causal attention then lets the image tokens read it: probe.py's at task), or both
    (read by the image tokens and again next to the answer). A checkpoint names its own layout
    (model.VisionProcessor.question_at); docs/perception.md, sessions 11 and 12, says why.
    """
    if question_at not in QUESTION_AT:
        raise ValueError(f"question_at={question_at!r}: expected one of {QUESTION_AT}")
    S = Special
    parts = [S(IM_START), f"system\n{system}", S(IM_END), "\n", S(IM_START), "user\n"]
    if duration is None:
        parts += [0, f"\n{question}"]
    else:
        if question_at != "after":
            parts.append(f"{question}\n")
        for i, t in enumerate(times):
            parts += [f"Frame {i + 1} at {format_seconds(t)}s:", i]
        total = f"\nThe video is in total {format_seconds(duration)} seconds."
        parts.append(total if question_at == "before" else f"{total}\n{question}")
    for answer, next_question in history:
        parts += [S(IM_END), "\n", S(IM_START), f"assistant\n{answer}", S(IM_END), "\n", S(IM_START),
                  f"user\n{next_question}"]
    return parts + [S(IM_END), "\n", S(IM_START), "assistant\n"]
