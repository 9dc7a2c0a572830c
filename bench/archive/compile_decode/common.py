import torch

torch.set_num_threads(2)
from visprompt.models.gguf import load_gguf_causal_lm, packaged_smollm2_path  # noqa: E402 (after the thread count is set)


def load():
    folder, f = packaged_smollm2_path()
    lm, tok = load_gguf_causal_lm(folder, f)
    return lm.eval(), tok


PROMPTS = [
    "Write a short story about a robot who learns to paint. " * 6,
    "Explain how photosynthesis works in plants, step by step, for a student. " * 5,
    "List some facts about the moon and the tides and the oceans of the world. " * 5,
]


def prompt_ids(tok, i=0, n=86):
    ids = tok(PROMPTS[i], return_tensors="pt").input_ids[0][:n]
    return ids
