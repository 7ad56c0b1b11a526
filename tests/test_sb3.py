"""stable-baselines3 bridge: evaluate_policy over SB3 VecEnvs equals robolora eval episode by episode; PPO
fine-tuning of an adapter starts at the BC policy, trains only LoRA, keeps the base bit-identical, and saves an
adapter that loads, switches and exports like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from torch import nn

from robolora.adapters import adapter_from_policy, attach, attach_for_eval, load_adapter, save_adapter
from robolora.config import LoRAConfig
from robolora.data import BCDataset, collect
from robolora.policy import probe_batch
from robolora.evaluate import evaluate, make_env
from robolora.export import export_bundle
from robolora.inject import inject_lora, lora_layers, mark_only_lora_trainable, set_active_adapter
from robolora.policies import PolicyConfig, VisuomotorPolicy, base_fingerprint, load_policy, save_policy
from robolora.rl import RLConfig, build_ppo, finetune_rl, make_rl_env
from robolora.sb3 import EpisodeSeeds, ExecuteChunk, SB3SkillPolicy, evaluate_sb3, split_seeds
from robolora.skills import SkillManager
from robolora.train import TrainConfig, train

REACH = "robolora/Reach-v0"
SEED = 100  # demos are recorded on the evaluation seeds: the tests need a policy that succeeds on some episodes
EPISODES = 8  # 6 demo scenes + 2 unseen ones, so outcomes (success, length) differ between episodes
TINY_RL = RLConfig(n_envs=2, n_steps=16, batch_size=16, n_epochs=2, critic_warmup_rollouts=1, actor_lr=1e-3,
                   shaped_weight=1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 rollouts of a tiny model: 2 intra-op threads contending on a busy 2-core machine made an 8-episode
    evaluation 10-20x slower (12 s vs 0.6-1.5 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reacher(tmp_path_factory):
    """A tiny base overfit to 6 noise-free reach demos, and a 'reach' skill adapter on it (small non-zero B, the
    reach task embedding as skill token), so the skill policy succeeds on some seeds and fails on others."""
    root = tmp_path_factory.mktemp("sb3")
    collect(REACH, 6, root / "demos", seed=SEED, noise=0.0)
    torch.manual_seed(0)
    policy = VisuomotorPolicy(PolicyConfig.preset("tiny"))
    data = BCDataset([root / "demos"], chunk_size=policy.config.chunk_size)
    policy.set_normalization(data.stats)
    train(policy, data, TrainConfig(steps=250, batch_size=32, lr=3e-3, weight_decay=0.0, warmup_steps=10,
                                    checkpoint_every=10**6, device="cpu"), root / "bc")
    save_policy(policy.eval(), root / "base")
    g = torch.Generator().manual_seed(1)
    inject_lora(policy, LoRAConfig(rank=4, alpha=8.0), "reach", generator=g)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["reach"].normal_(0.0, 1e-3, generator=g)
    policy.set_skill_token(nn.Parameter(policy.task_embed.weight[0].detach().clone()))
    save_adapter(adapter_from_policy(policy, "reach"), root / "skill")
    return root / "base", root / "skill"


def skill_policy(reacher) -> VisuomotorPolicy:
    base, skill = reacher
    policy = load_policy(base)
    attach_for_eval(policy, skill)
    return policy


def outcomes(metrics: dict) -> list[tuple[int, bool, int]]:
    return [(e["seed"], e["success"], e["length"]) for e in metrics["episodes"]]


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_policy_matches_robolora_eval_on_the_same_seeds(reacher):
    reference = evaluate(skill_policy(reacher), REACH, EPISODES, seed=SEED)
    assert 0 < reference["eval/success_rate"] < 1, f"need mixed outcomes to compare, got {outcomes(reference)}"
    for vec_env_cls, n_envs in ((DummyVecEnv, 4), (SubprocVecEnv, 3)):  # episodes end at different times
        m = evaluate_sb3(SB3SkillPolicy(skill_policy(reacher)), REACH, EPISODES, seed=SEED, n_envs=n_envs,
                         vec_env_cls=vec_env_cls)
        assert outcomes(m) == outcomes(reference), (vec_env_cls.__name__, n_envs)
        for key in ("eval/success_rate", "eval/ci_low", "eval/ci_high", "eval/mean_length"):
            assert m[key] == reference[key], key


def test_seed_split_follows_evaluate_policy_and_reseeds_every_reset():
    blocks = split_seeds(list(range(10)), 3)
    assert [len(b) for b in blocks] == [(10 + i) // 3 for i in range(3)] == [3, 3, 4]
    assert sum(blocks, []) == list(range(10))
    env, plain = EpisodeSeeds(make_env(REACH, {}), [7, 8]), make_env(REACH, {})
    for seed in (7, 8):
        _, info = env.reset()
        plain.reset(seed=seed)
        assert info["episode_seed"] == seed and np.array_equal(env.unwrapped.goal, plain.unwrapped.goal)
    assert env.step(np.zeros(4, dtype=np.float32))[-1]["episode_seed"] == 8
    assert env.reset()[1]["episode_seed"] is None, "past the list, episodes are unseeded"


def test_predict_resets_the_chunk_queue_of_starting_envs_only():
    torch.manual_seed(0)
    policy = VisuomotorPolicy(PolicyConfig.preset("tiny", n_action_steps=4)).eval()
    wrapper = SB3SkillPolicy(policy, task_id=0)
    zero = {"task_id": torch.zeros(2, dtype=torch.long)}  # the wrapper's task
    first, second = {**probe_batch(policy, 2, seed=1), **zero}, {**probe_batch(policy, 2, seed=2), **zero}
    obs = lambda b: {"rgb_front": b["rgb_front"].numpy(), "proprio": b["proprio"].numpy()}  # noqa: E731
    with torch.no_grad():
        chunk1, chunk2 = policy.predict_chunk(first), policy.predict_chunk(second)
    a0, _ = wrapper.predict(obs(first), episode_start=np.array([True, True]))
    a1, _ = wrapper.predict(obs(second), episode_start=np.array([False, True]))
    assert np.allclose(a0, chunk1[:, 0].numpy(), atol=1e-6)
    assert np.allclose(a1[0], chunk1[0, 1].numpy(), atol=1e-6), "env 0 continues its chunk"
    assert np.allclose(a1[1], chunk2[1, 0].numpy(), atol=1e-6), "env 1 started an episode: new chunk"
    channels_first = {"rgb_front": np.moveaxis(obs(second)["rgb_front"], -1, 1), "proprio": obs(second)["proprio"]}
    a2, _ = wrapper.predict(channels_first, episode_start=np.array([True, True]))
    assert np.allclose(a2, chunk2[:, 0].numpy(), atol=1e-6), "VecTransposeImage'd observations read the same"
    with pytest.raises(TypeError, match="select_action"):
        SB3SkillPolicy(object())


# ------------------------------------------------------------------------------------------------ RL
def test_execute_chunk_runs_h_steps_and_stops_at_the_episode_end():
    env = ExecuteChunk(make_env(REACH, {}), horizon=8)
    assert env.action_space.shape == (32,)
    env.reset(seed=0)
    lengths = []
    while True:
        _, reward, terminated, truncated, info = env.step(np.zeros(32, dtype=np.float32))
        lengths.append(info["env_steps"])
        if terminated or truncated:
            break
    assert lengths == [8] * 6 + [2], "50-step episodes: six chunks of 8, then the time limit after 2"
    assert reward == 0.0 and not info["success"], "sparse reward by default"


def rl_policy(reacher) -> VisuomotorPolicy:
    """The skill policy as finetune_rl prepares it: LoRA trainable, skill token frozen."""
    base, skill = reacher
    policy = load_policy(base)
    adapter = load_adapter(skill)
    set_active_adapter(policy, attach(policy, adapter))
    policy.set_skill_token(nn.Parameter(adapter.skill_token.clone(), requires_grad=False))
    mark_only_lora_trainable(policy)
    return policy


@pytest.mark.parametrize("horizon", [1, 4])
def test_sb3_actor_starts_as_the_bc_policy(reacher, horizon):
    policy = rl_policy(reacher)
    env = make_rl_env(REACH, horizon, TINY_RL)
    try:
        model = build_ppo(policy, env, TINY_RL, horizon)
        obs = env.reset()
        actions, _ = model.predict(obs, deterministic=True)
    finally:
        env.close()
    with torch.no_grad():
        chunk = policy.predict_chunk({k: torch.as_tensor(v) for k, v in obs.items()})  # (n_envs, K, 4)
    assert actions.shape == (2, horizon * 4)
    assert np.array_equal(actions, chunk[:, :horizon].reshape(2, -1).numpy())
    assert torch.allclose(model.policy.log_std.exp(), torch.full((horizon * 4,), 0.1))


def test_ppo_trains_only_lora_and_keeps_the_base_bit_identical(reacher):
    policy = rl_policy(reacher)
    tensors = lambda: dict([*policy.named_parameters(), *policy.named_buffers()])  # noqa: E731  live, incl. W0 copies
    before = {k: v.detach().clone() for k, v in tensors().items()}
    lora = {n for n in before if ".lora_" in n}
    env = make_rl_env(REACH, 4, TINY_RL)
    try:
        model = build_ppo(policy, env, TINY_RL, 4)
        model.learn(total_timesteps=64)  # 2 rollouts of 32 decisions (~250 env steps): warm-up, then PPO
    finally:
        env.close()
    after = tensors()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= lora, f"only LoRA may change; also changed: {sorted(changed - lora)}"
    assert len(before) - len(lora) > 40, "every base parameter and buffer was compared bit for bit"
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == lora


def test_finetune_rl_saves_an_adapter_that_loads_switches_and_exports(reacher, tmp_path):
    base, skill = reacher
    reports = []
    result = finetune_rl(skill, 200, tmp_path / "rl", base=base, config=TINY_RL, eval_episodes=2, eval_seed=SEED,
                         progress=lambda n, m: reports.append((n, m)))
    assert result["rl/env_steps"] >= 200 and result["rl/episodes"] >= 1 and result["execution_horizon"] == 4
    assert result["rl/actor_rollouts"] == result["rl/rollouts"] - 1 >= 1, "one critic warm-up rollout, then PPO"
    assert reports and reports[-1][0] == result["rl/env_steps"]
    assert set(result["before"]["episodes"][0]) == {"seed", "success", "length"}
    assert [e["seed"] for e in result["after"]["episodes"]] == [SEED, SEED + 1]
    tuned, source = load_adapter(result["out"]), load_adapter(skill)
    assert tuned.base_fingerprint == base_fingerprint(load_policy(base)) == source.base_fingerprint
    assert tuned.metadata["rl"]["env_steps"] == result["rl/env_steps"] and "eval" in tuned.metadata
    assert tuned.metadata["rl"]["n_updates"] > 0 and tuned.metadata["rl"]["config"]["n_envs"] == 2
    assert torch.equal(tuned.skill_token, source.skill_token), "the skill token is not trained by default"
    assert any(not torch.equal(tuned.lora[n][1], source.lora[n][1]) for n in source.lora)

    batch = probe_batch(load_policy(base), 3)
    single = {}
    for name, path in (("bc", skill), ("rl", result["out"])):
        p = load_policy(base)
        attach_for_eval(p, path)
        with torch.no_grad():
            single[name] = p.predict_chunk(batch)
    assert (single["rl"] - single["bc"]).abs().max() > 1e-3, "RL moved the actions (measured 0.016)"
    manager = SkillManager(load_policy(base))  # bank mode: merged weights, equal to unmerged within 1e-5
    manager.load(skill, "bc")
    manager.load(result["out"], "rl")
    for name in ("bc", "rl", "bc"):
        manager.activate(name)
        assert torch.allclose(manager.predict_chunk(batch), single[name], atol=1e-5), f"switching to {name}"
    meta = export_bundle(base, result["out"], tmp_path / "bundle")
    assert meta["parity"]["max_abs_diff"] < 1e-4


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="init_std"):
        RLConfig(init_std=0.0)
    with pytest.raises(ValueError, match="success_reward"):
        RLConfig(success_reward=0.0, shaped_weight=0.0)
