#!/usr/bin/env bash
# ConSPO (or DisCO) on GSM8K with verl 0.9.1 on a GPU cluster: Ray, FSDP, vLLM rollouts.
#
# Before running, on EVERY node (Ray workers import the plug-in through verl's entry points):
#   pip install 'verl[vllm]==0.9.1' 'conspo[verl]'
#   python3 examples/data_preprocess/gsm8k.py --local_save_dir "$DATA_DIR"   # from verl's repository
# and start Ray across the nodes (ray start --head on one, ray start --address=... on the others).
#
#   METHOD=conspo NNODES=2 bash examples/verl/run_conspo_gsm8k.sh [more verl overrides]
#
# The settings marked "required" keep every prompt's rollouts together in each micro-batch; without them
# the loss raises an error naming them (see docs/verl.md). CONSPO_PRINT_OVERRIDES=1 prints the overrides
# instead of launching (the tests compose them with verl's own config loader).
set -euo pipefail

METHOD=${METHOD:-conspo}                      # conspo or disco
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
N=${N:-8}                                     # rollouts per prompt: the group size G
PROMPTS=${PROMPTS:-128}                       # prompts per training step; a multiple of NNODES * GPUS_PER_NODE
MINI=${MINI:-32}                              # prompts per optimizer step (4 per generation batch, as DisCO);
                                              # a multiple of NNODES * GPUS_PER_NODE. ConSPO has no trust region
                                              # by default: the 3 later steps train on rollouts of an older policy
                                              # (MINI=$PROMPTS avoids it; or add ...conspo.trust_region=True)
TOTAL_STEPS=${TOTAL_STEPS:-300}               # also the horizon of ConSPO's margin curriculum (its first 30%)
LR=${LR:-1e-6}

# The options default to the ConSPO paper's (and the TRL trainer's): tau 10, a cosine margin from 0 to 0.01 over
# the first 30% of training, no trust region for ConSPO; DisCO-DRO with tau 10 and its KL trust region. They take
# the TRL trainer's names, e.g. +actor_rollout_ref.actor.policy_loss.conspo.margin_max=0.02 (docs/verl.md).
case "$METHOD" in
  conspo) OPTIONS=(
      +actor_rollout_ref.actor.policy_loss.conspo.total_steps="$TOTAL_STEPS"   # required: the margin's horizon
    ) ;;
  disco) OPTIONS=(
      +actor_rollout_ref.actor.policy_loss.disco.disco_variant=dro
    ) ;;
  *) echo "METHOD must be conspo or disco, got $METHOD" >&2; exit 2 ;;
esac

ARGS=(
  # The plug-in: group codes from the estimator, the loss and its options, the group-preserving trainer.
  algorithm.adv_estimator="$METHOD"                                   # required
  +algorithm.conspo.correct_threshold=0.5
  actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig
  actor_rollout_ref.actor.policy_loss.loss_mode="$METHOD"             # required
  "${OPTIONS[@]}"
  trainer.v1.trainer_mode=conspo                                      # required when data-parallel size > 1
  # Whole groups per micro-batch.
  actor_rollout_ref.rollout.n="$N"
  actor_rollout_ref.actor.ppo_mini_batch_size="$MINI"
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$N"           # required: a multiple of rollout.n
  actor_rollout_ref.actor.use_dynamic_bsz=False                       # required
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False            # verl asserts it equals the actor's
  actor_rollout_ref.actor.shuffle=False                               # required
  # The objective is the whole loss: no entropy bonus, no reference KL, no in-reward KL (the objectives have none).
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.use_kl_loss=False
  algorithm.use_kl_in_reward=False
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.actor.optim.lr="$LR"
  # Data, model, rollouts.
  data.train_files="$DATA_DIR/train.parquet"
  data.val_files="$DATA_DIR/test.parquet"
  data.train_batch_size="$PROMPTS"
  data.max_prompt_length=512
  data.max_response_length=1024
  data.filter_overlong_prompts=True
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.temperature=0.6
  actor_rollout_ref.rollout.tensor_model_parallel_size=1
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32
  # Cluster and bookkeeping.
  trainer.nnodes="$NNODES"
  trainer.n_gpus_per_node="$GPUS_PER_NODE"
  trainer.total_training_steps="$TOTAL_STEPS"
  trainer.critic_warmup=0
  trainer.logger='["console","wandb"]'
  trainer.project_name=conspo
  trainer.experiment_name="${METHOD}-gsm8k-$(basename "$MODEL")"
  trainer.save_freq=50
  trainer.test_freq=25
)

if [[ "${CONSPO_PRINT_OVERRIDES:-0}" == 1 ]]; then
  printf '%s\n' "${ARGS[@]}" "$@"
  exit 0
fi
exec python3 -m verl.trainer.main_ppo "${ARGS[@]}" "$@"
