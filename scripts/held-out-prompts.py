#!/usr/bin/env python3
"""Cuts the rank study's fixed prompts (examples/prompts/*.jsonl) from the held-out end of a
corpus: COUNT prompts of about CHARS characters, evenly spaced through the last 8 % of the text
(`data prepare` holds out the last 10 % of tokens for validation), each starting at the start of
a line (prose: of a sentence) and ending at a line or word break. One JSON string per line.

python3 scripts/held-out-prompts.py data/corpora/moby-dick.txt prose > examples/prompts/prose.jsonl
python3 scripts/held-out-prompts.py data/corpora/python-stdlib.txt code > examples/prompts/code.jsonl
"""
import json
import sys

COUNT, CHARS = 24, 320


def main():
    path, kind = sys.argv[1], sys.argv[2]
    text = open(path, encoding="utf-8", errors="replace").read()
    start_of_tail = int(len(text) * 0.92)
    room = len(text) - start_of_tail - 2 * CHARS
    for i in range(COUNT):
        at = start_of_tail + i * room // COUNT
        if kind == "prose":
            # the start of the next sentence
            at = min(text.find(end, at) for end in (". ", ".\n") if text.find(end, at) >= 0) + 2
        else:
            # the start of the next non-blank line that is not indented past its block
            at = text.find("\n", at) + 1
            while not text[at:at + 1].strip() or text[at] in "#)]}":
                at = text.find("\n", at) + 1
        piece = text[at:at + CHARS]
        cut = max(piece.rfind("\n"), piece.rfind(" ")) if kind == "prose" else piece.rfind("\n")
        piece = " ".join(piece[:cut].split()) if kind == "prose" else piece[:cut + 1]
        print(json.dumps(piece, ensure_ascii=False))


if __name__ == "__main__":
    main()
