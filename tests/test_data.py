"""data.py: frame times, prompt rendering, box conversion, and a clear error for each bad input."""
import json
import os
import shutil

import pytest
import torch

import data as D


def test_sample_times_at_fps_and_clamped():
    assert D.sample_times(3.0, fps=2.0) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert D.sample_times(8.0, fps=2.0) == [i / 2 for i in range(16)]             # synthetic clips: the 2 fps grid
    assert D.sample_times(600.0, fps=2.0, max_frames=16) == [i * 37.5 for i in range(16)]  # spread, not cut
    assert D.sample_times(1.0, fps=2.0, min_frames=4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError):
        D.sample_times(0.0)


def test_box_conversions_round_trip():
    assert D.norm_box_to_pixels([0.1, 0.2, 0.5, 1.0], 112, 84) == [11, 17, 56, 84]
    assert D.norm_box_to_pixels([0.1, 0.2, 0.5, 1.0], 112, 84, rounded=False) == pytest.approx([11.2, 16.8, 56.0, 84.0])
    assert D.pixel_box_to_norm([28, 21, 56, 84], 112, 84) == [0.25, 0.25, 0.5, 1.0]


def test_render_prompt_interleaves_frames_and_duration():
    parts = D.render_prompt("What moves?", [0.0, 0.5, 1.0], 1.4)
    assert parts[6:12] == ["Frame 1 at 0.0s:", 0, "Frame 2 at 0.5s:", 1, "Frame 3 at 1.0s:", 2]
    assert "".join(p for p in parts if isinstance(p, str)).startswith(D.IM_START + "system\n")
    assert parts[4:6] == [D.IM_START, "user\n"] and isinstance(parts[4], D.Special)
    assert parts[12] == "\nThe video is in total 1.4 seconds.\nWhat moves?"
    assert parts[-4:] == [D.IM_END, "\n", D.IM_START, "assistant\n"]
    assert [p for p in parts if isinstance(p, D.Special)] == [D.IM_START, D.IM_END, D.IM_START, D.IM_END, D.IM_START]


def test_render_prompt_question_at_before_and_both():
    q, times = "What moves?", [0.0, 0.5]
    after = D.render_prompt(q, times, 1.4)
    before, both = (D.render_prompt(q, times, 1.4, question_at=a) for a in ("before", "both"))
    assert D.render_prompt(q, times, 1.4, question_at="after") == after
    assert before[6:11] == ["What moves?\n", "Frame 1 at 0.0s:", 0, "Frame 2 at 0.5s:", 1]
    assert before[11] == "\nThe video is in total 1.4 seconds."
    assert both[:11] == before[:11] and both[11] == after[10] == "\nThe video is in total 1.4 seconds.\nWhat moves?"
    assert both[12:] == before[12:] == after[11:]
    image = D.render_prompt(q, [0.0], None, question_at="both")   # an image keeps its one layout
    assert image == D.render_prompt(q, [0.0], None)
    with pytest.raises(ValueError, match="question_at='first'"):
        D.render_prompt(q, times, 1.4, question_at="first")


def test_trace_boxes_pixels_rescaled():
    text = "<obj>a</obj><box>[10,20,30,40]</box>at<t>1.0</t>s <box> [0, 0, 100, 100] </box>"
    assert D.trace_to_frame_pixels(text, (100, 100), (200, 50), "r") == \
        "<obj>a</obj><box>[20,10,60,20]</box>at<t>1.0</t>s <box>[0,0,200,50]</box>"
    assert D.trace_to_frame_pixels(text, (112, 112), (112, 112), "r") == \
        "<obj>a</obj><box>[10,20,30,40]</box>at<t>1.0</t>s <box>[0,0,100,100]</box>"


def test_loads_synthetic_records_and_key_frames_land_at_their_times(tiny_data):
    records = D.load_records(os.path.join(tiny_data, "train.json"))
    st = [r for r in records if r["key_frames"]]
    assert st, "the synthetic set has spatio-temporal records"
    for rec in st:
        video = D.load_video_sample(rec)
        assert video.frames.dtype == torch.uint8 and video.frames.shape[1:] == (3, 112, 112)
        assert len(video.times) == video.frames.shape[0] and video.times == sorted(video.times)
        for kf in rec["key_frames"]:
            pos = video.key_positions[kf["idx"]]
            assert abs(video.times[pos] - kf["time"]) < 0.05
            assert torch.equal(video.frames[pos], D.read_image(kf["path"]))   # the key-frame image itself


# ---- bad input: each gets a clear error naming file and field ------------------------------

def _write(tmp_path, records, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture
def good(tiny_data):
    rec = next(r for r in json.load(open(os.path.join(tiny_data, "train.json"))) if r["key_frames"])
    return rec


def _copy_media(tiny_data, tmp_path, rec):
    for rel in [rec["video_path"]] + [k["path"] for k in rec["key_frames"]]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(tiny_data, rel), tmp_path / rel)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("question"), "question"),
    (lambda r: r.pop("video_path"), "video_path"),
    (lambda r: r.update(answer=3), "answer"),
    (lambda r: r.update(task="dance"), "task"),
    (lambda r: r.update(key_frames="none"), "key_frames"),
    (lambda r: r["key_frames"][0].update(time="soon"), "key_frames[0].time"),
    (lambda r: r["key_frames"][0].update(idx=1.5), "key_frames[0].idx"),
    (lambda r: r["key_items"].pop(str(r["key_frames"][0]["idx"])), "key_frames[0].idx"),
    (lambda r: next(iter(r["key_items"].values())).update({"ghost": [[0.1, 0.1, 1.3, 0.5]]}), "['ghost'][0]"),
    (lambda r: next(iter(r["key_items"].values())).update({"ghost": [[0.5, 0.1, 0.2, 0.5]]}), "['ghost'][0]"),
    (lambda r: next(iter(r["key_items"].values())).update({"ghost": [[0.1, 0.1, 0.5]]}), "['ghost'][0]"),
    (lambda r: r.update(video_path="../../etc/passwd"), "video_path"),
])
def test_bad_records_name_file_and_field(tiny_data, tmp_path, good, mutate, field):
    rec = json.loads(json.dumps(good))
    mutate(rec)
    path = _write(tmp_path, [rec])
    with pytest.raises(D.DataError) as e:
        D.load_records(path)
    assert path in str(e.value) and field in str(e.value)


def test_temporal_answer_must_be_a_span(tmp_path, tiny_data):
    rec = {"id": "t", "task": "temporal QA", "question": "When?", "answer": "[3.0, 3.0]", "video_path": "v.mp4"}
    with pytest.raises(D.DataError, match=r"'answer'.*empty or inverted"):
        D.load_records(_write(tmp_path, [rec]))
    rec["answer"] = "soon"
    with pytest.raises(D.DataError, match="'answer'"):
        D.load_records(_write(tmp_path, [rec]))


def test_not_a_list_and_not_json(tmp_path):
    with pytest.raises(D.DataError, match="JSON list"):
        D.load_records(_write(tmp_path, {"id": 1}))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(D.DataError, match="not valid JSON"):
        D.load_records(str(tmp_path / "broken.json"))
    with pytest.raises(D.DataError, match="no such file"):
        D.load_records(str(tmp_path / "missing.json"))


def test_missing_corrupt_and_empty_videos(tiny_data, tmp_path, good):
    _copy_media(tiny_data, tmp_path, good)
    rec = D.load_records(_write(tmp_path, [good]))[0]
    os.remove(rec["video_path"])
    with pytest.raises(D.DataError, match="'video_path': file not found"):
        D.load_video_sample(rec)
    with open(rec["video_path"], "wb") as f:
        f.write(b"\x00not a video" * 100)
    with pytest.raises(D.DataError, match="'video_path': cannot decode"):
        D.load_video_sample(rec)
    open(rec["video_path"], "wb").close()
    with pytest.raises(D.DataError, match="'video_path'"):
        D.load_video_sample(rec)


def test_key_frame_past_the_end_of_the_video(tiny_data, tmp_path, good):
    _copy_media(tiny_data, tmp_path, good)
    bad = json.loads(json.dumps(good))
    bad["key_frames"][0]["time"] = 99.0
    rec = D.load_records(_write(tmp_path, [bad]))[0]
    with pytest.raises(D.DataError, match=r"key_frames\[0\].time.*past the video's end"):
        D.load_video_sample(rec)


def test_missing_key_frame_image(tiny_data, tmp_path, good):
    _copy_media(tiny_data, tmp_path, good)
    rec = D.load_records(_write(tmp_path, [good]))[0]
    os.remove(rec["key_frames"][0]["path"])
    with pytest.raises(D.DataError, match=r"key_frames\[0\].path.*file not found"):
        D.load_video_sample(rec)
