"""A SmolVLM-shaped checkpoint folder built offline, for benchmarks of the pretrained-VLM path.

SmolVLM-256M's layout: a SigLIP vision tower (base, patch 16, 512 px: 93M parameters, random weights
here), a pixel-shuffle connector (scale factor 4: 64 image tokens per 512 px tile, random), and
SmolLM2-135M-Instruct as the language model with its REAL weights (the packaged GGUF, dequantized
to fp32), its tokenizer extended with SmolVLM's image tokens. The folder loads through
`AutoModelForImageTextToText` / `HFVLMBackend.from_pretrained` like a published checkpoint.

    python bench/smolvlm_shaped.py /tmp/smolvlm-shaped      # writes the folder (~1 GB)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# SmolVLM's chat style: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

SIGLIP_BASE_512 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
}


def write_smolvlm_shaped(folder: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint folder (skipped when it is already there); returns its path."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    from visprompt.models.gguf import load_gguf_causal_lm, packaged_smollm2_path

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    lm, tok = load_gguf_causal_lm(*packaged_smollm2_path())
    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = CHAT_TEMPLATE
    text_cfg = lm.config.to_dict()
    text_cfg["vocab_size"] = len(tok)
    cfg = Idefics3Config(
        vision_config=SIGLIP_BASE_512,
        text_config=text_cfg,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=4,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[len(lm.get_input_embeddings().weight) - len(specials) :].normal_(0, 0.02)
    model.model.text_model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.get_output_embeddings().weight)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 2
    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 512}, max_image_size={"longest_edge": 512}, do_image_splitting=False
    )
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64, chat_template=CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(write_smolvlm_shaped(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smolvlm-shaped"))
