#!/usr/bin/env bash
# The CUDA checks we cannot run in CI: run on a machine with one NVIDIA GPU and a Python that has torch.
#   OUT=/some/folder bash scripts/device-check.sh        (results and pictures land in $OUT)
# 1. install core + plugins (no network: --no-index, no dependencies);  2. the default run on CUDA with bf16
# autocast, timed;  3. the same run under torchrun with the NCCL backend (world size 1: one GPU);  4. the 256-px
# XQ-GAN-V step benchmark;  5. VAR-d16 training and sampling images/s at batch 64;  6. a sweep of default-run
# settings (fp32, in parallel) with their held-out metrics and grids;  7. the engine/tokenizer tests with the GPU
# visible (the engine picks CUDA by itself there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/xqgan-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_HOME=$(mktemp -d)
PY=${PYTHON:-python3}
section() { printf '\n===== %s (%s)\n' "$1" "$(date +%T)"; }

section install
wheels=$(ls .whl/*.whl 2>/dev/null || true)
$PY -m pip install -q --no-index --no-deps --no-build-isolation . plugins/*/ $wheels 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
xqgan-run --list-plugins --check | tail -3

metrics() {  # last held-out evaluation of a run folder, one line
  $PY - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
ev = [r for r in rows if r.get("split") == "eval"]
tr = [r for r in rows if r.get("split") == "train"]
e = ev[-1] if ev else {}
keep = ("step", "psnr", "ssim", "lpips", "utilization", "perplexity")
print(" ".join(f"{k}={e[k]:.4g}" if isinstance(e.get(k), float) else f"{k}={e.get(k)}" for k in keep),
      f"| last train images/s {tr[-1].get('images_per_s', 0):.1f}" if tr else "")
EOF
}

section "default run on CUDA, bf16 autocast (precision auto)"
/usr/bin/time -f "wall %e s, max RSS %M KiB" timeout 150 xqgan-run registry.toml --set device.use=cuda \
  --set run.out_dir=/tmp/runs/cuda-bf16 2>&1 | tail -25
metrics /tmp/runs/cuda-bf16
cp /tmp/runs/cuda-bf16/reconstructions.png "$OUT/cuda-bf16-reconstructions.png" 2>/dev/null

section "DDP: torchrun, NCCL backend, world size 1"
timeout 90 torchrun --standalone --nproc_per_node=1 "$(command -v xqgan-run)" registry.toml --set device.use=cuda \
  --set train.steps=60 --set train.checkpoint_every=30 --set train.eval_every=60 \
  --set run.out_dir=/tmp/runs/ddp 2>&1 | grep -iv warn | tail -12
metrics /tmp/runs/ddp

section "256-px XQ-GAN-V step benchmark"
timeout 150 $PY benchmarks/cuda_step.py --config xqgan-v-256 --batch 4 32 --json "$OUT/cuda-step.json"

section "VAR-d16 on the MSVR10P2 token layout: training and sampling images/s at batch 64 (issue 11)"
timeout 240 $PY benchmarks/var_cuda.py --depth 16 --batch 64 --json "$OUT/var-d16.json"

section "default-run settings sweep (fp32, 800 steps each, run side by side)"
declare -A SWEEP=(
  [base]=""
  [lr1e-3]="--set train.lr=1e-3 --set train.disc_lr=1e-3"
  [ds4]="--set encoder.channel_mult=[1,2,4] --set decoder.channel_mult=[1,2,4]"
  [ds4-lr1e-3]="--set encoder.channel_mult=[1,2,4] --set decoder.channel_mult=[1,2,4] --set train.lr=1e-3 --set train.disc_lr=1e-3"
  [ds4-lr2e-3]="--set encoder.channel_mult=[1,2,4] --set decoder.channel_mult=[1,2,4] --set train.lr=2e-3 --set train.disc_lr=2e-3"
  [ds4-lr1e-3-nogan]="--set encoder.channel_mult=[1,2,4] --set decoder.channel_mult=[1,2,4] --set train.lr=1e-3 --set loss.adversarial=0.0"
  [ds4-lr1e-3-b16]="--set encoder.channel_mult=[1,2,4] --set decoder.channel_mult=[1,2,4] --set train.lr=1e-3 --set train.disc_lr=1e-3 --set train.batch_size=16"
  [lr1e-3-dim16]="--set train.lr=1e-3 --set train.disc_lr=1e-3 --set quantizer.dim=16 --set encoder.out_dim=16 --set decoder.in_dim=16"
)
for name in "${!SWEEP[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout 240 xqgan-run registry.toml --set device.use=cuda --set train.precision=fp32 \
    --set run.out_dir=/tmp/sweep/$name ${SWEEP[$name]} >/tmp/sweep-$name.log 2>&1 &
done
wait
for name in "${!SWEEP[@]}"; do
  printf '%-20s ' "$name"; metrics /tmp/sweep/$name 2>/dev/null || { echo FAILED; tail -5 /tmp/sweep-$name.log; }
done
$PY - "$OUT/sweep-grids.png" "${!SWEEP[@]}" <<'EOF'
# one picture: each sweep entry's final reconstruction grid, labelled
import sys
from PIL import Image, ImageDraw
out, names = sys.argv[1], sys.argv[2:]
tiles = []
for n in names:
    try:
        im = Image.open(f"/tmp/sweep/{n}/reconstructions.png").convert("RGB")
    except OSError:
        continue
    canvas = Image.new("RGB", (im.width, im.height + 14), "white")
    canvas.paste(im, (0, 14)); ImageDraw.Draw(canvas).text((2, 1), n, fill="black"); tiles.append(canvas)
if tiles:
    w, h = max(t.width for t in tiles), sum(t.height for t in tiles)
    sheet = Image.new("RGB", (w, h), "white"); y = 0
    for t in tiles:
        sheet.paste(t, (0, y)); y += t.height
    sheet.save(out)
EOF

section "engine + tokenizer tests with the GPU visible"
timeout 200 $PY -m pytest -q -n 8 -p no:cacheprovider tests/test_engine.py tests/test_tokenizer.py \
  tests/test_finetune.py tests/test_devices.py tests/test_binary_codes.py tests/test_diffaug.py \
  plugins/stylegan plugins/dino plugins/finetune plugins/var plugins/llamagen tests/test_generator_run.py 2>&1 | tail -15
section done
