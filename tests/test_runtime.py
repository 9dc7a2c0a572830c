"""The fast runtime: lean decoder, continuous batching, streaming, cancellation, caches, quantized path.

Every test compares outputs (never timings): the fast path against transformers' forward and the
reference decode loop, batched against one-by-one, cached against uncached.
"""

import shutil
import threading

import pytest
import torch
from conftest import IMAGE_CONVS
from conftest import image_conv as conv

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.runtime.caches import ByteLRU, ImageFeatureCache, PrefixKVCache, token_keys
from visprompt.runtime.fast_decode import FastLM, unsupported_reason

CONVS = [
    *IMAGE_CONVS,
    [{"role": "user", "content": "No image here: what is a circle?"}],
    conv("purple", "red blue green"),
]


def reference(backend, convs, params):
    """The reference path: the model's own forward with its KV cache, one conversation at a time."""
    ref = OwnVLMBackend(backend.model, fast=False)
    return [ref.generate([c], params)[0] for c in convs]


def same(a, b):
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [(r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens) for r in a] == [
        (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens) for r in b
    ]


@pytest.fixture
def backend(tiny_model):
    return OwnVLMBackend(tiny_model, max_batch=4)


# -- the lean decoder -----------------------------------------------------------------------------
def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg = LlamaConfig(**{**sizes, **kw})
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.4)
    return lm


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    lm = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn_like(p) * 0.4)  # q/k/v biases included
    return lm


def tiny_llama_hd64():  # the kernel's register-resident attention output (head_dim a multiple of 64)
    return tiny_llama(head_dim=64)


def tiny_llama_hd12():  # a head_dim the kernel's 8-wide vectors do not divide
    return tiny_llama(head_dim=12)


# packed x kernels: the C++ kernel with panels / with the modules' own rows, and torch ops alone
@pytest.mark.parametrize("packed,kernels", [(True, None), (False, None), (True, False), (False, False)])
@pytest.mark.parametrize("make_lm", [tiny_llama, tiny_qwen2, tiny_llama_hd64, tiny_llama_hd12])
def test_fast_decoder_matches_transformers_forward(packed, kernels, make_lm, monkeypatch):
    monkeypatch.setenv("VISPROMPT_KERNEL_ROWS", "128")  # the kernel takes every step below, until told otherwise
    lm = make_lm()
    dec = FastLM(
        lm, max_batch=3, initial_len=4, packed=packed, kernels=kernels
    )  # tiny start: the KV buffer must grow (rows and length)
    if kernels is None and shutil.which("c++"):
        assert dec.kernel is not None, dec.kernel_reason  # where a compiler exists, the kernel must build
    emb = lm.get_input_embeddings()
    a, b = torch.randint(0, 300, (1, 30)), torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        ref_a, ref_b = lm(a).logits[0], lm(b).logits[0]
    sa = dec.new_sequence()
    torch.testing.assert_close(dec.prefill(sa, emb(a)[0, :9]), ref_a[8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dec.prefill(sa, emb(a)[0, 9:12]), ref_a[11], rtol=1e-4, atol=1e-4)  # chunked prefill
    filler = dec.new_sequence()
    dec.prefill(filler, emb(b)[0, :3])
    sb = dec.new_sequence()
    dec.prefill(sb, emb(b)[0, :5])
    dec.free(filler)  # the last row moves into the freed one
    for k in range(6):  # rows at different lengths decode together, in any order
        logits = dec.decode([sb, sa], [b[0, 5 + k], a[0, 12 + k]])
        torch.testing.assert_close(logits[0], ref_b[5 + k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1], ref_a[12 + k], rtol=1e-4, atol=1e-4)
    assert dec.length(sa) == 18 and dec.length(sb) == 11
    dec.prefill(sb, emb(b)[0, 11:30])  # grows the buffer inside inference mode ...
    dec.truncate(sb, 11)
    dec.kernel_rows = 16
    long = torch.randint(0, 300, (1, 45))  # over kernel_rows: torch ops prefill, the kernel decodes on
    with torch.no_grad():
        ref_long = lm(long).logits[0]
    sl = dec.new_sequence()
    torch.testing.assert_close(dec.prefill(sl, emb(long)[0, :40]), ref_long[39], rtol=1e-4, atol=1e-4)
    for k in range(40, 45):
        torch.testing.assert_close(
            dec.decode([sl, sb, sa], [long[0, k], b[0, 11], a[0, 18]])[0], ref_long[k], rtol=1e-4, atol=1e-4
        )
    dec.free(sl)
    dec.truncate(sb, 11)
    dec.truncate(sa, 18)
    kv = dec.export_kv(sa, 10)
    dec.free(sa)
    sc = dec.new_sequence()
    dec.import_kv(sc, kv)
    torch.testing.assert_close(dec.prefill(sc, emb(a)[0, 10:14]), ref_a[13], rtol=1e-4, atol=1e-4)
    sd = dec.new_sequence()  # several sequences prefilled together: a fresh one and one with a cached prefix
    dec.kernel_rows = 8  # 6 + 3 rows: two kernel steps
    both = dec.prefill_many([sd, sc], [emb(b)[0, :6], emb(a)[0, 14:17]])
    torch.testing.assert_close(both, torch.stack([ref_b[5], ref_a[16]]), rtol=1e-4, atol=1e-4)
    assert dec.length(sd) == 6 and dec.length(sc) == 17
    got = dec.decode([sc, sd, sb], [a[0, 17], b[0, 6], b[0, 11]])
    torch.testing.assert_close(got, torch.stack([ref_a[17], ref_b[6], ref_b[11]]), rtol=1e-4, atol=1e-4)


def test_kernel_build_says_why_it_is_off(monkeypatch):
    from visprompt.runtime import cpu_kernels

    monkeypatch.setenv("VISPROMPT_KERNELS", "0")
    assert cpu_kernels._build() == (None, "turned off by VISPROMPT_KERNELS")
    monkeypatch.delenv("VISPROMPT_KERNELS")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    module, reason = cpu_kernels._build()
    assert module is None and "no C++ compiler" in reason
    lm = tiny_llama()
    with pytest.raises(ValueError, match="kernel"):  # asked for explicitly, and it cannot run this model
        FastLM(lm.to(torch.float64), kernels=True)


def test_fast_decoder_refuses_what_it_cannot_reproduce():
    lm = tiny_llama()
    assert unsupported_reason(lm) is None
    handle = lm.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
    assert "hooks" in unsupported_reason(lm)
    handle.remove()
    lm.model.layers[1].self_attn.q_proj = torch.nn.Sequential(lm.model.layers[1].self_attn.q_proj)
    assert unsupported_reason(lm) is not None
    with pytest.raises(ValueError):
        FastLM(lm)


# -- the backend on the fast runtime --------------------------------------------------------------
def test_fast_path_equals_reference_path(backend):
    assert backend.fast_path_reason() is None
    params = SamplingParams(max_new_tokens=14)
    fast = backend.generate(CONVS, params)
    same(fast, reference(backend, CONVS, params))
    assert sum(len(set(r.token_ids)) > 2 for r in fast) >= 4  # not constant streams


def test_falls_back_when_the_lm_has_hooks(tiny_model):
    backend = OwnVLMBackend(tiny_model)
    params = SamplingParams(max_new_tokens=8)
    want = backend.generate(CONVS[:2], params)
    handle = tiny_model.lm.model.layers[0].register_forward_hook(lambda m, i, o: o)
    try:
        assert backend.fast_path_reason() is not None
        same(backend.generate(CONVS[:2], params), want)
    finally:
        handle.remove()


def test_continuous_batching_equals_one_by_one(backend):
    """Requests join a running batch at different steps, each with its own limits and stops; with two
    slots for six requests, finished rows free slots that later requests take."""
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 16, 9, 3, 11)]
    want = [reference(backend, [c], p)[0] for c, p in zip(CONVS, params)]
    stop = want[2].text[3:5]
    params[2] = SamplingParams(max_new_tokens=16, stop=[stop])
    want[2] = reference(backend, [CONVS[2]], params[2])[0]
    assert want[2].finish_reason == "stop"

    sched = backend.scheduler
    sched.max_batch = 2
    reqs = backend.encode_requests(CONVS)
    handles = []
    batch_sizes = []
    for i, ((prompt, embeds, keys), p) in enumerate(zip(reqs, params)):
        handles.append(sched.submit(prompt, p, image_embeds=embeds, image_keys=keys))
        for _ in range(i % 3):  # join mid-flight
            sched.step()
            batch_sizes.append(sched.batch_size)
    sched.run()
    same([h.result() for h in handles], want)
    assert max(batch_sizes) == 2
    assert len(backend.scheduler.decoder.sequences) == 0  # every slot was freed


def test_per_request_sampling_does_not_depend_on_the_batch(backend):
    sampled = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=7)
    alone = backend.generate([CONVS[1]], sampled)[0]
    backend.prefix_cache.clear()
    sched = backend.scheduler
    reqs = backend.encode_requests(CONVS[:3])
    hs = [
        sched.submit(p, SamplingParams(max_new_tokens=10) if i != 1 else sampled, image_embeds=e, image_keys=k)
        for i, (p, e, k) in enumerate(reqs)
    ]
    sched.run()
    assert hs[1].result().token_ids == alone.token_ids
    same([hs[0].result(), hs[2].result()], reference(backend, [CONVS[0], CONVS[2]], SamplingParams(max_new_tokens=10)))


def test_streaming_yields_the_result_text(backend):
    params = SamplingParams(max_new_tokens=16)
    events = []
    handle = backend.submit(CONVS[1], params, on_event=events.append)
    pieces = list(handle)
    res = handle.result()
    assert len(pieces) > 3
    assert "".join(pieces).strip() == res.text
    assert events[-1].finished and events[-1].finish_reason == res.finish_reason
    assert [e.token_id for e in events if e.token_id is not None] == res.token_ids
    # A stop string is never shown, not even its first characters.
    stop = res.text[4:7]
    handle = backend.submit(CONVS[1], SamplingParams(max_new_tokens=16, stop=[stop]))
    streamed = "".join(handle)
    assert stop not in streamed and streamed.strip() == handle.result().text


def test_cancel_frees_the_slot_and_leaves_others_alone(backend):
    params = SamplingParams(max_new_tokens=12)
    want = reference(backend, CONVS[:3], params)
    sched = backend.scheduler
    reqs = backend.encode_requests(CONVS[:3])
    hs = [sched.submit(p, params, image_embeds=e, image_keys=k) for p, e, k in reqs]
    sched.step()
    sched.step()
    hs[1].cancel()
    sched.step()
    assert len(sched.decoder.sequences) == 2
    sched.run()
    assert hs[1].result().finish_reason == "cancelled"
    assert len(hs[1].result().token_ids) < 12
    same([hs[0].result(), hs[2].result()], [want[0], want[2]])
    waiting = sched.submit(reqs[0][0], params, image_embeds=reqs[0][1], image_keys=reqs[0][2])
    waiting.cancel()  # cancelled before it ever ran
    assert waiting.result().finish_reason == "cancelled" and waiting.result().token_ids == []


def test_a_failing_request_does_not_take_the_batch_down(backend):
    params = SamplingParams(max_new_tokens=8)
    want = reference(backend, CONVS[:2], params)
    sched = backend.scheduler
    reqs = backend.encode_requests(CONVS[:2])
    good = sched.submit(reqs[0][0], params, image_embeds=reqs[0][1], image_keys=reqs[0][2])
    sched.step()
    bad = sched.submit(reqs[1][0], params)  # image placeholders but no image features: embed raises
    late = sched.submit(reqs[1][0], params, image_embeds=reqs[1][1], image_keys=reqs[1][2])
    sched.run()
    with pytest.raises(ValueError):
        bad.result()
    with pytest.raises(ValueError):
        list(bad)
    same([good.result(), late.result()], want)
    assert len(sched.decoder.sequences) == 0


def test_a_burst_about_one_image_is_admitted_together(backend, monkeypatch):
    """Requests submitted together: the first prefills alone and stores its prompt, the rest find it
    in the prefix cache and prefill in one `prefill_many` step; a broken one among them fails alone."""
    questions = ["What color is it?", "Is it a circle?", "Describe it."]  # + a broken one: the 4 slots
    convs = [conv("orange", q) for q in questions]
    params = SamplingParams(max_new_tokens=7)
    want = reference(backend, convs, params)
    sched = backend.scheduler
    calls = []
    real = sched.decoder.prefill_many
    monkeypatch.setattr(
        sched.decoder,
        "prefill_many",
        lambda seqs, prompts, starts: calls.append(len(seqs)) or real(seqs, prompts, starts),
    )
    reqs = backend.encode_requests(convs)
    handles = [sched.submit(p, params, image_embeds=e, image_keys=k) for p, e, k in reqs[:2]]
    bad = sched.submit(reqs[1][0], params)  # image placeholders but no image features: embed raises
    handles += [sched.submit(p, params, image_embeds=e, image_keys=k) for p, e, k in reqs[2:]]
    sched.run()
    with pytest.raises(ValueError):
        bad.result()
    results = [h.result() for h in handles]
    same(results, want)
    assert calls == [2]  # one step for the two after the first (the broken one dropped out before it)
    assert all(h.cached_prompt_tokens > 0 for h in handles[1:])  # they shared the first's prefix
    assert len(sched.decoder.sequences) == 0


def test_background_thread_serves_concurrent_callers(backend):
    params = SamplingParams(max_new_tokens=10)
    want = reference(backend, CONVS, params)
    sched = backend.scheduler
    sched.start()
    try:
        results = [None] * len(CONVS)

        def call(i):
            results[i] = backend.generate([CONVS[i]], params)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(CONVS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sched.stop()
    same(results, want)


def test_context_limit_ends_with_length(tiny_model):
    backend = OwnVLMBackend(tiny_model)
    prompt_len = backend.encode_requests([CONVS[0]])[0][0].__len__()
    backend.scheduler.decoder.max_len = prompt_len + 4
    res = backend.generate([CONVS[0]], SamplingParams(max_new_tokens=50))[0]
    assert res.finish_reason in ("length", "stop") and res.completion_tokens <= 4


# -- caches ---------------------------------------------------------------------------------------
def test_byte_lru_evicts_least_recently_used():
    lru = ByteLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 40)  # over 100 bytes: b goes
    assert "b" not in lru and "a" in lru and "c" in lru and lru.bytes == 80
    assert not lru.put("huge", 4, 101) and "huge" not in lru


def test_image_feature_cache_skips_the_encoder_and_is_exact(tiny_model):
    backend = OwnVLMBackend(tiny_model)
    calls = []
    hook = tiny_model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        _, first = backend.encode_prompts(CONVS[:1])
        photo = CONVS[0][0]["content"][0]["image"]
        again = [
            {"role": "user", "content": [{"type": "image", "image": photo.copy()}, {"type": "text", "text": "Other?"}]}
        ]
        _, second = backend.encode_prompts([again])
    finally:
        hook.remove()
    assert calls == [1]  # the second image (equal pixels, another object) never reached the encoder
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    cache = ImageFeatureCache(max_bytes=first[0].numel() * 4 * 2)
    for k in "abc":
        cache.put(k, first[0])
    assert len(cache) == 2 and "a" not in cache


def test_a_file_seen_before_is_not_decoded_again(tiny_model, tmp_path, monkeypatch):
    """A follow-up about the same file takes its features by the hash of its encoded bytes, without
    decoding; changed bytes, or changed weights, decode again; results equal a fresh backend's."""
    from visprompt.engine.backends import own

    photo = CONVS[0][0]["content"][0]["image"]
    path = tmp_path / "photo.png"
    photo.save(path)
    decoded = []
    real_load = own.load_image
    monkeypatch.setattr(own, "load_image", lambda src, **kw: decoded.append(1) or real_load(src, **kw))

    def ask(question, image=str(path)):
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]

    backend = OwnVLMBackend(tiny_model)
    _, first = backend.encode_prompts([ask("What is it?")])
    _, again = backend.encode_prompts([ask("And the colour?"), ask("Where?", path.read_bytes())])
    assert len(decoded) == 1  # the path twice and its raw bytes: decoded once
    torch.testing.assert_close(again, torch.cat([first, first]), rtol=0, atol=0)
    photo.rotate(90).save(path)  # new bytes at the same path
    _, rotated = backend.encode_prompts([ask("What is it?")])
    assert len(decoded) == 2
    torch.testing.assert_close(
        rotated, OwnVLMBackend(tiny_model).encode_prompts([ask("What is it?")])[1], rtol=0, atol=0
    )
    with torch.no_grad():
        tiny_model.connector.net[1].weight.mul_(2.0)
    _, after = backend.encode_prompts([ask("What is it?")])
    assert len(decoded) == 4  # decoded again (the fresh backend above decoded once too)
    torch.testing.assert_close(after, OwnVLMBackend(tiny_model).encode_prompts([ask("What is it?")])[1], rtol=0, atol=0)


def test_a_batch_about_one_photo_decodes_and_encodes_it_once(tiny_model, tmp_path, monkeypatch):
    from visprompt.engine.backends import own

    photo = CONVS[0][0]["content"][0]["image"]
    path = tmp_path / "photo.png"
    photo.save(path)
    decoded, encoded = [], []
    real_load = own.load_image
    monkeypatch.setattr(own, "load_image", lambda src, **kw: decoded.append(1) or real_load(src, **kw))
    real_encode = tiny_model.encode_images
    monkeypatch.setattr(
        tiny_model, "encode_images", lambda pixels: encoded.append(pixels.shape[0]) or real_encode(pixels)
    )

    def ask(question, image):
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]

    backend = OwnVLMBackend(tiny_model, image_cache_bytes=0)  # no cache: the sharing is within the batch
    other = photo.rotate(90)
    _, embeds = backend.encode_prompts(
        [ask("What?", str(path)), ask("Where?", path.read_bytes()), ask("Which?", other), ask("Why?", str(path))]
    )
    assert len(decoded) == 2 and encoded == [2]  # the file once (+ the PIL image); two distinct images encoded
    want = OwnVLMBackend(tiny_model).encode_prompts([ask("What?", photo), ask("Which?", other)])[1]
    torch.testing.assert_close(embeds, want[[0, 0, 1, 0]], rtol=0, atol=0)


def test_image_cache_is_dropped_when_weights_change(tiny_model):
    backend = OwnVLMBackend(tiny_model)
    _, before = backend.encode_prompts(CONVS[:1])
    with torch.no_grad():
        tiny_model.connector.net[1].weight.mul_(2.0)  # an in-place update, as an optimizer step does
    _, after = backend.encode_prompts(CONVS[:1])
    _, fresh = OwnVLMBackend(tiny_model).encode_prompts(CONVS[:1])
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert not torch.allclose(after, before)


def test_prefix_cache_follow_up_equals_uncached(tiny_model):
    params = SamplingParams(max_new_tokens=10)
    cached = OwnVLMBackend(tiny_model)
    uncached = OwnVLMBackend(tiny_model, prefix_cache_bytes=0, image_cache_bytes=0)
    first = cached.generate([CONVS[1]], params)[0]
    follow = CONVS[1] + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the color?"}]
    same_image_new_question = conv("blue", "Is it big?")
    other_image_same_question = conv("orange", "How many shapes are there? Describe the image please, in detail.")
    sched = cached.scheduler
    got = []
    for c in (follow, same_image_new_question, other_image_same_question):
        ((p, e, k),) = cached.encode_requests([c])
        h = sched.submit(p, params, image_embeds=e, image_keys=k)
        got.append((h.result(), h.cached_prompt_tokens, len(p)))
    same([g[0] for g in got], uncached.generate([follow, same_image_new_question, other_image_same_question], params))
    (res_f, hit_f, len_f), (res_q, hit_q, len_q), (res_o, hit_o, _) = got
    assert hit_f >= first.prompt_tokens  # the first turn came from the cache
    image_end = (
        max(
            i
            for i, t in enumerate(cached.encode_requests([same_image_new_question])[0][0])
            if t == tiny_model.cfg.image_token_id
        )
        + 1
    )
    assert image_end <= hit_q < len_q  # the image tokens were reused, the new question was run
    assert hit_o < image_end - tiny_model.cfg.tokens_per_image + 1  # another image: nothing past its start
    assert cached.prefix_cache.stats()["hits"] >= 2


def test_a_finished_reply_is_cached_for_the_next_turn(backend):
    """Token level: the next turn's prompt starts with the first prompt and its reply; everything
    but the reply's last token (sampled, never fed to the model) comes from the cache."""
    params = SamplingParams(max_new_tokens=9)
    ((prompt, embeds, keys),) = backend.encode_requests([CONVS[0]])
    sched = backend.scheduler
    first = sched.submit(prompt, params, image_embeds=embeds, image_keys=keys).result()
    assert first.finish_reason == "length"
    follow = prompt + first.token_ids + [5, 6, 7]
    h = sched.submit(follow, params, image_embeds=embeds, image_keys=keys)
    got = h.result()
    assert h.cached_prompt_tokens == len(prompt) + len(first.token_ids) - 1
    ref = OwnVLMBackend(backend.model, fast=False).scheduler
    want = ref.submit(follow, params, image_embeds=embeds, image_keys=keys).result()
    same([got], [want])


def test_prefix_cache_keys_and_lookup():
    keys = token_keys([5, 9, 9, 9, 9, 7], 9, ["imgA", "imgB"])
    assert keys == (5, ("imgA", 0), ("imgA", 1), ("imgB", 0), ("imgB", 1), 7)
    cache = PrefixKVCache(max_bytes=1 << 20, min_tokens=2)
    kv = torch.arange(2 * 2 * 6 * 1 * 2, dtype=torch.float32).view(2, 2, 6, 1, 2)
    assert cache.store(keys, kv)
    hit = cache.lookup(keys[:4] + (8, 8))
    assert hit.length == 4 and torch.equal(hit.kv, kv[:, :, :4])
    assert cache.lookup(keys, limit=5).length == 5
    assert cache.lookup((5, ("imgC", 0))) is None  # another image: only 1 token shared (< min_tokens)
    assert cache.store(keys[:3], kv[:, :, :3]) and len(cache.lru) == 1  # a prefix of a stored entry adds nothing


# -- the quantized path (llama.cpp; skipped when llama-cpp-python is absent) -----------------------
def test_gguf_export_refuses_what_it_cannot_write(tmp_path):
    from visprompt.runtime.quantized import QuantizedUnavailable, write_gguf

    pytest.importorskip("gguf")
    lm = tiny_llama(attention_bias=True)
    with pytest.raises(QuantizedUnavailable):
        write_gguf(lm, tmp_path / "x.gguf", "q8_0")
    narrow = tiny_llama(hidden_size=48, intermediate_size=96)  # rows that do not fill 32-value blocks
    with pytest.raises(QuantizedUnavailable, match="multiple of 32"):
        write_gguf(narrow, tmp_path / "y.gguf", "q4_1")
    assert write_gguf(narrow, tmp_path / "z.gguf", "f32").is_file()  # f32 has no blocks


def test_llama_cpp_f32_export_matches_transformers(tmp_path):
    """An F32 GGUF run by llama.cpp gives transformers' logits: the export (rotary permutation,
    layout, hyper-parameters) and the embeddings input are right."""
    pytest.importorskip("llama_cpp")
    from visprompt.runtime.quantized import LlamaCppLM, write_gguf

    lm = tiny_llama()
    dec = LlamaCppLM(
        write_gguf(lm, tmp_path / "lm-f32.gguf", "f32"), max_batch=2, ctx_per_seq=64, n_threads=1, kv_f32=True
    )
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        ref = lm(ids).logits[0]
        emb = lm.get_input_embeddings()(ids)[0]
    s = dec.new_sequence()
    torch.testing.assert_close(dec.prefill(s, emb[:12]), ref[11], rtol=2e-3, atol=2e-3)
    other = dec.new_sequence()
    dec.prefill(other, emb[:5])
    for k in range(12, 20):
        logits = dec.decode([s, other], [ids[0, k], ids[0, k - 7]])
        torch.testing.assert_close(logits[0], ref[k], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(logits[1], ref[k - 7], rtol=2e-3, atol=2e-3)
    dec.close()


def test_quantized_backend_passes_its_gate_and_batches(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from conftest import TEXTS, spread_weights, tiny_config

    from visprompt.models.vision_language_model import VisionLanguageModel
    from visprompt.runtime.quantized import agreement

    monkeypatch.setenv("VISPROMPT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    # Q8_0 needs widths divisible by 32; a milder spread than the other tests (int8 keeps ~2-3 digits).
    model = spread_weights(
        VisionLanguageModel.build(tiny_config(lm_hidden_size=64, lm_heads=2, lm_kv_heads=1), TEXTS), std=0.15
    ).eval()
    q8 = OwnVLMBackend(model, quantize="q8_0")
    params = SamplingParams(max_new_tokens=12)
    got = q8.generate(CONVS, params)
    assert q8.decoder_kind == "q8_0" and q8.quality.teacher_forced >= 0.95  # the gate, on its own prompt set
    # ... and on these image prompts: top-1 agreement along the fp32 greedy path
    with torch.inference_mode():
        prompts = [model.embed(torch.tensor([p]), e)[0] for p, e, _ in q8.encode_requests(CONVS)]
    ag = agreement(FastLM(model.lm, max_batch=1), q8.scheduler.decoder.inner, prompts, n_tokens=12)
    assert ag.teacher_forced >= 0.95, ag
    # continuous batching on llama.cpp = one-by-one on llama.cpp
    singles = [q8.generate([c], params)[0] for c in CONVS]
    assert [r.token_ids for r in singles] == [r.token_ids for r in got]


# -- real weights (slow: SmolLM2-135M + EfficientNet-Lite0; still runs in CI) ------------------------
@pytest.fixture(scope="module")
def real_vlm():
    from pathlib import Path

    from visprompt.models.config import VLMConfig
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel.build(VLMConfig(vision_source="efficientnet-lite0", lm_source="smollm2-135m")).eval()
    return model, Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_real_smollm2_fast_path_equals_transformers(real_vlm):
    """The lean decoder (packed weights, batch 1 and batched) gives transformers' greedy tokens on
    the real SmolLM2-135M with a real photo, and follow-ups served from the caches do too."""
    model, examples = real_vlm
    backend = OwnVLMBackend(model)
    photo = str(examples / "coffee.jpg")
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": q}]}]
        for q in ("What is in this picture?", "Describe the image.")
    ]
    convs.append([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_new_tokens=12)
    want = reference(backend, convs, params)
    same(backend.generate(convs, params), want)  # batched, cold caches
    same([backend.generate([c], params)[0] for c in convs], want)  # one by one, prefixes and images cached
    assert backend.prefix_cache.stats()["hits"] >= 2 and backend.image_cache.stats()["hits"] >= 1
