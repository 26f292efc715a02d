"""End to end at the tiny preset: train -> sample CLI -> evaluate; and the CLIs' errors for bad input."""
import json
import os

import pytest
import torch

import common
import data
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
    model, _ = common.load_model(ckpt)  # the end-of-run evaluation is the scorer's verdict on the saved EMA model
    logged = [json.loads(line) for line in open(os.path.join(os.path.dirname(ckpt), "log.jsonl"))][-1]["eval"]["t2i"]
    assert logged == evaluate.evaluate_task(model, "t2i", 4, 32, "cpu")
    monkeypatch.chdir(tmp_path)
    res = evaluate.main(common.parse_config(evaluate.Config(), [f"--ckpts=tiny={ckpt}", "--n=4", "--steps=2",
                                                                "--tasks=t2i,local_edit", "--name=e2e"]))
    assert set(res["tiny"]) == {"t2i", "t2i 1 object", "t2i 2 objects", "t2i held-out pairs"}  # not trained: edits
    assert res["tiny"]["t2i 2 objects"] == evaluate.evaluate_task(model, "t2i", 4, 32, "cpu", n_objects=2, steps=2)
    table = (tmp_path / "results" / "e2e.md").read_text()
    row = "| tiny | " + " | ".join(f"{res['tiny'][c]['success']:.3f} (PSNR truth {res['tiny'][c]['psnr_truth']:.1f})"
                                   for c in res["tiny"]) + " |"
    assert row in table and json.load(open(tmp_path / "results" / "e2e.json"))["results"] == res


def test_sample_builds_the_condition_the_model_was_trained_with(tmp_path):
    """For an edit, an inpainting and a customisation, the CLI's model inputs from image files equal those of the
    training batch the files came from (8-bit PNG rounding aside): the same slots, channels and order."""
    for task, image, mask in (("local_edit", "cond", None), ("inpaint", "target", "mask"), ("customize", "ref", None)):
        b = data.make_batch(task, 1, 32, seed=3)
        world.to_pil(getattr(b, image)[0, :3]).save(tmp_path / "image.png")
        if mask:
            world.to_pil(b.mask[0].expand(3, -1, -1) * 2 - 1).save(tmp_path / "mask.png")
        cfg = common.parse_config(sample.Config(), ["--ckpt=" + __file__, f"--task={task}", f"--prompt={b.text[0]}",
                                                    f"--image={tmp_path / 'image.png'}", "--n=2"]
                                  + ([f"--mask={tmp_path / 'mask.png'}"] if mask else []))
        got, _ = sample.condition(cfg, 32, "cpu")
        want = common.model_inputs(b)
        for key in ("task", "tokens"):
            assert torch.equal(got[key], want[key].expand_as(got[key])), (task, key)
        for key in ("cond", "ref"):
            assert (got[key] is None) == (want[key] is None), (task, key)
            if want[key] is not None:
                assert (got[key] - want[key]).abs().max() <= 1 / 127.5 + 1e-6, (task, key)


def test_sample_cli_errors(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="unknown word 'teal'"):
        sample_cli(f"--ckpt={ckpt}", "--prompt=a teal circle")
    with pytest.raises(SystemExit, match="was trained for t2i, not local_edit"):
        sample_cli(f"--ckpt={ckpt}", "--task=local_edit", "--prompt=make the red circle blue", f"--image={__file__}")
    with pytest.raises(SystemExit, match="--ckpt=nope.pt: no such file"):
        sample_cli("--ckpt=nope.pt", "--prompt=a red circle")
    with pytest.raises(SystemExit, match="unknown option '--stpes=3'"):
        sample_cli(f"--ckpt={ckpt}", "--prompt=a red circle", "--stpes=3")
    world.to_pil(torch.zeros(3, 48, 48)).save(tmp_path / "big.png")
    edit = train.train(common.parse_config(train.Config(), TINY + [f"--out={tmp_path / 'e'}", "--steps=1",
                                                                   "--task=local_edit", f"--init_from={ckpt}"]))
    with pytest.raises(SystemExit, match="the image is 48x48, the model takes 32x32"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue",
                   f"--image={tmp_path / 'big.png'}")
    with pytest.raises(SystemExit, match="--image=none.png: no such file"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue", "--image=none.png")
    with pytest.raises(SystemExit, match="needs --image"):
        sample_cli(f"--ckpt={edit}", "--task=local_edit", "--prompt=make the red circle blue")
