"""train.py: config overrides, SFT lowers the loss, atomic checkpoints, exact resume, torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data as D
import model as M
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_type_checked():
    cfg = T.parse_args(["--lr=0.5", "--train_vision=false", "--stage=sft", "--group_size=3"])
    assert (cfg.lr, cfg.train_vision, cfg.stage, cfg.group_size) == (0.5, False, "sft", 3)
    assert T.parse_args(["--reward_rules=released"]).reward_rules == "released"
    for bad in (["--lr=fast"], ["--nope=1"], ["lr=1"], ["--train_vision=maybe"], ["--group_size=2.5"],
                ["--ratio=tokens"], ["--stage=pretrain"], ["--sd_condition=both"], ["--reward_rules=release"]):
        with pytest.raises(SystemExit):
            T.parse_args(bad)


def sft_cfg(tiny_data, out, **kw):
    base = dict(stage="sft", out_dir=str(out), data_dir=tiny_data, batch_size=4, sft_epochs=1.0, lr=3e-3,
                sft_warmup=1, save_every=100, max_frames=8)
    base.update(kw)
    return T.Config(**base)


def fixed_batch_loss(path, tiny_data, cfg):
    model, tok, vision = M.load_policy(path)
    recs = D.load_records(os.path.join(tiny_data, "train.json"))[:4]
    with torch.no_grad():
        return T.sft_loss(M.LogProbModule(model), [T.sft_example(r, tok, vision, cfg) for r in recs]).item()


def test_sft_steps_lower_the_loss(tiny_data, tiny_model_dir, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, sft_epochs=2.0)
    rt = T.setup_runtime(cfg)
    before = fixed_batch_loss(tiny_model_dir, tiny_data, cfg)
    ckpt = T.stage_sft(cfg, rt, tiny_model_dir)
    after = fixed_batch_loss(ckpt, tiny_data, cfg)
    assert after < before - 0.5, (before, after)
    rows = [json.loads(l) for l in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    state = T.load_trainer_state(ckpt)
    assert state["done"] and state["step"] == 6


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    full = sft_cfg(tiny_data, tmp_path / "full", sft_epochs=2.0)
    rt = T.setup_runtime(full)
    T.stage_sft(full, rt, tiny_model_dir)

    crash = sft_cfg(tiny_data, tmp_path / "crash", sft_epochs=2.0, save_every=2)
    real_step = T.sft_step

    def crashing_step(*args):                                    # args[8] is the step
        if args[8] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(T, "sft_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        T.stage_sft(crash, rt, tiny_model_dir)
    assert T.load_trainer_state(str(tmp_path / "crash" / "sft" / "last"))["step"] == 2
    assert not os.path.exists(tmp_path / "crash" / "sft" / "last.tmp")
    monkeypatch.setattr(T, "sft_step", real_step)
    T.stage_sft(crash, rt, tiny_model_dir)                       # resumes at step 2

    losses = lambda p: [json.loads(l)["loss"] for l in open(p / "sft" / "metrics.jsonl")]
    full_l, crash_l = losses(tmp_path / "full"), losses(tmp_path / "crash")
    assert crash_l[-3:] == pytest.approx(full_l[-3:], abs=1e-6)  # steps 4..6 after the resume
    a, _, _ = M.load_policy(str(tmp_path / "full" / "sft" / "last"))
    b, _, _ = M.load_policy(str(tmp_path / "crash" / "sft" / "last"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_checkpoint_write_is_atomic(tiny_policy, tmp_path, monkeypatch):
    model, tok, vision = tiny_policy
    path = str(tmp_path / "ck")
    T.save_checkpoint(path, model, tok, vision, {"step": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        T.save_checkpoint(path, model, tok, vision, {"step": 2})
    monkeypatch.undo()
    assert T.load_trainer_state(path)["step"] == 1               # the old checkpoint is intact
    M.load_policy(path)


def test_frozen_vision_tower_stays_frozen(tiny_data, tiny_model_dir, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, train_vision=False, sft_epochs=0.5)
    ckpt = T.stage_sft(cfg, T.setup_runtime(cfg), tiny_model_dir)
    a, _, _ = M.load_policy(tiny_model_dir)
    b, _, _ = M.load_policy(ckpt)
    va, vb = dict(a.model.visual.named_parameters()), dict(b.model.visual.named_parameters())
    assert all(torch.equal(va[n], vb[n]) for n in va)
    assert not torch.equal(a.model.language_model.layers[0].mlp.up_proj.weight,
                           b.model.language_model.layers[0].mlp.up_proj.weight)


def test_two_process_torchrun_sft(tiny_data, tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage=sft", f"--model={tiny_model_dir}", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}",
           "--batch_size=4", "--sft_epochs=0.7", "--max_frames=8", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = T.load_trainer_state(str(tmp_path / "sft" / "last"))
    assert state["done"] and state["step"] == 2
