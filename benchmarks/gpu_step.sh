# Sourced by benchmarks/gpu_checks.sh. `step NAME SECONDS COMMAND...` runs COMMAND with a time limit, logs it to
# $out/NAME.log and appends its exit status and duration to $out/summary.txt (so one hang costs only its share);
# a limit of 0 skips the step and says so, as does a name
# missing from GPU_CHECKS_ONLY when that is set (`selected NAME`). `limit WANTED RESERVE` prints WANTED cut to what is left of $budget
# (counted from $start) after keeping RESERVE seconds for the steps after it.
selected() { [[ -z ${GPU_CHECKS_ONLY:-} || ",$GPU_CHECKS_ONLY," == *",$1,"* ]]; }

step() {
    local name=$1 limit=$2
    shift 2
    if ! selected "$name"; then
        echo "== $name: not selected (GPU_CHECKS_ONLY=$GPU_CHECKS_ONLY)" | tee -a "$out/summary.txt"
        return 0
    fi
    if ((limit <= 0)); then
        echo "== $name: skipped, the budget is spent" | tee -a "$out/summary.txt"
        return 0
    fi
    local tic=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local why=""
    ((rc == 124 || rc == 137)) && why="; stopped there, partial results kept"
    echo "== $name: exit $rc in $((SECONDS - tic)) s (limit ${limit} s$why)" | tee -a "$out/summary.txt"
}

limit() {
    local wanted=$1 reserve=$2
    local left=$((budget - (SECONDS - start) - reserve))
    ((left < wanted)) && wanted=$left
    ((wanted < 0)) && wanted=0
    echo "$wanted"
}
