#!/usr/bin/env bash
# The GPU checks of issue 5 as one call of the device tool (about 8 minutes on one H100), so that a session
# lent a GPU can run them at once. What it measures, in $OUT (default runs/gpu-check):
#   demo.txt    `ddm2 demo` on CUDA with the CPU demo's settings (small network, 800 + 800 steps, bf16
#               autocast): its scores against the CPU run's in README (26.41 / 0.929 / 0.099) say whether
#               the CUDA path computes what the CPU path does
#   speed.json  bench/speed.py with the paper's network on the HARDI-size input (106 x 81 x 76 x 160): Stage I
#   speed.txt   and Stage III steps per second, inference seconds per slice, and a short whole pipeline
#               (peak VRAM); the 30-minute goal is then 1e4 / Stage I rate + 1e5 / Stage III rate + inference
#   compiled.*  the same training and inference figures under torch.compile (skipped when time is short)
#
# Prepare here (the device machine has torch but not dipy, nibabel or pynrrd; nothing can be fetched there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl dipy==1.12.1 nibabel==5.4.2 pynrrd==1.1.3 trx-python==0.6
# then call the device tool's run with carry [".whl"], timeout_s 590 and the command `bash bench/gpu_check.sh`.
# DEVICE=cpu BUDGET_S=... runs the same steps on the CPU with tiny settings (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}  # the summaries (the device tool brings back at most 8 files)
work=runs/gpu-check-work    # the runs themselves
device=${DEVICE:-cuda}
budget_s=${BUDGET_S:-540}  # the compiled figures run only while under half of this has been used
mkdir -p "$out" "$work"
python=${PYTHON:-python3}
if ! "$python" -c "import dipy, nibabel, nrrd" 2>/dev/null; then  # the device machine: from the carried wheels
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ddm2-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ddm2-site
fi
export PYTHONPATH="$PWD/DDM2Slicer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    demo_steps=(--stage1-steps 800 --stage3-steps 800)
    speed=(--preset paper --slices 76 --steps 50 --probe-steps 3 --sampling-steps 1 --inference-batch 64)
    pipeline_steps=(100 100)
else
    demo_steps=(--stage1-steps 4 --stage3-steps 4)
    speed=(--preset small --slices 2 --steps 2 --probe-steps 1 --sampling-steps 1 --inference-batch 4)
    pipeline_steps=(2 2)
fi
failed=0

# step NAME LOG COMMAND...: runs COMMAND with its output in $out/LOG (progress lines left out of the
# console), and goes on after a failure, which it reports
step() {
    local name=$1 log=$2
    shift 2
    echo "== $name (${SECONDS} s so far)"
    "$@" 2>&1 | tee "$out/$log" | grep -Ev '^\[ddm2\] [a-z0-9]+ \[[^]]*\] [0-9]+/[0-9]+ '
    local code=${PIPESTATUS[0]}
    if [ "$code" -ne 0 ]; then
        echo "== FAILED: $name (exit $code)"
        failed=1
    fi
}

"$python" -c "import torch, dipy, nibabel, nrrd; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'dipy', dipy.__version__)" \
    | tee "$out/versions.txt"

rm -rf "$work/demo" "$work/speed" "$work/compiled"
step "demo on $device (small network, the CPU demo's settings)" demo.txt \
    "$python" -m ddm2 demo --device "$device" --preset small "${demo_steps[@]}" --no-baselines --out "$work/demo"
cp "$work/demo/report.png" "$out/demo_report.png" 2>/dev/null

step "speed, paper network" speed.txt \
    "$python" bench/speed.py --device "$device" "${speed[@]}" --pipeline-steps "${pipeline_steps[@]}" \
    --out "$work/speed"
cp "$work/speed/speed.json" "$out/speed.json" 2>/dev/null

if [ "$SECONDS" -lt $((budget_s / 2)) ]; then
    step "speed, paper network, torch.compile" compiled.txt \
        "$python" bench/speed.py --device "$device" "${speed[@]}" --pipeline-steps 1 1 --compile \
        --out "$work/compiled"
    cp "$work/compiled/speed.json" "$out/compiled.json" 2>/dev/null
else
    echo "== torch.compile skipped: ${SECONDS} s used of ${budget_s}" | tee "$out/compiled.txt"
fi
echo "== done in ${SECONDS} s"
exit $failed
