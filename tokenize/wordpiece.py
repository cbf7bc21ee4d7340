"""Learning WordPiece's vocabulary the same way on every run: byte-identical files for the same corpus.

Hugging Face's ``WordPieceTrainer`` (``tokenizers`` <= 0.23) is BPE with a ``##`` continuation
prefix, and gives the ``##x`` pieces their ids in the order a randomly seeded hash map yields the
words (huggingface/tokenizers#1794, PR #2066). Merges with equal counts are ranked by those ids, so
two trainings on the same captions pick different merges and give different vocabularies. This is
the same algorithm with every order fixed: the alphabet and its ``##`` pieces sorted by code
point, and each step merging the most frequent adjacent pair, ties going to the smallest pair of
ids (the library's own tie-break, over ids that no longer depend on the process).

Words come from the caller's normalizer and pre-tokenizer (``text.py``'s BERT-uncased ones), so
the learned pieces split captions exactly as the tokenizer that uses them does.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping

PREFIX = "##"
"""Marks a piece that continues a word, as in BERT's vocabulary."""

Pair = tuple[int, int]


def learn_pieces(word_counts: Mapping[str, int], size: int) -> list[str]:
    """WordPiece tokens in id order: the characters, their ``##`` forms, then merged pieces.

    Merging stops once ``size`` tokens exist or no adjacent pair is left (the alphabet alone may
    already exceed ``size``, as with the library's trainer). The result depends on the counts
    only, never on the mapping's order.
    """
    words = sorted(word_counts)
    counts = [word_counts[w] for w in words]
    initials = {w[0] for w in words}
    continuations = {c for w in words for c in w[1:]}
    tokens = sorted(initials | continuations) + sorted(PREFIX + c for c in continuations)
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = [[ids[w[0]], *(ids[PREFIX + c] for c in w[1:])] for w in words]

    pair_counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}
    for i, piece in enumerate(pieces):
        for pair in zip(piece, piece[1:], strict=False):
            pair_counts[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    # Entries (-count, a, b): the most frequent pair first, then the smallest ids. An entry whose
    # count is no longer the pair's is stale and skipped; every change pushes a fresh one.
    queue = [(-n, *pair) for pair, n in pair_counts.items()]
    heapq.heapify(queue)
    while len(tokens) < size and queue:
        negative, a, b = heapq.heappop(queue)
        pair = (a, b)
        if pair_counts.get(pair, 0) != -negative:
            continue
        merged = tokens[a] + tokens[b].removeprefix(PREFIX)
        if merged not in ids:  # "ab" + "##c" and "a" + "##bc" make the same token
            ids[merged] = len(tokens)
            tokens.append(merged)
        changed: set[Pair] = set()
        for i in sorted(where.pop(pair)):
            old = pieces[i]
            new = _merge(old, pair, ids[merged])
            if new is old:
                continue
            for gone in zip(old, old[1:], strict=False):
                pair_counts[gone] -= counts[i]
                changed.add(gone)
            for made in zip(new, new[1:], strict=False):
                pair_counts[made] += counts[i]
                where.setdefault(made, set()).add(i)
                changed.add(made)
            pieces[i] = new
        for p in sorted(changed):
            if pair_counts[p] > 0:
                heapq.heappush(queue, (-pair_counts[p], *p))
            else:
                del pair_counts[p]
                where.pop(p, None)
    return tokens


def _merge(piece: list[int], pair: Pair, new: int) -> list[int]:
    """``piece`` with each occurrence of ``pair`` replaced by ``new``, left to right without
    overlaps (as the library merges "aaa"); ``piece`` itself if the pair is not in it."""
    a, b = pair
    out: list[int] = []
    i = 0
    while i < len(piece):
        if i + 1 < len(piece) and piece[i] == a and piece[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(piece[i])
            i += 1
    return out if len(out) < len(piece) else piece
