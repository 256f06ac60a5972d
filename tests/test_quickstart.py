"""examples/quickstart.sh end to end in a reduced mode (fewer iterations, a smaller corpus): every stage leaves what
it promises — the loss falls, the export is the trained model, and generation continues the prompt."""

import json
import math
import re
import subprocess

import torch
import transformers

from helpers import ROOT, env, free_port, read_scalars

ITERS, VOCAB, PROMPT = 20, 4096, "Return the number of"


def test_quickstart_reduced(tmp_path):
    qs_env = {**env(), "QUICKSTART_DIR": str(tmp_path / "qs"), "QUICKSTART_ITERS": str(ITERS), "QUICKSTART_MB": "0.6",
              "MASTER_PORT": str(free_port())}
    qs_env.pop("DS_ACCELERATOR")  # the script decides (CPU here)
    res = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], env=qs_env, capture_output=True,
                         text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    qs = tmp_path / "qs"
    for path in ["data/jsonl/1/shard_000.jsonl", "data/jsonl/2/shard_000.jsonl", "data/tokenizer.model",
                 "data/stdlib.bin", "data/stdlib.idx", "checkpoints/latest", f"checkpoints/iter_{ITERS:07d}",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.model", "loss.png"]:
        assert (qs / path).exists(), path
    assert "world size 2" in res.stdout and "tensorboard --logdir" in res.stdout

    # Training learned: from the uniform guess at iteration 0 the validation loss fell at every evaluation, and
    # both curves ended clearly below it (measured: 8.32 → 7.4 valid, 7.6 train after 20 iterations).
    scalars = read_scalars(qs / "tensorboard")
    train, valid = scalars["train/loss"], scalars["valid/loss"]
    assert max(train) == ITERS and min(valid) == 0 and max(valid) == ITERS
    assert abs(valid[0] - math.log(VOCAB)) < 0.1
    curve = [valid[i] for i in sorted(valid)]
    assert all(later < earlier for earlier, later in zip(curve, curve[1:])), curve
    assert train[ITERS] < valid[0] - 0.4 and valid[ITERS] < valid[0] - 0.4, (train, valid)

    # The export is that trained model: transformers loads it, matches our logits, and scores training text as
    # well as training did (a random or untrained export sits near log(vocab)).
    assert float(re.search(r"verify: max \|Δlogits\| = (\S+)", res.stdout)[1]) <= 1e-4
    model = transformers.AutoModelForCausalLM.from_pretrained(qs / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(qs / "hf")
    with open(qs / "data/jsonl/1/shard_000.jsonl") as f:
        docs = [json.loads(next(f))["token_ids"][:256] for _ in range(8)]
    with torch.no_grad():
        hf_loss = sum(model(torch.tensor([d]), labels=torch.tensor([d])).loss.item() for d in docs) / len(docs)
    assert hf_loss < valid[0] - 0.4, (hf_loss, valid[0])

    # Generation continues the prompt: the quickstart's own sample, and greedy decoding here, add tokens after it.
    prompt_ids = tok(PROMPT)["input_ids"]
    sample_ids = [int(t) for t in re.search(r"^ids: (.*)$", res.stdout, flags=re.M)[1].split()]
    assert sample_ids[:len(prompt_ids)] == prompt_ids and len(sample_ids) > len(prompt_ids)
    sample_text = re.search(r"^text: (.*)$", res.stdout, flags=re.M)[1]
    assert sample_text.startswith(PROMPT) and sample_text[len(PROMPT):].strip()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, do_sample=False)[0].tolist()
    assert out[:len(prompt_ids)] == prompt_ids and len(out) > len(prompt_ids)
    assert tok.decode(out[len(prompt_ids):], skip_special_tokens=True).strip()
