"""Shared fixtures: a small synthetic STGR set and a tiny Qwen2.5-VL built from it (once per session)."""
import copy
import json
import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A few synthetic records of every task, videos and key frames on disk. -> data folder path."""
    import synth
    import train
    out = tmp_path_factory.mktemp("synth")
    synth.generate(train.Config(data_dir=str(out), n_train=12, n_val=2, n_test=6, seed=3, synth_workers=1))
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data, tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint (save_pretrained layout) whose tokenizer knows the data."""
    import model
    import train
    out = str(tmp_path_factory.mktemp("tiny_model"))
    records = json.load(open(os.path.join(tiny_data, "train.json")))
    model.build_tiny_model(out, train.tokenizer_corpus(records), seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    import model
    return model.load_policy(tiny_model_dir)


@pytest.fixture(scope="session")
def sharp(tiny_policy):
    """The tiny policy with larger random text weights: a fresh model greedily repeats one token
    whatever it reads; this one answers each prompt differently, so a wrong row, position or turn
    in batched decoding shows."""
    model, tok, vision = tiny_policy
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "visual" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model, tok, vision
