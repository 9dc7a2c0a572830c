"""Generation for visprompt's own models: KV cache, batching with left padding, sampling, stops."""

import pytest
import torch
from conftest import IMAGE_CONVS

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.errors import VispromptError
from visprompt.runtime.sampling import choose_next_tokens

CONVS = IMAGE_CONVS


@pytest.fixture
def backend(tiny_model):
    return OwnVLMBackend(tiny_model)


def test_kv_cache_equals_recomputing_everything(backend):
    params = SamplingParams(max_new_tokens=12)
    cached = backend.generate(CONVS, params, use_cache=True)
    uncached = backend.generate(CONVS, params, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]
    assert all(len(set(r.token_ids)) > 2 for r in cached)  # the comparison is not of a constant stream


def test_batched_greedy_equals_one_by_one(backend):
    params = SamplingParams(max_new_tokens=12)
    batched = backend.generate(CONVS, params)
    single = [backend.generate([c], params)[0] for c in CONVS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    # Prompts really differ in length, so left padding was exercised.
    assert len({r.prompt_tokens for r in batched}) == len(CONVS)


def test_batched_logits_match_single_with_left_padding(backend):
    """Not only the argmax: the padded row's next-token distribution equals the unpadded one."""
    model = backend.model
    prompts, embeds = backend.encode_prompts(CONVS[:2])
    from conftest import left_pad, positions

    ids, mask = left_pad(prompts, model.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, image_embeds=embeds, position_ids=positions(mask)).logits[:, -1]
        alone = model(torch.tensor([prompts[0]]), image_embeds=embeds[:1]).logits[:, -1]  # row 0 has 1 image
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(backend):
    a = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=10, temperature=1.5, seed=1))
    b = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=10, temperature=1.5, seed=1))
    c = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=10, temperature=1.5, seed=2))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_top_k_one_is_greedy(backend):
    greedy = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=8))
    topk1 = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=8, temperature=0.8, top_k=1, seed=0))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(choose_next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn


def test_max_new_tokens_and_finish_reason(backend):
    res = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=3))[0]
    assert res.completion_tokens <= 3
    assert res.finish_reason in ("length", "stop")
    if res.finish_reason == "length":
        assert res.completion_tokens == 3


def test_stop_string_trims_text(backend):
    full = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=16))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=16, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_eos_stops_generation(tiny_model):
    """Make EOS the only likely token: generation ends at once with finish_reason 'stop'."""
    backend = OwnVLMBackend(tiny_model)
    eos = tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        bias_hook = tiny_model.lm.lm_head.register_forward_hook(
            lambda m, i, o: o + torch.nn.functional.one_hot(torch.tensor(eos), o.shape[-1]) * 1e4
        )
    try:
        res = backend.generate(CONVS[:2], SamplingParams(max_new_tokens=10))
    finally:
        bias_hook.remove()
    assert all(r.finish_reason == "stop" and r.text == "" and r.completion_tokens == 1 for r in res)


def test_invalid_sampling_params_are_clear_errors():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}):
        with pytest.raises(VispromptError):
            SamplingParams(**bad)


def test_model_system_prompt_is_used_when_the_conversation_has_none(tiny_model):
    """A model trained with a default system prompt sees it at generation time too."""
    tiny_model.cfg.system_prompt = "Answer with one word."
    backend = OwnVLMBackend(tiny_model)
    tok = tiny_model.tokenizer
    plain = backend.encode_prompts(CONVS[:1])[0][0]
    assert "Answer with one word." in tok.decode(plain)
    own_system = [{"role": "system", "content": "Be brief."}, *CONVS[0]]
    text = tok.decode(backend.encode_prompts([own_system])[0][0])
    assert "Be brief." in text and "Answer with one word." not in text
