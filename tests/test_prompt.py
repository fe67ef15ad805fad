"""Visual prompts on real pixels: every expected value below can be checked by hand.

Run: python -m pytest tests/test_prompt.py -q
"""
import json
import math

import pytest
import torch

import prompt
from prompt import (FONT_3X5, HINTS, VISUAL_PROMPTS, VisualPromptConfig, add_hint, apply_visual_prompt,
                    attention_spotlight, clean_boxes, darken_outside_boxes, draw_red_circles,
                    stamp_frame_number)

RED = torch.tensor([255, 0, 0], dtype=torch.uint8)


def noise_frame(h=100, w=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)  # (3, H, W)


def flat_frame(value=128, h=100, w=100):
    return torch.full((3, h, w), value, dtype=torch.uint8)  # (3, H, W)


# ----------------------------------------------------------------------------------------------
# darken
# ----------------------------------------------------------------------------------------------

def test_darken_inside_untouched_outside_scaled():
    frame = noise_frame()
    # box [0.3, 0.3, 0.6, 0.5] padded by 0.02 -> [0.28, 0.28, 0.62, 0.52] -> rows 28:52, cols 28:62
    out = darken_outside_boxes(frame, [[0.3, 0.3, 0.6, 0.5]], factor=0.25, pad=0.02)
    expected = (frame.float() * 0.25).round().to(torch.uint8)
    expected[:, 28:52, 28:62] = frame[:, 28:52, 28:62]
    assert torch.equal(out, expected)
    # the padding edge: row 28 / col 61 are inside (untouched), row 27 / col 62 outside (darkened)
    assert torch.equal(out[:, 28, 30], frame[:, 28, 30]) and torch.equal(out[:, 40, 61], frame[:, 40, 61])
    assert torch.equal(out[:, 27, 30], expected[:, 27, 30]) and torch.equal(out[:, 40, 62], expected[:, 40, 62])


def test_darken_padding_and_factor_by_hand():
    frame = flat_frame(200)
    no_pad = darken_outside_boxes(frame, [[0.3, 0.3, 0.6, 0.5]], factor=0.25, pad=0.0)
    padded = darken_outside_boxes(frame, [[0.3, 0.3, 0.6, 0.5]], factor=0.25, pad=0.02)
    assert no_pad[0, 29, 40] == 50 and padded[0, 29, 40] == 200  # row 29: in the padding only
    assert no_pad[0, 30, 40] == 200 and no_pad[0, 0, 0] == 50
    two = darken_outside_boxes(frame, [[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0]], pad=0.0)
    assert two[0, 5, 5] == 200 and two[0, 95, 95] == 200 and two[0, 50, 50] == 50


# ----------------------------------------------------------------------------------------------
# red circle
# ----------------------------------------------------------------------------------------------

def radius_from(cy, cx, h=100, w=100):
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    return torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)  # (H, W)


def test_red_circle_on_the_circle_through_the_box_corners():
    frame = flat_frame(128)
    # square box -> pixels [30, 30, 70, 70]: a circle centred (50, 50) through the corners, r = 20 * sqrt(2)
    out = draw_red_circles(frame, [[0.3, 0.3, 0.7, 0.7]], thickness=2)
    changed = (out != frame).any(0)  # (H, W)
    assert changed.sum() > 100
    assert (out[:, changed] == RED[:, None]).all()  # pure red
    r, a = radius_from(50, 50), 20 * math.sqrt(2)
    assert ((r[changed] - a).abs() < 1.1).all()  # on the ring, thickness 2 -> within ~1 px
    assert changed[(r - a).abs() < 0.5].all()  # and the ring has no gaps
    assert not changed[40:60, 40:60].any()  # nothing deep inside the box
    assert torch.equal(out[:, 50, 78], RED) and torch.equal(out[:, 50, 50], frame[:, 50, 50])


def test_red_ellipse_follows_the_box_aspect_and_clips_at_the_edge():
    frame = flat_frame(128)
    # wide box -> pixels [10, 40, 90, 60]; semi-axes 40 * sqrt(2) (leaves the frame) and 10 * sqrt(2)
    out = draw_red_circles(frame, [[0.1, 0.4, 0.9, 0.6]], thickness=2)
    changed = (out != frame).any(0)
    a, b = 40 * math.sqrt(2), 10 * math.sqrt(2)
    ys = torch.arange(100.0)[:, None] + 0.5 - 50
    xs = torch.arange(100.0)[None, :] + 0.5 - 50
    rho = torch.sqrt((xs / a) ** 2 + (ys / b) ** 2)  # (H, W) 1 on the ellipse
    assert changed.any() and ((rho[changed] - 1).abs() < 1.5 / b).all()
    assert changed[50 - 15:50 - 13, 50].any() and changed[50 + 13:50 + 15, 50].any()  # top and bottom
    assert not changed[45:55, 20:80].any()


def test_two_circles_and_thickness():
    frame = flat_frame(128)
    thin = (draw_red_circles(frame, [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]], thickness=1) != frame).any(0)
    thick = (draw_red_circles(frame, [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]], thickness=4) != frame).any(0)
    assert thin[:50, :50].any() and thin[50:, 50:].any()
    assert thick.sum() > 2 * thin.sum() and not (thin & ~thick).any()


# ----------------------------------------------------------------------------------------------
# frame numbers
# ----------------------------------------------------------------------------------------------

# The font written out a second time, as a person would read it, so a wrong tensor font shows up.
SEVEN = ["111", "001", "001", "001", "001"]
ONE = ["010", "110", "010", "010", "111"]
ZERO = ["111", "101", "101", "101", "111"]


def check_digit(out, rows, top, left, s):
    for r, row in enumerate(rows):
        for c, bit in enumerate(row):
            block = out[:, top + r * s:top + (r + 1) * s, left + c * s:left + (c + 1) * s]
            assert (block == (255 if bit == "1" else 0)).all(), (r, c)


def test_font_matches_the_written_digits():
    for digit, rows in [("7", SEVEN), ("1", ONE), ("0", ZERO)]:
        assert FONT_3X5[digit].tolist() == [[b == "1" for b in row] for row in rows]
    assert sorted(FONT_3X5) == list("0123456789") and all(v.shape == (5, 3) for v in FONT_3X5.values())


def test_stamp_seven():
    frame = flat_frame(128, 40, 40)
    out = stamp_frame_number(frame, 7, scale=2)
    # black patch 7*2 = 14 rows x (3 + 2)*2 = 10 cols; the digit starts one font pixel (2 px) in
    assert (out[:, :14, :10] != 128).all()
    check_digit(out, SEVEN, top=2, left=2, s=2)
    assert (out[:, :2, :10] == 0).all() and (out[:, 12:14, :10] == 0).all()  # margin is black
    assert (out[:, 14:, :] == 128).all() and (out[:, :, 10:] == 128).all()  # nothing else touched


def test_stamp_ten_two_digits():
    frame = flat_frame(128, 40, 40)
    out = stamp_frame_number(frame, 10, scale=3)
    # patch 7*3 = 21 rows x (4*2 + 1)*3 = 27 cols; digit k at column 3 + 12 k; blank column between
    check_digit(out, ONE, top=3, left=3, s=3)
    check_digit(out, ZERO, top=3, left=15, s=3)
    assert (out[:, :21, 12:15] == 0).all()
    assert (out[:, 21:, :] == 128).all() and (out[:, :, 27:] == 128).all()


def test_stamp_auto_scale_and_clipping():
    frame = flat_frame(90, 112, 112)
    assert torch.equal(stamp_frame_number(frame, 4), stamp_frame_number(frame, 4, scale=2))  # 112 / 50
    small = stamp_frame_number(flat_frame(90, 20, 20), 12345, scale=4)  # patch larger than the frame
    assert small.shape == (3, 20, 20) and not (small == 90).any()
    with pytest.raises(ValueError, match="non-negative int"):
        stamp_frame_number(frame, -1)


# ----------------------------------------------------------------------------------------------
# spotlight
# ----------------------------------------------------------------------------------------------

def test_spotlight_one_inside_monotone_outside():
    frame = flat_frame(200)
    # box -> pixels [40, 40, 60, 60]
    out = attention_spotlight(frame, [[0.4, 0.4, 0.6, 0.6]], dim=0.3, falloff=0.1)
    assert torch.equal(out[:, 40:60, 40:60], frame[:, 40:60, 40:60])  # brightness 1.0 inside
    row = out[0, 50, 59:].tolist()  # walking right from the box's last column
    assert all(a >= b for a, b in zip(row, row[1:])) and row[-1] < row[0]
    # by hand: column 70 has its centre at 70.5, dx = 10.5 / 100 = 0.105
    assert out[0, 50, 70] == round(200 * (0.3 + 0.7 * math.exp(-0.105**2 / (2 * 0.1**2))))  # 141
    diag = [out[0, i, i].item() for i in range(60, 100)]
    assert all(a >= b for a, b in zip(diag, diag[1:]))
    assert abs(out[0, 0, 0].item() - 200 * 0.3) <= 2  # far away: dim


def test_spotlight_two_boxes_each_lit():
    frame = noise_frame()
    out = attention_spotlight(frame, [[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0]])
    assert torch.equal(out[:, :20, :20], frame[:, :20, :20]) and torch.equal(out[:, 80:, 80:], frame[:, 80:, 80:])
    assert (out.int() <= frame.int()).all()  # only ever dims
    # two boxes 0.1 apart: the lights combine by max, so the gap is never brighter than the input
    # and each box stays exactly as it was (a sum of weights would brighten both)
    close = attention_spotlight(frame, [[0.2, 0.4, 0.4, 0.6], [0.5, 0.4, 0.7, 0.6]])
    assert (close.int() <= frame.int()).all()
    assert torch.equal(close[:, 40:60, 20:40], frame[:, 40:60, 20:40])
    assert torch.equal(close[:, 40:60, 50:70], frame[:, 40:60, 50:70])


# ----------------------------------------------------------------------------------------------
# registry, raw, purity, hints, bad input
# ----------------------------------------------------------------------------------------------

def test_registry_order_and_hints():
    assert VISUAL_PROMPTS == ("raw", "darken", "red_circle", "frame_numbers", "spotlight")
    assert set(HINTS) == set(VISUAL_PROMPTS) and HINTS["raw"] == ""
    assert all(HINTS[k] for k in VISUAL_PROMPTS if k != "raw")
    q = "What colour is the square at the end?"
    assert add_hint(q, "raw") == q
    for kind in VISUAL_PROMPTS[1:]:
        assert add_hint(q, kind) == HINTS[kind] + "\n" + q                  # default: the question stays last
        assert add_hint(q, kind, "before") == HINTS[kind] + "\n" + q
        assert add_hint(q, kind, "after") == q + "\n" + HINTS[kind]         # the paper's q + hint
    with pytest.raises(ValueError, match="hint position"):
        add_hint(q, "darken", "middle")


def test_raw_is_identity_and_a_new_tensor():
    frame = noise_frame()
    out = apply_visual_prompt("raw", [frame], [[[0.1, 0.1, 0.5, 0.5]]], [1])[0]
    assert torch.equal(out, frame) and out.data_ptr() != frame.data_ptr()


@pytest.mark.parametrize("kind", VISUAL_PROMPTS)
def test_no_mutation(kind):
    frames = [noise_frame(seed=1), noise_frame(seed=2)]
    before = [f.clone() for f in frames]
    boxes = [[[0.2, 0.2, 0.5, 0.6]], [[0.5, 0.1, 0.9, 0.4], [0.1, 0.6, 0.3, 0.9]]]
    outs = apply_visual_prompt(kind, frames, boxes, [3, 12])
    assert all(torch.equal(f, b) for f, b in zip(frames, before))
    assert all(o.dtype == torch.uint8 and o.shape == f.shape for o, f in zip(outs, frames))
    for o in outs:
        o.zero_()  # writing to an output never reaches the input
    assert all(torch.equal(f, b) for f, b in zip(frames, before))


def test_apply_matches_the_single_functions_and_config():
    frames, boxes = [noise_frame(seed=3), noise_frame(seed=4)], [[[0.2, 0.2, 0.5, 0.6]], [[0.4, 0.4, 0.7, 0.8]]]
    cfg = VisualPromptConfig(darken_factor=0.5, darken_pad=0.0, circle_thickness=3, digit_scale=3,
                             spotlight_dim=0.1, spotlight_falloff=0.05)
    cases = {
        "darken": lambda f, b, n: darken_outside_boxes(f, b, 0.5, 0.0),
        "red_circle": lambda f, b, n: draw_red_circles(f, b, 3),
        "frame_numbers": lambda f, b, n: stamp_frame_number(f, n, 3),
        "spotlight": lambda f, b, n: attention_spotlight(f, b, 0.1, 0.05),
    }
    for kind, fn in cases.items():
        outs = apply_visual_prompt(kind, frames, boxes, [7, 10], cfg)
        assert all(torch.equal(o, fn(f, b, n)) for o, f, b, n in zip(outs, frames, boxes, [7, 10])), kind


def test_bad_kind_names_it_and_the_allowed_ones():
    for call in (lambda: apply_visual_prompt("heatmap", [flat_frame()], [[]], [1]), lambda: add_hint("q", "heatmap")):
        with pytest.raises(ValueError) as err:
            call()
        assert "'heatmap'" in str(err.value) and all(k in str(err.value) for k in VISUAL_PROMPTS)


def test_bad_lists_and_frames_fail_loudly():
    with pytest.raises(ValueError, match="box lists"):
        apply_visual_prompt("darken", [flat_frame()], [], [1])
    with pytest.raises(ValueError, match="one number per frame"):
        apply_visual_prompt("frame_numbers", [flat_frame()], [[]], None)
    with pytest.raises(ValueError, match="uint8"):
        darken_outside_boxes(flat_frame().float(), [[0.1, 0.1, 0.2, 0.2]])


def test_clean_boxes_table():
    assert clean_boxes([]) == [] and clean_boxes(None) == []
    assert clean_boxes([[0.5, 0.5, 0.4, 0.6]]) == []  # inverted
    assert clean_boxes([[0.5, 0.5, 0.5, 0.7]]) == []  # zero width
    assert clean_boxes([[float("nan"), 0.1, 0.2, 0.3]]) == []
    assert clean_boxes([[-0.5, -0.2, 1.5, 1.3]]) == [[0.0, 0.0, 1.0, 1.0]]
    assert clean_boxes([[1.2, 1.2, 1.5, 1.5]]) == []  # wholly outside
    assert clean_boxes([[0.8, 0.8, 1.2, 1.2], [0.1, 0.1, 0.2, 0.2]]) == [[0.8, 0.8, 1.0, 1.0], [0.1, 0.1, 0.2, 0.2]]


DEGENERATE = [[], [[0.5, 0.5, 0.4, 0.6]], [[-0.5, -0.2, 1.5, 1.3]], [[float("nan"), 0, 1, 1]],
              [[0.5, 0.5, 0.5, 0.7]], [[0.5, 0.5, 0.501, 0.501]], [[1.2, 1.2, 1.5, 1.5]]]


@pytest.mark.parametrize("kind", VISUAL_PROMPTS)
@pytest.mark.parametrize("boxes", DEGENERATE)
def test_degenerate_boxes_do_not_crash(kind, boxes):
    frame = noise_frame(37, 53)
    out = apply_visual_prompt(kind, [frame], [boxes], [1])[0]
    assert out.shape == frame.shape and out.dtype == torch.uint8
    if not clean_boxes(boxes) and kind != "frame_numbers":
        assert torch.equal(out, frame)  # nothing to point at: frame left as is


def test_box_covering_the_frame_leaves_darken_and_spotlight_untouched():
    frame = noise_frame()
    for kind in ("darken", "spotlight"):
        assert torch.equal(apply_visual_prompt(kind, [frame], [[[-0.5, -0.2, 1.5, 1.3]]], None)[0], frame)


# ----------------------------------------------------------------------------------------------
# CLI pieces
# ----------------------------------------------------------------------------------------------

def test_demo_grid_size():
    frames, boxes, labels, numbers = prompt.demo_key_frames()
    grid = prompt.make_grid(frames, boxes, labels, numbers, cell=112)
    assert grid.size == (60 + 5 * (112 + 4), 20 + 3 * (112 + 4))


def test_load_key_frames_from_a_record(tmp_path):
    from PIL import Image
    img = Image.new("RGB", (8, 6), (10, 20, 30))
    img.putpixel((3, 2), (255, 0, 0))
    img.save(tmp_path / "k0.png")
    record = {"id": "s0", "key_frames": [{"idx": 4, "time": 2.0, "path": "k0.png"}],
              "key_items": {"4": {"cup": [[0.1, 0.1, 0.5, 0.5]], "dog": [[0.6, 0.2, 0.9, 0.8]]}}}
    (tmp_path / "split.json").write_text(json.dumps([record]))
    record = json.loads((tmp_path / "split.json").read_text())[0]
    frames, boxes, labels, numbers = prompt.load_key_frames(record, tmp_path)
    assert frames[0].shape == (3, 6, 8) and frames[0][:, 2, 3].tolist() == [255, 0, 0]
    assert frames[0][:, 0, 0].tolist() == [10, 20, 30]
    assert boxes == [[[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.8]]] and numbers == [1]
    with pytest.raises(ValueError, match="no key_frames"):
        prompt.load_key_frames({"id": "s1", "key_frames": []}, tmp_path)
