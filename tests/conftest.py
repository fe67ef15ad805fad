"""Shared fixtures: a small synthetic STGR set and a tiny Qwen2.5-VL built from it (once per session)."""
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
