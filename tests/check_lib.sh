# check_lib.sh: the pass/fail bookkeeping of the shell end-to-end tests.
#   source tests/check_lib.sh          # from the repository root
#   check "the server answers" curl -sf ...
#   # the caller prints $passed and $failed and exits non-zero on failures
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1" >&2; }
# check NAME COMMAND...: one check, passed when COMMAND succeeds.
check() {
  local name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}
