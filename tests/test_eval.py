"""eval.py inference: an STGR run writes predictions and a summary (into the run, never the checkpoint);
2 processes equal 1; its flags."""
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import config
import data
import eval
import metrics
import model as M
import rewards
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_writes_predictions_and_summary(tiny_data, tiny_policy, tmp_path):
    cfg = train.Config(model="tiny", eval_data=os.path.join(tiny_data, "test.json"), eval_out=str(tmp_path),
                       eval_samples=0, eval_max_new_tokens=8, max_frames=6)
    summary = eval.evaluate(cfg, tiny_policy)
    preds = [json.loads(l) for l in open(tmp_path / "stgr_predictions.jsonl")]
    assert len(preds) == summary["n"] == 6
    assert {"id", "completion", "answer", "correct"} <= set(preds[0])
    assert json.load(open(tmp_path / "stgr_summary.json"))["n"] == 6
    records = json.load(open(os.path.join(tiny_data, "test.json")))
    boxes = sum(r["reasoning_process"].count("<box>") for r in records)
    assert boxes > 0 and summary["forced_box/n"] == boxes                     # every gold box read once
    assert sum(len(p.get("forced_boxes", [])) for p in preds) == boxes
    assert 0 <= summary["forced_box/mIoU"] <= 100
    names = sum(r["reasoning_process"].count("<obj>") for r in records)
    assert summary["forced_name/n"] == names == sum(len(p.get("forced_names", [])) for p in preds)
    claims = [r for r in records if "<obj>" in r["reasoning_process"]]
    assert 0 <= summary["name/first"] <= 100 and sum("first_name" in p for p in preds) == len(claims) > 0
    off = eval.evaluate(dataclasses.replace(cfg, eval_forced_boxes=False, eval_out=str(tmp_path / "off")), tiny_policy)
    assert not any(k.startswith("forced_") for k in off)
    assert "| tiny |" in open(tmp_path / "stgr_summary.md").read()


def test_eval_writes_into_the_run_never_into_the_checkpoint(tiny_data, tiny_model_dir, tiny_policy, tmp_path):
    before = sorted(os.listdir(tiny_model_dir))
    cfg = train.Config(model=tiny_model_dir, out_dir=str(tmp_path / "run"), eval_samples=1, eval_max_new_tokens=4,
                       eval_data=os.path.join(tiny_data, "test.json"), max_frames=4)
    eval.evaluate(cfg, tiny_policy)
    assert json.load(open(tmp_path / "run" / "eval" / "stgr_summary.json"))["n"] == 1
    assert sorted(os.listdir(tiny_model_dir)) == before              # the folder a user uploads is untouched
    with pytest.raises(SystemExit, match="inside the checkpoint"):
        eval.evaluate(dataclasses.replace(cfg, eval_out=os.path.join(tiny_model_dir, "eval")), tiny_policy)


def test_vstar_eval_runs_end_to_end(tiny_data, tiny_policy, tmp_path):
    cfg = train.Config(model="tiny", eval_data=os.path.join(tiny_data, "vstar_test.json"), eval_out=str(tmp_path),
                       eval_max_new_tokens=6, max_frames=6, eval_samples=2)
    summary = eval.evaluate(cfg, tiny_policy)
    assert summary["n"] == 2 and {"mAM", "mLGM", "Acc"} <= set(summary)
    rows = [json.loads(l) for l in open(tmp_path / "vstar_predictions.jsonl")]
    assert {"what", "when1", "where1", "where2", "when2"} <= set(rows[0])


def test_two_process_eval_equals_one_process(tiny_data, tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "eval.py",
               f"--model={tiny_model_dir}", f"--data={tiny_data}/test.json", f"--out={out}",
               "--max_new_tokens=10", "--max_frames=6"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = ([json.loads(l) for l in open(out / "stgr_predictions.jsonl")],
                   json.load(open(out / "stgr_summary.json")))
    assert [p["id"] for p in outs[2][0]] == [p["id"] for p in outs[1][0]]
    assert [p["completion"] for p in outs[2][0]] == [p["completion"] for p in outs[1][0]]
    assert outs[2][1] == outs[1][1]


def _benchmark_files(tiny_data, tmp_path):
    records = json.load(open(os.path.join(tiny_data, "test.json")))
    mcq = [{"question_id": r["id"], "videoID": os.path.splitext(r["video_path"])[0], "task_type": "synthetic",
            "question": r["question"].split("\nOptions:")[0],
            "options": r["question"].split("\nOptions:\n")[1].split("\n"), "answer": r["answer"]}
           for r in records if r["task"] == "General video QA MCQ"]
    tg = [{"video": r["video_path"], "query": r["question"], "span": json.loads(r["answer"])}
          for r in records if r["task"] == "temporal QA"]
    (tmp_path / "mcq.json").write_text(json.dumps(mcq))
    (tmp_path / "tg.json").write_text(json.dumps(tg))
    return len(mcq), len(tg)


def test_multiple_choice_and_temporal_grounding_files(tiny_data, tiny_policy, tmp_path):
    n_mcq, n_tg = _benchmark_files(tiny_data, tmp_path)
    assert n_mcq and n_tg, "the tiny synthetic test split has both kinds"
    for benchmark, n in (("mcq", n_mcq), ("tg", n_tg)):
        path = str(tmp_path / f"{benchmark}.json")
        assert eval.detect_benchmark(path) == benchmark
        cfg = eval.parse_eval_args(["--model=tiny", f"--data={path}", f"--data_root={tiny_data}",
                                    f"--out={tmp_path / benchmark}", "--max_new_tokens=8", "--max_frames=6"])
        summary = eval.evaluate(cfg, tiny_policy)
        assert summary["n"] == n
        assert ("Acc[task_type=synthetic]" in summary) if benchmark == "mcq" else ("R@0.5" in summary and "mIoU" in summary)
        assert len(open(tmp_path / benchmark / f"{benchmark}_predictions.jsonl").readlines()) == n


def test_grounding_file_with_a_bad_span_names_the_field(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "a.mp4", "query": "x", "span": [3, 1]}]))
    import pytest
    with pytest.raises(ValueError, match=r"bad.json: sample 0: field 'span'"):
        metrics.load_grounding(str(tmp_path / "bad.json"))


def test_eval_flags_keep_their_names_and_help_lists_every_field(capsys):
    cfg = eval.parse_eval_args(["--model=m", "--data=d.json", "--kind=vstar", "--out=o", "--limit=3",
                                "--max_new_tokens=7", "--temperature=0.5", "--fps=1.0"])
    assert (cfg.eval_data, cfg.benchmark, cfg.eval_out, cfg.eval_samples) == ("d.json", "vstar", "o", 3)
    assert (cfg.eval_max_new_tokens, cfg.eval_temperature, cfg.fps) == (7, 0.5, 1.0)
    assert cfg.max_new_tokens == train.Config().max_new_tokens      # the RL field is untouched
    assert eval.parse_eval_args(["--model=m", "--data=d.json"]).eval_samples == 0   # eval.py: every sample
    import pytest
    for bad in (["--model=m", "--data=d.json", "--kind=videomme"], ["--model=m"]):
        with pytest.raises(SystemExit):
            eval.parse_eval_args(bad)
    with pytest.raises(SystemExit) as done:
        eval.parse_eval_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--eval_samples=0 " in text and "--kind (= --benchmark)" in text
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}=" in text, f.name


def test_eval_takes_the_training_pixel_budget(tiny_data, tiny_policy):
    import config
    import data
    _, tokenizer, vision = tiny_policy
    rec = data.load_records(os.path.join(tiny_data, "test.json"))[0]
    cfg = train.Config(max_frames=4, max_pixels=56 * 56)
    video = data.load_video_sample(rec, config.frames(dataclasses.replace(cfg, max_pixels=0)))   # full-size frames
    small = eval._input_for(tiny_policy, video, [rec["question"]], [], cfg, "rec", eval.one_process())
    full = eval._input_for(tiny_policy, video, [rec["question"]], [], dataclasses.replace(cfg, max_pixels=0), "rec",
                           eval.one_process())
    trained = train.model_input(cfg, eval.one_process(), tokenizer, vision, video, rec["question"])
    assert small.frame_size == trained.frame_size and small.frame_size[0] * small.frame_size[1] <= 56 * 56
    assert len(small) < len(full)


def test_batched_eval_equals_one_sample_at_a_time(tiny_data, sharp, tmp_path):
    for name, n in (("test.json", 6), ("vstar_test.json", 4)):
        out = {}
        for bp in (1, 4):                               # 6 samples: chunks of 4 and 2; V-STAR turns of 4 and 8
            cfg = train.Config(model="sharp", eval_data=os.path.join(tiny_data, name), eval_out=str(tmp_path / f"{bp}"),
                               eval_samples=n, eval_max_new_tokens=10, max_frames=6, eval_batch=bp)
            summary = eval.evaluate(cfg, sharp)
            kind = "vstar" if "vstar" in name else "stgr"
            out[bp] = summary, [json.loads(l) for l in open(tmp_path / f"{bp}" / f"{kind}_predictions.jsonl")]
        assert out[4] == out[1] and out[1][0]["n"] == n
        texts = [p[k] for p in out[1][1] for k in (("what", "when1", "where1", "where2", "when2")
                                                   if kind == "vstar" else ("completion",))]
        assert len(set(texts)) > len(texts) // 2          # the answers depend on the prompt


def test_forced_box_summary_hand_computed():
    pairs = [("[0,0,10,10]", "[0,0,10,10]"),       # IoU 1
             ("[0,0,10,10]", "[5,0,15,10]"),       # 50 / 150 = 1/3
             ("[0,0,10", "[0,0,10,10]"),           # not four numbers: 0, and still counted
             ("[1,2,3,4]", "[1,2,3]")]             # a gold box that is not a box: not counted
    s = metrics.forced_box_summary(pairs)
    assert s["forced_box/n"] == 3
    assert s["forced_box/mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0) / 3)
    assert s["forced_box/IoU50"] == pytest.approx(100 / 3)
    assert metrics.forced_box_summary([]) == {}


def test_forced_name_summary_hand_computed():
    pairs = [("red  circle", "red circle"),        # whitespace collapsed: same
             ("Red circle", "red circle"),         # any case: same
             ("red square", "red circle"),         # another object
             ("", "blue square")]                  # nothing named
    s = metrics.forced_name_summary(pairs)
    assert s == {"forced_name/acc": pytest.approx(50.0), "forced_name/n": 4}
    assert metrics.forced_name_summary([]) == {}


def test_first_name_compares_the_first_claims():
    rec = {"task": "temporal-spatial free-form QA", "question": "Which way does the red circle move?",
           "answer": "up", "reasoning_process": "<think><obj>red circle</obj><box>[1,2,3,4]</box>at<t>1.0</t>s "
                                                 "then <obj>blue square</obj><box>[5,6,7,8]</box></think><answer>up</answer>",
           "key_frames": [], "key_items": {}}
    ctx = rewards.RewardContext(frame_width=112, frame_height=112, progress=1.0)
    score = lambda text: metrics.score_stgr_sample(rec, text, ctx).get("first_name")
    assert score("<think><obj>Red circle</obj> moves</think><answer>up</answer>") == 1.0
    assert score("<think><obj>blue square</obj> then <obj>red circle</obj></think><answer>up</answer>") == 0.0
    assert score("<think>it moves</think><answer>up</answer>") == 0.0          # nothing named
    assert score("garbage") == 0.0
    assert score("<think><obj>red circle") == 0.0                              # never closed: no name
    assert metrics.first_object("</obj><obj> Red  circle </obj>") == "red circle"
    assert metrics.first_object("<obj>" * 50_000) is None                      # linear: two finds
    no_claims = dict(rec, reasoning_process="<think>it moves up</think><answer>up</answer>")
    assert "first_name" not in metrics.score_stgr_sample(no_claims, "x", ctx)   # the trace names nothing
    rows = [{"task": "t", "correct": 0.0, "first_name": 1.0}, {"task": "t", "correct": 1.0, "first_name": 0.0},
            {"task": "t", "correct": 1.0}]
    assert metrics.stgr_summary(rows)["name/first"] == pytest.approx(50.0)


def test_forced_spans_read_each_box_and_name_where_greedy_decoding_would(tiny_data, sharp):
    vlm, tok, vision = sharp
    cfg = train.Config(max_frames=4)
    rec = next(r for r in data.load_records(os.path.join(tiny_data, "test.json")) if "<box>" in r["reasoning_process"])
    video = data.load_video_sample(rec, config.frames(cfg))
    inputs = M.model_input(tok, vision, video, rec["question"])
    trace = data.trace_to_frame_pixels(rec["reasoning_process"], video.source_size, inputs.frame_size, "t")
    with torch.no_grad():
        spans = eval.forced_spans(vlm, tok, inputs, trace)
    pairs = spans["box"]
    assert [g for _, g in pairs] == re.findall(r"<box>(.*?)</box>", trace)      # every box, the gold text
    assert [g for _, g in spans["obj"]] == re.findall(r"<obj>(.*?)</obj>", trace)  # every name, the gold text
    # the first predicted token of the first box is the greedy next token after the trace up to its <box>
    prefix = M.encode_text(tok, trace[:trace.index("<box>") + len("<box>")])
    longer = M.Prompt(torch.cat([inputs.input_ids, torch.tensor(prefix)]),
                      torch.cat([inputs.mm_token_type_ids, torch.zeros(len(prefix), dtype=torch.int32)]),
                      inputs.pixel_values, inputs.image_grid_thw, inputs.frame_size)
    with torch.no_grad():
        ids, mask, _ = M.generate(vlm, longer, 1, 1, [], tok.pad_token_id, 0.0, 1.0, None)
    first = tok.decode(ids[0][mask[0]])
    assert first and pairs[0][0].startswith(first)


def test_forced_pointer_shares_where_head_0_looks_from_each_claim(tiny_data, sharp):
    """--eval_pointer_layer: one (box share, frame share) per gold claim; the frame share is the
    claim's rows' attention summed over the image tokens of the frame shown nearest its time (by hand
    for the first claim); without the flag nothing is read; the summary's means by hand."""
    vlm, tok, vision = sharp
    vlm = copy.deepcopy(vlm)
    vlm.set_attn_implementation("eager")
    rec = next(r for r in data.load_records(os.path.join(tiny_data, "test.json")) if "<box>" in r["reasoning_process"])
    video = data.load_video_sample(rec, config.frames(train.Config(max_frames=4)))
    inputs = M.model_input(tok, vision, video, rec["question"])
    trace = data.trace_to_frame_pixels(rec["reasoning_process"], video.source_size, inputs.frame_size, "t")
    with torch.no_grad():
        shares = eval.forced_spans(vlm, tok, inputs, trace, pointer_layer=1)["pointer"]
        assert "pointer" not in eval.forced_spans(vlm, tok, inputs, trace)
        ids = M.encode_text(tok, trace)
        out, _ = M.plain_forward(vlm, [inputs], [torch.tensor(ids)], output_attentions=True)
    claims = re.findall(r"<obj>[^<]*</obj><box>[^<]*</box>at<t>([^<]*)</t>", trace)
    assert len(shares) == len(claims) > 0 and all(0 <= b <= f <= 1 for b, f in shares)
    first, end = ids.index(tok.convert_tokens_to_ids("<obj>")) + 1, ids.index(tok.convert_tokens_to_ids("</t>"))
    k = min(range(len(video.times)), key=lambda i: abs(video.times[i] - float(claims[0])))
    image = (inputs.mm_token_type_ids == 1).nonzero()[:, 0]
    per = len(image) // len(video.times)
    rows = out.attentions[0][0, 0, len(inputs) - 1 + first:len(inputs) - 1 + end]
    assert shares[0][1] == pytest.approx(rows[:, image[k * per:(k + 1) * per]].sum(-1).mean().item(), rel=1e-5)
    assert metrics.forced_pointer_summary([(0.1, 0.5), (0.3, 0.7)]) == pytest.approx(
        {"forced_pointer/box": 20.0, "forced_pointer/frame": 60.0, "forced_pointer/n": 2})
    assert metrics.forced_pointer_summary([]) == {}
