"""Caption metrics as COCO reports them: pycocoevalcap's own scorers on PTB-tokenized text.

BLEU-4 (`Bleu(4)`, "closest" reference length), ROUGE-L (`Rouge`, beta 1.2), CIDEr-D (`Cider`:
pycocoevalcap's CIDEr is the CIDEr-D variant, with clipped counts and the length penalty, sigma 6;
its document frequencies come from the evaluated set's references), and METEOR 1.5 when Java is
present. Captions are tokenized by Stanford's PTB tokenizer (pycocoevalcap's `PTBTokenizer`, Java)
and, without Java, by `python_ptb_tokenize`, an approximation (lower case, punctuation split off and
dropped, "n't" and "'s" split) that matches it on plain sentences.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import unicodedata
from dataclasses import dataclass, field

# pycocoevalcap's PTBTokenizer drops these tokens after tokenizing.
PTB_PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
PIP_INSTALL = "pip install --no-deps pycocoevalcap"
METEOR_TIMEOUT_S = 600  # METEOR's Java process answers line by line; a stuck one is killed, METEOR left out
_TOKEN = re.compile(r"n't|'\w+|\w+|\.\.\.|--|[^\w\s]")


@dataclass
class CaptionScores:
    corpus: dict[str, float]  # metric -> score over the whole set
    per_item: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> item id -> score
    tokenizer: str = ""


def java_available() -> bool:
    return shutil.which("java") is not None


def plain_text(text: str) -> str:
    """Control, format and line-separator characters as spaces: the Java tools read one caption per
    line, and a model's stray bytes must not split or stall that protocol."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)


@contextlib.contextmanager
def _quiet_java():
    """The Java tokenizer reports its speed and untokenizable characters on the inherited stderr."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def python_ptb_tokenize(text: str) -> str:
    """PTB-like tokens of one caption, space-joined, lower case, punctuation dropped."""
    text = re.sub(r"(\w)n't\b", r"\1 n't", text.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in PTB_PUNCTUATIONS)


def tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    """Item id -> tokenized captions, by the Java PTB tokenizer or its Python approximation."""
    captions = {k: [plain_text(c) for c in v] for k, v in captions.items()}
    if not use_java:
        return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # An empty caption would be an empty line, which the Java tokenizer may drop: "." tokenizes to nothing too.
    wrapped = {k: [{"caption": c if c.strip() else "."} for c in v] for k, v in captions.items()}
    with _quiet_java():
        return PTBTokenizer().tokenize(wrapped)


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        from ..errors import VispromptError

        raise VispromptError(f"caption metrics need pycocoevalcap's scorers: {PIP_INSTALL}") from None
    return Bleu, Rouge, Cider


@dataclass
class TokenizedCaptions:
    """Predictions and references of a set of items, tokenized once and scored on any subset."""

    res: dict[str, list[str]]  # item id -> [the tokenized prediction]
    gts: dict[str, list[str]]  # item id -> tokenized references
    java: bool

    @property
    def tokenizer(self) -> str:
        return "ptb (java)" if self.java else "python approximation of ptb"


def tokenize_captions(
    predictions: dict[str, str], references: dict[str, list[str]], use_java: bool | None = None
) -> TokenizedCaptions:
    """Tokenize predicted and reference captions (Java's PTB tokenizer when `use_java`, None: when found)."""
    _scorers()
    java = java_available() if use_java is None else use_java
    ids = sorted(predictions)
    try:
        res = tokenize({i: [predictions[i]] for i in ids}, java)
        gts = tokenize({i: list(references[i]) for i in ids}, java)
    except OSError as exc:  # e.g. a read-only install: the wrapper writes its input beside the jar
        import warnings

        warnings.warn(f"the Java PTB tokenizer failed ({exc}); tokenizing in Python, METEOR left out", stacklevel=2)
        return tokenize_captions(predictions, references, use_java=False)
    return TokenizedCaptions(res, gts, java)


def score_captions(tokens: TokenizedCaptions, ids: list[str] | None = None, meteor: bool = True) -> CaptionScores:
    """Corpus and per-item BLEU-4, ROUGE-L, CIDEr-D (and METEOR with Java, unless `meteor` is False)
    over `ids` (default: all)."""
    Bleu, Rouge, Cider = _scorers()
    ids = sorted(tokens.res) if ids is None else sorted(ids)
    res = {i: tokens.res[i] for i in ids}
    gts = {i: tokens.gts[i] for i in ids}
    out = CaptionScores({}, {}, tokens.tokenizer)
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    out.corpus["BLEU-4"], out.per_item["BLEU-4"] = float(bleu[3]), dict(zip(ids, map(float, bleu_items[3])))
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr-D", Cider())):
        score, items = scorer.compute_score(gts, res)
        out.corpus[name], out.per_item[name] = float(score), dict(zip(ids, map(float, items)))
    if tokens.java and meteor:
        result = _meteor(gts, res)
        if result is not None:
            out.corpus["METEOR"], out.per_item["METEOR"] = result[0], dict(zip(ids, result[1]))
    return out


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]] | None:
    """METEOR 1.5 through pycocoevalcap's Java wrapper; None (with a warning) when it fails or stalls."""
    import warnings

    from pycocoevalcap.meteor.meteor import Meteor

    with _quiet_java():
        scorer = Meteor()
    watchdog = threading.Timer(METEOR_TIMEOUT_S, scorer.meteor_p.kill)
    watchdog.start()
    try:
        score, items = scorer.compute_score(gts, res)
        return float(score), [float(x) for x in items]
    except (ValueError, OSError) as exc:  # a killed or failed process: no number to read
        warnings.warn(f"METEOR left out: its Java process failed ({exc})", stacklevel=3)
        return None
    finally:
        watchdog.cancel()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], use_java: bool | None = None
) -> CaptionScores:
    """Corpus and per-item BLEU-4, ROUGE-L, CIDEr-D (and METEOR with Java) of predicted captions.

    Args:
        predictions: item id -> the model's caption.
        references: item id -> the human captions (several per item, as in COCO's 5).
        use_java: tokenize with the Java PTB tokenizer and score METEOR (None: when Java is found).

    Returns:
        CaptionScores with metric names "BLEU-4", "ROUGE-L", "CIDEr-D" (and "METEOR").
    """
    return score_captions(tokenize_captions(predictions, references, use_java))
