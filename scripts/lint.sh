#!/usr/bin/env bash
# The tree's formatting and Python lint, as CI checks them (.ci/run):
#   - C++/CUDA: clang-format with the tree's .clang-format, every tracked source must be unchanged by it;
#   - Python: pyflakes (Debian's pyflakes3), except lines that carry a `# noqa` naming why.
# `scripts/lint.sh --fix` rewrites the C++/CUDA sources in place instead of checking them.
# Installs clang-format / pyflakes3 with apt-get where missing (as scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v clang-format >/dev/null || need+=(clang-format)
command -v pyflakes3 >/dev/null || need+=(pyflakes3)
if ((${#need[@]})); then
  sudo=; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Tracked files and new ones not yet added (not ignored): a new file is checked before its first commit.
mapfile -t sources < <(git ls-files --cached --others --exclude-standard '*.cpp' '*.hpp' '*.cu' '*.cuh' '*.h')
status=0
if [[ ${1:-} == --fix ]]; then
  clang-format -i --style=file "${sources[@]}"
  echo "lint: clang-format applied to ${#sources[@]} files"
  exit 0
fi
bad=()
for f in "${sources[@]}"; do
  clang-format --style=file "$f" | cmp -s - "$f" || bad+=("$f")
done
if ((${#bad[@]})); then
  echo "lint: ${#bad[@]} file(s) differ from clang-format (run scripts/lint.sh --fix):"
  printf '  %s\n' "${bad[@]:0:20}"
  status=1
else
  echo "lint: clang-format: ${#sources[@]} files formatted"
fi

mapfile -t py < <(git ls-files --cached --others --exclude-standard '*.py')
# pyflakes has no `noqa`; drop the reports whose line says `# noqa` (with a reason).
report=$( (pyflakes3 "${py[@]}" 2>&1 || true) | while IFS= read -r line; do
  file=${line%%:*}; rest=${line#*:}; no=${rest%%:*}
  if [[ -f $file && $no =~ ^[0-9]+$ ]] && sed -n "${no}p" "$file" | grep -q '# noqa'; then continue; fi
  echo "$line"
done)
if [[ -n $report ]]; then
  echo "lint: pyflakes:"; echo "$report"
  status=1
else
  echo "lint: pyflakes: ${#py[@]} files clean"
fi
exit $status
