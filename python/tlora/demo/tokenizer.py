"""A word-level CLIP tokenizer built from a word list (no downloads).

CLIPTokenizer is byte-pair based; listing every word and its left-to-right merge chain makes each
listed word one token, so a caption tokenizes word by word and a placeholder such as "sks" is a
single, never-trained token.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop for one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        best, i = min((ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(pieces, pieces[1:])))
        if best == 1 << 30:
            break
        first, second = pieces[i], pieces[i + 1]
        merged, out, j = first + second, [], 0
        while j < len(pieces):
            if j + 1 < len(pieces) and pieces[j] == first and pieces[j + 1] == second:
                out.append(merged)
                j += 2
            else:
                out.append(pieces[j])
                j += 1
        pieces = out
    return pieces


def vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary layout: the two specials, single characters with and without the
    end-of-word marker, then the tokens the merges build. Merges are added until every listed
    word is a single token: where earlier merges split a word differently, merges of the pieces
    it does get are appended (a lower priority never changes a word that is already whole)."""
    words = list(dict.fromkeys(words))
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-")
    tokens += chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(16):
        pending = [(w, _bpe(w, ranks)) for w in words]
        pending = [(w, p) for w, p in pending if len(p) > 1]
        if not pending:
            break
        for _, pieces in pending:
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
    else:
        raise RuntimeError("could not make every word a single token")
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, [f"{a} {b}" for a, b in merges]


def clip_tokenizer(words: Iterable[str], max_length: int):
    """A CLIPTokenizer over `words` that pads/truncates to `max_length` tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(words)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        # An explicit model_max_length is required: the default overflows when tokenizing.
        return CLIPTokenizer.from_pretrained(
            d, model_max_length=max_length, pad_token="<|endoftext|>", local_files_only=True
        )
