"""The perception stage (train.stage_pretrain): probe.py's single-frame tasks before SFT, with the
SFT stage's checkpointed loop: it trains, resumes exactly, reports held-out frames, hands its model
to SFT, and a bad task mix stops the run before any stage."""
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import model
import probe
import synth
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pre_cfg(out, **kw):
    base = dict(stage="pretrain", out_dir=str(out), pretrain_steps=4, pretrain_batch=4, pretrain_lr=3e-3,
                sft_warmup=1, save_every=100, pretrain_tasks="find:1,marked:1,list:1")
    base.update(kw)
    return train.Config(**base)


def perception_loss(path, cfg):
    """The SFT loss on 8 fixed held-out-style frames of the stage's tasks."""
    vlm, tok, vision = model.load_policy(path)
    tasks = train.perception_tasks(cfg)
    rng = random.Random("fixed")
    batch = [probe.encode(probe.training_sample(rng, tasks, 0), tok, vision, tasks.prompt) for _ in range(8)]
    with torch.no_grad():
        return train.sft_loss(model.LogProbModule(vlm), batch).item()


def test_pretrain_lowers_the_perception_loss_and_reports_held_out_frames(tiny_model_dir, tmp_path):
    cfg = pre_cfg(tmp_path, pretrain_steps=6)
    before = perception_loss(tiny_model_dir, cfg)
    ckpt = train.stage_pretrain(cfg, train.setup_runtime(cfg), tiny_model_dir)
    assert ckpt == train.stage_model(cfg, "pretrain")
    assert perception_loss(ckpt, cfg) < before - 0.5
    rows = [json.loads(l) for l in open(tmp_path / "pretrain" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    scores = json.load(open(tmp_path / "pretrain" / "heldout.json"))
    assert set(scores) == {"box_miou", "box_iou50", "marked_acc", "marked_colour_acc", "marked_kind_acc",
                           "find_name_acc", "parsed"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_zero_steps_pass_the_model_through(tiny_model_dir, tmp_path):
    cfg = pre_cfg(tmp_path, pretrain_steps=0)
    assert train.stage_pretrain(cfg, train.setup_runtime(cfg), tiny_model_dir) == tiny_model_dir
    assert not (tmp_path / "pretrain").exists()


def test_a_resumed_pretrain_equals_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    """The frames are a function of (seed, step, rank), so a run killed after step 2 and resumed
    trains on the frames the unbroken run saw and ends with its weights."""
    full = pre_cfg(tmp_path / "full")
    rt = train.setup_runtime(full)
    train.stage_pretrain(full, rt, tiny_model_dir)
    crash = pre_cfg(tmp_path / "crash", save_every=2)
    real = train.sft_loss

    def crashing(policy, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt("simulated crash in step 3")
        return real(policy, batch)

    monkeypatch.setattr(train, "sft_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train.stage_pretrain(crash, rt, tiny_model_dir)
    assert train.load_trainer_state(train.checkpoints(str(tmp_path / "crash" / "pretrain"))[-1][1])["step"] == 2
    monkeypatch.setattr(train, "sft_loss", real)
    train.stage_pretrain(crash, rt, tiny_model_dir)
    a = model.load_policy(train.stage_model(full, "pretrain"))[0].state_dict()
    b = model.load_policy(train.stage_model(crash, "pretrain"))[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_sft_starts_from_the_pretrained_model(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    os.makedirs(out)
    os.symlink(tiny_model_dir, out / "base")
    seen = []
    monkeypatch.setattr(train, "stage_sft", lambda cfg, rt, start: seen.append(start) or start)
    common = ["--pretrain_steps=2", "--pretrain_batch=2", f"--out_dir={out}", f"--data_dir={tiny_data}",
              "--base_model=tiny"]
    train.main(["--stage=pretrain"] + common)
    train.main(["--stage=sft"] + common)                     # a later call finds the stage's model
    train.main(["--stage=sft", f"--out_dir={out}", f"--data_dir={tiny_data}", "--base_model=tiny"])  # the base
    assert seen == [train.stage_model(train.Config(out_dir=str(out)), "pretrain"), str(out / "base")]


@pytest.mark.parametrize("mix, says", [("find:1,look:1", "'look' is not one of find, marked, list"),
                                       ("find", "expected task:weight"), ("find:0,marked:0", "not all 0"),
                                       ("find:-1,marked:2", "must be >= 0")])
def test_a_bad_task_mix_stops_the_run_before_any_stage(mix, says, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(["--pretrain_steps=5", f"--pretrain_tasks={mix}", f"--out_dir={tmp_path}"])
    assert "--pretrain_tasks" in str(stop.value) and says in str(stop.value)
    assert not os.listdir(tmp_path)


def test_two_process_torchrun_pretrain(tiny_model_dir, tmp_path):
    """Two ranks draw their own frames, sync gradients, and both decode the held-out frames."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage=pretrain", f"--model={tiny_model_dir}", f"--out_dir={tmp_path}", "--pretrain_steps=2",
           "--pretrain_batch=4", "--device=cpu"]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = train.load_trainer_state(train.checkpoints(str(tmp_path / "pretrain"))[-1][1])
    assert state["done"] and state["step"] == 2
    assert set(json.load(open(tmp_path / "pretrain" / "heldout.json"))) >= {"box_miou", "marked_acc"}


def test_sft_perception_adds_perception_frames_to_each_batch(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    cfg = train.Config(stage="sft", out_dir=str(tmp_path), data_dir=tiny_data, batch_size=4, sft_epochs=0.7,
                       sft_warmup=1, max_frames=8, sft_vstar_turns=0, sft_perception=0.5, sft_forward_batch=0)
    seen, real = [], train.sft_loss
    monkeypatch.setattr(train, "sft_loss", lambda policy, batch, n=None, pointer=None: seen.append(batch) or real(policy, batch, n, pointer))
    train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    tok = model.load_policy(tiny_model_dir)[1]
    assert [len(b) for b in seen] == [6, 6]                 # 4 records + 0.5 x 4 perception frames, 2 steps
    assert not torch.equal(seen[0][4][0].pixel_values, seen[1][4][0].pixel_values)   # fresh frames every step
    records = [tok.decode(t) for _, t in seen[0][:4]]
    frames = [tok.decode(t) for _, t in seen[0][4:]]
    assert all("<think>" in t for t in records) and not any("<think>" in t for t in frames)
    assert all(t.startswith("<obj>") for t in frames)
    assert all(p.image_grid_thw.shape[0] == 1 for p, _ in seen[0][4:])     # one frame each


def test_sft_perception_weight_gives_the_perception_samples_their_own_token_mean(tiny_data, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """A perception answer is a few tokens beside a trace's hundred: with the weight, the records' NLL
    is per record token and the perception samples' per their own token, times the weight."""
    cfg = train.Config(stage="sft", out_dir=str(tmp_path), data_dir=tiny_data, batch_size=4, sft_epochs=0.7,
                       sft_warmup=1, max_frames=8, sft_vstar_turns=0, sft_perception=0.5, sft_forward_batch=0,
                       sft_perception_weight=2.0)
    calls, real = [], train.sft_loss
    monkeypatch.setattr(train, "sft_loss", lambda policy, batch, n=None, pointer=None:
                        calls.append((batch, n)) or real(policy, batch, n, pointer))
    train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    tok = model.load_policy(tiny_model_dir)[1]
    assert len(calls) == 4                                   # 2 steps x (records, perception frames)
    for (records, n_records), (frames, n_frames) in zip(calls[::2], calls[1::2]):
        assert len(records) == 4 and all("<think>" in tok.decode(t) for _, t in records)
        assert len(frames) == 2 and not any("<think>" in tok.decode(t) for _, t in frames)
        assert n_records == sum(len(t) for _, t in records)
        assert n_frames == sum(len(t) for _, t in frames) / 2.0
        assert n_frames * 10 < n_records                     # why: in one mean the frames would weigh little


def test_a_fresh_run_starts_from_base_model_and_model_overrides_it(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    out, other = tmp_path / "run", tmp_path / "other"
    common = [f"--out_dir={out}", f"--data_dir={tiny_data}", f"--base_model={tiny_model_dir}",
              f"--background={json.load(open(os.path.join(tiny_data, 'train.json')))[0]['meta']['background']}"]
    seen = []

    class Stop(Exception):
        pass

    def sft(cfg, rt, start):
        seen.append(start)
        raise Stop
    monkeypatch.setattr(train, "stage_sft", sft)
    train.main(["--stage=data"] + common)
    assert not (out / "base").exists()                       # no random model is built
    for extra in ([], [f"--model={other}"]):
        with pytest.raises(Stop):
            train.main(["--stage=all"] + common + extra)
    assert seen == [tiny_model_dir, str(other)]              # --model is not lost to the data stage


def test_a_synthetic_set_drawn_on_the_other_background_stops_the_run(tiny_data, tmp_path):
    drawn = json.load(open(os.path.join(tiny_data, "train.json")))[0]["meta"]["background"]
    other = {"flat": "gradient", "gradient": "flat"}[drawn]
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage=data", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", f"--background={other}"])
    says = str(stop.value)
    assert "train.json" in says and "train_00000" in says and f"meta.background is '{drawn}'" in says
    train.main(["--stage=data", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", f"--background={drawn}",
                f"--base_model={tmp_path}"])                 # the matching background passes (no model built)
    with pytest.raises(SystemExit, match="--base_model=.*no config.json"):
        train.main(["--stage=sft", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", f"--base_model={tmp_path}"])


def test_a_synthetic_set_drawn_with_other_mcq_options_stops_the_run(tiny_data, tmp_path):
    """The set's meta.mcq_options against --mcq_options; a set written before the field was drawn."""
    meta = json.load(open(os.path.join(tiny_data, "train.json")))[0]["meta"]
    common = [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", f"--background={meta['background']}",
              f"--base_model={tmp_path}"]
    drawn = meta.get("mcq_options", "drawn")
    other = {"drawn": "fixed", "fixed": "drawn"}[drawn]
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage=data", f"--mcq_options={other}"] + common)
    assert "train_00000" in str(stop.value) and f"meta.mcq_options is '{drawn}'" in str(stop.value)
    train.main(["--stage=data", f"--mcq_options={drawn}"] + common)  # the matching rule passes


def test_the_clip_tasks_join_the_stage_mix(tmp_path):
    tasks = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="find:1,at:2,when:1,qa:1"))
    assert (tasks.find_weight, tasks.marked_weight, tasks.at_weight, tasks.when_weight, tasks.qa_weight) == \
        (1.0, 0.0, 2.0, 1.0, 1.0)
    rng = random.Random(0)
    drawn = {probe.training_sample(rng, tasks, 0).task for _ in range(40)}
    assert drawn == {"find", "at", "when", "qa"}


def test_perception_samples_follow_a_question_first_model_and_the_asked_events(tiny_model_dir, tmp_path):
    """A model that reads the question before the frames (question_at before or both: probe.py's clip
    models) gets SFT's perception frames and clips with the question before the first image token; a
    model in Qwen2.5-VL's layout keeps the stage's own (the question after the frame). Clips follow
    the model's own layout: a both-layout model's clips ask after the frames too, as its records do."""
    _, tok, vision = model.load_policy(tiny_model_dir)
    cfg = pre_cfg(tmp_path, pretrain_tasks="find:1,when:1", pretrain_when_events="appear")
    tasks = train.perception_tasks(cfg)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for layout, first in (("after", False), ("both", True), ("before", True)):
        run = SimpleNamespace(tokenizer=tok, vision=dataclasses.replace(vision, question_at=layout))
        batch = train.perception_batch(cfg, SimpleNamespace(rank=0), run, tasks, 0, 12, "sft0")
        kinds = set()
        for prompt, _ in batch:
            ids = prompt.input_ids.flatten().tolist()
            text, after = tok.decode(ids[:ids.index(pad)]), tok.decode(ids[len(ids) - ids[::-1].index(pad):])
            kind = "clip" if prompt.image_grid_thw.shape[0] > 1 else "frame"
            kinds.add(kind)
            assert ("?" in text) == first, (layout, text)   # every probe question ends in "?"
            if kind == "clip":
                assert ("?" in after) == (layout != "before"), (layout, after)
        assert kinds == {"clip", "frame"}
    rng = random.Random(1)
    whens = [s for s in (probe.training_sample(rng, tasks, 0) for _ in range(40)) if s.task == "when"]
    assert whens and all(s.question.endswith("visible?") for s in whens), [s.question for s in whens]  # appear's question
    everything = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="when:1"))   # the default: every event
    assert not all(probe.training_sample(rng, everything, 0).question.endswith("visible?") for _ in range(20))
    with pytest.raises(SystemExit, match="--pretrain_when_events"):
        train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="when:1", pretrain_when_events="appear,jump"))
    colour = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="qa:1", pretrain_qa_events="colour"))
    qas = [probe.training_sample(rng, colour, 0) for _ in range(20)]
    assert {(s.task, s.event) for s in qas} == {("qa", "colour")}, [s.question for s in qas]
    assert len({s.event for s in (probe.training_sample(rng, train.perception_tasks(
        pre_cfg(tmp_path, pretrain_tasks="qa:1")), 0) for _ in range(30))}) > 1   # the default: every event
    with pytest.raises(SystemExit, match="--pretrain_qa_events"):
        train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="qa:1", pretrain_qa_events="colour,jump"))
    traces = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="when:1", pretrain_when_answer="trace"))
    run = SimpleNamespace(tokenizer=tok, vision=dataclasses.replace(vision, question_at="both"))
    (_, target), = train.perception_batch(cfg, SimpleNamespace(rank=0), run, traces, 0, 1, "sft0")
    assert tok.decode(target).startswith("<think><obj>")          # the TG trace, not the span alone
    with pytest.raises(SystemExit, match="pretrain_when_answer"):
        train.parse_args(["--pretrain_when_answer=words"])
    for answer, opens in (("trace", "<think><obj>"), ("answer", "<answer>")):
        qa = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="qa:1", pretrain_qa_answer=answer))
        (_, target), = train.perception_batch(cfg, SimpleNamespace(rank=0), run, qa, 0, 1, "sft0")
        assert tok.decode(target).startswith(opens)               # the free-form trace, or the answer block alone
    letters = train.perception_tasks(pre_cfg(tmp_path, pretrain_tasks="letter:1"))
    (prompt, target), = train.perception_batch(cfg, SimpleNamespace(rank=0), run, letters, 0, 1, "sft0")
    assert tok.decode(prompt.input_ids).endswith(synth.MCQ_LEAD)   # the trace up to its letter, in the prompt
    assert re.fullmatch(r" ?([A-D])\.</think><answer>\1</answer><\|im_end\|>", tok.decode(target))
