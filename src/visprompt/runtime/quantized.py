"""Quantized decoding through llama.cpp (llama-cpp-python), with a quality gate.

Measured on this project's 2-core AVX2 CPU, torch's own int8 kernels lose to fp32 (weight-only
`_weight_int8pack_mm` ran at 0.17-0.42x `F.linear`; `quantize_dynamic` diverged from fp32 greedy
output after 3 tokens), while llama.cpp's Q4/Q8 kernels decode several times faster than fp32. So
the quantized path keeps the vision encoder and connector in torch and runs the language model in
llama.cpp:

* `write_gguf(lm, path, quant)` writes a transformers Llama, Mistral or Qwen2 LM to GGUF (Q8_0,
  Q4_0, Q4_1, F16 or F32 matrices written by the `gguf` package; Q4_K by llama.cpp's own quantizer
  from the F16 file; norms and biases in F32; Llama's q/k rows permuted to llama.cpp's rotary
  layout, as llama.cpp's `convert_hf_to_gguf.py` does). Without a tokenizer none goes in
  (`no_vocab`): the quantized path tokenizes and feeds token ids and input embeddings itself; with
  one (`visprompt export --format gguf`) the file runs on its own in llama.cpp and Ollama.
* `LlamaCppLM` is a decoder with `FastLM`'s interface (sequences, `prefill` of input embeddings,
  batched `decode` of token ids), so the continuous-batching `Scheduler` drives it unchanged.
  Prompts (with image features already fused into the embeddings) enter as embeddings, the way
  llama.cpp's llava path feeds images; later tokens enter as ids.
* `agreement(reference, candidate, prompts)` is the quality gate: greedy top-1 agreement with the
  fp32 decoder, teacher-forced along the fp32 output (so one early flip does not count as every
  later token wrong), plus how many prompts give an identical free-running continuation.

Leave OMP_WAIT_POLICY unset (or ACTIVE): llama.cpp's CPU backend runs each op on an OpenMP team,
and PASSIVE (threads sleep between parallel regions) cut its decode from ~135 to ~48 tok/s here.

llama-cpp-python is an optional extra (`pip install llama-cpp-python`, a ~8 minute compile on a
small CPU); `llama_cpp_available()` says whether it imports, and everything here fails with a clear
`QuantizedUnavailable` otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import VispromptError

QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "f32", "f16", "q4_k")
# transformers model type -> llama.cpp architecture
GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's llama_ftype
PIP_INSTALL = "pip install llama-cpp-python"


class QuantizedUnavailable(VispromptError):
    pass


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp():
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or a broken shared library
        raise QuantizedUnavailable(f"the quantized path needs llama-cpp-python ({PIP_INSTALL}): {exc}") from exc
    return llama_cpp


# -- GGUF export ------------------------------------------------------------------------------------
def gguf_unsupported_reason(lm: nn.Module) -> str | None:
    cfg = getattr(lm, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in GGUF_ARCHES:
        return f"model type {model_type!r} (llama, mistral and qwen2 are exported)"
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type", "default") != "default":
        return f"rope type {params.get('rope_type')!r}"
    if model_type != "qwen2" and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        return "linear biases"
    window = getattr(cfg, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(cfg, "use_sliding_window", False)):
        if window < cfg.max_position_embeddings:
            return f"sliding-window attention ({window} tokens)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    return None


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers' rotate_half layout -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights_digest(lm: nn.Module) -> str:
    """A content hash of an LM's weights (every byte; names, shapes and dtypes too)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in lm.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
    return h.hexdigest()


def write_gguf(
    lm: nn.Module, path: str | os.PathLike, quant: str = "q8_0", name: str = "visprompt-lm", tokenizer=None
) -> Path:
    """Write a transformers Llama, Mistral or Qwen2 causal LM as a GGUF file llama.cpp can run.

    Args:
        lm: the causal LM (see `gguf_unsupported_reason`).
        path: the file to write (atomically: a temporary sibling renamed into place).
        quant: the matrices' type, one of QUANT_TYPES ("q4_k" needs llama-cpp-python's quantizer).
        name: `general.name`.
        tokenizer: a byte-level BPE tokenizer to write into the file (runtime/gguf_vocab.py), with its
            chat template; None writes no vocabulary.

    Returns:
        The path.
    """
    if quant not in QUANT_TYPES:
        raise VispromptError(f"quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    path = Path(path)
    if quant == "q4_k":  # the gguf package cannot make k-quants: llama.cpp quantizes the F16 file
        f16 = path.with_name(path.name + f".f16-{os.getpid()}")
        try:
            _write_gguf(lm, f16, "f16", name, tokenizer)
            return _llama_cpp_quantize(f16, path, LLAMA_FTYPE_MOSTLY_Q4_K_M)
        finally:
            f16.unlink(missing_ok=True)
    return _write_gguf(lm, path, quant, name, tokenizer)


def _llama_cpp_quantize(source: Path, path: Path, ftype: int) -> Path:
    L = _llama_cpp()
    _silence(L)
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if L.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise QuantizedUnavailable(f"llama.cpp could not quantize {source.name}")
    os.replace(tmp, path)
    return path


def _write_gguf(lm: nn.Module, path: Path, quant: str, name: str, tokenizer) -> Path:
    import gguf

    reason = gguf_unsupported_reason(lm)
    if reason is not None:
        raise QuantizedUnavailable(f"cannot write this language model to GGUF: {reason}")
    cfg = lm.config
    arch = GGUF_ARCHES[cfg.model_type]
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    Q = gguf.GGMLQuantizationType
    mat_type = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "f32": Q.F32, "f16": Q.F16}[quant]
    # token embeddings (and a tied output) stay 8-bit when the matrices are quantized
    emb_type = mat_type if quant in ("f32", "f16") else Q.Q8_0
    file_type = {
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
    }[quant]

    if quant not in ("f32", "f16"):  # llama.cpp quantizes rows in blocks: every matrix row must fill whole blocks
        block = gguf.GGML_QUANT_SIZES[mat_type][0]
        rows = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size}
        rows["attention output"] = n_head * head_dim
        odd = {k: int(v) for k, v in rows.items() if int(v) % block}
        if odd:
            raise QuantizedUnavailable(
                f"{quant} packs weight rows in blocks of {block} values; this model's "
                + ", ".join(f"{k} {v}" for k, v in odd.items())
                + f" is not a multiple of {block}"
            )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    w.add_rope_freq_base(float(theta or getattr(cfg, "rope_theta", 10000.0)))
    vocab = lm.get_input_embeddings().num_embeddings
    w.add_vocab_size(int(vocab))
    if tokenizer is None:
        w.add_tokenizer_model("no_vocab")
    else:
        from .gguf_vocab import add_bpe_vocab

        add_bpe_vocab(w, tokenizer, int(vocab))

    def add(tname: str, t: torch.Tensor, qtype) -> None:
        arr = t.detach().float().cpu().numpy()
        if qtype == Q.F32 or arr.ndim == 1:
            w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)

    # llama.cpp's llama architecture rotates interleaved pairs; its qwen2 one (NEOX) rotates halves as transformers does
    permute = arch == "llama"
    add("token_embd.weight", lm.get_input_embeddings().weight, emb_type)
    for i, layer in enumerate(lm.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, Q.F32)
        for proj, heads in (("q", n_head), ("k", n_kv), ("v", 0)):
            linear = getattr(att, f"{proj}_proj")
            weight, bias = linear.weight.detach().float(), linear.bias
            if permute and heads:
                weight = torch.from_numpy(_permute_rope(weight.numpy(), heads))
            add(f"blk.{i}.attn_{proj}.weight", weight, mat_type)
            if bias is not None:
                add(f"blk.{i}.attn_{proj}.bias", bias, Q.F32)
        add(f"blk.{i}.attn_output.weight", att.o_proj.weight, mat_type)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, Q.F32)
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight, mat_type)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight, mat_type)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight, mat_type)
    add("output_norm.weight", lm.model.norm.weight, Q.F32)
    tied = lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    if not tied:
        add("output.weight", lm.lm_head.weight, emb_type)
    return finish_gguf(w, tmp, path)


def finish_gguf(w, tmp: Path, path: Path) -> Path:
    """Write a filled GGUFWriter's header, metadata and tensors to `tmp`, then rename it to `path`."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def cached_gguf(lm: nn.Module, quant: str, cache_root: str | os.PathLike | None = None) -> Path:
    """The GGUF of `lm` at `quant`, written once per weights content under <cache>/gguf/."""
    from ..models.gguf import default_cache_root

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    path = root / "gguf" / f"lm-{weights_digest(lm)}-{quant}.gguf"
    if not path.is_file():
        write_gguf(lm, path, quant)
    return path


# -- the llama.cpp decoder --------------------------------------------------------------------------
_LOG_CALLBACK = None


def _silence(llama_cpp) -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaCppLM:
    """A llama.cpp context behind the decoder interface the `Scheduler` drives.

    Each sequence is a llama.cpp sequence id with its own KV stream (`ctx_per_seq` positions).
    `supports_kv_export` is False: the prefix KV cache stays with the fp32 path (the image-feature
    cache still applies).
    """

    supports_kv_export = False

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        max_batch: int = 16,
        ctx_per_seq: int = 1024,
        n_threads: int | None = None,
        verbose: bool = False,
        kv_f32: bool = False,
        flash_attn: bool = False,
        kv_unified: bool = False,
    ):
        L = _llama_cpp()
        self._L = L
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            warnings.warn("OMP_WAIT_POLICY=PASSIVE makes llama.cpp ~3x slower; leave it unset", stacklevel=2)
        if not verbose:
            _silence(L)
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self._model:
            raise QuantizedUnavailable(f"llama.cpp could not load {gguf_path}")
        threads = n_threads or torch.get_num_threads()
        cparams = L.llama_context_default_params()
        cparams.n_seq_max = max_batch
        cparams.n_ctx = max_batch * ctx_per_seq
        cparams.n_batch = ctx_per_seq
        cparams.n_ubatch = min(512, ctx_per_seq)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = kv_unified
        cparams.no_perf = True
        # llama.cpp's CPU flash attention works in f16 (logits off by ~5e-4 relative); off, it is exact.
        cparams.flash_attn_type = 1 if flash_attn else 0
        if kv_f32:  # llama.cpp keeps K/V in f16 by default
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise QuantizedUnavailable("llama.cpp could not create a context")
        self._mem = L.llama_get_memory(self._ctx)
        self.n_embd = L.llama_model_n_embd(self._model)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self.max_batch = max_batch
        self.max_len = ctx_per_seq
        self._tok_batch = L.llama_batch_init(max_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(ctx_per_seq, self.n_embd, 1)
        self._free_ids = list(range(max_batch - 1, -1, -1))
        self._len: dict[int, int] = {}
        self.path = Path(gguf_path)

    def close(self) -> None:
        L = self._L
        if getattr(self, "_ctx", None):
            L.llama_batch_free(self._tok_batch)
            L.llama_batch_free(self._emb_batch)
            L.llama_free(self._ctx)
            L.llama_model_free(self._model)
            self._ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- sequences --------------------------------------------------------------------------------
    @property
    def n_active(self) -> int:
        return len(self._len)

    @property
    def sequences(self) -> list[int]:
        return list(self._len)

    def new_sequence(self) -> int:
        if not self._free_ids:
            raise RuntimeError(f"all {self.max_batch} sequence slots are in use")
        seq = self._free_ids.pop()
        self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._len[seq] = 0
        return seq

    def free(self, seq: int) -> None:
        del self._len[seq]
        self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_ids.append(seq)

    def free_all(self) -> None:
        for seq in list(self._len):
            self.free(seq)

    def length(self, seq: int) -> int:
        return self._len[seq]

    def _logits(self, rows: int) -> torch.Tensor:
        ptr = self._L.llama_get_logits(self._ctx)
        arr = np.ctypeslib.as_array(ptr, shape=(rows, self.vocab))
        return torch.from_numpy(arr.copy())

    # -- forward ----------------------------------------------------------------------------------
    def prefill(self, seq: int, embeds: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Append input embeddings [T, D]; next-token logits [V] after the last one."""
        L = self._L
        t = embeds.shape[0]
        start = self._len[seq]
        if start + t > self.max_len:
            raise VispromptError(f"sequence of {start + t} tokens is over the context of {self.max_len}")
        data = embeds.detach().to(torch.float32).contiguous().cpu()
        b = self._emb_batch
        b.n_tokens = t
        ctypes.memmove(b.embd, data.data_ptr(), t * self.n_embd * 4)
        for i in range(t):
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if i == t - 1 else 0
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a prefill of {t} embeddings")
        self._len[seq] = start + t
        return self._logits(1)[0] if logits else None

    def decode(self, seqs: Sequence[int], tokens) -> torch.Tensor:
        """Append one token id to each sequence; next-token logits [B, V] in the order of `seqs`."""
        L = self._L
        toks = torch.as_tensor(tokens).tolist()
        b = self._tok_batch
        b.n_tokens = len(seqs)
        for i, (s, tok) in enumerate(zip(seqs, toks)):
            b.token[i] = int(tok)
            b.pos[i] = self._len[s]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a decode step of {len(seqs)} tokens")
        for s in seqs:
            self._len[s] += 1
        return self._logits(len(seqs))


# -- the quality gate -------------------------------------------------------------------------------
@dataclass
class Agreement:
    teacher_forced: float  # share of positions where the candidate's top-1 equals fp32's greedy token
    identical: float  # share of prompts whose free-running greedy continuation is identical
    first_divergence: list[int]  # per prompt: tokens until the free-running outputs differ (len if never)
    tokens: int

    def passes(self, threshold: float = 0.95) -> bool:
        return self.teacher_forced >= threshold


def greedy_tokens(decoder, embeds: torch.Tensor, n: int, embed_tokens=None) -> list[int]:
    seq = decoder.new_sequence()
    try:
        logits = decoder.prefill(seq, embeds)
        out = [int(logits.argmax())]
        for _ in range(n - 1):
            out.append(int(decoder.decode([seq], [out[-1]])[0].argmax()))
        return out
    finally:
        decoder.free(seq)


def agreement(
    reference,
    candidate,
    prompts: Sequence[torch.Tensor],
    n_tokens: int = 32,
    reference_tokens: Sequence[Sequence[int]] | None = None,
) -> Agreement:
    """Compare greedy decoding of `candidate` with `reference` (both decoders, both idle) on
    prompts given as input embeddings [T, D]. `reference_tokens` (the reference's greedy tokens per
    prompt, from `greedy_tokens`) saves decoding them again."""
    match = total = same = 0
    first_div = []
    for i, embeds in enumerate(prompts):
        ref = (
            list(reference_tokens[i])[:n_tokens]
            if reference_tokens is not None
            else greedy_tokens(reference, embeds, n_tokens)
        )
        seq = candidate.new_sequence()
        try:
            logits = candidate.prefill(seq, embeds)
            for t in range(n_tokens):
                match += int(int(logits.argmax()) == ref[t])
                total += 1
                if t + 1 < n_tokens:
                    logits = candidate.decode([seq], [ref[t]])[0]
        finally:
            candidate.free(seq)
        free = greedy_tokens(candidate, embeds, n_tokens)
        k = next((i for i, (a, b) in enumerate(zip(ref, free)) if a != b), n_tokens)
        first_div.append(k)
        same += int(k == n_tokens)
    return Agreement(match / max(total, 1), same / max(len(prompts), 1), first_div, total)
