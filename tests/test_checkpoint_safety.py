"""No checkpoint file can run code, and no export can delete what the exporter did not write."""

import shutil

import pytest
import torch

from helpers import run_pretrain, run_tool, tiny_args
from megatron_mobilellm.checkpoint_layout import consolidate, latest_tag, read_manifest, write_manifest
from megatron_mobilellm.errors import CheckpointError
from megatron_mobilellm.safe_load import weights_only_loads

CORPUS_DOCS = 100


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def checkpoint(zero2_checkpoint):
    """conftest's ZeRO-2 checkpoint: these tests only read it or change copies (an export that wrote into it
    would fail here first)."""
    return zero2_checkpoint


def planted_copy(checkpoint, tmp_path, kind):
    """A copy of ``checkpoint`` whose ``kind`` file also carries a Payload."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    marker = tmp_path / "code_ran"
    (target,) = (ckpt / latest_tag(ckpt)).glob(kind)
    with weights_only_loads():
        state = torch.load(target)
    state["payload"] = Payload(marker)
    torch.save(state, target)
    manifest = read_manifest(target.parent)  # a tamperer keeps the manifest consistent
    write_manifest(target.parent, manifest["iteration"], manifest["world_size"], manifest["zero_stage"])
    return ckpt, marker


KINDS = ["mp_rank_00_model_states.pt", "*optim_states.pt", "rng_state_rank0.pt"]


@pytest.mark.parametrize("kind", KINDS[:2])
def test_consolidation_refuses_a_planted_object(checkpoint, tmp_path, kind):
    ckpt, marker = planted_copy(checkpoint, tmp_path, kind)
    with pytest.raises(CheckpointError, match=r"refusing to load .*: it contains [\w.]*open"):
        consolidate(ckpt, latest_tag(ckpt))
    if kind == KINDS[0]:  # the ZeRO-0 path reads the module file itself
        for f in (ckpt / latest_tag(ckpt)).glob(KINDS[1]):
            f.unlink()
        with pytest.raises(CheckpointError, match=r"refusing to load .*model_states\.pt: it contains [\w.]*open"):
            consolidate(ckpt, latest_tag(ckpt))
    assert not marker.exists()


def test_export_refuses_a_planted_object(checkpoint, tmp_path):
    ckpt, marker = planted_copy(checkpoint, tmp_path, KINDS[1])
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", ckpt, "--output", tmp_path / "hf", check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last.startswith("error: refusing to load"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind,finetune", [(KINDS[1], False), (KINDS[2], False), (KINDS[0], True)],
                         ids=["resume-optim", "resume-rng", "finetune-model"])
def test_training_refuses_a_planted_object(checkpoint, corpus, tmp_path, kind, finetune):
    ckpt, marker = planted_copy(checkpoint, tmp_path, kind)
    extra = {"--load": ckpt, "--save": tmp_path / "new", "--eval-iters": 0, "--finetune": "" if finetune else None}
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=2, **extra), check=False)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "error: refusing to load" in res.stderr and "open" in res.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_export_never_replaces_the_checkpoint(checkpoint, tmp_path, where):
    ckpt = tmp_path / "run" / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    output = {"same": ckpt, "parent": ckpt.parent, "inside": ckpt / "hf"}[where]
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", ckpt, "--output", output, "--overwrite",
                   check=False)
    assert res.returncode == 1 and "is, holds or lies inside the checkpoint" in res.stderr, res.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_only_an_earlier_export(checkpoint, tmp_path):
    hf = tmp_path / "hf"
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoint, "--output", hf)
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoint, "--output", hf, "--overwrite",
                   check=False)
    assert res.returncode == 0, res.stderr[-2000:]  # an earlier export is replaced
    (hf / "notes.txt").write_text("mine")
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoint, "--output", hf, "--overwrite",
                   check=False)
    assert res.returncode == 1 and "holds more than an earlier export (notes.txt)" in res.stderr
    assert (hf / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoint, "--output", other, "--overwrite",
                   check=False)
    assert res.returncode == 1 and (other / "data").is_dir()
