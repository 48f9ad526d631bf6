# Sourced by the GPU check scripts: `step NAME SECONDS COMMAND...` runs COMMAND with a time limit, logs it to
# $out/NAME.log and appends its exit status and duration to $out/summary.txt (so one hang costs only its share).
step() {
    local name=$1 limit=$2
    shift 2
    local tic=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - tic)) s" | tee -a "$out/summary.txt"
}
