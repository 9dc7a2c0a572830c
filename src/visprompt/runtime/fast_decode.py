"""A lean fp32 decoder for Llama-family language models, with a preallocated, slotted KV cache.

`FastLM` runs the transformer blocks of a transformers `LlamaForCausalLM` (or Mistral / Qwen2, which
share the layout) without `Cache` objects, mask construction or per-token re-allocation. A step of up
to `kernel_rows` rows (decoding, follow-up prefills, short prompts) runs each layer as one call of a
C++ kernel (`csrc/llama_layer.cpp` via `cpu_kernels.py`) that streams the weights from packed
16-column panels; without a compiler, or for longer steps, plain tensor ops run instead, reading
decode-friendly packed copies (see `_Proj`: a transposed layout for one row, oneDNN's blocked layout
for several). Where one path gives way to the other is chosen per CPU and model by a short,
cached calibration (`kernel_plan.py`; `FastLM.kernel_plan` says what was chosen, and
`VISPROMPT_KERNEL_ROWS` fixes it). `packed=False` reads the modules' own tensors on either path. Norms, RoPE and
attention follow transformers op for op. The embedding and `lm_head` modules are still called as
modules when they have hooks, so hooks on them keep firing.

Sequences live in *slots*: rows of one KV buffer `[layers, 2, rows, max_len, kv_heads, head_dim]`
that grows by doubling (rows up to `max_batch`, positions up to the model's context), so a decode
step allocates nothing big. Each sequence has its own length and its own positions (from 0), which
is what lets requests join and leave a running batch (see `runtime/scheduler.py`). Active sequences
occupy rows 0..n-1; freeing one moves the last row into its place, so a decode step reads the
cache through plain views.

`unsupported_reason(lm)` says why a model cannot take this path (a different architecture,
adapters wrapping its linears, hooks on modules it bypasses, a dynamic RoPE); callers then use the
reference transformers path instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def unsupported_reason(lm: nn.Module) -> str | None:
    """None when `FastLM` reproduces `lm`'s forward pass; otherwise why not."""
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if _rope_type(config) not in STATIC_ROPE:
        return f"rope type {_rope_type(config)!r} is not static"
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r}"
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(lm, "lm_head"):
        return "unexpected module layout"
    for name, module in inner.named_modules():
        if module is inner.embed_tokens:
            continue
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            return f"{name} is a {type(module).__name__} (an adapter?), not a plain Linear"
        if _has_hooks(module):
            return f"{name or 'model'} has forward hooks"
        if name.endswith("_proj") and type(module) is not nn.Linear:
            return f"{name} is a {type(module).__name__}, not a plain Linear"
    return None


def _kernel_reason(lm: nn.Module) -> str | None:
    """None when the C++ layer kernel can run `lm` (fp32 contiguous CPU weights, no biases beyond q/k/v)."""
    cfg = lm.config
    for i, layer in enumerate(lm.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        for name, lin in (
            ("o_proj", att.o_proj),
            ("gate_proj", mlp.gate_proj),
            ("up_proj", mlp.up_proj),
            ("down_proj", mlp.down_proj),
        ):
            if lin.bias is not None:
                return f"layer {i} {name} has a bias"
        tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight] + [
            lin.weight
            for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        ]
        for t in tensors:
            if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
                return "weights are not contiguous fp32 on the CPU"
    if getattr(cfg, "head_dim", None) and cfg.head_dim > 512:
        return "head_dim over 512"
    return None


def _onednn_reorder(w: torch.Tensor, batch_hint: int = 16) -> torch.Tensor | None:
    """w [out, in] repacked in oneDNN's blocked layout for `_linear_pointwise`, or None if unavailable."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, w.shape[1]), packed, None, "none", [], "")
        return packed
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class _Proj:
    """One or more nn.Linear layers that read the same input, run as one product where possible.

    Three layouts of the same weights, each where it was measured fastest on this project's CPU
    (2-core AVX2, MKL + oneDNN), SmolLM2-135M:

    * a transposed, fused [in, out] copy for one row (batch-1 decoding), cut into column blocks, one
      per thread, run as one `bmm`: MKL's mat-vec reads a 576-wide [out, in] matrix at ~11-12 GB/s,
      an [in, out] one at 13-25 GB/s, and two [in, out/2] blocks on 2 cores at 18-34 GB/s;
    * oneDNN's blocked layout for several rows (batched decoding, prefill): MKL repacks the weights
      on every small-M call, oneDNN's prepacked weights do not (~2x tok/s at 4 and 16 rows; a
      12-token prefill 2x, an 86-token one 1.25x faster);
    * the module's own [out, in] tensors through `F.linear` when a layout is not packed.

    Packed copies take the thread count at construction (`torch.get_num_threads()`).
    """

    __slots__ = ("parts", "sizes", "bias", "t", "d", "out", "splits")

    def __init__(self, linears: list[nn.Linear], gemv: bool, onednn: bool):
        self.parts = [(lin.weight, lin.bias) for lin in linears]
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self.out = sum(self.sizes)
        self.bias = self.t = self.d = None
        self.splits = 1
        if not (gemv or onednn):
            return
        with torch.no_grad():
            w = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
            if any(lin.bias is not None for lin in linears):
                self.bias = torch.cat(
                    [lin.bias if lin.bias is not None else torch.zeros(lin.weight.shape[0]) for lin in linears]
                )
            if gemv:
                # [splits, in, out/splits]: one bmm runs the column blocks on `splits` threads (MKL's
                # mat-vec alone uses one core; two blocks read 1.25-1.45x faster on 2 cores).
                self.splits = splits = max(1, min(torch.get_num_threads(), 8))
                per = -(-self.out // splits)
                t = torch.zeros(splits, w.shape[1], per, dtype=w.dtype, device=w.device)
                wt = w.t()
                for j in range(splits):
                    cols = wt[:, j * per : (j + 1) * per]
                    t[j, :, : cols.shape[1]] = cols
                self.t = t
            if onednn:
                self.d = _onednn_reorder(w)

    def extra_bytes(self) -> int:
        n = 0
        for t in (self.t, self.d):
            if t is not None:
                n += self.parts[0][0].element_size() * self.out * self.parts[0][0].shape[1]
        return n

    def __call__(self, x: torch.Tensor):
        # x: [M, in] -> [M, out] (or a tuple of [M, out_i], one per fused layer)
        m = x.shape[0]
        if m == 1 and self.t is not None:
            if self.splits == 1:
                y = x @ self.t[0]
            else:
                y = torch.bmm(x.expand(self.splits, 1, x.shape[1]), self.t).view(1, -1)
                if y.shape[1] != self.out:
                    y = y[:, : self.out]
            if self.bias is not None:
                y = y + self.bias
        elif m > 1 and self.d is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.d, self.bias, "none", [], "")
        else:
            outs = [F.linear(x, w, b) for w, b in self.parts]
            return outs[0] if len(outs) == 1 else tuple(outs)
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


class _Layer:
    __slots__ = ("ln1", "ln2", "qkv", "o", "gate_up", "down", "kernel_args", "panels")

    def __init__(self, layer: nn.Module, gemv: bool, onednn: bool):
        att, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        # the C++ kernel's view of the layer: the modules' own tensors (no copies)
        biases = [lin.bias for lin in (att.q_proj, att.k_proj, att.v_proj)]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b.detach() if b is not None else torch.zeros(lin.weight.shape[0])
                    for b, lin in zip(biases, (att.q_proj, att.k_proj, att.v_proj))
                ]
            )
        self.kernel_args = (
            self.ln1.detach(),
            self.ln2.detach(),
            [att.q_proj.weight.detach(), att.k_proj.weight.detach(), att.v_proj.weight.detach()],
            bias,
            att.o_proj.weight.detach(),
            mlp.gate_proj.weight.detach(),
            mlp.up_proj.weight.detach(),
            mlp.down_proj.weight.detach(),
        )
        self.panels: list[torch.Tensor] = []  # the kernel's several-row layout, filled by FastLM when packed
        self.qkv = _Proj([att.q_proj, att.k_proj, att.v_proj], gemv, onednn)
        self.o = _Proj([att.o_proj], gemv, onednn)
        self.gate_up = _Proj([mlp.gate_proj, mlp.up_proj], gemv, onednn)
        self.down = _Proj([mlp.down_proj], gemv, onednn)

    def pack_panels(self, kernel) -> None:
        (q, k, v), wo, wg, wu, wd = self.kernel_args[2], *self.kernel_args[4:]
        with torch.no_grad():
            self.panels = [
                kernel.pack_panels(torch.cat([q, k, v])),
                kernel.pack_panels(wo),
                kernel.pack_panels(wg),
                kernel.pack_panels(wu),
                kernel.pack_panels(wd),
            ]


def _packed_bytes(lm: nn.Module) -> int:
    """Extra bytes of both packed layouts (about 1.8x the LM's projection + output weights)."""
    n = sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, nn.Linear))
    return 4 * 2 * (n + lm.lm_head.weight.numel())


class FastLM:
    """Prefill and batched decode over a slotted KV cache. Not thread-safe: one driver at a time.

    Every method runs under `torch.inference_mode` (the KV buffer is an inference tensor).
    """

    def __init__(
        self,
        lm: nn.Module,
        max_batch: int = 16,
        initial_len: int = 256,
        packed: bool | None = None,
        max_packed_bytes: int = 2 << 30,
        kernels: bool | None = None,
    ):
        """packed: keep decode-friendly copies of the weights (see `_Proj`: ~1.4x faster at batch 1,
        ~2x batched, for ~1.8x the LM's weight memory extra); the default when that extra is under
        max_packed_bytes. Packed copies do not follow later weight updates: build a new FastLM
        (OwnVLMBackend does so when the weights' version counters change).

        kernels: run each layer of a step of up to `kernel_rows` rows as one call of the C++ kernel
        (`runtime/cpu_kernels.py`; panel copies of the weights when packed, the modules' own tensors
        otherwise). The default uses it when it builds on this machine and fits the model (else
        `kernel_reason` says why); True insists (ValueError if it cannot). `kernel_rows` and
        `head_kernel_rows` come from the CPU's kernel plan (`kernel_plan.py`: calibrated once per
        CPU and model, cached on disk, or VISPROMPT_KERNEL_ROWS); `kernel_plan` describes it. The
        transposed one-row copies are kept only where one row runs on torch ops."""
        reason = unsupported_reason(lm)
        if reason is not None:
            raise ValueError(f"FastLM cannot run this model: {reason}")
        cfg = lm.config
        self.lm = lm
        self.embed_tokens = lm.get_input_embeddings()
        self.lm_head = lm.lm_head
        self.norm_w = lm.model.norm.weight
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.kernel_reason = "turned off (kernels=False)" if kernels is False else _kernel_reason(lm)
        self.kernel = None
        if self.kernel_reason is None:
            from . import cpu_kernels

            self.kernel = cpu_kernels.load()
            self.kernel_reason = None if self.kernel is not None else cpu_kernels.reason()
        if kernels and self.kernel is None:
            raise ValueError(f"the C++ layer kernel cannot run this model: {self.kernel_reason}")
        if packed is None:
            packed = _packed_bytes(lm) <= max_packed_bytes
        self.packed = bool(packed)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim**-0.5
        self.max_len = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.max_batch = int(max_batch)
        self.device = self.norm_w.device
        self.dtype = self.norm_w.dtype
        rotary = lm.model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(self.device, torch.float32)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.vocab = self.embed_tokens.num_embeddings
        self._nq = self.n_heads * self.head_dim
        self._nkv = self.n_kv * self.head_dim
        self.plan = self._choose_plan()
        self.kernel_rows = self.plan.layer_rows  # steps of up to this many rows run on the kernel
        self.head_kernel_rows = self.plan.head_rows  # lm_head products of up to this many rows
        self.layers = [_Layer(layer, self.packed and self.kernel_rows < 1, self.packed) for layer in lm.model.layers]
        self.head = _Proj([lm.lm_head], self.packed and self.head_kernel_rows < 1, self.packed)
        self.head_panels = None
        if self.kernel is not None and self.packed:
            if self.kernel_rows > 0:
                for layer in self.layers:
                    layer.pack_panels(self.kernel)
            if self.head_kernel_rows > 0:
                with torch.no_grad():
                    self.head_panels = self.kernel.pack_panels(self.lm_head.weight.detach())
        # KV buffer and per-row bookkeeping (rows 0..n_active-1 are in use).
        self._len_cap = 0
        self._row_cap = 0
        self.kv = torch.empty(0)
        self._cos = self._sin = torch.empty(0)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.n_active = 0
        self._row_of: dict[int, int] = {}
        self._seq_at: list[int] = []
        self._next_id = 0
        self._reserve(1, min(initial_len, self.max_len))

    # -- the kernel plan ---------------------------------------------------------------------------
    @property
    def kernel_plan(self) -> str:
        """Which code runs which step here, e.g. "kernel ≤16 rows, oneDNN above; lm_head kernel ≤8 (avx512, cached)"."""
        return self.plan.describe(self.kernel_rows, self.head_kernel_rows)

    def _choose_plan(self):
        from . import kernel_plan as kp

        other = "oneDNN" if self.packed and torch.backends.mkldnn.is_available() else "torch ops"
        if self.kernel is None:
            return kp.KernelPlan(0, 0, "no kernel", other, note=self.kernel_reason or "")
        simd = self.kernel.simd() if hasattr(self.kernel, "simd") else ""
        rows = kp.env_rows()
        if rows is not None:
            return kp.KernelPlan(rows, rows, kp.ENV, other, simd)
        from . import cpu_kernels
        from .cpu import cpu_summary

        cfg = self.lm.config
        about = {
            "cpu": cpu_summary(),
            "kernel": cpu_kernels.build_key(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "packed": self.packed,
            "other": other,
            "shapes": [cfg.hidden_size, cfg.intermediate_size, self.n_heads, self.n_kv, self.head_dim, self.vocab],
            "head_bias": self.lm_head.bias is not None,
            "qkv_bias": self.lm.model.layers[0].self_attn.q_proj.bias is not None,
        }
        key = kp.plan_key(**about)
        plan = kp.load_cached(key)
        if plan is None:
            plan = self._calibrate(kp, other, simd)
            kp.save(key, plan, about)
        return plan

    @torch.inference_mode()
    def _calibrate(self, kp, other: str, simd: str):
        """Time the first layer and lm_head, kernel against torch ops, per row count (kernel_plan.py)."""
        gemv = onednn = self.packed
        p = _Layer(self.lm.model.layers[0], gemv, onednn)
        head = _Proj([self.lm_head], gemv, onednn)
        head_panels = None
        if self.packed:
            p.pack_panels(self.kernel)
            with torch.no_grad():
                head_panels = self.kernel.pack_panels(self.lm_head.weight.detach())
        prefix = min(kp.PREFIX, self.max_len // 4)
        grid = [m for m in kp.LAYER_GRID if prefix + m <= self.max_len]
        n = prefix + grid[-1]
        cos, sin = self._rope_tables(n)
        kv = torch.zeros(1, 2, 1, n, self.n_kv, self.head_dim, dtype=self.dtype, device=self.device)
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(n, self.lm.config.hidden_size, generator=gen).to(self.dtype)
        layer_ms = []
        for m in grid:
            x = base[:m]
            pos = torch.arange(prefix, prefix + m)
            rows = torch.zeros(m, dtype=torch.long)
            c, s = cos[prefix : prefix + m].unsqueeze(1), sin[prefix : prefix + m].unsqueeze(1)
            mask = torch.ones(m, prefix + m, dtype=torch.bool).tril(prefix)

            def kernel_step(x=x, pos=pos, rows=rows):
                self.kernel.layer_forward(
                    x.clone(), *p.kernel_args, kv, 0, rows, pos, cos, sin, self.eps, self.scale,
                    self.n_heads, self.n_kv, 0, p.panels,
                )  # fmt: skip

            def torch_step(x=x, c=c, s=s, mask=mask):
                self._prefill_layer(x, p, kv[0], 0, prefix, c, s, mask, False, False)

            layer_ms.append((m, *kp.time_pair(kernel_step, torch_step)))
        head_ms = []
        w = self.lm_head.weight.detach()
        for m in kp.HEAD_GRID:
            x = base[:m].contiguous()
            head_ms.append(
                (
                    m,
                    *kp.time_pair(
                        lambda x=x: self.kernel.head_forward(x, self.norm_w.detach(), w, self.eps, head_panels),
                        lambda x=x: head(self._rms(x, self.norm_w)),
                    ),
                )
            )
        return kp.KernelPlan(
            kp.choose_rows(layer_ms), kp.choose_rows(head_ms), "calibrated", other, simd, layer_ms, head_ms
        )

    # -- memory ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _reserve(self, rows: int, length: int) -> None:
        """Grow the KV buffer (doubling) to at least `rows` x `length`; the content is kept."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is over the model's context of {self.max_len}")
        if rows <= self._row_cap and length <= self._len_cap:
            return
        if rows > self.max_batch:
            raise RuntimeError(f"{rows} sequences asked for, over max_batch {self.max_batch}")
        new_rows, new_len = self._row_cap, self._len_cap
        if rows > new_rows:
            new_rows = min(max(rows, 2 * new_rows), self.max_batch)
        if length > new_len:
            new_len = min(max(length, 2 * new_len), self.max_len)
        kv = torch.zeros(
            len(self.layers), 2, new_rows, new_len, self.n_kv, self.head_dim, dtype=self.dtype, device=self.device
        )
        if self.n_active:
            kv[:, :, : self.n_active, : self._len_cap] = self.kv[:, :, : self.n_active]
        self.kv = kv
        lengths = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        lengths[: self.lengths.numel()] = self.lengths
        self.lengths = lengths
        if new_len > self._cos.shape[0]:
            self._cos, self._sin = self._rope_tables(new_len)
        self._row_cap, self._len_cap = new_rows, new_len

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin of positions 0..n-1, [n, head_dim]"""
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq  # as transformers computes it, row by row
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half's sign folded in

    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # -- sequences ------------------------------------------------------------------------------
    @torch.inference_mode()
    def new_sequence(self) -> int:
        """A fresh, empty sequence; raises when max_batch sequences are live."""
        if self.n_active >= self.max_batch:
            raise RuntimeError(f"all {self.max_batch} sequence slots are in use")
        self._reserve(self.n_active + 1, 0)
        seq, row = self._next_id, self.n_active
        self._next_id += 1
        self._row_of[seq] = row
        self._seq_at.append(seq)
        self.lengths[row] = 0
        self.n_active += 1
        return seq

    @torch.inference_mode()
    def free(self, seq: int) -> None:
        """Release a sequence; the last active row moves into its place."""
        row = self._row_of.pop(seq)
        last = self.n_active - 1
        if row != last:
            moved = self._seq_at[last]
            n = int(self.lengths[last])
            self.kv[:, :, row, :n] = self.kv[:, :, last, :n]
            self.lengths[row] = n
            self._row_of[moved] = row
            self._seq_at[row] = moved
        self._seq_at.pop()
        self.lengths[last] = 0
        self.n_active -= 1

    def free_all(self) -> None:
        for seq in list(self._row_of):
            self.free(seq)

    @property
    def sequences(self) -> list[int]:
        """Live sequences in row order."""
        return list(self._seq_at)

    def length(self, seq: int) -> int:
        return int(self.lengths[self._row_of[seq]])

    @torch.inference_mode()
    def export_kv(self, seq: int, n: int | None = None) -> torch.Tensor:
        """A copy of the first n cached positions of `seq`: [layers, 2, n, kv_heads, head_dim]."""
        row = self._row_of[seq]
        n = int(self.lengths[row]) if n is None else n
        return self.kv[:, :, row, :n].clone()

    @torch.inference_mode()
    def import_kv(self, seq: int, kv: torch.Tensor) -> None:
        """Make `seq` (empty) start with cached positions from `export_kv`."""
        row = self._row_of[seq]
        n = kv.shape[2]
        self._reserve(self.n_active, n)
        self.kv[:, :, row, :n] = kv
        self.lengths[row] = n

    @torch.inference_mode()
    def truncate(self, seq: int, n: int) -> None:
        """Forget every cached position of `seq` from n on."""
        row = self._row_of[seq]
        self.lengths[row] = min(n, int(self.lengths[row]))

    # -- math -----------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's w * (x * rsqrt(mean(x^2) + eps)) in one kernel (equal outputs, checked)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        # x: [..., heads, head_dim]. transformers: x*cos + cat(-x2, x1)*sin; roll(x) = cat(x2, x1)
        # with the sign folded into sin_signed gives the same products, in fewer ops.
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed

    def _attention_inputs(self, x: torch.Tensor, p: _Layer, cos: torch.Tensor, sin: torch.Tensor):
        # x: [N, D] -> q [N, heads, hd], k and v [N, kv_heads, hd]; q and k rotated
        n = x.shape[0]
        q, k, v = p.qkv(self._rms(x, p.ln1))
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv, self.head_dim)
        v = v.view(n, self.n_kv, self.head_dim)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, h: torch.Tensor, p: _Layer) -> torch.Tensor:
        g, u = p.gate_up(h)
        return p.down(F.silu(g) * u)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if _has_hooks(self.lm_head):  # hooks on lm_head still see every call
            return self.lm_head(self._rms(hidden, self.norm_w))
        w = self.lm_head.weight
        if (
            self.kernel is not None
            and hidden.shape[0] <= self.head_kernel_rows
            and w.dtype == torch.float32
            and w.is_contiguous()
        ):
            return self.kernel.head_forward(
                hidden.contiguous(), self.norm_w.detach(), w.detach(), self.eps, self.head_panels
            )
        return self.head(self._rms(hidden, self.norm_w))

    def _run_kernel(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, last_from: int) -> None:
        """x [M, D] through every layer in place; row m of x is slot rows[m] at position pos[m]. The
        last layer finishes only rows last_from.. (the others' K/V are all a later step reads)."""
        last = len(self.layers) - 1
        for li, p in enumerate(self.layers):
            self.kernel.layer_forward(
                x,
                *p.kernel_args,
                self.kv,
                li,
                rows,
                pos,
                self._cos,
                self._sin,
                self.eps,
                self.scale,
                self.n_heads,
                self.n_kv,
                last_from if li == last else 0,
                p.panels,
            )

    def extra_bytes(self) -> int:
        """Memory of the packed weight copies."""
        n = (
            sum(
                p.qkv.extra_bytes() + p.o.extra_bytes() + p.gate_up.extra_bytes() + p.down.extra_bytes()
                for p in self.layers
            )
            + self.head.extra_bytes()
        )
        panels = [t for p in self.layers for t in p.panels] + (
            [self.head_panels] if self.head_panels is not None else []
        )
        return n + sum(t.numel() * t.element_size() for t in panels)

    # -- prefill --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: int, embeds: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Append `embeds` [T, D] (input embeddings, image tokens already fused) to `seq`.

        Returns the next-token logits after the last of them, [V], when `logits` is set.
        """
        row = self._row_of[seq]
        start = int(self.lengths[row])
        t = embeds.shape[0]
        end = start + t
        self._reserve(self.n_active, end)
        if self.kernel is not None and t <= self.kernel_rows:
            x = embeds.reshape(t, -1).to(self.dtype, copy=True).contiguous()  # the kernel writes x in place
            rows = torch.full((t,), row, dtype=torch.long)
            self._run_kernel(x, rows, torch.arange(start, end), t - 1 if logits else t)
            self.lengths[row] = end
            return self._logits(x[-1:])[0] if logits else None
        kv = self.kv
        cos = self._cos[start:end].unsqueeze(1)  # [T, 1, hd]
        sin = self._sin[start:end].unsqueeze(1)
        if start == 0:
            mask, causal = None, True
        else:  # query i (at start + i) sees keys 0..start + i
            mask = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(start)
            causal = False
        x = embeds.to(self.dtype).reshape(t, -1)
        last_layer = len(self.layers) - 1
        for li, p in enumerate(self.layers):
            # Only the last position's output is read (its logits): the last layer finishes one row
            x = self._prefill_layer(x, p, kv[li], row, start, cos, sin, mask, causal, li == last_layer and logits)
        self.lengths[row] = end
        if not logits:
            return None
        return self._logits(x[-1:])[0]

    def _prefill_layer(self, x, p: _Layer, kv, row: int, start: int, cos, sin, mask, causal: bool, last_only: bool):
        """One layer of a torch-ops prefill: x [T, D] at positions start.. of slot `row` of kv (one
        layer's [2, rows, len, kv_heads, hd]); with last_only, only the last row comes out."""
        t = x.shape[0]
        end = start + t
        q, k, v = self._attention_inputs(x, p, cos, sin)
        kv[0, row, start:end] = k
        kv[1, row, start:end] = v
        keys = kv[0, row, :end].transpose(0, 1).unsqueeze(0)  # [1, kv, end, hd]
        vals = kv[1, row, :end].transpose(0, 1).unsqueeze(0)
        if last_only and t > 1:
            # the others' K/V are stored above, so attention output, o_proj and MLP run for one row
            q, x, mask, causal = q[-1:], x[-1:], None, False  # the last query sees every key
        att = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys,
            vals,
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=self.group > 1,
        )  # [1, H, T, hd]
        x = x + p.o(att[0].transpose(0, 1).reshape(x.shape[0], -1))
        return x + self._mlp(self._rms(x, p.ln2), p)

    @torch.inference_mode()
    def prefill_many(self, seqs: list[int], embeds: list[torch.Tensor]) -> torch.Tensor:
        """`prefill` of several sequences at once: the next-token logits after each, [n, V].

        On the kernel the rows of every sequence run as one step (each row at its own slot and
        position), so the weights are read once for all of them -- what several requests admitted
        together (a burst of questions about one image) cost in one follow-up's time and a bit."""
        sizes = [e.shape[0] for e in embeds]
        limit = self.kernel_rows
        if self.kernel is None or not seqs or min(sizes) < 1 or max(sizes) > limit:
            return torch.stack([self.prefill(s, e) for s, e in zip(seqs, embeds)])
        if sum(sizes) > limit:  # steps of at most kernel_rows rows
            groups, total = [[]], 0
            for i, t in enumerate(sizes):
                if total + t > limit:
                    groups.append([])
                    total = 0
                groups[-1].append(i)
                total += t
            return torch.cat([self.prefill_many([seqs[i] for i in g], [embeds[i] for i in g]) for g in groups])
        rows, pos = [], []
        for seq, t in zip(seqs, sizes):
            row = self._row_of[seq]
            start = int(self.lengths[row])
            self._reserve(self.n_active, start + t)
            rows.append(torch.full((t,), row, dtype=torch.long))
            pos.append(torch.arange(start, start + t))
        x = (
            torch.cat([e.reshape(e.shape[0], -1) for e in embeds]).to(self.dtype).contiguous()
        )  # a new tensor: written in place
        self._run_kernel(x, torch.cat(rows), torch.cat(pos), 0)
        for seq, p in zip(seqs, pos):
            self.lengths[self._row_of[seq]] = int(p[-1]) + 1
        last = torch.tensor(sizes).cumsum(0) - 1
        return self._logits(x.index_select(0, last))

    # -- decode ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[int], tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """Append one token to each of `seqs` (all live sequences, any order); next-token logits [B, V]
        in the order of `seqs`."""
        b = len(seqs)
        if b != self.n_active:
            raise ValueError(f"decode takes every live sequence ({self.n_active}), got {b}")
        rows = [self._row_of[s] for s in seqs]
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if self.kernel is not None and b <= self.kernel_rows:
            # rows in the order of seqs: the kernel takes each row's slot and position as given
            rows_t = torch.tensor(rows, dtype=torch.long)
            pos = self.lengths.index_select(0, rows_t)
            self._reserve(b, int(pos.max()) + 1)
            x = self.embed_tokens(tokens).to(self.dtype).contiguous()  # [B, D]
            self._run_kernel(x, rows_t, pos, 0)
            self.lengths[:b] += 1
            return self._logits(x)
        in_order = rows == list(range(b))
        if not in_order:  # put tokens in row order; logits go back to seqs order at the end
            rows_t = torch.tensor(rows, device=self.device)
            tokens = torch.empty_like(tokens).index_copy_(0, rows_t, tokens)
        lengths = self.lengths[:b]
        top = int(lengths.max()) + 1
        self._reserve(b, top)
        kv = self.kv
        pos = lengths.clone()  # [B]
        cos = self._cos.index_select(0, pos).unsqueeze(1)  # [B, 1, hd]
        sin = self._sin.index_select(0, pos).unsqueeze(1)
        same = b == 1 or bool((lengths == lengths[0]).all())
        if same:
            p0 = int(pos[0])
            mask = None
        else:
            flat_idx = torch.arange(b, device=self.device) * self._len_cap + pos  # rows of [B * len_cap]
            mask = (torch.arange(top, device=self.device)[None, :] <= pos[:, None]).view(b, 1, 1, top)
        x = self.embed_tokens(tokens).to(self.dtype)  # [B, D]
        for li, p in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, p, cos, sin)
            if same:
                kv[li, 0, :b, p0] = k
                kv[li, 1, :b, p0] = v
            else:
                kv[li, 0, :b].view(-1, self.n_kv, self.head_dim).index_copy_(0, flat_idx, k)
                kv[li, 1, :b].view(-1, self.n_kv, self.head_dim).index_copy_(0, flat_idx, v)
            keys = kv[li, 0, :b, :top].transpose(1, 2)  # [B, kv, top, hd]
            vals = kv[li, 1, :b, :top].transpose(1, 2)
            att = F.scaled_dot_product_attention(
                q.unsqueeze(2), keys, vals, attn_mask=mask, scale=self.scale, enable_gqa=self.group > 1
            )
            x = x + p.o(att.reshape(b, -1))  # att: [B, H, 1, hd]
            x = x + self._mlp(self._rms(x, p.ln2), p)
        self.lengths[:b] += 1
        logits = self._logits(x)  # [B, V]
        if not in_order:
            logits = logits.index_select(0, rows_t)
        return logits


def supports(lm: nn.Module) -> bool:
    return unsupported_reason(lm) is None


def kv_bytes_per_token(lm: nn.Module) -> int:
    cfg = lm.config
    heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * n_kv * hd * 4


__all__ = ["FastLM", "unsupported_reason", "supports", "kv_bytes_per_token"]
