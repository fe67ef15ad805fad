"""STGR data: records, media, frames and the prompt the model sees.

Owns: the facts every other file imports (output tags, box coordinate conventions, frame
timestamps), loading and validating STGR JSON, decoding videos with torchcodec, and rendering the
chat prompt with `Frame i at t s:` interleaving. Leaves pixel tensors -> model inputs to model.py
and scoring to rewards.py.

Test: python -m pytest tests/test_data.py
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch

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

# Boxes. Ground truth (key_items) is normalized xyxy in [0, 1]; the model reads and writes integer
# pixels xyxy of the resized frame it sees (width x height in pixels). These two functions are the
# only place the two conventions meet.


def norm_box_to_pixels(box, width, height):
    """Normalized [x1, y1, x2, y2] in [0, 1] -> integer pixels of a width x height frame."""
    x1, y1, x2, y2 = box
    return [round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)]


def pixel_box_to_norm(box, width, height):
    """Pixel [x1, y1, x2, y2] of a width x height frame -> normalized floats (not clipped)."""
    x1, y1, x2, y2 = box
    return [x1 / width, y1 / height, x2 / width, y2 / height]


# Frame timestamps. A clip of `duration` seconds sampled at `fps` shows frames at t_i = i / fps
# (seconds from the start), i = 0 .. n-1; n is clamped to [min_frames, max_frames] by spreading the
# n times evenly over [0, duration) instead. Every file that needs a frame time calls this.


def sample_times(duration, fps=2.0, min_frames=4, max_frames=16):
    """Seconds at which frames are shown to the model, rounded to 0.1 s."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    n = int(math.floor(duration * fps + 1e-6))
    n = max(min_frames, min(max_frames, max(n, 1)))
    step = min(1.0 / fps, duration / n)
    return [round(i * step, 1) for i in range(n)]


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

SYSTEM_PROMPT = ("You answer questions about videos. First think inside <think></think>, grounding each "
                 "claim as <obj>name</obj><box>[x1,y1,x2,y2]</box>at<t>seconds</t>s (box in pixels of the "
                 "frame); then give the final answer inside <answer></answer>.")


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


# ---------------------------------------------------------------------------------------------
# Records: load and validate STGR JSON
# ---------------------------------------------------------------------------------------------

def load_records(json_path, data_root=None):
    """Read an STGR JSON list, validate every record, resolve media paths under data_root.

    data_root defaults to the JSON file's folder. Returns the records with `video_path` /
    `image_path` and key-frame `path`s replaced by absolute paths (checked to stay inside the
    root). Raises DataError naming the file, the record and the field on any problem.
    """
    if not os.path.isfile(json_path):
        raise DataError(f"{json_path}: no such file")
    try:
        with open(json_path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    root = os.path.realpath(data_root or os.path.dirname(os.path.abspath(json_path)))
    return [validate_record(r, root, f"{json_path}: record {i}") for i, r in enumerate(records)]


def _fail(where, field, msg):
    raise DataError(f"{where}: field '{field}': {msg}")


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(rec, root, where="record"):
    """Check one record's keys and types; return a copy with media paths resolved under root."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    where = f"{where} (id={rec.get('id', '?')})"
    for key in ("id", "task", "question", "answer"):
        if key not in rec:
            _fail(where, key, "missing")
    for key in ("question", "answer"):
        if not isinstance(rec[key], str):
            _fail(where, key, f"expected a string, got {type(rec[key]).__name__}")
    if rec["task"] not in TASKS:
        _fail(where, "task", f"unknown task {rec['task']!r}; expected one of {TASKS}")
    if "reasoning_process" in rec and not isinstance(rec["reasoning_process"], str):
        _fail(where, "reasoning_process", "expected a string")
    rec = dict(rec)
    media = "video_path" if "video_path" in rec else "image_path" if "image_path" in rec else None
    if media is None:
        _fail(where, "video_path", "missing (a record needs video_path or image_path)")
    rec[media] = resolve_media(root, rec[media], where, media)
    rec["key_frames"] = _check_key_frames(rec.get("key_frames", []), root, where)
    rec["key_items"] = _check_key_items(rec.get("key_items", {}), where)
    for i, kf in enumerate(rec["key_frames"]):
        if rec["key_items"] and str(kf["idx"]) not in rec["key_items"]:
            _fail(where, f"key_frames[{i}].idx", f"key frame {kf['idx']} has no entry in key_items")
    if rec["task"] in TEMPORAL_TASKS:
        span = parse_gt_span(rec["answer"])
        if span is None:
            _fail(where, "answer", f"temporal task needs '[start, end]' seconds, got {rec['answer']!r}")
        if not span[1] > span[0] >= 0:
            _fail(where, "answer", f"empty or inverted span {list(span)}")
    return rec


def resolve_media(root, rel, where, field):
    """Media path relative to the data root -> absolute path; refuses paths that escape the root."""
    if not isinstance(rel, str) or not rel:
        _fail(where, field, f"expected a relative path string, got {rel!r}")
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([path, root]) != root:
        _fail(where, field, f"path {rel!r} escapes the data root {root}")
    return path


def _check_key_frames(key_frames, root, where):
    if not isinstance(key_frames, list):
        _fail(where, "key_frames", f"expected a list, got {type(key_frames).__name__}")
    out = []
    for i, kf in enumerate(key_frames):
        if not isinstance(kf, dict):
            _fail(where, f"key_frames[{i}]", "expected an object {idx, time, path}")
        if not isinstance(kf.get("idx"), int) or isinstance(kf.get("idx"), bool):
            _fail(where, f"key_frames[{i}].idx", f"expected an integer, got {kf.get('idx')!r}")
        if not _number(kf.get("time")) or kf["time"] < 0:
            _fail(where, f"key_frames[{i}].time", f"expected seconds >= 0, got {kf.get('time')!r}")
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


_SPAN = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


def parse_gt_span(answer):
    """Ground-truth '[s, e]' (or 'B\\n[s, e]') seconds -> (s, e), or None."""
    m = _SPAN.search(answer)
    return (float(m.group(1)), float(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------
# Media: decode frames, read key-frame images
# ---------------------------------------------------------------------------------------------

@dataclass
class FrameConfig:
    fps: float = 2.0         # frames per second sampled from the video
    min_frames: int = 4
    max_frames: int = 16


@dataclass
class VideoSample:
    """What the model is shown: frames in time order, their times, where the key frames are."""
    frames: torch.Tensor     # (N, 3, H, W) uint8
    times: list              # seconds, one per frame, non-decreasing
    key_positions: dict      # key-frame idx -> position in frames
    duration: float          # seconds


def open_video(path, where="video"):
    """A torchcodec decoder for the record's video and its duration in seconds (checked)."""
    from torchcodec.decoders import VideoDecoder
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'video_path': file not found: {path}")
    try:
        decoder = VideoDecoder(path)
        meta = decoder.metadata
    except Exception as e:  # torchcodec raises RuntimeError/ValueError on unreadable files
        raise DataError(f"{where}: field 'video_path': cannot decode {path} ({e})") from None
    duration = meta.duration_seconds or 0.0
    if not duration > 0 or not meta.num_frames:
        raise DataError(f"{where}: field 'video_path': empty video (no frames): {path}")
    return decoder, duration


def decode_frames(decoder, times, where="video"):
    """uint8 frames (N, 3, H, W) of an opened video at `times` seconds."""
    try:
        return decoder.get_frames_played_at(seconds=list(times)).data
    except Exception as e:
        raise DataError(f"{where}: field 'video_path': cannot decode frames ({e})") from None


def read_image(path, where="image", field="path"):
    """uint8 (3, H, W) from an image file."""
    from PIL import Image
    if not os.path.isfile(path):
        raise DataError(f"{where}: field '{field}': file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            return arr.view(im.height, im.width, 3).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise DataError(f"{where}: field '{field}': cannot read image {path} ({e})") from None


def load_video_sample(rec, fc=FrameConfig()):
    """Decode a record's video at fc.fps and put its key-frame images in at their times.

    A key frame whose time is a sampled time (within 0.05 s) replaces that frame; otherwise it
    is inserted in time order. Key-frame times past the video's end are an error.
    """
    where = f"record id={rec['id']}"
    decoder, duration = open_video(rec["video_path"], where)
    times = sample_times(duration, fc.fps, fc.min_frames, fc.max_frames)
    frames = list(decode_frames(decoder, times, where))
    for i, kf in enumerate(rec.get("key_frames", [])):
        if kf["time"] > duration + 1e-3:
            _fail(where, f"key_frames[{i}].time", f"{kf['time']} s is past the video's end ({duration:.2f} s)")
    key_positions = {}
    for kf in sorted(rec.get("key_frames", []), key=lambda k: k["time"]):
        if "path" in kf:
            image = read_image(kf["path"], where, "key_frames.path")
        else:  # no key-frame image: the frame at that time
            image = decode_frames(decoder, [kf["time"]], where)[0]
        if image.shape != frames[0].shape:
            image = torch.nn.functional.interpolate(image[None].float(), size=frames[0].shape[-2:],
                                                    mode="bilinear", antialias=True)[0].round().clamp(0, 255).byte()
        j = min(range(len(times)), key=lambda j: abs(times[j] - kf["time"]))
        if abs(times[j] - kf["time"]) < 0.05:
            frames[j] = image
        else:
            j = sum(t <= kf["time"] for t in times)
            times.insert(j, round(kf["time"], 1))
            frames.insert(j, image)
            key_positions = {k: p + (p >= j) for k, p in key_positions.items()}
        key_positions[kf["idx"]] = j
    return VideoSample(torch.stack(frames), times, key_positions, duration)


# ---------------------------------------------------------------------------------------------
# The prompt the model sees
# ---------------------------------------------------------------------------------------------

def render_prompt(question, times, duration, system=SYSTEM_PROMPT):
    """Chat prompt as parts: text pieces (str) and frame indices (int) into the frames tensor.

    <|im_start|>system ... user: "Frame 1 at 0.0s:" [frame 0] "Frame 2 at 0.5s:" [frame 1] ...
    "The video is in total 6.0 seconds." question, then the assistant turn opens.
    """
    parts = [f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n"]
    for i, t in enumerate(times):
        parts += [f"Frame {i + 1} at {format_seconds(t)}s:", i]
    parts.append(f"\nThe video is in total {format_seconds(duration)} seconds.\n{question}{IM_END}\n"
                 f"{IM_START}assistant\n")
    return parts


_BOX_IN_TEXT = re.compile(r"<box>\s*\[([^\[\]<>]*)\]\s*</box>")


def rescale_boxes_in_text(text, src_size, dst_size):
    """Pixel boxes written for a src (width, height) frame -> pixels of a dst (width, height) frame."""
    if tuple(src_size) == tuple(dst_size):
        return text

    def one(m):
        try:
            box = [float(v) for v in m.group(1).split(",")]
        except ValueError:
            return m.group(0)
        if len(box) != 4:
            return m.group(0)
        px = norm_box_to_pixels(pixel_box_to_norm(box, *src_size), *dst_size)
        return f"<box>[{px[0]},{px[1]},{px[2]},{px[3]}]</box>"
    return _BOX_IN_TEXT.sub(one, text)
