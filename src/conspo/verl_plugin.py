"""ConSPO and DisCO as verl policy losses (verl 0.9.1); the only conspo module that imports verl.

How verl finds it: ``pip install conspo`` declares the entry point ``conspo = "conspo.verl_plugin"`` in
the group ``verl.plugins``, which ``import verl`` loads in every process (driver, Ray workers).
``VERL_USE_EXTERNAL_MODULES=conspo.verl_plugin`` does the same for releases without entry points.
verl logs a failing entry point only at DEBUG level, so this module logs its own failure as an ERROR
before re-raising.

What it registers:

* policy losses ``conspo`` and ``disco`` (``actor_rollout_ref.actor.policy_loss.loss_mode``);
* advantage estimators ``conspo`` and ``disco`` (``algorithm.adv_estimator``, the same function): verl
  hands a policy loss per-token tensors of one micro-batch, never rewards or prompt ids, so the
  estimator writes into ``advantages`` a *group code* per rollout: its verdict, its group, the group's
  size and the training step (layout in :func:`encode_group_codes`);
* the v1 trainer mode ``conspo`` (``trainer.v1.trainer_mode=conspo``): verl's sync trainer, except that
  it balances *whole groups* across data-parallel ranks (verl's own balancing splits groups), tells the
  estimator the training step, which drives the margin curriculum, and checks the settings below on the
  driver before any worker starts.

Options (``policy_loss.conspo`` / ``policy_loss.disco``) carry the names and defaults of the TRL trainer's
``ConSPOConfig`` (the paper's: tau 10, cosine margin from 0 to 0.01 over the first 30% of training, trust
region off for ConSPO and on for DisCO); this plug-in's former names (``m0``, ``m_max``, ``ramp_frac``,
``step_at``, ``tr_delta``, ``tr_beta``, ``variant``) are deprecated aliases. A setting that has no effect under
the chosen loss is refused with a message naming it.

The margin is read once per generation batch: in verl one training step is one generation batch, the
estimator writes the step (verl's global step minus one) into every rollout's code, and every loss call of
that batch (all micro-batches, mini-batches and PPO epochs) reads m(step) of ``total_steps`` training steps.

Two verl-free neighbours hold the parts that need no verl: ``conspo.verl_options`` (the typed options and their
checks) and ``conspo.verl_codes`` (the estimator's group codes and their decoding in the loss); their names are
re-exported here.

A rollout with no token in its loss mask takes no part: it leaves its group for the loss and every metric,
as in the TRL trainer (docs/objectives.md, section 6).

Exactness (docs/objectives.md, section 9, "whole groups per micro-batch"): every loss call decodes the
groups it holds, raises if one is incomplete or comes from another generation batch, and evaluates the
objective of ``conspo.objectives`` on them at the current parameters. Dividing by the number of groups in
verl's global mini-batch (``global_batch_size / rollout.n``) and multiplying by ``dp_size`` (verl averages
gradients over ranks) makes the summed gradient that of the full mini-batch loss, for any micro-batch split,
at every optimizer step, ppo_epochs > 1 included. Documented departures (docs/verl.md):

* groups are averaged over *all* groups of the mini-batch (``group_norm="all"``, the DisCO code's choice):
  the number of *valid* groups of a mini-batch is not known to a micro-batch (and a group none of whose
  rollouts has a token still counts among them);
* with the trust region on, the hinge ``beta * [KL - delta]_+`` uses each micro-batch's own KL estimate,
  each weighted by its share of the mini-batch's tokens; with one micro-batch per rank it is exact.

Why this file is long: it is the whole verl adapter, everything that must import verl in one place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_log = logging.getLogger(__name__)


def _report_failure(exc: BaseException) -> None:
    _log.error(
        "conspo's verl plug-in failed to load (%s: %s); the policy losses 'conspo' and 'disco' are NOT "
        "registered. conspo.verl_plugin needs verl==0.9.1: pip install 'conspo[verl]'.",
        type(exc).__name__,
        exc,
    )


try:
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    from conspo.objectives import conspo_loss, disco_loss, kl_trust_region, sequence_scores
    from conspo.verl_codes import (  # noqa: F401  (re-exported: the plug-in's names stay where they were)
        EXCLUDED,
        MAX_GROUP_SIZE,
        MAX_GROUPS,
        MAX_STEP,
        NEGATIVE,
        POSITIVE,
        _StepSource,
        compute_group_codes,
        decode_group_codes,
        decode_micro_batch,
        encode_group_codes,
    )
    from conspo.verl_options import (  # noqa: F401
        METHOD_OPTIONS,
        ConSPOOptions,
        DiscoOptions,
        field_defaults,
        is_empty,
        parse_options,
        section,
    )
except Exception as _exc:  # verl swallows plug-in errors at DEBUG level: say it loudly first
    _report_failure(_exc)
    raise

__all__ = [
    "ConSPOOptions",
    "DiscoOptions",
    "ConSPOPolicyLossConfig",
    "conspo_policy_loss",
    "disco_policy_loss",
    "compute_group_codes",
    "encode_group_codes",
    "decode_group_codes",
    "group_balanced_order",
    "check_trainer_config",
]

# The registered dataclass for verl's config. verl instantiates ``policy_loss`` from its ``_target_``, so
# pointing that at this class is what lets Hydra accept the extra keys.
_PolicyLossConfigBase: Any
try:
    from verl.workers.config import ActorConfig as _ActorConfig
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfigBase
except Exception as _exc:
    _report_failure(_exc)
    raise

# verl settings read only by verl's own policy losses: under loss_mode conspo/disco they change nothing, so a value
# other than verl's default is refused (as the TRL trainer refuses TRL's loss fields).
_IDLE_POLICY_LOSS_FIELDS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
_IDLE_ACTOR_FIELDS = ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c")


def _refuse_idle_verl_settings(method: str, values: Mapping[str, Any], names: tuple[str, ...], prefix: str,
                               defaults: Mapping[str, Any]) -> None:  # fmt: skip
    idle = [f"{prefix}.{name}={values[name]!r}" for name in names if name in values and values[name] != defaults[name]]
    if idle:
        raise ValueError(
            f"loss_mode {method} never reads {', '.join(idle)} (read only by verl's own policy losses), so "
            f"{'it is' if len(idle) == 1 else 'they are'} refused; remove {'it' if len(idle) == 1 else 'them'}"
        )


def _check_actor_settings(method: str, actor: Any) -> None:
    """Refuse actor settings that loss_mode ``method`` never reads (verl's PPO clip ranges)."""
    values = {name: section(actor, name) for name in _IDLE_ACTOR_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    _refuse_idle_verl_settings(method, values, _IDLE_ACTOR_FIELDS, "actor_rollout_ref.actor", field_defaults(_ActorConfig))


@dataclass
class ConSPOPolicyLossConfig(_PolicyLossConfigBase):
    """verl's ``PolicyLossConfig`` plus the options of loss_mode conspo and disco, validated at load.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig``
    and set options as ``+actor_rollout_ref.actor.policy_loss.conspo.tau=10``. Options of the method that
    ``loss_mode`` does not select, and verl's own policy-loss settings under conspo/disco, are refused: they
    would have no effect.
    """

    conspo: Any = field(default_factory=dict)
    disco: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate the active method's options when the config loads, not at the first loss call. BaseConfig
        # freezes assigned fields, so the typed options are stored through object.__setattr__.
        for method, cls in METHOD_OPTIONS.items():
            given = getattr(self, method)
            if self.loss_mode == method:
                object.__setattr__(self, method, parse_options(cls, given, f"policy_loss.{method}"))
            elif not is_empty(given):
                keys = sorted(given) if isinstance(given, Mapping) else [type(given).__name__]
                raise ValueError(
                    f"policy_loss.{method} options {keys} would have no effect under loss_mode={self.loss_mode!r}, "
                    f"so they are refused; remove them, or set loss_mode={method}"
                )
        if self.loss_mode in METHOD_OPTIONS:
            values = {name: getattr(self, name) for name in _IDLE_POLICY_LOSS_FIELDS}
            _refuse_idle_verl_settings(self.loss_mode, values, _IDLE_POLICY_LOSS_FIELDS, "policy_loss",
                                       field_defaults(_PolicyLossConfigBase))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The policy losses.
# --------------------------------------------------------------------------------------------------


def _normaliser(config: Any, n_groups_here: int, n_tokens_here: Tensor) -> tuple[float, float, Tensor | float]:
    """(groups in the global mini-batch, dp_size, tokens in the global mini-batch) from verl's batch info.

    Without global information (a direct call, dp_size 1) the micro-batch is the whole batch.
    """
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = int(info.get("dp_size") or 1)
    global_rows, global_tokens = info.get("global_batch_size"), info.get("batch_num_tokens")
    rollout_n = section(config, "rollout_n")
    if global_rows is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required in config.global_batch_info when dp_size > 1")
        n_groups = float(max(n_groups_here, 1))
    else:
        if not rollout_n or global_rows % rollout_n:
            raise ValueError(f"global_batch_size={global_rows} is not a multiple of rollout.n={rollout_n}")
        n_groups = global_rows / rollout_n
    if global_tokens is None:
        if dp_size > 1:
            raise ValueError("batch_num_tokens is required in config.global_batch_info when dp_size > 1")
        return n_groups, float(dp_size), n_tokens_here.clamp(min=1)
    return n_groups, float(dp_size), float(max(global_tokens, 1))


def _group_policy_loss(
    method: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: Any,
    rollout_is_weights: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    if config is None:
        raise ValueError(f"loss_mode {method} needs verl's actor config")
    if rollout_is_weights is not None:
        raise ValueError(
            f"loss_mode {method} has no token importance ratio to correct: disable algorithm.rollout_correction"
        )
    _check_actor_settings(method, config)
    options = parse_options(
        METHOD_OPTIONS[method], section(section(config, "policy_loss"), method), f"policy_loss.{method}"
    )
    mask = response_mask.bool()
    batch = decode_micro_batch(advantages, mask, section(config, "rollout_n"))
    n_tokens_here = mask.sum()
    n_groups, dp_size, tokens = _normaliser(config, batch.n_groups, n_tokens_here)

    prefix = f"actor/{method}/"
    metrics: dict[str, Tensor] = {}
    trust_term: Tensor | float = 0.0
    if options.trust_region:
        # DisCO's trust region (docs/objectives.md, section 6) on this micro-batch's KL, weighted by its share of the
        # mini-batch tokens.
        trust = kl_trust_region(
            log_prob, old_log_prob, mask, delta=options.trust_region_delta, beta=options.trust_region_beta
        )
        trust_term = trust.penalty * (n_tokens_here.to(trust.penalty.dtype) / tokens) * dp_size
        metrics[prefix + "kl"] = trust.kl
        metrics[prefix + "trust_region"] = trust_term.detach()
    else:  # the KL of this micro-batch as a diagnostic only (no device sync)
        diff = torch.where(mask, old_log_prob.detach() - log_prob.detach(), 0.0)
        metrics[prefix + "kl"] = diff.sum() / n_tokens_here.clamp(min=1).to(diff.dtype)
    if batch.rows.numel() == 0:  # no rollout takes part: no objective, but a graph for the backward pass
        return log_prob[:, :0].sum() + trust_term, metrics
    scores = sequence_scores(log_prob[batch.rows], mask[batch.rows])
    correct, group = batch.correct, batch.group
    if method == "conspo":
        margin = options.margin(batch.step)  # one margin per generation batch: the step is in the codes
        out = conspo_loss(
            scores, correct, group, tau=options.tau, margin=margin, neg_reduce=options.neg_reduce, group_norm="all"
        )
    else:
        out = disco_loss(scores, correct, group, tau=options.tau, variant=options.disco_variant, group_norm="all")
    # The core averages over the groups it was given; rescale to the groups of the global mini-batch.
    objective = out.loss * (batch.n_groups / n_groups) * dp_size
    metrics.update({prefix + k: v for k, v in out.metrics.items()})
    metrics[prefix + "objective"] = objective.detach()
    return objective + trust_term, metrics


def conspo_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``conspo``: ConSPO's group-wise InfoNCE (docs/objectives.md, section 4), plus the trust
    region when ``policy_loss.conspo.trust_region=True``.

    ``old_log_prob``, ``log_prob``, ``response_mask``: (b, T) for the b rollouts of one micro-batch;
    ``advantages``: (b, T) group codes from the ``conspo`` estimator. ``loss_agg_mode`` is ignored: the
    objective fixes its own reduction (length-normalised scores, mean over groups). Returns the loss
    (summed over micro-batches and averaged over ranks it is the mini-batch objective) and detached
    0-d tensor metrics under ``actor/conspo/``.
    """
    del loss_agg_mode
    return _group_policy_loss("conspo", old_log_prob, log_prob, advantages, response_mask, config, rollout_is_weights)


def disco_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``disco``: DisCO's objective (docs/objectives.md, section 7) plus, by default, its trust
    region; as :func:`conspo_policy_loss`."""
    del loss_agg_mode
    return _group_policy_loss("disco", old_log_prob, log_prob, advantages, response_mask, config, rollout_is_weights)


# --------------------------------------------------------------------------------------------------
# The v1 trainer mode "conspo": whole groups per data-parallel rank, and the step for the margin.
# --------------------------------------------------------------------------------------------------


def group_balanced_order(uids: list[Any], seqlens: list[int], padding: list[bool], dp_size: int) -> list[int]:
    """A row order whose ``dp_size`` equal contiguous slices hold whole prompt groups, balanced in tokens.

    Groups (rows sharing a uid) stay contiguous; verl's padding rows are spread evenly at the slice ends.
    Raises if the groups cannot be split evenly (their number must be a multiple of ``dp_size`` and their
    sizes equal).
    """
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    groups: dict[Any, list[int]] = {}
    pads = []
    for row, (uid, is_pad) in enumerate(zip(uids, padding, strict=True)):
        (pads if is_pad else groups.setdefault(uid, [])).append(row)
    members = list(groups.values())
    if len(members) % dp_size or len(pads) % dp_size or len({len(m) for m in members}) > 1:
        raise ValueError(
            f"trainer mode conspo cannot give {dp_size} data-parallel ranks equal whole groups: {len(members)} prompt "
            f"groups of sizes {sorted({len(m) for m in members})}, {len(pads)} padding rows. Make data.train_batch_size "
            "(prompts per step, after any filtering) a multiple of the actor's data-parallel size."
        )
    workload = calculate_workload(torch.tensor(seqlens, dtype=torch.int64)).tolist()
    group_load = [int(sum(workload[r] for r in m)) for m in members]
    parts = get_seqlen_balanced_partitions(group_load, k_partitions=dp_size, equal_size=True)
    per_rank_pads = len(pads) // dp_size
    order: list[int] = []
    for rank, part in enumerate(parts):
        for g in part:
            order.extend(members[g])
        order.extend(pads[rank * per_rank_pads : (rank + 1) * per_rank_pads])
    return order


def check_trainer_config(config: Any, total_training_steps: int) -> None:
    """What trainer mode ``conspo`` checks on the driver before any worker starts (``config`` is verl's full config).

    Under loss_mode conspo/disco it refuses verl's clip settings (no effect), and under conspo a margin ramp whose
    ``total_steps`` is not verl's number of training steps: the curriculum would reach M at the wrong time (the TRL
    trainer ramps over its planned optimizer steps, which it knows). Without a trust region and with several
    optimizer steps per generation batch it logs the TRL trainer's warning.
    """
    actor = config.actor_rollout_ref.actor
    policy_loss = section(actor, "policy_loss")
    method = section(policy_loss, "loss_mode")
    if method not in METHOD_OPTIONS:
        return
    _check_actor_settings(method, actor)
    options = parse_options(METHOD_OPTIONS[method], section(policy_loss, method), f"policy_loss.{method}")
    mini, prompts = section(actor, "ppo_mini_batch_size"), config.data.train_batch_size
    epochs = section(actor, "ppo_epochs") or 1
    if not options.trust_region and ((mini and prompts and mini < prompts) or epochs > 1):
        _log.warning(
            "loss_mode %s without a trust region and %s: the optimizer steps after the first of each generation batch "
            "train on rollouts of an older policy with no correction (the ConSPO paper mentions no constraint). Set "
            "+actor_rollout_ref.actor.policy_loss.%s.trust_region=True for DisCO's KL penalty.", method,
            f"ppo_epochs={epochs}" if epochs > 1 else f"{prompts // mini} optimizer steps per generation batch "
            f"(ppo_mini_batch_size={mini}, data.train_batch_size={prompts})", method,
        )  # fmt: skip
    if method != "conspo":
        return
    ramps = options.margin_schedule in ("linear", "cosine") and options.margin_start != options.margin_max
    if ramps and options.total_steps != total_training_steps:
        raise ValueError(
            f"policy_loss.conspo.total_steps={options.total_steps} but verl trains for {total_training_steps} steps "
            f"(trainer.total_training_steps, or the dataset's steps per epoch times trainer.total_epochs): the margin "
            f"would ramp over {options.margin_ramp_frac:g} of the wrong length. Set "
            f"+actor_rollout_ref.actor.policy_loss.conspo.total_steps={total_training_steps}."
        )


def _register_trainer() -> None:
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
    from verl.trainer.ppo.v1 import register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    class ConSPOTrainer(PPOTrainerSync):
        """verl's sync trainer with group-preserving balancing and the step passed to the estimator."""

        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
            worker_group = self.actor_rollout_wg
            if "actor" not in worker_group._dispatch_info:
                worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
            dp_size = max(worker_group._dispatch_info["actor"]) + 1
            multiple = self._get_required_batch_multiple(dp_size)
            batch = upsample_batch_to_divisible_size(batch, multiple, self.tokenizer.eos_token_id)
            uids = [key.rsplit("_", 2)[0] for key in batch.keys]
            seqlens = [int(tag["seq_len"]) for tag in batch.tags]
            padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
            order = group_balanced_order(uids, seqlens, padding, dp_size)
            batch.reorder(order)
            per_rank = len(order) // dp_size
            partitions = [order[r * per_rank : (r + 1) * per_rank] for r in range(dp_size)]
            metrics.update(log_seqlen_unbalance(seqlen_list=seqlens, partitions=partitions, prefix=logging_prefix))
            return batch

        def _init_dataloader(self):
            super()._init_dataloader()  # sets total_training_steps; the workers are created after it
            check_trainer_config(self.config, self.total_training_steps)

        def _compute_advantage(self, batch, metrics):
            _StepSource.trainer_step = max(int(self.global_steps) - 1, 0)  # verl counts steps from 1
            try:
                return super()._compute_advantage(batch, metrics)
            finally:
                _StepSource.trainer_step = None

    register_trainer("conspo")(ConSPOTrainer)


class _RegisterTrainerOnImport:
    """Registers the trainer mode once verl's v1 trainer package is imported (it needs TransferQueue and is
    heavy, so ``import verl`` in a worker should not pay for it)."""

    target = "verl.trainer.ppo.v1"

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            try:
                _register_trainer()
            except Exception as exc:  # never break verl's own trainers because ours failed
                _log.error("conspo: trainer mode 'conspo' not registered (%s: %s)", type(exc).__name__, exc)

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def _install() -> None:
    register_policy_loss("conspo")(conspo_policy_loss)
    register_policy_loss("disco")(disco_policy_loss)
    register_adv_est("conspo")(compute_group_codes)
    register_adv_est("disco")(compute_group_codes)
    if _RegisterTrainerOnImport.target in sys.modules:
        _register_trainer()
    elif not any(isinstance(f, _RegisterTrainerOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterTrainerOnImport())  # type: ignore[arg-type]


try:
    _install()
except Exception as _exc:
    _report_failure(_exc)
    raise
