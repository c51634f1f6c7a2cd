#!/usr/bin/env bash
# The project's prepared device check (issue 13.7): one script, at most 10 minutes, one markdown file.
#     bash analysis_scripts/benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: $OUT, else figures/
# On a CUDA machine it measures, on the GPU:
#   1. the Flat-LoRA step time, exact and inplace modes against LoRA, in bf16 (bench_flatlora_step.py);
#   2. the warm Hessian-vector product against a gradient, and a top-5 to 1e-6 on rt-minilm;
#   3. a collective over nccl on one GPU (one process: nccl refuses two ranks on one device);
#   4. the test suite's CUDA tests (pytest -k "gpu or cuda").
# Without CUDA each step runs its CPU fallback (fp32 instead of bf16, gloo instead of nccl; step 4
# reports the skips), and the file says so: the script is exercised on every machine.
# Every step has its own time limit (570 s in all); a failing step is recorded and the next one runs.
# On this project's 2-core CPU machine the fallback took 258 s (75, 154, 7 and 22 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DIR=${1:-${OUT:-figures}}
mkdir -p "$DIR"
MD="$DIR/gpu_check.md"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$CUDA" = 1 ]; then DEV=cuda DTYPE=bfloat16 BACKEND=nccl; else DEV=cpu DTYPE=float32 BACKEND=gloo; fi

step() {  # step TITLE SECONDS COMMAND...: run, time-limited, its output into the file
    local title=$1 limit=$2; shift 2
    echo "## $title" >>"$MD"; echo >>"$MD"; echo '```' >>"$MD"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$DIR/.step.log" 2>&1; local rc=$?
    grep -v -e "Loading weights" -e "^USDT:" -e "CPUAllocator" -e "FutureWarning" -e "^  warnings.warn" \
        "$DIR/.step.log" | tail -n 40 >>"$MD"
    echo '```' >>"$MD"
    echo "exit $rc after $((SECONDS - t0)) s (limit $limit s)" >>"$MD"; echo >>"$MD"
    echo "[gpu_check] $title: exit $rc after $((SECONDS - t0)) s"
}

{
    echo "# Device check"
    echo
    echo "\`bash analysis_scripts/benchmarks/gpu_check.sh\` on $(date -u +%F), $(hostname)."
    echo
    $PY - <<'EOF'
import platform, torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {platform.processor() or platform.machine()}; "
      + (f"device {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}" if cuda
         else "**no CUDA device: every step below is its CPU fallback**"))
EOF
    echo
} >"$MD"

step "1. Flat-LoRA step time ($DEV, $DTYPE)" 180 \
    $PY analysis_scripts/benchmarks/bench_flatlora_step.py --device "$DEV" --dtype "$DTYPE" --reps 10 \
    --warmup 3 --drift-steps 200 --out "$DIR/gpu_flatlora_step.md"

step "2. Hessian-vector product and top-5 on rt-minilm ($DEV)" 180 $PY - "$DEV" <<'EOF'
import statistics, sys, time
import numpy as np, torch
from flatlora import TrainConfig, get_task, prepare_model
from landscape import Loss, hessian_eigenvalues
from landscape.hessian.operator import HessianOperator

device = torch.device(sys.argv[1])
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
task = get_task("rt-minilm")
model = prepare_model(task, TrainConfig(task="rt-minilm", method="lora", seed=0).resolved(task)).to(device).eval()
loss = Loss(task.batches("test", 16, limit=16))
op = HessianOperator(model, loss, "lora", include_trainable=True)
params = [p for p in model.parameters() if p.requires_grad]
v = np.random.default_rng(0).standard_normal(op.shape[0])

def timed(fn, reps=10):
    fn(); sync(); out = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); sync(); out.append(time.perf_counter() - t0)
    return statistics.median(out)

batch = loss.on(device)[0]

def gradient():
    torch.autograd.grad(loss.batch_value(model, batch), params)

with op.session():
    g, h = timed(gradient), timed(lambda: op.matvec(v))
print(f"{op.shape[0]} coordinates: gradient {g * 1e3:.2f} ms, warm Hessian-vector product {h * 1e3:.2f} ms, "
      f"ratio {h / g:.2f}")
t0 = time.perf_counter()
top = hessian_eigenvalues(model, loss, "lora", k=5, tol=1e-6, include_trainable=True, progress=False)
print(f"top-5 to 1e-6: {np.array2string(np.asarray(top.eigenvalues), precision=4)}, {top.num_hvp} products, "
      f"{time.perf_counter() - t0:.1f} s")
EOF

cat >"$DIR/.collective.py" <<EOF
import torch, torch.distributed as dist
dist.init_process_group("$BACKEND")
x = torch.arange(4.0, device="cuda" if "$BACKEND" == "nccl" else "cpu")
dist.all_reduce(x)
print(f"all_reduce over {dist.get_backend()} on {x.device}: {x.tolist()} (expected [0, 1, 2, 3])")
assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
dist.destroy_process_group()
EOF
step "3. a collective over $BACKEND (torchrun, one process)" 60 \
    $PY -m torch.distributed.run --nproc_per_node 1 "$DIR/.collective.py"

step "4. the suite's CUDA tests" 150 $PY -m pytest -q -rs -p no:cacheprovider tests -k "gpu or cuda"
rm -f "$DIR/.step.log" "$DIR/.collective.py"
echo "[gpu_check] wrote $MD"
