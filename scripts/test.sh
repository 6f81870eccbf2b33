#!/usr/bin/env bash
# `make unit`: every test binary of the workspace, each one run even when
# another fails (--no-fail-fast), then one closing line that counts them
# all together: "tests: N passed, M failed" (", K ignored" when any were).
# Exits non-zero when any test failed or any binary did not build or run.
set -uo pipefail
cd "$(dirname "$0")/.."

jobs=${JOBS:-2}
log=target/test-output.log
mkdir -p target
"${CARGO:-cargo}" test -j"$jobs" --no-fail-fast --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# libtest's per-binary line: "test result: ok. 31 passed; 0 failed; 2 ignored; …"
read -r passed failed ignored binaries < <(awk '
  /^test result: / {
    for (i = 1; i <= NF; i++) {
      if ($(i + 1) ~ /^passed;/)  p += $i
      if ($(i + 1) ~ /^failed;/)  f += $i
      if ($(i + 1) ~ /^ignored;/) g += $i
    }
    n++
  }
  END { printf "%d %d %d %d\n", p, f, g, n }' "$log")

echo
echo "Test binaries run: $binaries (log: $log)"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  # A binary that did not compile or crashed counts no failed test itself.
  echo "cargo test exited $status with no failing test counted: a binary did not build or run (see above)"
  failed=1
fi
line="tests: $passed passed, $failed failed"
[ "$ignored" -gt 0 ] && line="$line, $ignored skipped"
echo "$line"
exit "$status"
