"""examples/quickstart.sh end to end in a reduced mode (fewer iterations, a smaller corpus)."""

import subprocess

import torch
import transformers

from helpers import ROOT, env, free_port


def test_quickstart_reduced(tmp_path):
    qs_env = {**env(), "QUICKSTART_DIR": str(tmp_path / "qs"), "QUICKSTART_ITERS": "20", "QUICKSTART_MB": "0.6",
              "MASTER_PORT": str(free_port())}
    qs_env.pop("DS_ACCELERATOR")  # the script decides (CPU here)
    res = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], env=qs_env, capture_output=True,
                         text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    qs = tmp_path / "qs"
    for path in ["data/jsonl/1/shard_000.jsonl", "data/jsonl/2/shard_000.jsonl", "data/tokenizer.model",
                 "data/stdlib.bin", "data/stdlib.idx", "checkpoints/latest", "checkpoints/iter_0000020",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.model", "loss.png"]:
        assert (qs / path).exists(), path
    assert list((qs / "tensorboard").glob("events.out.tfevents.*"))
    assert "world size 2" in res.stdout and "verify: max |Δlogits|" in res.stdout
    assert "text: Return the number of" in res.stdout
    assert "validation loss: first" in res.stdout and "tensorboard --logdir" in res.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(qs / "hf", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(qs / "hf")
    out = model.generate(**tok("The", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1
