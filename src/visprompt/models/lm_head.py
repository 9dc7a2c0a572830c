"""The LM head on chosen positions only.

A training loss needs logits only where a label is: answer tokens, a small part of a VLM's sequence
(never the image tokens or the prompt). `head_rows` makes any transformers causal LM apply its output
layer to the chosen final hidden states only, through a forward pre-hook on
`lm.get_output_embeddings()`: the LM's own code still runs after the head (a logit soft-cap or scale
applies to each logit alone, so to the chosen ones as to all), and nothing else in the LM changes.
The hidden states the head read are kept (mixture fusion scores images with them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

Select = Callable[[torch.Tensor], torch.Tensor]


class HeadInput:
    """What the output layer read during a `head_rows` block.

    Attributes:
        hidden: the hidden states the head read (after the selection), None if it never ran.
        selected: whether the selection was applied before the head.
    """

    def __init__(self, select: Select | None):
        self.select = select
        self.hidden: torch.Tensor | None = None
        self.selected = False

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM's output logits at the chosen positions: as they came when the head read only those,
        else selected from the whole [R, T, V] (an LM whose head did not run as a module)."""
        if self.select is None or self.selected:
            return logits
        return self.select(logits)


@contextlib.contextmanager
def head_rows(lm: nn.Module, select: Select | None = None) -> Iterator[HeadInput]:
    """While active, the output layer of `lm` reads `select(hidden)` instead of the final hidden
    states (`select` maps [R, T, D] to [1, n, D], or any shape the head accepts); without `select` it
    reads them unchanged. Yields a `HeadInput` holding what it read.

    Usage: `with head_rows(lm, lambda h: h[keep][None]) as head: out = lm(...)`, then
    `head.logits(out.logits)` is [1, n, V] for the n positions `keep` marks.
    """
    seen = HeadInput(select)

    def hook(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if select is not None:
            hidden = select(hidden)
            seen.selected = True
        seen.hidden = hidden
        return (hidden, *args[1:])

    handle = lm.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def keep_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] bool: the positions whose logits a next-token loss reads (position t predicts token
    t+1, so t is kept when labels[:, t+1] is not `ignore_index`; the last position never is)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    return keep
