"""The verl plug-in against the objectives core, through verl's own registries and config loading.

Runs only where verl is importable (``.venv-verl``, set up by ``bootstrap.py test``); elsewhere it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("verl")
pytestmark = pytest.mark.verl

from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from conspo import objectives as core  # noqa: E402
from conspo import verl_plugin as plugin  # noqa: E402

G = 4  # rollouts per prompt
T = 6  # response tokens


# --------------------------------------------------------------------------------------------------
# A fake verl batch: rewards, masks and uids as verl's driver holds them, log-probs as the actor sees them.
# --------------------------------------------------------------------------------------------------


def _batch(seed: int, n_groups: int = 6, drift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    b = n_groups * G
    uids = [f"uid-{g}" for g in range(n_groups) for _ in range(G)]
    perm = torch.randperm(b, generator=gen)  # group members need not be contiguous
    uids = [uids[i] for i in perm.tolist()]
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    correct = torch.rand(b, generator=gen) < 0.5
    by_group = {u: [i for i, v in enumerate(uids) if v == u] for u in dict.fromkeys(uids)}
    first, second, third = list(by_group.values())[:3]
    correct[first] = torch.tensor([True, False, False, True])  # at least one mixed group
    correct[second] = True  # all correct: contributes nothing
    correct[third] = False  # all wrong: contributes nothing
    rewards = torch.zeros(b, T)
    rewards[torch.arange(b), lengths - 1] = correct.float()
    old = -torch.rand(b, T, generator=gen, dtype=torch.float64) * 2
    new = old + drift * (torch.randn(b, T, generator=gen, dtype=torch.float64) - 0.5)  # KL(old || new) ~ drift / 2
    return uids, rewards, mask, old, new, correct


def _actor_config(method: str = "conspo", **options) -> ActorConfig:
    if method == "conspo":
        options.setdefault("margin_schedule", "constant")
    policy_loss = plugin.ConSPOPolicyLossConfig(loss_mode=method, **{method: options})
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, policy_loss=policy_loss)


def _codes(uids, rewards, mask, config=None):
    estimator = get_adv_estimator_fn("conspo")
    advantages, _ = estimator(token_level_rewards=rewards, response_mask=mask, index=uids, config=config)
    return advantages


def _core_value_and_grad(method, old, new, mask, correct, uids, options, margin=0.0):
    logp = new.clone().requires_grad_(True)
    group = torch.tensor([int(u.split("-")[1]) for u in uids])
    scores = core.sequence_scores(logp, mask)
    if method == "conspo":
        out = core.conspo_loss(scores, correct, group, tau=options.get("tau", 0.1), margin=margin, group_norm="all")
    else:
        out = core.disco_loss(scores, correct, group, tau=options.get("tau", 10.0), variant=options.get("variant", "dro"),
                              group_norm="all")  # fmt: skip
    trust = core.kl_trust_region(logp, old, mask)
    total = out.loss + trust.penalty
    total.backward()
    return total.detach(), logp.grad, out.loss.detach()


def _split_by_groups(uids, sizes_in_groups, seed=0):
    """Row-index lists of micro-batches holding whole groups, ``sizes_in_groups`` groups each."""
    order = list(dict.fromkeys(uids))
    gen = torch.Generator().manual_seed(seed)
    order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
    out, start = [], 0
    for n in sizes_in_groups:
        chosen = set(order[start : start + n])
        out.append([i for i, u in enumerate(uids) if u in chosen])
        start += n
    assert start == len(order)
    return out


def _run_plugin(method, config, old, new, mask, advantages, ranks, dp_size=1):
    """verl's view: each rank runs its micro-batches; DDP averages gradients over ranks."""
    logp = new.clone().requires_grad_(True)
    info = {"dp_size": dp_size, "global_batch_size": old.shape[0], "batch_num_tokens": int(mask.sum())}
    config.global_batch_info.clear()
    config.global_batch_info.update(info)
    loss_fn = get_policy_loss_fn(method)
    total = torch.zeros((), dtype=torch.float64)
    metrics = []
    for micro_batches in ranks:
        for rows in micro_batches:
            idx = torch.tensor(rows)
            loss, m = loss_fn(
                old_log_prob=old[idx], log_prob=logp[idx], advantages=advantages[idx], response_mask=mask[idx],
                loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
            )  # fmt: skip
            total = total + loss / dp_size
            metrics.append(m)
    total.backward()
    return total.detach(), logp.grad, metrics


# Micro-batch splits of the 6 groups (in groups per micro-batch); "two ranks" also splits over data parallelism.
SPLITS = {"one micro-batch": [6], "one group each": [1] * 6, "uneven": [2, 3, 1], "two ranks": None}


def _ranks(uids, name):
    """(micro-batches of each rank, dp_size)."""
    if SPLITS[name] is not None:
        return [_split_by_groups(uids, SPLITS[name], seed=1)], 1
    order = list(dict.fromkeys(uids))
    halves = [order[:3], order[3:]]
    ranks = []
    for rank, half in enumerate(halves):
        rows = [i for i, u in enumerate(uids) if u in half]
        sub = [uids[i] for i in rows]
        parts = _split_by_groups(sub, [2, 1] if rank == 0 else [1, 2], seed=rank)
        ranks.append([[rows[j] for j in part] for part in parts])
    return ranks, 2


# --------------------------------------------------------------------------------------------------
# Exactness through verl's registry.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize(
    "method,options",
    [
        ("conspo", {"tau": 0.1}),
        ("conspo", {"tau": 0.05, "neg_reduce": "sum", "margin_schedule": "constant", "m_max": 0.05}),
        ("disco", {"variant": "dro"}),
        ("disco", {"variant": "basic"}),
    ],
)
def test_value_and_gradient_equal_the_core_for_any_split(split, method, options):
    """First optimizer step after generation (log_prob == old_log_prob): objective + trust region, exact."""
    uids, rewards, mask, old, new, correct = _batch(seed=1)
    config = _actor_config(method, **options)
    ranks, dp = _ranks(uids, split)
    value, grad, _ = _run_plugin(method, config, old, new, mask, _codes(uids, rewards, mask), ranks, dp)
    margin = options.get("m_max", 0.1) if method == "conspo" else 0.0
    ref_value, ref_grad, _ = _core_value_and_grad(method, old, new, mask, correct, uids, options, margin)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert bool((grad[~mask] == 0).all())
    assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("method", ["conspo", "disco"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_objective_exact_after_drift_and_trust_region_per_micro_batch(method, split):
    """Later optimizer steps (log_prob != old_log_prob): the objective stays exact for any split; the hinge uses
    each micro-batch's KL weighted by its token share (docs/verl.md), the spec's exactly for one micro-batch."""
    uids, rewards, mask, old, new, correct = _batch(seed=2, drift=0.05)
    options = {"tau": 0.1} if method == "conspo" else {}
    config = _actor_config(method, **options)
    ranks, dp = _ranks(uids, split)
    value, grad, metrics = _run_plugin(method, config, old, new, mask, _codes(uids, rewards, mask), ranks, dp)

    logp = new.clone().requires_grad_(True)
    group = torch.tensor([int(u.split("-")[1]) for u in uids])
    scores = core.sequence_scores(logp, mask)
    if method == "conspo":
        objective = core.conspo_loss(scores, correct, group, tau=0.1, margin=0.1, group_norm="all").loss
    else:
        objective = core.disco_loss(scores, correct, group, group_norm="all").loss
    n_tokens = mask.sum()
    trust = sum(
        core.kl_trust_region(logp[rows], old[rows], mask[rows]).penalty * mask[rows].sum() / n_tokens
        for micro_batches in ranks
        for rows in micro_batches
    )
    (objective + trust).backward()
    torch.testing.assert_close(value, (objective + trust).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-10, atol=1e-14)
    reported = sum(float(m[f"actor/{method}/objective"]) for m in metrics) / dp
    assert reported == pytest.approx(float(objective), rel=1e-12)
    if split == "one micro-batch":
        single = core.kl_trust_region(new, old, mask)
        assert float(single.penalty) > 0  # the hinge is active here, and equals the spec's
        assert float(sum(m[f"actor/{method}/trust_region"] for m in metrics)) == pytest.approx(float(single.penalty))


def test_margin_follows_the_training_step():
    uids, rewards, mask, old, new, correct = _batch(seed=3)
    config = _actor_config("conspo", margin_schedule="linear", m_max=0.1, total_steps=10)
    plugin._StepSource.trainer_step = 4  # what trainer mode conspo sets around the estimator
    try:
        advantages = _codes(uids, rewards, mask)
    finally:
        plugin._StepSource.trainer_step = None
    value, grad, metrics = _run_plugin("conspo", config, old, new, mask, advantages, [_split_by_groups(uids, [3, 3])])
    ref_value, ref_grad, _ = _core_value_and_grad("conspo", old, new, mask, correct, uids, {}, margin=0.04)
    assert float(metrics[0]["actor/conspo/margin"]) == pytest.approx(0.04)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_metrics_are_detached_tensors_under_actor_prefix():
    uids, rewards, mask, old, new, _ = _batch(seed=4)
    config = _actor_config("conspo")
    _, _, metrics = _run_plugin("conspo", config, old, new, mask, _codes(uids, rewards, mask), [[list(range(24))]])
    m = metrics[0]
    for key in ("score_gap", "auc", "valid_frac", "gate_mean", "neg_entropy", "margin", "kl", "objective"):
        value = m[f"actor/conspo/{key}"]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert 1 / 6 <= float(m["actor/conspo/valid_frac"]) <= 4 / 6


# --------------------------------------------------------------------------------------------------
# The estimator and its codes.
# --------------------------------------------------------------------------------------------------


def test_codes_round_trip_at_the_field_limits():
    state = torch.tensor([plugin.NEGATIVE, plugin.POSITIVE, plugin.EXCLUDED])
    group = torch.tensor([0, plugin.MAX_GROUPS - 1, 7])
    size = torch.tensor([1, plugin.MAX_GROUP_SIZE, 8])
    codes = plugin.encode_group_codes(state, group, size, plugin.MAX_STEP)
    assert codes.dtype == torch.float64 and float(codes.max()) < 2.0**53
    for got, want in zip(plugin.decode_group_codes(codes), (state, group, size, torch.full((3,), plugin.MAX_STEP))):
        assert torch.equal(got, want)


def test_estimator_groups_threshold_and_padding_rows():
    rewards = torch.tensor([[0.0, 0.7], [0.0, 0.3], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]]).bool()
    uids = ["b", "a", "b", "pad"]
    config = {"conspo": {"correct_threshold": 0.5}}
    advantages = _codes(uids, rewards, mask, config)
    assert advantages.shape == (4, 2) and bool((advantages == advantages[:, :1]).all())
    state, group, size, _ = plugin.decode_group_codes(advantages[:, 0])
    assert state.tolist() == [plugin.POSITIVE, plugin.NEGATIVE, plugin.POSITIVE, plugin.EXCLUDED]
    assert group.tolist() == [0, 1, 0, 2] and size.tolist() == [2, 1, 2, 1]
    with pytest.raises(ValueError, match="algorithm.conspo has unknown option"):
        _codes(uids, rewards, mask, {"conspo": {"threshold": 0.5}})


# --------------------------------------------------------------------------------------------------
# Group integrity: split, mixed or foreign inputs raise and name the verl settings.
# --------------------------------------------------------------------------------------------------


def _call(method, config, old, new, mask, advantages, rows, weights=None):
    idx = torch.tensor(rows)
    return get_policy_loss_fn(method)(
        old_log_prob=old[idx], log_prob=new[idx], advantages=advantages[idx], response_mask=mask[idx],
        loss_agg_mode="token-mean", config=config, rollout_is_weights=weights,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["conspo", "disco"])
def test_incomplete_group_raises_naming_the_verl_settings(method):
    uids, rewards, mask, old, new, _ = _batch(seed=5)
    advantages = _codes(uids, rewards, mask)
    rows = _split_by_groups(uids, [1, 5])[0][:-1] + _split_by_groups(uids, [1, 5])[1][:2]
    with pytest.raises(ValueError, match="incomplete prompt group") as err:
        _call(method, _actor_config(method), old, new, mask, advantages, rows)
    for setting in ("ppo_micro_batch_size_per_gpu", "use_dynamic_bsz=False", "trainer.v1.trainer_mode=conspo",
                    "shuffle=False", "ppo_mini_batch_size"):  # fmt: skip
        assert setting in str(err.value)


def test_groups_from_two_generation_batches_raise():
    uids, rewards, mask, old, new, _ = _batch(seed=6)
    first = _codes(uids, rewards, mask)
    second = _codes(uids, rewards, mask)  # the next call counts as the next step
    advantages = torch.where(torch.tensor([u in ("uid-0",) for u in uids])[:, None], first, second)
    with pytest.raises(ValueError, match="mixes rollouts of training steps"):
        _call("conspo", _actor_config(), old, new, mask, advantages, list(range(len(uids))))


def test_foreign_advantages_and_settings_raise():
    uids, rewards, mask, old, new, _ = _batch(seed=7)
    rows = list(range(len(uids)))
    config = _actor_config()
    with pytest.raises(ValueError, match="adv_estimator=conspo"):
        _call("conspo", config, old, new, mask, torch.randn(len(uids), T), rows)  # GRPO's float32 advantages
    with pytest.raises(ValueError, match="do not hold conspo group codes"):
        _call("conspo", config, old, new, mask, torch.full((len(uids), T), 0.5, dtype=torch.float64), rows)
    advantages = _codes(uids, rewards, mask)
    with pytest.raises(ValueError, match="rollout_correction"):
        _call("conspo", config, old, new, mask, advantages, rows, weights=torch.ones(len(uids), T))
    odd = ActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=8, policy_loss=config.policy_loss)
    with pytest.raises(ValueError, match="rollout.n=8"):
        _call("conspo", odd, old, new, mask, advantages, rows)


def test_padding_only_micro_batch_contributes_nothing():
    rewards, mask = torch.zeros(2, T), torch.zeros(2, T, dtype=torch.bool)
    advantages = _codes(["pad", "pad"], rewards, mask)
    old = torch.zeros(2, T, dtype=torch.float64)
    new = old.clone().requires_grad_(True)
    loss, _ = _call("conspo", _actor_config(), old, new, mask, advantages, [0, 1])
    loss.backward()
    assert float(loss) == 0.0 and bool((new.grad == 0).all())


# --------------------------------------------------------------------------------------------------
# verl's config loading, the plug-in discovery, the trainer mode.
# --------------------------------------------------------------------------------------------------

OVERRIDES = [
    "algorithm.adv_estimator=conspo",
    "+algorithm.conspo.correct_threshold=0.5",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=conspo",
    "+actor_rollout_ref.actor.policy_loss.conspo.tau=0.05",
    "+actor_rollout_ref.actor.policy_loss.conspo.total_steps=100",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "data.train_batch_size=32",
]


def _compose(overrides):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_verl_config_loading_accepts_the_options():
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    config = _compose(OVERRIDES)
    validate_config(config, use_reference_policy=False, use_critic=False)  # what verl's main_ppo runs first
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # what each actor worker builds
    assert isinstance(actor.policy_loss, plugin.ConSPOPolicyLossConfig)
    assert actor.policy_loss.conspo == plugin.ConSPOOptions(tau=0.05, total_steps=100)
    state, *_ = plugin.decode_group_codes(
        _codes(["a", "a"], torch.tensor([[0.5], [0.4]]), torch.ones(2, 1, dtype=torch.bool), config.algorithm)[:, 0]
    )
    assert state.tolist() == [plugin.POSITIVE, plugin.NEGATIVE]


def test_verl_config_loading_rejects_bad_options_at_load():
    from verl.utils.config import omega_conf_to_dataclass

    for bad, message in (("tau=-1", "tau must be"), ("group_norm=valid", "only 'all' is exact")):
        key = bad.split("=")[0]
        kept = [o for o in OVERRIDES if not o.endswith(f"conspo.{key}=0.05")]
        config = _compose([*kept, f"+actor_rollout_ref.actor.policy_loss.conspo.{bad}"])
        with pytest.raises(Exception, match=message):
            omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    config = _compose([o for o in OVERRIDES if "total_steps" not in o])
    with pytest.raises(Exception, match="total_steps must be an integer"):
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


CHECK_REGISTRY = """
    import verl
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_policy_loss_fn
    get_policy_loss_fn("conspo"), get_policy_loss_fn("disco")
    assert "conspo" in ADV_ESTIMATOR_REGISTRY and "disco" in ADV_ESTIMATOR_REGISTRY
    print("REGISTERED")
"""


def test_plain_import_verl_finds_the_plugin_by_entry_point():
    result = _fresh_python(CHECK_REGISTRY)
    assert "REGISTERED" in result.stdout, result.stderr[-3000:]


def test_external_modules_route_and_missing_plugin_report():
    result = _fresh_python(
        CHECK_REGISTRY, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="conspo.verl_plugin"
    )
    assert "REGISTERED" in result.stdout, result.stderr[-3000:]
    result = _fresh_python(CHECK_REGISTRY, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0 and "Unsupported loss mode: conspo" in result.stderr


def test_broken_plugin_is_reported_not_swallowed():
    code = "import sys; sys.modules['conspo.objectives'] = None\n" + textwrap.dedent(CHECK_REGISTRY)
    result = _fresh_python(code)
    assert "conspo's verl plug-in failed to load" in result.stderr
    assert result.returncode != 0 and "REGISTERED" not in result.stdout


def test_group_balanced_order_keeps_groups_whole_per_rank():
    uids = [f"g{i % 6}" for i in range(24)] + ["pad"] * 4
    seqlens = [10 + 7 * i for i in range(28)]
    padding = [False] * 24 + [True] * 4
    order = plugin.group_balanced_order(uids, seqlens, padding, dp_size=2)
    assert sorted(order) == list(range(28))
    for rank in (order[:14], order[14:]):
        real = [uids[i] for i in rank if not padding[i]]
        assert len(real) == 12 and all(real.count(u) == 4 for u in set(real))
        runs = [u for j, u in enumerate(real) if j == 0 or u != real[j - 1]]
        assert len(runs) == len(set(real))  # each group contiguous
        assert sum(padding[i] for i in rank) == 2
    with pytest.raises(ValueError, match="multiple of the actor's data-parallel size"):
        plugin.group_balanced_order(uids[:20], seqlens[:20], padding[:20], dp_size=3)


def test_trainer_mode_is_registered_and_balances_whole_groups():
    pytest.importorskip("transfer_queue")
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    cls = get_trainer_cls("conspo")
    assert issubclass(cls, PPOTrainerSync)

    class Batch:  # the parts of TransferQueue's KVBatchMeta that balancing uses
        def __init__(self, keys, tags):
            self.keys, self.tags = keys, tags

        def __len__(self):
            return len(self.keys)

        def reorder(self, order):
            self.keys = [self.keys[i] for i in order]
            self.tags = [self.tags[i] for i in order]

    trainer = object.__new__(cls)
    trainer.actor_rollout_wg = type("WG", (), {"_dispatch_info": {"actor": [0, 0, 1, 1]}})()
    trainer.tokenizer = type("Tokenizer", (), {"eos_token_id": 0})()
    trainer._get_required_batch_multiple = lambda dp: dp
    batch = Batch([f"u_{i % 4}_{i}_0" for i in range(16)], [{"seq_len": 5 + i} for i in range(16)])
    metrics: dict = {}
    trainer._balance_batch(batch, metrics)
    halves = [[k.split("_")[1] for k in batch.keys[:8]], [k.split("_")[1] for k in batch.keys[8:]]]
    assert all(h.count(u) == 4 for h in halves for u in set(h)) and metrics

    seen = []
    original = PPOTrainerSync._compute_advantage
    PPOTrainerSync._compute_advantage = lambda self, b, m: seen.append(plugin._StepSource.trainer_step) or b
    try:
        trainer.global_steps = 7
        trainer._compute_advantage(batch, metrics)
    finally:
        PPOTrainerSync._compute_advantage = original
    assert seen == [6] and plugin._StepSource.trainer_step is None


@pytest.mark.parametrize("method", ["conspo", "disco"])
def test_example_launch_script_overrides_load_in_verl(method):
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "verl", "run_conspo_gsm8k.sh")
    env = {**os.environ, "CONSPO_PRINT_OVERRIDES": "1", "METHOD": method}
    printed = subprocess.run(["bash", script], capture_output=True, text=True, env=env, check=True).stdout
    config = _compose(printed.splitlines())
    validate_config(config, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == method and config.trainer.v1.trainer_mode == "conspo"
    assert actor.ppo_micro_batch_size_per_gpu % config.actor_rollout_ref.rollout.n == 0
    assert not actor.use_dynamic_bsz and not actor.shuffle
    if method == "conspo":
        assert actor.policy_loss.conspo.total_steps == config.trainer.total_training_steps


# --------------------------------------------------------------------------------------------------
# GMPO: verl's own ``geo_mean`` policy loss against ``conspo.objectives.gmpo_loss``.
# verl's loss is the mean over the rows of the micro-batch it is given (empty rows included, loss_agg_mode
# and global_batch_info unused), so it is conspo's with normalizer = that row count. Its per-row denominators
# n_i + 1e-8 are formed in float32 from the bool mask verl passes (verl/workers/utils/losses.py), where they
# round to n_i exactly for n_i >= 1, so the two agree to float64 rounding.
# --------------------------------------------------------------------------------------------------

GMPO_RTOL = 1e-12


def _gmpo_batch(seed: int, b: int = 12):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, T, generator=gen, dtype=torch.float64) * 2
    new = old + 0.5 * torch.randn(b, T, generator=gen, dtype=torch.float64)  # many |log rho| > 0.4
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    adv[3] = 0.0
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    lengths[0] = 0  # a row without tokens: verl counts it in its mean
    lengths[1:3] = T
    adv[1], adv[2] = adv[1].abs() + 0.1, -adv[2].abs() - 0.1
    new[1, 0], new[2, 0] = old[1, 0] + 0.7, old[2, 0] - 0.7  # a capped token (A > 0) and a floored one (A < 0)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old, new, adv, mask


def _verl_geo_mean(config, old, new, adv, mask, micro_batches):
    logp = new.clone().requires_grad_(True)
    loss_fn = get_policy_loss_fn("geo_mean")
    total = torch.zeros((), dtype=torch.float64)
    metrics = []
    for rows in micro_batches:
        idx = torch.tensor(rows)
        token_adv = adv[idx][:, None].expand(-1, T)  # verl's advantages are per token: a sequence's value repeated
        loss, m = loss_fn(
            old_log_prob=old[idx], log_prob=logp[idx], advantages=token_adv, response_mask=mask[idx],
            loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
        )  # fmt: skip
        total = total + loss
        metrics.append(m)
    total.backward()
    return total.detach(), logp.grad, metrics


def _conspo_gmpo(old, new, adv, mask, micro_batches, **kwargs):
    logp = new.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    outs = []
    for rows in micro_batches:
        idx = torch.tensor(rows)
        out = core.gmpo_loss(logp[idx], old[idx], adv[idx], mask[idx], **kwargs)
        total = total + out.loss
        outs.append(out)
    total.backward()
    return total.detach(), logp.grad, outs


@pytest.mark.parametrize("low,high", [(0.4, 0.4), (0.2, 0.3)])
def test_gmpo_geo_mean_equals_conspo_gmpo_loss(low, high):
    """One micro-batch: verl's geo_mean with clip_ratio_low/high = conspo's eps_low/eps_high (both log space)."""
    old, new, adv, mask = _gmpo_batch(seed=11)
    b = old.shape[0]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, clip_ratio_low=low,
                         clip_ratio_high=high)  # fmt: skip
    value, grad, metrics = _verl_geo_mean(config, old, new, adv, mask, [list(range(b))])
    ref_value, ref_grad, outs = _conspo_gmpo(old, new, adv, mask, [list(range(b))], eps_low=low, eps_high=high,
                                             normalizer=b)  # fmt: skip
    torch.testing.assert_close(value, ref_value, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=GMPO_RTOL, atol=1e-12)
    out = outs[0]
    assert float(out.metrics["clip_frac_low"]) > 0 and float(out.metrics["clip_frac_high"]) > 0
    assert bool((grad[mask] == 0).any()) and bool((grad[mask] != 0).any())  # clipped and unclipped tokens
    # conspo's default normaliser counts rows with tokens (b - 1 here), verl's mean counts every row
    default = core.gmpo_loss(new, old, adv, mask, eps_low=low, eps_high=high).loss
    assert float(default) == pytest.approx(float(value) * b / (b - 1), rel=GMPO_RTOL)
    # verl's pg_clipfrac counts A > 0 tokens outside the clip range on either side; conspo's clip_frac_high
    # only those capped (d > eps_high), the others keep their gradient
    d, a = (new - old)[mask], adv[:, None].expand(-1, T)[mask]
    outside = (d > high) | (d < -low)
    assert metrics[0]["actor/pg_clipfrac"] == pytest.approx(float(((a > 0) & outside).double().mean()))
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(float(((a > 0) & (d > high)).double().mean()))


def test_gmpo_geo_mean_sums_micro_batch_means():
    """Several micro-batches: verl 0.9.1 backpropagates each micro-batch mean as it is (geo_mean ignores
    global_batch_info), so a mini-batch of k equal micro-batches gets k times the gradient of the mean over its
    sequences; conspo's normalizer = the micro-batch's row count reproduces it, the full count gives the mean."""
    old, new, adv, mask = _gmpo_batch(seed=12)
    b = old.shape[0]
    parts = [list(range(i, i + G)) for i in range(0, b, G)]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, clip_ratio_low=0.4,
                         clip_ratio_high=0.4)  # fmt: skip
    value, grad, _ = _verl_geo_mean(config, old, new, adv, mask, parts)
    per_part, per_part_grad, _ = _conspo_gmpo(old, new, adv, mask, parts, normalizer=G)
    torch.testing.assert_close(value, per_part, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, per_part_grad, rtol=GMPO_RTOL, atol=1e-12)
    full, full_grad, _ = _conspo_gmpo(old, new, adv, mask, parts, normalizer=b)  # additive: the full-batch mean
    whole, whole_grad, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], normalizer=b)
    torch.testing.assert_close(full, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(full_grad, whole_grad, rtol=1e-13, atol=1e-15)
    k = len(parts)
    torch.testing.assert_close(value, k * full, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, k * full_grad, rtol=GMPO_RTOL, atol=1e-12)


def test_gmpo_geo_mean_default_clip_is_0_2_in_log_space():
    """verl's ActorConfig defaults (clip_ratio_low = clip_ratio_high = 0.2) give conspo's eps 0.2, not GMPO's 0.4."""
    old, new, adv, mask = _gmpo_batch(seed=13)
    b = old.shape[0]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G)
    assert (config.clip_ratio_low, config.clip_ratio_high) == (0.2, 0.2)
    value, grad, _ = _verl_geo_mean(config, old, new, adv, mask, [list(range(b))])
    at_02, grad_02, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], eps_low=0.2, eps_high=0.2, normalizer=b)
    at_04, grad_04, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], normalizer=b)
    torch.testing.assert_close(value, at_02, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, grad_02, rtol=GMPO_RTOL, atol=1e-12)
    assert float((grad - grad_04).abs().max()) > 1e-3
