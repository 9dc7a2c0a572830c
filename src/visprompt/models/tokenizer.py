"""Tokenizers: the LM's own, or a byte-level BPE trained on the dataset's text.

Either way the tokenizer gets the image placeholder as a special token (so it is never split), a
pad token, and a chat template (the LM's own, or a plain ChatML one).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .chat import IMAGE_TOKEN

# ChatML, as SmolLM2/Qwen use: every turn ends with <|im_end|>, which is also the stop token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, image_token: str = IMAGE_TOKEN
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (any text round-trips; no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIAL_TOKENS + [image_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
    return fast


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> PreTrainedTokenizerBase:
    """Make any LM tokenizer ready for images: placeholder token, pad token, chat template."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        for t in CHAT_SPECIAL_TOKENS[1:3]:
            if t not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [t]}, replace_extra_special_tokens=False)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: EOS and the end-of-turn marker when the template uses one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for t in ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and t in tokenizer.get_vocab():
            ids.add(tid)
    return sorted(ids)
