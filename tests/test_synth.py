"""Tests for synth.py: determinism, STGR layout, grammar, and the encode -> decode round trip."""
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchcodec.decoders import VideoDecoder
from transformers import AutoTokenizer

import config
import model
import synth
from data import sample_times

N_TRAIN, N_TEST = 6, 3

# one grounded claim: <obj>name</obj><box>[x1,y1,x2,y2]</box>(<box>...)*at<t>1.5</t>s
CLAIM = re.compile(r"<obj>([^<]+)</obj>((?:<box>\[\d+,\d+,\d+,\d+\]</box>)+)at<t>(\d+\.\d)</t>s")
COMPLETION = re.compile(r"<think>(.+)</think><answer>(.+)</answer>", re.S)
SPAN = re.compile(r"From <t>(\d+\.\d)</t>s to <t>(\d+\.\d)</t>s")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = config.Config(data_dir=str(out), n_train=N_TRAIN, n_val=1, n_test=N_TEST, seed=3,
                        difficulty=0.5, synth_workers=1)
    return out, synth.generate(cfg)


def records(generated):
    out, result = generated
    return [(out, r) for sp in ("train", "val", "test") for r in result[sp]]


def test_deterministic_and_split_seeds(generated, tmp_path):
    out, _ = generated
    cfg = config.Config(data_dir=str(tmp_path), n_train=N_TRAIN, n_val=1, n_test=N_TEST, seed=3,
                        difficulty=0.5, synth_workers=2)
    synth.generate(cfg)  # same seed, other worker count: byte-identical JSON
    for name in ("train.json", "val.json", "test.json", "vstar_train.json", "vstar_val.json", "vstar_test.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for media in sorted((out / "videos").iterdir()) + sorted((out / "frames").iterdir()):
        rel = media.relative_to(out)
        assert media.read_bytes() == (tmp_path / rel).read_bytes(), rel
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert {r["reasoning_process"] for r in train}.isdisjoint(r["reasoning_process"] for r in test)


def test_stgr_keys_and_types(generated):
    for out, r in records(generated):
        assert r["source"] == "synth" and r["task"] in synth.TASKS.values()
        for k in ("id", "question", "answer", "reasoning_process", "video_path"):
            assert isinstance(r[k], str) and r[k], k
        assert (out / r["video_path"]).is_file()
        assert isinstance(r["key_frames"], list) and isinstance(r["key_items"], dict)
        assert isinstance(r["meta"]["hard"], bool) and len(r["meta"]["span"]) == 2
        if r["task"] == "temporal QA":
            assert re.fullmatch(r"\[\d+\.\d, \d+\.\d\]", r["answer"])
            continue
        assert 1 <= len(r["key_frames"]) <= 3
        assert sorted(r["key_items"]) == sorted(str(kf["idx"]) for kf in r["key_frames"])
        for kf in r["key_frames"]:
            assert isinstance(kf["idx"], int) and isinstance(kf["time"], float)
            assert (out / kf["path"]).is_file()
            assert 1 <= len(r["key_items"][str(kf["idx"])]) <= 3
        if r["task"] == "General video QA MCQ":
            assert r["answer"] in "ABCD" and f"\n{r['answer']}. " in r["question"]


def test_key_times_boxes_and_grammar(generated):
    for _, r in records(generated):
        shown = sample_times(r["meta"]["duration"])
        for kf in r["key_frames"]:
            assert kf["time"] in shown
            assert kf["idx"] == round(kf["time"] * synth.FPS)
        for objs in r["key_items"].values():
            for boxes in objs.values():
                for x1, y1, x2, y2 in boxes:
                    assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        m = COMPLETION.fullmatch(r["reasoning_process"])
        assert m, r["reasoning_process"]
        think, answer = m.groups()
        claims = CLAIM.findall(think)
        assert claims and all(float(t) in shown for _, _, t in claims)
        assert len(re.findall(r"<t>", think)) == len(claims)  # every time is part of a claim
        assert 15 <= len(re.sub(r"<[^>]+>", " ", think).split()) <= 70
        if r["task"] == "temporal QA":
            s, e = (float(x) for x in SPAN.fullmatch(answer).groups())
            assert [s, e] == r["meta"]["span"] and len(claims) >= 2
            assert all(s <= float(t) <= e for _, _, t in claims)
        else:
            assert answer == r["answer"]
            times = {kf["time"] for kf in r["key_frames"]}
            assert {float(t) for _, _, t in claims} == times


def test_round_trip_decode_matches_png_and_boxes(generated):
    checked = 0
    for out, r in records(generated):
        if not r["key_frames"]:
            continue
        dec = VideoDecoder(str(out / r["video_path"]))
        assert dec.metadata.num_frames == r["meta"]["n_frames"]
        assert dec.metadata.width == dec.metadata.height == synth.SIZE
        times = [kf["time"] for kf in r["key_frames"]]
        batch = dec.get_frames_played_at(seconds=times)
        for kf, frame in zip(r["key_frames"], batch.data):  # frame: (3, H, W) uint8
            png = torch.from_numpy(np.array(Image.open(out / kf["path"])))
            png = png.permute(2, 0, 1).float()
            assert (frame.float() - png).abs().mean() < 3.0  # codec tolerance (2.06 seen on the gradient background)
            for name, boxes in r["key_items"][str(kf["idx"])].items():
                colour = torch.tensor(synth.COLOURS[name.split()[0]], dtype=torch.float32)
                x1, y1, x2, y2 = boxes[0]
                cx, cy = round((x1 + x2) / 2 * synth.SIZE), round((y1 + y2) / 2 * synth.SIZE)
                patch = frame[:, cy - 1:cy + 2, cx - 1:cx + 2].float().mean((1, 2))  # (3,)
                assert (patch - colour).abs().max() < 30, (r["id"], name, patch, colour)
            checked += 1
    assert checked > 0


def test_vstar_layout(generated):
    out, result = generated
    vstar = json.loads((out / "vstar_test.json").read_text())
    assert len(vstar) == N_TEST and result["vstar"] == vstar
    train_vids = [v["vid"] for v in json.loads((out / "vstar_train.json").read_text())]
    assert train_vids == [r["id"] for r in result["train"]]      # every clip of every split has one
    fields = {"vid", "domain", "fps", "width", "height", "frame_count", "question", "chain",
              "object", "answer", "temporal_question", "timestamps", "spatial_question",
              "spatial_question_2", "bboxes"}
    for v in vstar:
        assert set(v) == fields
        assert (out / "videos" / f"{v['vid']}.mp4").is_file()
        s, e = v["timestamps"]
        assert 0 <= s < e <= v["frame_count"] / v["fps"]
        assert v["chain"].startswith("<think>") and v["chain"].endswith("</think>")
        assert v["bboxes"]
        for b in v["bboxes"]:
            assert set(b) == {"timestamp", "frame_index", "xmin", "ymin", "xmax", "ymax"}
            assert s <= b["timestamp"] <= e and b["frame_index"] == b["timestamp"] * v["fps"]
            assert 0 <= b["xmin"] < b["xmax"] <= v["width"]
            assert 0 <= b["ymin"] < b["ymax"] <= v["height"]


def test_cli_reads_the_config_in_both_spellings():
    cfg = config.parse_args(["--n-train=7", "--n_val=3", "--difficulty=0.25"], prog="synth.py")
    assert (cfg.n_train, cfg.n_val, cfg.difficulty) == (7, 3, 0.25)
    with pytest.raises(SystemExit):
        config.parse_args(["--difficulty=2"], prog="synth.py")


def test_gradient_background_changes_the_background_only(tmp_path):
    """--background=gradient: the same clips and records; frames differ where no object is."""
    cfgs = [config.Config(data_dir=str(tmp_path / bg), n_train=1, n_val=0, n_test=0, seed=3, synth_workers=1,
                          background=bg) for bg in ("flat", "gradient")]
    flat, grad = [synth.generate(c)["train"][0] for c in cfgs]
    assert flat["reasoning_process"] == grad["reasoning_process"]
    frames = [VideoDecoder(str(tmp_path / bg / flat["video_path"])).get_frame_at(0).data.float()
              for bg in ("flat", "gradient")]
    corner = lambda f: f[:, :4, :4].mean((1, 2))  # noqa: E731  (h264 blurs; a corner is far from objects)
    assert (corner(frames[0]) - corner(frames[1])).abs().max() > 20


def test_every_trace_fits_the_rl_and_eval_budgets():
    """RL samples at most max_new_tokens: a budget below the traces SFT teaches would cut the longest
    (then unformatted, unrewarded) and teach RL to drop claims. 300 scenes' three traces each, in the
    tokens of the default base model (its 112-pixel frames are synth's, so the boxes are as SFT writes them)."""
    cfg = config.Config()
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    rng = random.Random(0)
    longest = 0
    for _ in range(300):
        scene = synth.make_scene(rng, rng.random() < 0.5)
        story = synth.tell(scene)
        s, e = scene.span
        for text in (synth.completion(story.think, story.answer),
                     synth.completion(synth.mcq_think(story, "D"), "D"),
                     synth.completion(story.when_think, synth.span_text(s, e))):
            longest = max(longest, len(model.encode_text(tok, text)) + 1)             # + <|im_end|>
    assert 90 < longest <= min(cfg.max_new_tokens, cfg.eval_max_new_tokens)


def test_fixed_mcq_options_say_the_letter_and_leave_the_clips_alone(tmp_path):
    """--mcq_options=fixed: each answer kind has one option list in one order, so a word fixes its
    letter (red is always A); the clips, the other records and the random draw stay as drawn."""
    assert synth.fixed_options("blue") == ["red", "green", "blue", "yellow"]
    assert synth.fixed_options("left") == ["up", "down", "left", "right"]
    assert synth.fixed_options("yellow triangle") == ["red triangle", "green triangle", "blue triangle",
                                                      "yellow triangle"]
    recs = {}
    for rule in ("drawn", "fixed"):
        cfg = config.Config(data_dir=str(tmp_path / rule), n_train=40, n_val=0, n_test=0, seed=3,
                            synth_workers=1, mcq_options=rule)
        recs[rule] = synth.generate(cfg)["train"]
    mcqs = 0
    for drawn, fixed in zip(recs["drawn"], recs["fixed"]):
        assert fixed["meta"]["mcq_options"] == "fixed" and drawn["meta"]["mcq_options"] == "drawn"
        if drawn["task"] != "General video QA MCQ":
            assert drawn == {**fixed, "meta": {**fixed["meta"], "mcq_options": "drawn"}}
            continue
        mcqs += 1
        truth, options = fixed["meta"]["answer_text"], fixed["meta"]["options"]
        assert options == synth.fixed_options(truth) and fixed["answer"] == "ABCD"[options.index(truth)]
        assert fixed["question"].endswith("\n".join(f"{k}. {o}" for k, o in zip("ABCD", options)))
        assert fixed["reasoning_process"].endswith(f"That is option {fixed['answer']}.</think>"
                                                   f"<answer>{fixed['answer']}</answer>")
        assert drawn["meta"]["answer_text"] == truth and drawn["key_items"] == fixed["key_items"]
    assert mcqs >= 5
    for sub in ("videos", "frames"):
        a, b = tmp_path / "drawn" / sub, tmp_path / "fixed" / sub
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    with pytest.raises(ValueError, match="options_rule"):
        synth.mcq(synth.tell(synth.make_scene(random.Random(0), False)), random.Random(0), "sorted")
