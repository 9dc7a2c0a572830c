"""Run exported GGUF files in llama.cpp (llama-cpp-python) the way its own tools do: the language
model through `llama_cpp.Llama`, images through libmtmd (the library behind `llama-mtmd-cli` and
`llama-server --mmproj`). Greedy decoding by hand, so the tests compare token ids."""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import torch


class LlamaCppVLM:
    """An exported (model.gguf, mmproj.gguf) pair loaded in llama.cpp; mmproj may be None (text only)."""

    def __init__(self, lm_path, mmproj_path=None, n_ctx: int = 512):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.L, self.M = llama_cpp, mtmd_cpp
        self.llm = llama_cpp.Llama(model_path=str(lm_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, verbose=False)
        self.ctx = None
        if mmproj_path is not None:
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
            with _quiet_stderr():
                self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
            assert self.ctx, f"libmtmd could not load {mmproj_path}"

    @property
    def marker(self) -> str:
        return self.M.mtmd_default_marker().decode()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _chunks(self, text: str, images):
        """libmtmd's chunks of a prompt whose images are marked by `self.marker`, and their bitmaps."""
        M = self.M
        arrays = [np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8)) for im in images]
        bitmaps = [
            M.mtmd_bitmap_init(a.shape[1], a.shape[0], a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))) for a in arrays
        ]
        inp = M.mtmd_input_text()
        raw = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
        chunks = M.mtmd_input_chunks_init()
        with _quiet_stderr():
            rc = M.mtmd_tokenize(
                self.ctx, chunks, ctypes.byref(inp), (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps), len(bitmaps)
            )
        assert rc == 0, f"mtmd_tokenize failed ({rc})"
        return chunks, bitmaps

    def image_embeddings(self, image) -> torch.Tensor:
        """[n_tokens, D] what the mmproj makes of one image (libmtmd's encoder output)."""
        M = self.M
        chunks, bitmaps = self._chunks(self.marker, [image])
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    with _quiet_stderr():
                        assert M.mtmd_encode_chunk(self.ctx, chunk) == 0
                    n = M.mtmd_input_chunk_get_n_tokens(chunk)
                    d = self.llm.n_embd()
                    flat = np.ctypeslib.as_array(M.mtmd_get_output_embd(self.ctx), shape=(n * d,))
                    return torch.from_numpy(flat.copy()).view(n, d)
            raise AssertionError("no image chunk")
        finally:
            self._free(chunks, bitmaps)

    def greedy(self, text: str, images=(), n: int = 12, stop=()) -> list[int]:
        """Greedy token ids after `text` (images marked by `self.marker`), stopping at `stop` ids."""
        llm, L = self.llm, self.L
        llm.reset()
        llm._ctx.kv_cache_clear()
        if images:
            chunks, bitmaps = self._chunks(text, images)
            new_past = L.llama_pos(0)
            try:
                with _quiet_stderr():
                    rc = self.M.mtmd_helper_eval_chunks(
                        self.ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(new_past)
                    )
                assert rc == 0, f"mtmd_helper_eval_chunks failed ({rc})"
            finally:
                self._free(chunks, bitmaps)
            llm.n_tokens = new_past.value
        else:
            llm.eval(self.tokenize(text))
        out = []
        for _ in range(n):
            token = int(np.argmax(self._last_logits()))
            if token in stop:
                break
            out.append(token)
            llm.eval([token])
        return out

    def _last_logits(self) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _free(self, chunks, bitmaps) -> None:
        self.M.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            self.M.mtmd_bitmap_free(b)

    def close(self) -> None:
        if self.ctx:
            self.M.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()


@contextlib.contextmanager
def _quiet_stderr():
    """libmtmd logs through its own callback to stderr; keep test output readable."""
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        yield
