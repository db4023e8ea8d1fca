#!/usr/bin/env sh
# Print the path of a Python >= 3.12: first from PATH, then from pyenv's installed versions (3.12 preferred).
# Used by the Makefile and CI so the same commands work on a laptop, a TPU VM and pyenv-managed machines.
recent_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

for candidate in python3.12 python3.13 python3.14 python3 python; do
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if recent_enough "$path"; then echo "$path"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -t. -k1,1n -k2,2n -k3,3nr); do
    path="$root/versions/$version/bin/python3"
    if [ -x "$path" ] && recent_enough "$path"; then echo "$path"; exit 0; fi
  done
fi
echo "memlab needs Python >= 3.12 (jax >= 0.11 does): none found on PATH or in pyenv; install one, or run" \
     "'make PYTHON=/path/to/python3.12 ...'" >&2
exit 1
