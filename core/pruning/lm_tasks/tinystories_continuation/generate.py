"""Generates tinystories_continuation.jsonl, the data of the `tinystories_continuation` lm-eval task, from the
TinyStories validation text (first 1,000 stories of roneneldan/TinyStories, CDLA-Sharing-1.0; see README.md).

    python core/pruning/lm_tasks/tinystories_continuation/generate.py ../shared/assets/text/tinystories-valid.txt

Each story is cut at a sentence boundary into a context and the sentence that follows it (the continuation).
A row names four contexts (its own and those of three other stories, in a seeded random order); the task asks
under which of them the continuation is most likely (lm-eval's multiple-input mechanism, as in winogrande: the
continuation is fixed and the contexts vary, so a model cannot win by preferring common sentences). Deterministic:
the same input and seed give the same file byte for byte."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

# The text's own mojibake (UTF-8 quotes decoded as cp1252), mapped back to ASCII.
MOJIBAKE = {"â€™": "'", "â€œ": '"', "â€˜": "'", "â€\x9d": '"', "â€": '"'}
SENTENCE_END = re.compile(r'(?<=[.!?])\s+|(?<=[.!?]")\s+')
MIN_CONTEXT_SENTENCES, MAX_CONTEXT_CHARS = 2, 320
MIN_CONTINUATION_WORDS, MAX_CONTINUATION_CHARS = 4, 120
CHOICES = 4


def clean(story: str) -> str | None:
    for bad, good in MOJIBAKE.items():
        story = story.replace(bad, good)
    story = " ".join(story.split())
    return story if story.isascii() else None


def cut(story: str, rnd: random.Random) -> tuple[str, str] | None:
    """(context, continuation): a random valid sentence boundary of the story."""
    sentences = [s for s in SENTENCE_END.split(story) if s]
    cuts = []
    for k in range(MIN_CONTEXT_SENTENCES, len(sentences)):
        context, cont = " ".join(sentences[:k]), sentences[k]
        if len(context) <= MAX_CONTEXT_CHARS and len(cont.split()) >= MIN_CONTINUATION_WORDS:
            if len(cont) <= MAX_CONTINUATION_CHARS:
                cuts.append((context, cont))
    return rnd.choice(cuts) if cuts else None


def rows(text: str, seed: int) -> list[dict[str, object]]:
    rnd = random.Random(seed)
    pieces = []
    for story in text.split("<|endoftext|>"):
        cleaned = clean(story)
        if cleaned:
            piece = cut(cleaned, rnd)
            if piece:
                pieces.append(piece)
    out: list[dict[str, object]] = []
    for i, (context, cont) in enumerate(pieces):
        others = rnd.sample([j for j in range(len(pieces)) if j != i], CHOICES - 1)
        label = rnd.randrange(CHOICES)
        choices = others[:label] + [i] + others[label:]
        out.append({"id": i, "context": context, "continuation": cont, "choices": choices, "label": label})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="tinystories-valid.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tinystories_continuation.jsonl"))
    args = ap.parse_args()
    data = args.source.read_bytes()
    lines = [json.dumps(r, ensure_ascii=True) for r in rows(data.decode("utf-8"), args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} rows from {args.source} (sha256 {hashlib.sha256(data).hexdigest()}) -> {args.out}")


if __name__ == "__main__":
    main()
