"""Visual prompts: what VisionCoach draws on the key frames of a hard sample, and its hint text.

Owns: the five visual-prompt types (raw, darken outside the key objects, red circles around them,
frame numbers stamped in a corner, attention spotlight), their hint sentences, `apply_visual_prompt`
over a list of key frames, and a CLI that writes a PNG grid of one sample under every prompt so a
person can look. Every drawing function is pure: uint8 (3, H, W) frame + normalized xyxy boxes in,
a new uint8 (3, H, W) frame out, the input never touched. Boxes go to pixels only through
data.norm_box_to_pixels. Degenerate boxes (inverted, empty, non-finite) are dropped and boxes
reaching outside [0, 1] are clipped; a frame left with no box is returned unchanged (there is
nothing to point at, and darkening everything would only hide evidence).
Leaves to others: the VP-Selector (selector.py), the self-distillation step (distill.py),
reading records and building the model's prompt (data.py).

Run:  python prompt.py --demo --out grid.png
      python prompt.py --data path/to/split.json --root DATA_ROOT --index 0 --out grid.png
Test: python -m pytest tests/test_prompt.py -q
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import norm_box_to_pixels, read_image, read_json, resolve_media

# ---------------------------------------------------------------------------------------------
# Registry: the order is fixed, a prompt's index is its class id for the VP-Selector
# ---------------------------------------------------------------------------------------------
VISUAL_PROMPTS = ("raw", "darken", "red_circle", "frame_numbers", "spotlight")

# One sentence per prompt, appended to the question so the model knows what was drawn (and that the
# marks are ours, not part of the scene: the synthetic scenes have red shapes of their own).
HINTS = {
    "raw": "",
    "darken": "Hint: the regions outside the key objects have been darkened; "
              "focus on the bright regions.",
    "red_circle": "Hint: the key objects are marked with red ellipses; "
                  "the ellipses are markers, not part of the scene.",
    "frame_numbers": "Hint: each key frame shows its frame number in white in the top-left corner.",
    "spotlight": "Hint: a soft spotlight highlights the key objects; "
                 "the dimmer regions matter less.",
}


@dataclass
class VisualPromptConfig:
    darken_factor: float = 0.25      # brightness kept outside the padded boxes (0 = black, 1 = raw)
    darken_pad: float = 0.02         # margin added around each box before darkening, normalized units
    circle_thickness: int = 2        # width of the red ellipse ring, pixels
    digit_scale: int | None = None   # pixels per font pixel; None = about 1/50 of the short side
    spotlight_dim: float = 0.3       # brightness far from every box
    spotlight_falloff: float = 0.1   # Gaussian sigma of the spotlight's edge, normalized units


def check_vp(vp):
    """Raise a ValueError naming `vp` and the allowed visual prompts unless it is one of them."""
    if vp not in VISUAL_PROMPTS:
        raise ValueError(f"unknown visual prompt {vp!r}; expected one of {', '.join(VISUAL_PROMPTS)}")


HINT_POSITIONS = ("before", "after")


def add_hint(question, vp, position="before"):
    """The question the model sees under visual prompt `vp` (raw: as is): its hint on a line of its
    own before the question, or after it (the paper's q + hint). Before keeps the question the last
    text the answer follows: with the hint after it, the tiny model's prompted answers often answered
    another question type (docs/history.md, "Where the hint goes": the measured costs, which vary by run)."""
    check_vp(vp)
    if position not in HINT_POSITIONS:
        raise ValueError(f"hint position {position!r}; expected one of {HINT_POSITIONS}")
    if not HINTS[vp]:
        return question
    return f"{HINTS[vp]}\n{question.lstrip()}" if position == "before" else f"{question.rstrip()}\n{HINTS[vp]}"


# ---------------------------------------------------------------------------------------------
# Boxes and frames
# ---------------------------------------------------------------------------------------------

def check_frame(frame):
    if not (isinstance(frame, torch.Tensor) and frame.dtype == torch.uint8
            and frame.ndim == 3 and frame.shape[0] == 3):
        desc = f"{frame.dtype} {tuple(frame.shape)}" if isinstance(frame, torch.Tensor) else type(frame)
        raise ValueError(f"expected a uint8 (3, H, W) frame, got {desc}")


def clean_boxes(boxes):
    """Normalized boxes clipped to [0, 1]; non-finite, inverted and empty ones dropped."""
    out = []
    for box in boxes or []:
        if len(box) != 4:
            raise ValueError(f"a box is [x1, y1, x2, y2], got {box!r}")
        if not all(math.isfinite(float(v)) for v in box):
            continue
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
        if x2 > x1 and y2 > y1:
            out.append([x1, y1, x2, y2])
    return out


def pixel_boxes(boxes, height, width, pad=0.0):
    """Clean normalized boxes, padded by `pad` and clipped, as integer pixel xyxy (x2, y2 exclusive)."""
    padded = [[b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad] for b in clean_boxes(boxes)]
    return [norm_box_to_pixels(b, width, height) for b in clean_boxes(padded)]


def box_mask(pix_boxes, height, width):
    """True on the pixels covered by any pixel box: rows y1:y2, columns x1:x2."""
    mask = torch.zeros(height, width, dtype=torch.bool)  # (H, W)
    for x1, y1, x2, y2 in pix_boxes:
        mask[y1:y2, x1:x2] = True
    return mask


def pixel_centers(height, width):
    """Continuous coordinates of pixel centers: column i sits at x = i + 0.5."""
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5  # (H, 1)
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5   # (1, W)
    return ys, xs


def scale_brightness(frame, gain):
    """frame * gain per pixel, rounded back to uint8; a gain of exactly 1 leaves a pixel as is."""
    out = frame.float() * gain[None]  # (3, H, W)
    return out.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The prompts
# ---------------------------------------------------------------------------------------------

def raw(frame):
    check_frame(frame)
    return frame.clone()


def darken_outside_boxes(frame, boxes, factor=0.25, pad=0.02):
    """Pixels inside the padded boxes untouched, every other pixel multiplied by `factor`."""
    check_frame(frame)
    _, H, W = frame.shape
    pix = pixel_boxes(boxes, H, W, pad)
    if not pix:
        return frame.clone()
    gain = torch.where(box_mask(pix, H, W), 1.0, factor)  # (H, W)
    return scale_brightness(frame, gain)


def draw_red_circles(frame, boxes, thickness=2):
    """Pure red ring of about `thickness` pixels on the ellipse through the corners of each box."""
    check_frame(frame)
    _, H, W = frame.shape
    ys, xs = pixel_centers(H, W)
    ring = torch.zeros(H, W, dtype=torch.bool)  # (H, W)
    for x1, y1, x2, y2 in pixel_boxes(boxes, H, W):
        # the smallest ellipse with the box's aspect ratio that encloses it: semi-axes sqrt(2) * half-sides
        a, b = max(math.sqrt(0.5) * (x2 - x1), 1.0), max(math.sqrt(0.5) * (y2 - y1), 1.0)
        dx, dy = xs - (x1 + x2) / 2, ys - (y1 + y2) / 2  # (1, W), (H, 1)
        f = (dx / a) ** 2 + (dy / b) ** 2 - 1  # (H, W), 0 on the ellipse
        grad = 2 * torch.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2)  # (H, W)
        dist = f / grad.clamp_min(1e-12)  # first-order distance to the ellipse, pixels
        ring |= dist.abs() < thickness / 2
    out = frame.clone()
    out[:, ring] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None]
    return out


# 3x5 bitmap digits, one string per row ("1" = lit). Built-in so tests can check pixels exactly.
_DIGIT_ROWS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}
FONT_3X5 = {d: torch.tensor([[c == "1" for c in row] for row in rows]) for d, rows in _DIGIT_ROWS.items()}


def text_bitmap(text):
    """The digits of `text` side by side, one blank column between: (5, 4 * len(text) - 1) bool."""
    cols = []
    for i, ch in enumerate(text):
        if i:
            cols.append(torch.zeros(5, 1, dtype=torch.bool))
        cols.append(FONT_3X5[ch])
    return torch.cat(cols, dim=1)


def auto_digit_scale(height, width):
    return max(1, round(min(height, width) / 50))


def stamp_frame_number(frame, number, scale=None):
    """White digits of `number` on a black patch in the top-left corner.

    The patch has a margin of one font pixel, so digit k's top-left font pixel lands at pixel
    (row, col) = (scale, scale + 4 * scale * k); each font pixel is a scale x scale block.
    A patch larger than the frame is cut at the frame's edge.
    """
    check_frame(frame)
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"a frame number is a non-negative int, got {number!r}")
    _, H, W = frame.shape
    s = scale or auto_digit_scale(H, W)
    bits = text_bitmap(str(number)).repeat_interleave(s, 0).repeat_interleave(s, 1)  # (5s, (4n-1)s)
    patch = F.pad(bits, (s, s, s, s), value=False).to(torch.uint8) * 255  # (7s, (4n+1)s)
    ph, pw = min(patch.shape[0], H), min(patch.shape[1], W)
    out = frame.clone()
    out[:, :ph, :pw] = patch[None, :ph, :pw]  # same value on all 3 channels: white or black
    return out


def attention_spotlight(frame, boxes, dim=0.3, falloff=0.1):
    """Brightness 1.0 inside the boxes, a Gaussian fall to `dim` with distance from the nearest box.

    Distance is measured per axis in normalized units (dx / W, dy / H), like the darken padding;
    `falloff` is the Gaussian's sigma in those units.
    """
    check_frame(frame)
    _, H, W = frame.shape
    pix = pixel_boxes(boxes, H, W)
    if not pix:
        return frame.clone()
    ys, xs = pixel_centers(H, W)
    near = torch.zeros(H, W)  # (H, W) best Gaussian weight over boxes, 1 inside a box
    for x1, y1, x2, y2 in pix:
        dx = ((x1 - xs).clamp_min(0) + (xs - x2).clamp_min(0)) / W  # (1, W), 0 within the columns
        dy = ((y1 - ys).clamp_min(0) + (ys - y2).clamp_min(0)) / H  # (H, 1)
        near = torch.maximum(near, torch.exp(-(dx**2 + dy**2) / (2 * falloff**2)))
    return scale_brightness(frame, dim + (1 - dim) * near)


def apply_visual_prompt(vp, frames, boxes_per_frame, frame_numbers, cfg=None):
    """Draw visual prompt `vp` on each key frame; returns a new list of uint8 (3, H, W) tensors.

    boxes_per_frame[i]: the normalized xyxy boxes of frame i's key objects.
    frame_numbers[i]: the 1-based index frame i has in the prompt the model sees (needed only for
    "frame_numbers"; may be None otherwise).
    """
    check_vp(vp)
    cfg = cfg or VisualPromptConfig()
    if len(boxes_per_frame) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(boxes_per_frame)} box lists")
    if vp == "frame_numbers" and (frame_numbers is None or len(frame_numbers) != len(frames)):
        raise ValueError(f"'frame_numbers' needs one number per frame ({len(frames)}), got {frame_numbers!r}")
    out = []
    for i, (frame, boxes) in enumerate(zip(frames, boxes_per_frame)):
        if vp == "raw":
            out.append(raw(frame))
        elif vp == "darken":
            out.append(darken_outside_boxes(frame, boxes, cfg.darken_factor, cfg.darken_pad))
        elif vp == "red_circle":
            out.append(draw_red_circles(frame, boxes, cfg.circle_thickness))
        elif vp == "frame_numbers":
            out.append(stamp_frame_number(frame, frame_numbers[i], cfg.digit_scale))
        else:  # spotlight
            out.append(attention_spotlight(frame, boxes, cfg.spotlight_dim, cfg.spotlight_falloff))
    return out


# ---------------------------------------------------------------------------------------------
# CLI: one sample under every prompt, as a PNG grid (rows = key frames, columns = prompts)
# ---------------------------------------------------------------------------------------------

def load_key_frames(record, root):
    """A record's key frames as uint8 (3, H, W) tensors, their boxes, row labels, frame numbers."""
    key_frames = record.get("key_frames") or []
    where = f"record {record.get('id')!r}"
    if not key_frames:
        raise ValueError(f"{where} has no key_frames")
    frames, boxes, labels = [], [], []
    for i, kf in enumerate(key_frames):  # through data.py's resolver: a path cannot leave the root
        field = f"key_frames[{i}].path"
        frames.append(read_image(resolve_media(root, kf.get("path"), where, field), where, field))  # (3, H, W)
        items = record.get("key_items", {}).get(str(kf["idx"]), {})
        boxes.append([box for obj_boxes in items.values() for box in obj_boxes])
        labels.append(f"idx {kf['idx']}\n{kf['time']:.1f}s")
    # The real frame numbers depend on where data.py interleaves the key frames among the sampled
    # frames; for a look at one sample, numbering the key frames 1..n is enough.
    return frames, boxes, labels, list(range(1, len(frames) + 1))


def demo_key_frames(size=112):
    """A tiny synthetic scene: grey background, a red and a blue rectangle drifting right, a static
    green distractor; the red and blue ones are the key objects."""
    frames, boxes, labels = [], [], []
    for k, t in enumerate([1.0, 3.5, 6.0]):
        frame = torch.full((3, size, size), 128, dtype=torch.uint8)  # (3, H, W)
        key = [[0.10 + 0.15 * k, 0.30, 0.30 + 0.15 * k, 0.50], [0.55, 0.60 + 0.05 * k, 0.75, 0.85 + 0.05 * k]]
        colours = [(220, 40, 40), (40, 70, 220)]
        for (x1, y1, x2, y2), c in zip(key + [[0.70, 0.10, 0.90, 0.25]], colours + [(40, 180, 60)]):
            px1, py1, px2, py2 = norm_box_to_pixels([x1, y1, x2, min(y2, 1.0)], size, size)
            frame[:, py1:py2, px1:px2] = torch.tensor(c, dtype=torch.uint8)[:, None, None]
        frames.append(frame)
        boxes.append(key)
        labels.append(f"idx {2 * k + 2}\n{t:.1f}s")
    return frames, boxes, labels, [3, 8, 13]  # as if interleaved among sampled frames


def make_grid(frames, boxes, labels, frame_numbers, cfg=None, cell=192):
    """PIL image: a header row of prompt names, then one row per key frame, one column per prompt."""
    from PIL import Image, ImageDraw
    columns = [apply_visual_prompt(vp, frames, boxes, frame_numbers, cfg) for vp in VISUAL_PROMPTS]
    H, W = frames[0].shape[1:]
    zoom = max(1, math.ceil(cell / max(H, W)))  # nearest-neighbour upscaling keeps small frames' pixels crisp
    ch, cw, head, side, gap = H * zoom, W * zoom, 20, 60, 4
    grid = Image.new("RGB", (side + len(columns) * (cw + gap), head + len(frames) * (ch + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, vp in enumerate(VISUAL_PROMPTS):
        draw.text((side + c * (cw + gap) + 2, 4), vp, fill="black")
        for r, img in enumerate(columns[c]):
            pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).resize((cw, ch), Image.NEAREST)
            grid.paste(pil, (side + c * (cw + gap), head + r * (ch + gap)))
    for r, label in enumerate(labels):
        draw.text((4, head + r * (ch + gap) + 4), label, fill="black")
    return grid


def main():
    p = argparse.ArgumentParser(description="PNG grid of one sample's key frames under every visual prompt.")
    p.add_argument("--data", help="STGR JSON list")
    p.add_argument("--root", default=None, help="directory the key-frame paths are relative to "
                                               "(default: the JSON's folder, as data.load_records)")
    p.add_argument("--index", type=int, default=0, help="which record of the list")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--demo", action="store_true", help="draw a built-in synthetic scene instead of --data")
    args = p.parse_args()
    if args.demo:
        frames, boxes, labels, frame_numbers = demo_key_frames()
    elif args.data:
        records = read_json(args.data)
        root = args.root or os.path.dirname(os.path.abspath(args.data))
        frames, boxes, labels, frame_numbers = load_key_frames(records[args.index], root)
    else:
        p.error("give --data (with --root) or --demo")
    if len({tuple(f.shape) for f in frames}) != 1:
        raise ValueError(f"key frames differ in size: {[tuple(f.shape) for f in frames]}")
    make_grid(frames, boxes, labels, frame_numbers).save(args.out)
    print(f"wrote {args.out}: {len(frames)} key frames x {len(VISUAL_PROMPTS)} prompts")


if __name__ == "__main__":
    main()
