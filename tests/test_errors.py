"""Every bad input to every script is answered before any work with one line that names the option or the file and
what is wrong (and the fix, where there is one): a non-zero exit, no traceback, no training started, and no file
under the working directory (out/, results/, ...) written or changed."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

import bench
import common
import distill_onpolicy as opd
import dual_process as dp
import evaluate
import feedback as fb
import judges
import sample
import self_distill as sd
import train
import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny", "--batch_size=4", "--eval_n=0", "--quiet"]


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """A working directory with finished tiny runs in out/ (a t2i base, a local-edit expert), a results table, and
    files that are bad in every way a user's file can be."""
    d = tmp_path_factory.mktemp("cwd")
    here = os.getcwd()
    os.chdir(d)
    try:
        base = train.train(common.parse_config(train.Config(), TINY + ["--steps=2", "--out=out/run"]))
        train.train(common.parse_config(train.Config(), TINY + ["--steps=1", "--task=local_edit", f"--init_from={base}",
                                                                "--out=out/edit"]))
    finally:
        os.chdir(here)
    os.makedirs(d / "results")
    (d / "results" / "table.md").write_text("| model | t2i |\n")
    world.to_pil(torch.zeros(3, 32, 32)).save(d / "ok.png")
    world.to_pil(torch.zeros(3, 48, 48)).save(d / "big.png")
    (d / "junk.png").write_bytes(b"not an image at all")
    (d / "cut.png").write_bytes((d / "ok.png").read_bytes()[:60])  # a truncated PNG
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    os.makedirs(d / "dir.png")
    (d / "bad.jsonl").write_text('{"task": "t2i", "prompt": "a red circle", "target_image": "ok.png"}\n'
                                 '{"task": t2i}\n'
                                 '{"task": "t2i", "prompt": 3, "target_image": "ok.png"}\n')
    (d / "cut.csv").write_text("task,prompt,target_image\nt2i,a red circle,cut.png\n")
    os.makedirs(d / "garbage" / "vlm")
    (d / "garbage" / "aesthetic.pt").write_bytes(b"\x80\x04garbage")
    return d


RUN = {"train": lambda a: train.train(common.parse_config(train.Config(), TINY + ["--steps=3"] + a)),
       "sample": lambda a: sample.main(common.parse_config(sample.Config(), [
           "--ckpt=out/run/ckpt.pt", "--prompt=a red circle", "--n=1", "--steps=1", "--out=new.png"] + a)),
       "evaluate": lambda a: evaluate.main(common.parse_config(evaluate.Config(), [
           "--ckpts=out/run/ckpt.pt", "--n=2", "--steps=1", "--name=x"] + a)),
       "distill_onpolicy": lambda a: opd.train(common.parse_config(opd.Config(), TINY + ["--steps=2"] + a)),
       "judges": lambda a: judges.main(common.parse_config(judges.Config(), [
           "--preset=tiny", "--quiet", "--out=jdir", "--results=jres", "--eval_n=2"] + a)),
       "bench": lambda a: bench.main(common.parse_config(bench.Config(), ["--device=cpu", "--preset=tiny"] + a)),
       "dual_process": lambda a: dp.train(common.parse_config(dp.Config(), ["--preset=tiny", "--quiet"] + a)),
       "self_distill": lambda a: sd.train(common.parse_config(sd.Config(), ["--preset=tiny", "--quiet"] + a)),
       "feedback": lambda a: fb.train(common.parse_config(fb.Config(), ["--preset=tiny", "--quiet"] + a))}
EDIT = "--ckpt=out/edit/ckpt.pt"
EDIT_ARGS = [EDIT, "--task=local_edit", "--prompt=make the red circle blue"]
CASES = [
    ("train", ["--steps=-1"], "--steps=-1: must be >= 1"),
    ("train", ["--steps=0"], "--steps=0: must be >= 1"),
    ("train", ["--batch_size=0"], "--batch_size=0: must be >= 1"),
    ("train", ["--warmup=0"], "--warmup=0: must be >= 1"),
    ("train", ["--ckpt_every=0"], "--ckpt_every=0: must be >= 1"),
    ("train", ["--lr=nan"], "--lr=nan: must be a finite number"),
    ("train", ["--lr=0"], "--lr=0.0: must be > 0"),
    ("train", ["--seed=-1"], "--seed=-1: must be >= 0"),
    ("train", ["--text_len=10"], "--text_len=10 is shorter than the longest edit instruction"),
    ("train", ["--preset=huge"], "--preset=huge: must be one of tiny, small, base"),
    ("train", ["--device=gpu"], "--device=gpu: must be one of auto, cpu, cuda"),
    ("train", ["--device=cuda"], "there is no CUDA device here (use --device=cpu, or auto)"),
    ("train", ["--task=paint"], "--task=paint: must be one of t2i, "),
    ("train", ["--task=joint", "--joint_tasks=t2i,t2i"], "--joint_tasks=t2i,t2i: an item twice"),
    ("train", ["--out="], "--out=: must not be empty"),
    ("train", ["--out=ok.png"], "--out=ok.png: is a file, not a directory"),
    ("train", ["--out=ok.png/run"], "ok.png is a file, so nothing can be written under it"),
    ("train", ["--init_from=nope.pt"], "--init_from=nope.pt: no such file"),
    ("train", ["--init_from=junk.pt", "--out=new"], "junk.pt is not a checkpoint of this project"),
    ("train", ["--resume", "--out=out/none"], "--resume: there is no out/none/ckpt.pt to continue"),
    ("train", ["--resume", "--out=out/run", "--steps=1"], "is at step 2, beyond --steps=1 (a resume only goes forward"),
    ("train", ["--stop_at=10", "--steps=5"], "--stop_at=10 is beyond --steps=5"),
    ("train", ["--out=out/run"], "out/run/ckpt.pt exists: pass --resume to continue it, or choose another --out"),
    ("train", ["--manifest=nope.jsonl"], "--manifest=nope.jsonl: no such file"),
    ("train", ["--manifest=bad.jsonl", "--out=new"], "bad.jsonl:2: not a JSON object"),
    ("train", ["--manifest=bad.jsonl", "--out=new"], "bad.jsonl:3: prompt must be a string, not int"),
    ("train", ["--manifest=cut.csv", "--out=new"], "cut.png: not a readable image"),
    ("train", ["--steps=many"], "--steps takes an int, not 'many'"),
    ("train", ["--quiet=maybe"], "--quiet takes true or false, not 'maybe'"),
    ("train", ["--lrr=1"], "unknown option '--lrr=1'"),
    ("sample", ["--ckpt="], "--ckpt=: must not be empty"),
    ("sample", ["--ckpt=nope.pt"], "--ckpt=nope.pt: no such file"),
    ("sample", ["--ckpt=junk.pt"], "junk.pt is not a checkpoint of this project"),
    ("sample", ["--steps=0"], "--steps=0: must be >= 1"),
    ("sample", ["--n=0"], "--n=0: must be >= 1"),
    ("sample", ["--shift=0"], "--shift=0.0: must be > 0"),
    ("sample", ["--out=x.gif"], "--out=x.gif: the file name must end in .png or .jpg or .jpeg"),
    ("sample", ["--out=dir.png"], "--out=dir.png: is a directory, not a file"),
    ("sample", ["--out=ok.png/x.png"], "ok.png is a file, so nothing can be written under it"),
    ("sample", ["--prompt=a teal circle"], "--prompt: unknown word 'teal'"),
    ("sample", ["--task=local_edit", "--prompt=make the red circle blue"], "--task=local_edit needs --image=PATH"),
    ("sample", ["--image=ok.png"], "--task=t2i takes no --image"),
    ("sample", ["--task=local_edit", "--image=ok.png"], "out/run/ckpt.pt was trained for t2i, not local_edit"),
    ("sample", EDIT_ARGS + ["--image=junk.png"], "junk.png: not a readable image"),
    ("sample", EDIT_ARGS + ["--image=cut.png"], "cut.png: not a readable image"),
    ("sample", EDIT_ARGS + ["--image=big.png"], "big.png: the image is 48x48, the model takes 32x32"),
    ("sample", EDIT_ARGS + ["--image=none.png"], "--image=none.png: no such file"),
    ("evaluate", ["--ckpts="], "--ckpts=: must not be empty"),
    ("evaluate", ["--ckpts=nope.pt"], "no such file: nope.pt"),
    ("evaluate", ["--ckpts=junk.pt"], "junk.pt is not a checkpoint of this project"),
    ("evaluate", ["--tasks=local_edit"], "out/run/ckpt.pt was trained for t2i, none of --tasks=local_edit"),
    ("evaluate", ["--tasks=paint"], "--tasks=paint: unknown item 'paint'"),
    ("evaluate", ["--teachers=nolabel"], "'nolabel' must be KEY=PATH with KEY one of t2i, "),
    ("evaluate", ["--teachers=local_edit=nope.pt"], "no such file: nope.pt"),
    ("evaluate", ["--name=../x"], "--name='../x' must be a file name or TOPIC/NAME"),
    ("evaluate", ["--n=0"], "--n=0: must be >= 1"),
    ("evaluate", ["--teachers=t2i=out/run/ckpt.pt", "--handover_at=0,four"], "each step must be a whole number"),
    ("evaluate", ["--handover_at=four"], "each step must be a whole number"),
    ("evaluate", ["--source_probe"], "--source_probe=true needs --teachers=TASK=PATH"),
    ("distill_onpolicy", ["--base=typo/ckpt.pt"], "--base=typo/ckpt.pt: no such file"),
    ("distill_onpolicy", ["--mode=sideways"], "--mode=sideways: must be one of onpolicy, offpolicy, dense"),
    ("distill_onpolicy", ["--steps=-1"], "--steps=-1: must be >= 0"),
    ("distill_onpolicy", ["--stop_at=10"], "--stop_at=10 is beyond --steps=2"),
    ("distill_onpolicy", ["--query_k=0"], "--query_k=0: must be >= 1"),
    ("distill_onpolicy", ["--rollin=2"], "--rollin=2.0: must be <= 1"),
    ("distill_onpolicy", ["--lr=inf"], "--lr=inf: must be a finite number"),
    ("distill_onpolicy", ["--tasks=t2i,paint"], "--tasks=t2i,paint: unknown item 'paint'"),
    ("distill_onpolicy", ["--experts=local_edit=nope.pt"], "no such file: nope.pt"),
    ("distill_onpolicy", ["--experts=paint=out/run/ckpt.pt"], "'paint=out/run/ckpt.pt' must be KEY=PATH with KEY"),
    ("distill_onpolicy", ["--compare=out/run/ckpt.pt"], "--compare takes LABEL=PATH"),
    ("distill_onpolicy", ["--name=a/b"], "--name='a/b' must be a plain file name"),
    ("distill_onpolicy", ["--resume"], "--resume: there is no out/tiny/danceopd/ckpt.pt to continue"),
    ("judges", ["--what=oracle"], "--what=oracle: unknown item 'oracle'"),
    ("judges", ["--vlm_family_batch=same:one"], "bad --vlm_family_batch item 'same:one'"),
    ("judges", ["--out=", "--vlm_vqa_steps=10"], "--vlm_vqa_steps differs from the recipe of the shared judges"),
    ("judges", ["--out=ok.png"], "--out=ok.png: is a file, not a directory"),
    ("judges", ["--res=4"], "--res=4: must be >= 8"),
    ("judges", ["--agreement_ckpt=nope.pt"], "--agreement_ckpt=nope.pt: no such file"),
    ("judges", ["--what=aesthetic", "--out=garbage"], "garbage/aesthetic.pt is not a reward model of this project"),
    ("judges", ["--what=vlm", "--out=garbage"], "garbage/vlm is not a saved transformers model"),
    ("distill_onpolicy", ["--experts=t2i=out/run/ckpt.pt"], "t2i is not an edit task of --tasks"),
    ("distill_onpolicy", ["--experts=local_edit=out/run/ckpt.pt"],
     "was trained for t2i, so it cannot teach local_edit"),
    ("distill_onpolicy", ["--compare=x=junk.pt"], "junk.pt is not a checkpoint of this project"),
    ("distill_onpolicy", ["--init=out/run/ckpt.pt", "--preset=small"], "is not a --preset=small model"),
    ("train", ["--resume", "--out=out/run", "--steps=5", "--stop_at=1"], "so --stop_at=1 would go back"),
    ("train", ["--resume", "--out=out/run", "--steps=5", "--edit_data=pipeline"],
     "out/run/ckpt.pt was trained with --edit_data=clean: pass it again"),
    ("judges", ["--families=all,color"], "--families: all stands alone"),
    ("judges", ["--agreement_ckpt=junk.pt"], "junk.pt is not a checkpoint of this project"),
    ("dual_process", ["--controls=sparkle"], "--controls: unknown control 'sparkle'"),
    ("dual_process", ["--controls=custom"], "custom control: --controls=custom needs --questions"),
    ("dual_process", ["--controls=custom", "--questions=is it night ?", "--oracle=mood=dark"],
     "--oracle item 'mood=dark' must be ATTR=V1,V2"),
    ("dual_process", ["--controls=custom", "--questions=is it night ?", "--oracle=sky=purple"],
     "--oracle: sky cannot be 'purple' (one of white, "),
    ("dual_process", ["--controls=custom", "--questions=is it night ?", "--oracle=sky=navy", "--visual=line=top"],
     "--visual='line=top' must be line=high|middle|low or strip=COLOR,COLOR,..."),
    ("dual_process", ["--best_of=4,x"], "--best_of=4,x: a comma-separated list of whole numbers >= 1"),
    ("dual_process", ["--judge=nowhere"], "--judge=nowhere: no such file or directory"),
    ("dual_process", ["--judge=garbage"], "garbage is not a saved transformers model"),
    ("dual_process", ["--mode=sometimes"], "--mode=sometimes: must be one of control, prompt, both"),
    ("self_distill", ["--rows=dsd,sparkle"], "--rows=dsd,sparkle: unknown item 'sparkle'"),
    ("self_distill", ["--threshold=0"], "--threshold=0.0: must be > 0"),
    ("self_distill", ["--threshold=1.5"], "--threshold=1.5: must be <= 1"),
    ("self_distill", ["--base=typo/ckpt.pt"], "--base=typo/ckpt.pt: no such file"),
    ("self_distill", ["--judge=garbage"], "garbage is not a saved transformers model"),
    ("self_distill", ["--steps=10", "--stop_at=20"], "--stop_at=20 is beyond --steps=10"),
    ("self_distill", ["--name=a/b"], "--name='a/b' must be a plain file name"),
    ("feedback", ["--phases=20,3"], "--phases=20,3: distinct phases, each one of 20, 8, 4, 2, 1 steps"),
    ("feedback", ["--phases=8,8"], "--phases=8,8: distinct phases"),
    ("feedback", ["--arms=pefl,magic"], "--arms=pefl,magic: unknown item 'magic'"),
    ("feedback", ["--generator=typo/ckpt.pt"], "--generator=typo/ckpt.pt: no such file"),
    ("feedback", ["--generator=out/run/ckpt.pt"], "was trained for t2i, not inpaint and outpaint"),
    ("feedback", ["--steps=10", "--stop_at=20"], "--stop_at=20 is beyond --steps=10"),
    ("feedback", ["--aesthetic=junk.pt"], "--aesthetic=junk.pt is not a saved aesthetic reward"),
    ("bench", ["--sample_steps=1,x"], "--sample_steps=1,x: a comma-separated list of whole numbers >= 1"),
    ("bench", ["--out=x.txt"], "--out=x.txt: the file name must end in .json"),
    ("bench", ["--preset=huge"], "--preset=huge: must be one of auto, tiny, small, base"),
    ("bench", ["--task=paint"], "--task=paint: must be one of t2i, "),
]


def files(root):
    """{path: content hash} of every file under root, and every folder (None)."""
    out = {}
    for folder, folders, names in os.walk(root):
        out.update({os.path.relpath(os.path.join(folder, f), root): None for f in folders})
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("script,args,fragment", CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_is_one_line_before_any_work(script, args, fragment, cwd, monkeypatch, capsys):
    if "--device=cuda" in args and torch.cuda.is_available():
        pytest.skip("there is a CUDA device here")
    monkeypatch.chdir(cwd)
    before = files(cwd)
    with pytest.raises(SystemExit) as e:
        RUN[script](args)
    message = e.value.code
    assert isinstance(message, str) and fragment in message, message  # a message, so the exit status is 1
    lines = message.splitlines()
    if "--manifest" in " ".join(args):  # a manifest lists every bad row, each as FILE:ROW: problem
        assert all(":" in line and (".jsonl" in line or ".csv" in line) for line in lines), message
    else:
        assert len(lines) == 1, message
    printed = capsys.readouterr().out
    assert "training" not in printed and "building" not in printed, printed
    assert files(cwd) == before  # nothing written, nothing changed


SUBPROCESS = [("train.py", ["--steps=-1"], "--steps=-1: must be >= 1"),
              ("sample.py", ["--ckpt=nope.pt", "--prompt=a red circle"], "--ckpt=nope.pt: no such file"),
              ("evaluate.py", ["--ckpts=junk.pt"], "junk.pt is not a checkpoint of this project"),
              ("distill_onpolicy.py", ["--base=typo/ckpt.pt"], "--base=typo/ckpt.pt: no such file"),
              ("judges.py", ["--what=oracle"], "--what=oracle: unknown item 'oracle'"),
              ("self_distill.py", ["--n_grids=0"], "--n_grids=0: must be >= 1"),
              ("feedback.py", ["--phases=0"], "--phases=0: distinct phases, each one of"),
              ("bench.py", ["--out=x.txt"], "--out=x.txt: the file name must end in .json"),
              ("data.py", ["--preview"], "data.py takes no arguments"),
              ("scorer.py", ["--n=3"], "scorer.py takes no arguments")]


@pytest.mark.parametrize("script,args,fragment", SUBPROCESS, ids=[s for s, _, _ in SUBPROCESS])
def test_each_script_exits_with_one_line_and_no_traceback(script, args, fragment, cwd):
    before = files(cwd)
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and fragment in done.stderr, done.stderr
    assert files(cwd) == before
