#!/usr/bin/env bash
# The GPU checks of issues 15 and 16 as one prepared script, for one GPU (sized for an H200 to
# end inside a 10-minute command; each part has its own time limit so one overrun keeps the rest).
#
# On this machine, once: `make device-data` (copies Fashion-MNIST into data/, git-ignored). Then,
# with the device tool, from the repository root:
#     run(command="bash bench/gpu_check.sh", carry=["data"], timeout_s=600)
# The JSON results land in $OUT (the device tool brings them back) or bench/out/gpu here; record
# them with this command in docs/RESULTS.md. CPU smoke test (tiny, checks the plumbing only):
#     SMOKE=1 bash bench/gpu_check.sh
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then  # here, in the project's venv (the device machine has its own torch)
  py=.venv/bin/python
  out=${OUT:-$(mktemp -d)}  # smoke results are not results: never in bench/out
  device=cpu; runtimes=eager,onnxruntime; batches="1 2"; repeats=2; epochs=2; limit=900; threads=1
  extra=(--set data.train_size=512 --set data.val_size=256 --set train.recal_images=256)
else
  py=python3
  device=cuda; runtimes=eager,cudagraph; batches="1 256"; repeats=20; epochs=12; limit=420; threads=8
  extra=()
  out=${OUT:-bench/out/gpu}
fi
mkdir -p "$out"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$out/device.txt"

# issue 16: ResNet-50 at 224, uniform widths, eager vs CUDA graphs, batch 1 and 256
timeout "$((limit / 3))" "$py" bench/bench_serving.py --device "$device" --parts widths --models resnet50 \
  --runtimes "$runtimes" --batch-sizes $batches --repeats-large "$repeats" --threads "$threads" \
  --out "$out/serving_gpu.json" || echo "serving part failed or ran out of time (rc $?)"

# issue 15: the supernet recipe vs one network per width trained alone, E epochs, seed 0
# (configs/fmnist_bench.yaml with the full training split minus 5k validation, as the issue's
# 12-epoch reference table; phase 2: channels ordered, frozen teacher with the label term)
timeout "$limit" "$py" bench/bench_accuracy.py --seeds 0 --epochs "$epochs" --phase1 0.5 --recipe teacher \
  --threads "$threads" --set train.device="$device" --set data.root=data/fashion-mnist "${extra[@]}" \
  --recipe-set optim.lr=0.02 --recipe-set train.teacher_label_term=true --recipe-set train.kd_ramp_epochs=0.2 \
  --runs "$(mktemp -d)" --out "$out/accuracy_gpu_e${epochs}.json" \
  || echo "accuracy part failed or ran out of time (rc $?)"
ls -l "$out"
