#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command (a lent GPU machine is billed from its start; see
# docs/TEAM_NOTES.md): install qformat without dependencies into the machine's python, then run the Triton kernel
# tests for real, the conformance vectors on the Triton kernel, the GEMV benchmark and the end-to-end decode benchmark.
# Logs go to $OUT (or ./gpu-logs). Each step has its own time limit so one slow step cannot eat the others.
#
#     bash bench/gpu_session.sh [steps...]     # steps: env conformance launch e2e gemv tests aot (default: all)
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
steps=${*:-"env conformance launch e2e gemv tests aot"}

install() {
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 && return 0
    # Fallback: put the packages on sys.path under their import names and describe the distribution by hand, so
    # that the entry points (the plugin system) are found.
    local site=/tmp/qformat-site
    mkdir -p "$site/qformat-0+gpu.dist-info"
    ln -sfn "$PWD/qformat" "$site/qformat"
    ln -sfn "$PWD/plugins" "$site/qformat_plugins"
    ln -sfn "$PWD/kernels" "$site/qformat_kernels"
    ln -sfn "$PWD/conformance" "$site/qformat_conformance"
    printf 'Metadata-Version: 2.1\nName: qformat\nVersion: 0+gpu\n' >"$site/qformat-0+gpu.dist-info/METADATA"
    python3 - "$site/qformat-0+gpu.dist-info/entry_points.txt" <<'EOF'
import sys, tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
with open(sys.argv[1], "w") as f:
    for group, items in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()))
EOF
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed (see install.log); using $site" | tee -a "$OUT/install.log"
}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name rc=$rc"
}

install
step env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, transformers, numba; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, numba.__version__); print(torch.cuda.get_device_name())"; python3 -c "import qformat_kernels.triton_plugin, qformat; print(\"qformat\", qformat.__version__)"'
step conformance 120 python3 -c "import sys; from qformat.cli import main; sys.exit(main())" conformance --impl triton --failures-only
step launch 90 bash -c 'cd bench && python3 triton_launch.py'
step e2e 180 python3 bench/e2e_gpu.py --json "$OUT/e2e.json"
step gemv 150 python3 bench/gemv_triton.py --batch 1
step tests 300 python3 -m pytest tests/test_kernels_triton.py -q -p no:cacheprovider ${QF_TESTS_K:+-k "$QF_TESTS_K"}
step aot 60 python3 -m qformat_kernels.triton_aot
exit 0
