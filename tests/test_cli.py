"""End to end at the tiny preset: train -> sample CLI -> evaluate; and the CLIs' errors for bad input."""
import json
import os

import pytest
import torch

import common
import evaluate
import sample
import train
import world

TINY = ["--preset=tiny", "--batch_size=8", "--eval_n=0", "--quiet", "--log_every=5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "base"
    return train.train(common.parse_config(train.Config(), TINY + [f"--out={out}", "--steps=10", "--eval_n=4"]))


def sample_cli(*args):
    return sample.main(common.parse_config(sample.Config(), list(args)))


def test_train_sample_evaluate_end_to_end(ckpt, tmp_path, monkeypatch):
    png = tmp_path / "s.png"
    sample_cli(f"--ckpt={ckpt}", "--prompt=a large red circle in the center on a white background", "--n=3",
               "--steps=2", f"--out={png}")
    from PIL import Image
    assert Image.open(png).size == (3 * 32, 32)
    assert os.path.exists(os.path.join(os.path.dirname(ckpt), "samples.png"))
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(ckpt), "log.jsonl"))]
    assert 0 <= rows[-1]["eval"]["t2i"]["success"] <= 1 and "shape" in rows[-1]["eval"]["t2i"]  # end-of-run eval
    monkeypatch.chdir(tmp_path)
    res = evaluate.main(common.parse_config(evaluate.Config(), [f"--ckpts=tiny={ckpt}", "--n=4", "--steps=2",
                                                               "--tasks=t2i,local_edit", "--name=e2e"]))
    assert set(res["tiny"]) == {"t2i", "t2i 1 object", "t2i 2 objects", "t2i held-out pairs"}  # not trained: edits
    assert all(0 <= m["success"] <= 1 for m in res["tiny"].values())
    table = (tmp_path / "results" / "e2e.md").read_text()
    assert "| tiny |" in table and json.load(open(tmp_path / "results" / "e2e.json"))["results"]["tiny"]


def test_sample_cli_errors(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="unknown word 'teal'"):
        sample_cli(f"--ckpt={ckpt}", "--prompt=a teal circle")
    with pytest.raises(SystemExit, match="was trained for t2i, not local_edit"):
        sample_cli(f"--ckpt={ckpt}", "--task=local_edit", "--prompt=make the red circle blue", "--image=x.png")
    with pytest.raises(SystemExit, match="missing checkpoint"):
        sample_cli("--ckpt=nope.pt", "--prompt=a red circle")
    with pytest.raises(SystemExit, match="unknown option '--stpes=3'"):
        sample_cli(f"--ckpt={ckpt}", "--prompt=a red circle", "--stpes=3")
    world.to_pil(torch.zeros(3, 48, 48)).save(tmp_path / "big.png")
    edit = train.train(common.parse_config(train.Config(), TINY + [f"--out={tmp_path / 'e'}", "--steps=1",
                                                                  "--task=local_edit", f"--init_from={ckpt}"]))
    with pytest.raises(SystemExit, match="is 48x48, expected 32x32"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue",
                   f"--image={tmp_path / 'big.png'}")
    with pytest.raises(SystemExit, match="missing image file"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue", "--image=none.png")
    with pytest.raises(SystemExit, match="needs --image"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue")
