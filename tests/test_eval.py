"""eval.py inference: an STGR run writes predictions and a summary; 2 processes equal 1."""
import json
import os
import subprocess
import sys

import eval as E
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_writes_predictions_and_summary(tiny_data, tiny_policy, tmp_path):
    cfg = E.EvalConfig(model="tiny", data=os.path.join(tiny_data, "test.json"), out=str(tmp_path), max_new_tokens=8,
                       max_frames=6)
    summary = E.evaluate(cfg, tiny_policy)
    preds = [json.loads(l) for l in open(tmp_path / "stgr_predictions.jsonl")]
    assert len(preds) == summary["n"] == 6
    assert {"id", "completion", "answer", "correct"} <= set(preds[0])
    assert json.load(open(tmp_path / "stgr_summary.json"))["n"] == 6
    assert "| tiny |" in open(tmp_path / "stgr_summary.md").read()


def test_vstar_eval_runs_end_to_end(tiny_data, tiny_policy, tmp_path):
    cfg = E.EvalConfig(model="tiny", data=os.path.join(tiny_data, "vstar_test.json"), out=str(tmp_path),
                       max_new_tokens=6, max_frames=6, limit=2)
    summary = E.evaluate(cfg, tiny_policy)
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
