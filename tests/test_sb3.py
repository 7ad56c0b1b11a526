"""stable-baselines3 bridge: evaluate_policy over SB3 VecEnvs equals robolora eval episode by episode; residual PPO
(robolora.rl) executes chunks as the skill does when deployed, shapes rewards by potential differences, starts
exactly at the BC skill, trains only the residual head (base and LoRA bit-identical), and writes an adapter that
loads, switches and exports like any other, with checkpoints that resume and refuse a mismatched run."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from torch import nn

from robolora.adapters import adapter_from_policy, attach_active, attach_for_eval, load_adapter, save_adapter
from robolora.config import LoRAConfig
from robolora.data import BCDataset, collect
from robolora.envs import make_expert
from robolora.evaluate import evaluate, make_env
from robolora.export import export_bundle
from robolora.inject import inject_lora, lora_layers
from robolora.policies import PolicyConfig, VisuomotorPolicy, base_fingerprint, load_policy, save_policy
from robolora.policy import ChunkExecutor, Execution, probe_batch
from robolora.residual import ResidualHead
from robolora.rl import RLConfig, build_ppo, finetune_rl, make_rl_env
from robolora.sb3 import EpisodeSeeds, ExecuteSkill, SB3SkillPolicy, evaluate_sb3, split_seeds
from robolora.skills import SkillManager
from robolora.train import TrainConfig, train

REACH = "robolora/Reach-v0"
SEED = 100  # demos are recorded on the evaluation seeds: the tests need a policy that succeeds on some episodes
EPISODES = 8  # 6 demo scenes + 2 unseen ones, so outcomes (success, length) differ between episodes
# 2 envs x 8 decisions per rollout (64 env steps for 4-step chunks); a residual of hidden 2 keeps the skill at 1.2% of
# the tiny base (LoRA 288 + head 226 of 42,228 parameters), the default hidden 8 would be 2.6%
TINY_RL = RLConfig(n_envs=2, n_steps=8, batch_size=16, n_epochs=2, critic_warmup_rollouts=1, actor_lr=1e-3,
                   residual_hidden=2, val_every=100, val_episodes=1, device="cpu")
ENSEMBLE = {"n_action_steps": 1, "temporal_ensemble": 0.5}


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
    """A tiny base overfit to 6 noise-free reach demos, and a 'reach' skill adapter on it (rank-1 LoRA on q and v with
    small non-zero B, the reach task embedding as skill token), so the skill policy succeeds on some seeds and fails
    on others. ``skill`` executes the base's 4-step chunks, ``skill_te`` is the same skill with temporal ensembling."""
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
    inject_lora(policy, LoRAConfig(rank=1, alpha=2.0, targets=("attn.q", "attn.v")), "reach", generator=g)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["reach"].normal_(0.0, 1e-3, generator=g)
    policy.set_skill_token(nn.Parameter(policy.task_embed.weight[0].detach().clone()))
    save_adapter(adapter_from_policy(policy, "reach"), root / "skill")
    save_adapter(adapter_from_policy(policy, "reach", metadata={"execution": ENSEMBLE}), root / "skill_te")
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
    for vec_env_cls, n_envs in ((DummyVecEnv, 4), (SubprocVecEnv, 2)):  # episodes end at different times;
        # 2 worker processes, not more: each spawned worker imports mujoco (~9 s on a loaded 2-core machine)
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


# ------------------------------------------------------------------------------------------------ ExecuteSkill
class Record(gym.Wrapper):
    """Records every executed env action and every step's info."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.actions: list[np.ndarray] = []
        self.infos: list[dict] = []

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        out = self.env.step(action)
        self.infos.append(out[-1])
        return out


def test_execute_skill_runs_a_chunk_of_h_steps_and_stops_at_the_episode_end():
    env = ExecuteSkill(Record(make_env(REACH, {})), Execution(n_action_steps=4), chunk_size=8)
    assert env.action_space.shape == (16,), "one action = the first h=4 actions of the chunk"
    env.reset(seed=0)
    chunk = np.random.default_rng(0).uniform(-0.3, 0.3, (4, 4)).astype(np.float32)
    lengths = []
    while True:
        _, reward, terminated, truncated, info = env.step(chunk.reshape(-1))
        lengths.append(info["env_steps"])
        if terminated or truncated:
            break
    assert lengths == [4] * 12 + [2], "50-step episodes: twelve chunks of 4, then the time limit after 2"
    executed = np.stack(env.env.actions)
    assert np.array_equal(executed, np.concatenate([np.tile(chunk, (12, 1)), chunk[:2]])), "open loop, in order"
    assert reward == 0.0 and not info["success"], "no shaping by default, no success"


def test_execute_skill_with_temporal_ensembling_executes_the_chunk_executors_ensemble():
    execution = Execution(n_action_steps=1, temporal_ensemble=0.5)
    env = ExecuteSkill(Record(make_env(REACH, {})), execution, chunk_size=8)
    assert env.action_space.shape == (32,), "ensembling feeds every element of the chunk: K=8 actions"
    rng = np.random.default_rng(1)
    reference, expected, chunks = ChunkExecutor(execution, 8, 4), [], []
    probe = {"x": torch.zeros(1)}
    for episode in range(2):  # a reset clears the ensemble (the first action of episode 2 is its first chunk's)
        env.reset(seed=episode)
        reference.reset()
        for t in range(6):
            chunk = rng.uniform(-1.3, 1.3, (8, 4)).astype(np.float32)  # out of range: clamped like predict_chunk
            info = env.step(chunk.reshape(-1))[-1]
            assert info["env_steps"] == 1
            clamped = torch.as_tensor(chunk).clamp(-1, 1)[None]
            chunks.append(clamped[0].numpy())
            expected.append(reference.step(probe, lambda _: clamped)[0].numpy())  # noqa: B023
            if t == 0:
                assert np.array_equal(expected[-1], clamped[0, 0].numpy())
    executed = np.stack(env.env.actions)
    assert np.array_equal(executed, np.stack(expected))
    assert np.abs(executed[1] - chunks[1][0]).max() > 0.1, "step 2 mixes two chunks' predictions"


def expert_episode(env: ExecuteSkill, expert, seed: int) -> tuple[list[float], list[int], list[dict]]:
    """One episode of the scripted expert, each decision repeating its current action for the chunk: the rewards
    and env steps per decision, and the info of every env step."""
    env.reset(seed=seed)
    expert.reset()
    start, rewards, steps = len(env.env.infos), [], []
    while True:
        _, reward, terminated, truncated, info = env.step(np.tile(expert.act(), env.n))
        rewards.append(reward)
        steps.append(info["env_steps"])
        if terminated or truncated:
            return rewards, steps, env.env.infos[start:]


def test_potential_shaping_telescopes_and_success_is_paid():
    env = ExecuteSkill(Record(make_env(REACH, {})), Execution(n_action_steps=2), chunk_size=8, success_reward=2.0,
                       shaped_weight=0.5, terms=["distance"])
    expert = make_expert(env, seed=0)
    for seed in (3, 4):  # two episodes: the potential restarts at a reset
        rewards, steps, infos = expert_episode(env, expert, seed)
        assert infos[-1]["success"] and not any(i["success"] for i in infos[:-1]), "the expert reaches the goal"
        phi = [i["reward/distance"] for i in infos]
        assert sum(steps) == len(phi) > 4 and phi[-1] > phi[0]
        assert sum(rewards) == pytest.approx(2.0 + 0.5 * (phi[-1] - phi[0]), abs=1e-9), "telescoping"
        ends = np.cumsum(steps) - 1  # the env step ending each decision
        shaped = [phi[ends[0]] - phi[0]] + [phi[b] - phi[a] for a, b in zip(ends[:-1], ends[1:])]
        success = [0.0] * (len(steps) - 1) + [2.0]
        assert rewards == pytest.approx([s + 0.5 * d for s, d in zip(success, shaped)], abs=1e-9), "per decision"


# ------------------------------------------------------------------------------------------------ PPO actor
def rl_policy(base, skill) -> VisuomotorPolicy:
    """The skill policy as finetune_rl prepares it: the adapter attached and active, everything frozen."""
    policy = load_policy(base)
    attach_active(policy, load_adapter(skill))
    return policy.eval().requires_grad_(False)


def fresh_head(policy, config: RLConfig = TINY_RL) -> ResidualHead:
    spec = policy.spec
    return ResidualHead(spec.feature_dim, spec.chunk_size, spec.action_dim, config.residual_hidden)


def randomize(head: ResidualHead, seed: int = 0, std: float = 0.3) -> ResidualHead:
    """Give a (zero-initialised) head non-trivial weights: corrections of about 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return head


def raw_batch(vec_env, policy) -> dict[str, torch.Tensor]:
    """The current raw observations of the DummyVecEnv under SkillFeaturesVecEnv, as a policy batch."""
    return {k: torch.as_tensor(np.array(vec_env.venv.buf_obs[k])) for k in policy.spec.observation}


@pytest.mark.parametrize("name, n", [("skill", 4), ("skill_te", 8)])
def test_ppo_actor_starts_as_the_bc_skill_and_follows_its_residual_head(reacher, name, n):
    base, skill = reacher
    policy = rl_policy(base, skill.parent / name)
    assert policy.spec.execution == (Execution(4) if n == 4 else Execution(**ENSEMBLE))
    residual = fresh_head(policy)
    env = make_rl_env(REACH, policy, TINY_RL, ["distance"])
    try:
        model = build_ppo(policy, residual, env, TINY_RL)
        assert env.action_space.shape == (n * 4,)
        assert torch.allclose(model.policy.log_std.exp(), torch.full((n * 4,), TINY_RL.init_std))
        obs = env.reset()
        for _ in range(3):
            actions, _ = model.predict(obs, deterministic=True)
            with torch.no_grad():
                chunk = policy.predict_chunk(raw_batch(env, policy))  # (2, K, A)
            assert actions.shape == (2, n * 4)
            assert np.allclose(actions, chunk[:, :n].reshape(2, -1).numpy(), rtol=0, atol=1e-6), "BC skill at start"
            obs = env.step(actions)[0]
        randomize(residual)  # the actor's head, trained in place
        actions, _ = model.predict(obs, deterministic=True)
        batch = raw_batch(env, policy)
        with torch.no_grad():
            plain = policy.predict_chunk(batch)
            policy.set_action_residual(residual)
            corrected = policy.predict_chunk(batch)
            policy.set_action_residual(None)
    finally:
        env.close()
    assert np.allclose(actions, corrected[:, :n].reshape(2, -1).numpy(), rtol=0, atol=1e-6)
    assert (corrected - plain).abs().max() > 1e-2, "the head changes the actions"


def test_skill_features_env_converts_the_terminal_observation(reacher):
    base, skill = reacher
    policy = rl_policy(base, skill)
    env = make_rl_env(REACH, policy, TINY_RL, [])
    try:
        env.seed(7)
        obs = env.reset()
        assert obs.shape == (2, 32 + 8 * 4) and obs.dtype == np.float32
        for _ in range(13):  # zero actions: the reacher stays put until the time limit (12 chunks of 4, then 2)
            obs, _, dones, infos = env.step(np.zeros((2, 16), dtype=np.float32))
    finally:
        env.close()
    assert dones.all()
    terminal = np.stack([info["terminal_observation"] for info in infos])
    assert terminal.dtype == np.float32 and terminal.shape == obs.shape
    reference = []
    for i in range(2):  # the same episode without PPO: 50 zero actions from seed 7 + i
        plain = make_env(REACH, {})
        o, _ = plain.reset(seed=7 + i)
        for _ in range(50):
            o = plain.step(np.zeros(4, dtype=np.float32))[0]
        reference.append(o)
    batch = {k: torch.as_tensor(np.stack([o[k] for o in reference])) for k in policy.spec.observation}
    with torch.no_grad():
        chunk, features = policy.raw_chunk_and_features(batch)
    assert np.allclose(terminal, torch.cat([features, chunk.flatten(1)], 1).numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(terminal, obs), "the returned observation is the next episode's first"


def test_ppo_trains_only_the_residual_head_log_std_and_value_head(reacher):
    base, skill = reacher
    policy = rl_policy(base, skill)
    tensors = lambda: dict([*policy.named_parameters(), *policy.named_buffers()])  # noqa: E731  incl. LoRA, token
    before = {k: v.detach().clone() for k, v in tensors().items()}
    assert sum(".lora_" in k for k in before) == 8 and "skill_token" in before
    residual = fresh_head(policy)
    env = make_rl_env(REACH, policy, TINY_RL, ["distance"])
    try:
        model = build_ppo(policy, residual, env, TINY_RL)
        heads = lambda: {"residual": [p.detach().clone() for p in residual.parameters()],  # noqa: E731
                         "value": [p.detach().clone() for p in model.policy.value_net.parameters()],
                         "log_std": [model.policy.log_std.detach().clone()]}
        start = heads()
        trainable = {id(p) for p in model.policy.parameters()}
        assert trainable == {id(p) for p in [*residual.parameters(), *model.policy.value_net.parameters(),
                                             model.policy.log_std]}
        model.learn(total_timesteps=32)  # 2 rollouts of 16 decisions (~128 env steps), 2 PPO updates
    finally:
        env.close()
    after = tensors()
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert not changed, f"the base and the adapter must stay bit-identical; changed: {changed}"
    assert not any(p.requires_grad for p in policy.parameters())
    end = heads()
    for part in start:
        assert any(not torch.equal(a, b) for a, b in zip(start[part], end[part])), f"PPO did not train {part}"
    assert residual.fc2.weight.abs().max() > 0, "the zero-initialised head moved"


# ------------------------------------------------------------------------------------------------ finetune_rl
def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rl_run(reacher, tmp_path_factory):
    base, skill = reacher
    out = tmp_path_factory.mktemp("rl") / "run"
    reports = []
    result = finetune_rl(skill, 160, out, base=base, config=TINY_RL, progress=lambda n, m: reports.append((n, m)))
    return out, result, reports, json.loads((out / "adapter" / "adapter.json").read_text())["rl"]


def test_finetune_rl_writes_an_adapter_with_its_rl_record(reacher, rl_run):
    base, skill = reacher
    out, result, reports, rl = rl_run
    assert result["out"] == str(out / "adapter") and (out / "adapter" / "residual.safetensors").is_file()
    assert rl["algorithm"].startswith("PPO (stable-baselines3") and rl["method"] == "residual head"
    assert rl["env_steps"] == result["rl/env_steps"] >= 160 and rl["episodes"] >= 2
    assert rl["reward"] == {"success": 1.0, "shaping_weight": 1.0, "shaping_terms": ["distance"],
                            "shaping": "potential-based"}
    assert rl["source_sha256"] == sha256(skill / "adapter.safetensors")
    assert rl["execution"] == {"n_action_steps": 4, "temporal_ensemble": None}
    assert rl["config"] == TINY_RL.to_dict() and rl["residual_params"] == 226
    val = rl["validation"]
    steps = [s for s, _ in val["curve"]]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == rl["env_steps"] and len(steps) >= 3
    assert val["best_success"] == max(r for _, r in val["curve"]) and [val["best_step"], val["best_success"]] in \
        val["curve"] and val["episodes"] == 1
    # one report per completed rollout (the last, stopped at the step budget, reports nothing)
    done = [n for n, _ in reports]
    assert done and done == sorted(done) and done[-1] <= 160 and set(reports[-1][1]) >= {"val", "best"}
    assert reports[0][1]["val"] == val["curve"][0][1], "the first rollout reports the step-0 (BC) validation"

    tuned, source = load_adapter(out / "adapter"), load_adapter(skill)
    assert tuned.base_fingerprint == source.base_fingerprint == base_fingerprint(load_policy(base))
    assert tuned.lora.keys() == source.lora.keys()
    for layer in source.lora:  # RL leaves the LoRA weights and the token bit-identical
        assert all(torch.equal(a, b) for a, b in zip(tuned.lora[layer], source.lora[layer])), layer
    assert torch.equal(tuned.skill_token, source.skill_token)
    ckpt = load_file(str(out / "checkpoint" / "state.safetensors"))
    for k, v in tuned.residual.state_dict().items():
        assert torch.equal(v, ckpt[f"best.{k}"]), "the adapter holds the best validated head"
    assert ckpt["residual.fc2.weight"].abs().max() > 0, "RL moved the (zero-initialised) head"


def test_finetuned_adapter_attaches_switches_and_exports(reacher, rl_run, tmp_path):
    base, skill = reacher
    out, *_ = rl_run
    tuned = load_adapter(out / "adapter")
    moved = dataclasses.replace(tuned, residual=randomize(load_adapter(out / "adapter").residual))  # visibly acts
    save_adapter(moved, tmp_path / "moved")
    batch = probe_batch(load_policy(base), 3)
    single, by_hand = {}, {}
    for name, path, head in (("bc", skill, None), ("rl", out / "adapter", tuned.residual),
                             ("moved", tmp_path / "moved", moved.residual)):
        p = load_policy(base)
        attach_for_eval(p, path)
        with torch.no_grad():
            single[name] = p.predict_chunk(batch)
        q = load_policy(base)
        attach_active(q, load_adapter(skill))
        q.set_action_residual(head)
        with torch.no_grad():
            by_hand[name] = q.predict_chunk(batch)
        assert torch.equal(single[name], by_hand[name]), name
    assert (single["moved"] - single["bc"]).abs().max() > 1e-2
    manager = SkillManager(load_policy(base))  # bank mode: merged weights, equal to unmerged within 1e-5
    manager.load(skill, "bc")
    manager.load(tmp_path / "moved", "moved")
    for name in ("bc", "moved", "bc", "moved"):
        manager.activate(name)
        assert torch.allclose(manager.predict_chunk(batch), single[name], atol=1e-5), f"switching to {name}"
    meta = export_bundle(base, tmp_path / "moved", tmp_path / "bundle")
    assert meta["parity"]["max_abs_diff"] < 1e-4 and (tmp_path / "bundle" / "residual.safetensors").is_file()


def test_finetune_rl_resumes_and_refuses_mismatched_or_clobbering_runs(reacher, rl_run, tmp_path):
    base, skill = reacher
    out, first, _, rl = rl_run
    with pytest.raises(FileExistsError, match="--resume"):
        finetune_rl(skill, 300, out, base=base, config=TINY_RL)
    with pytest.raises(ValueError, match="written by another run: its config differ"):
        finetune_rl(skill, 300, out, base=base, config=dataclasses.replace(TINY_RL, seed=1), resume=True)
    with pytest.raises(FileNotFoundError, match="state.json"):
        finetune_rl(skill, 300, tmp_path / "none", base=base, config=TINY_RL, resume=True)
    with pytest.raises(ValueError, match="over the 2% budget.*residual-hidden"):  # LoRA 288 + head 808: 2.6%
        finetune_rl(skill, 300, tmp_path / "big", base=base, config=dataclasses.replace(TINY_RL, residual_hidden=8))
    assert not (tmp_path / "big").exists(), "refused before anything is written"

    result = finetune_rl(skill, 300, out, base=base, config=TINY_RL, resume=True)
    resumed = json.loads((out / "adapter" / "adapter.json").read_text())["rl"]
    assert resumed["env_steps"] == result["rl/env_steps"] >= 300 > rl["env_steps"]
    assert resumed["episodes"] > rl["episodes"]
    curve, old = resumed["validation"]["curve"], rl["validation"]["curve"]
    assert curve[:len(old)] == old and len(curve) > len(old), "the validation curve continues"
    assert curve[-1][0] == resumed["env_steps"]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field, kwargs", [
    ("n_envs", {"n_envs": 0}), ("batch_size", {"batch_size": 1.5}), ("init_std", {"init_std": 0.0}),
    ("gamma", {"gamma": 1.5}), ("target_kl", {"target_kl": 0.0}), ("bc_weight", {"bc_weight": -1.0}),
    ("val_every", {"val_every": 0}), ("success_reward", {"success_reward": 0.0, "shaped_weight": 0.0}),
])
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        RLConfig(**kwargs)


def test_finetune_rl_continues_from_the_adapters_own_residual_head(reacher, rl_run, tmp_path):
    base, skill = reacher
    out, *_ = rl_run
    tuned = load_adapter(out / "adapter")
    save_adapter(dataclasses.replace(tuned, residual=randomize(tuned.residual, std=0.05)), tmp_path / "headed")
    with pytest.raises(ValueError, match="--residual-hidden 2"):
        finetune_rl(tmp_path / "headed", 0, tmp_path / "wide", base=base,
                    config=dataclasses.replace(TINY_RL, residual_hidden=1))
    result = finetune_rl(tmp_path / "headed", 0, tmp_path / "again", base=base, config=TINY_RL)  # step 0 only
    again, headed = load_adapter(result["out"]), load_adapter(tmp_path / "headed")
    assert [s for s, _ in again.metadata["rl"]["validation"]["curve"]] == [0]
    for k, v in headed.residual.state_dict().items():
        assert torch.equal(again.residual.state_dict()[k], v), "RL starts from (and here keeps) the source's head"
