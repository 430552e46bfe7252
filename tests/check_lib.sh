# check_lib.sh: the pass/fail bookkeeping of the shell end-to-end tests.
#   source tests/check_lib.sh          # from the repository root
#   check "the server answers" curl -sf ...
#   report_checks || exit 1   # prints the counts; fails if any check failed
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
# Prints the counts; returns non-zero when any check failed.
report_checks() {
  echo "$passed passed, $failed failed"
  [[ $failed -eq 0 ]]
}
