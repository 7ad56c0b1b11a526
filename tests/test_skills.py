"""SkillManager: every mode reproduces the unmerged reference, switches restore exactly, the base stays bit-identical,
bad input is refused with nothing changed, concurrent switches never mix skills, compiled graphs survive switching,
and a 20 Hz loop switching every tick meets its deadlines."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from robolora.adapters import SkillAdapter, adapter_from_policy, attach, save_adapter
from robolora.config import LoRAConfig
from robolora.policy import probe_batch
from robolora.inject import inject_lora, lora_layers, set_active_adapter
from robolora.policies import PolicyConfig, VisuomotorPolicy
from robolora.skills import MODES, SkillManager

ATTN = ("attn.q", "attn.k", "attn.v", "attn.o")
MLP = ("mlp.fc1", "mlp.fc2")
TARGETS = {1: ATTN, 2: MLP, 3: ATTN + MLP}  # skills touching different layer sets


def tiny(seed: int = 0, **overrides) -> VisuomotorPolicy:
    torch.manual_seed(seed)
    return VisuomotorPolicy(PolicyConfig.preset("tiny", **overrides)).eval()


def make_adapter(seed: int, targets: tuple[str, ...] | None = None, b_std: float = 0.1,
                 token: bool = True) -> SkillAdapter:
    """A "trained" adapter for tiny(0): non-zero B and a skill token."""
    policy = tiny()
    g = torch.Generator().manual_seed(seed)
    targets = targets or TARGETS[1 + seed % 3]
    inject_lora(policy, LoRAConfig(rank=4, alpha=8.0, targets=targets), "skill", generator=g)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["skill"].normal_(0, b_std, generator=g)
    if token:
        policy.set_skill_token(nn.Parameter(torch.randn(policy.config.d_model, generator=g)))
    return adapter_from_policy(policy, "skill", skill=f"s{seed}")


BATCH = probe_batch(VisuomotorPolicy(PolicyConfig.preset("tiny")), batch_size=3, seed=5)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on this 2-core machine shared with training, a 2-thread step waits on a starved
    worker (measured 370 ms vs 5 ms per tiny step), which would make timing tests meaningless."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(policy) -> torch.Tensor:
    with torch.no_grad():
        return policy.predict_chunk(BATCH)


def reference(adapter: SkillAdapter) -> torch.Tensor:
    """base + adapter through LoRALinear's unmerged path: the outputs every mode must reproduce."""
    policy = tiny()
    attach(policy, adapter, "ref")
    set_active_adapter(policy, "ref")
    policy.set_skill_token(nn.Parameter(adapter.skill_token.clone()))
    return run(policy)


def base_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights as bound right now (not state_dict, which always reports the pristine W0 of LoRA layers)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in policy.named_parameters()
            if "lora_" not in n and n != "skill_token"}


def assert_base_intact(policy: VisuomotorPolicy, original: dict[str, torch.Tensor]) -> None:
    for name, value in base_state(policy).items():
        assert torch.equal(value, original[name]), name
    state = {k.replace(".base_layer", ""): v for k, v in policy.state_dict().items()}
    for name, value in original.items():
        assert torch.equal(state[name], value), name
    for layer in lora_layers(policy).values():
        assert torch.equal(layer.pristine_weight, layer.base_layer.weight)


def manager(mode: str, seeds=(1, 2, 3), **kwargs) -> SkillManager:
    mgr = SkillManager(tiny(), mode, **kwargs)
    for seed in seeds:
        mgr.attach(f"s{seed}", make_adapter(seed))
    return mgr


def step(mgr: SkillManager, name) -> torch.Tensor:
    mgr.activate(name)
    return mgr.predict_chunk(BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_matches_the_reference_and_switches_back_exactly(mode):
    mgr = manager(mode)
    plain = run(tiny())
    refs = {f"s{s}": reference(make_adapter(s)) for s in (1, 2, 3)}
    first = {name: step(mgr, name) for name in refs}
    for name, ref in refs.items():
        assert (first[name] - ref).abs().max() < 1e-5, name
        assert (first[name] - plain).abs().max() > 1e-2, "each skill must change the actions"
    for name in ("s2", "s1", "s3", "s1", "s2", "s1"):
        assert torch.equal(step(mgr, name), first[name]), f"switching back to {name} must restore it exactly"
    assert torch.equal(step(mgr, None), plain), "activate(None) must give the plain base bit-exactly"
    assert mgr.active is None and mgr.skills == ["s1", "s2", "s3"]


def test_inplace_cache_gives_the_same_outputs_and_keeps_pointers():
    plain, cached = manager("inplace"), manager("inplace", cache_merged=True)
    assert torch.equal(step(plain, "s2"), step(cached, "s2"))
    pointers = {n: p.data_ptr() for n, p in cached.policy.named_parameters()}  # now with the skill token
    for name in ("s1", "s3", "s2", "s1"):
        assert torch.equal(step(plain, name), step(cached, name))
        assert {n: p.data_ptr() for n, p in cached.policy.named_parameters()} == pointers
    assert min(cached.memory_bytes().values()) > max(plain.memory_bytes().values())


def test_bank_keeps_the_original_parameters_untouched():
    mgr = manager("bank")
    originals = {n: layer.base_layer.weight for n, layer in lora_layers(mgr.policy).items()}
    values = {n: p.detach().clone() for n, p in originals.items()}
    for name in ("s1", "s2", "s3"):
        step(mgr, name)
        for n, p in originals.items():
            assert torch.equal(p, values[n]), "a bank switch must never write into W0"
    step(mgr, None)
    assert all(layer.base_layer.weight is originals[n] for n, layer in lora_layers(mgr.policy).items())


@pytest.mark.parametrize("mode", MODES)
def test_blend_is_the_exact_weighted_sum(mode):
    mgr = manager(mode, seeds=(1, 3))
    weights = {"s1": 0.7, "s3": -0.4}
    policy = tiny()  # reference: W0 + 0.7 d1 - 0.4 d3 written directly, computed in float64
    adapters = {"s1": make_adapter(1), "s3": make_adapter(3)}
    modules = dict(policy.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            a = adapters[name]
            for layer, (lora_a, lora_b) in a.lora.items():
                delta = (lora_b.double() @ lora_a.double()) * (a.config.alpha / a.config.rank) * w
                modules[layer].weight.copy_((modules[layer].weight.double() + delta).float())
    policy.set_skill_token(nn.Parameter(sum(w * adapters[n].skill_token for n, w in weights.items())))
    mgr.blend(weights)
    assert mgr.active == weights
    assert (mgr.predict_chunk(BATCH) - run(policy)).abs().max() < 1e-5


def test_blend_refuses_mixing_skills_with_and_without_a_token():
    mgr = manager("bank", seeds=(1,))
    mgr.attach("plain_token", make_adapter(2, token=False))
    with pytest.raises(ValueError, match="skill token"):
        mgr.blend({"s1": 0.5, "plain_token": 0.5})
    with pytest.raises(ValueError, match="finite"):
        mgr.blend({"s1": float("nan")})


def random_operations(policy: VisuomotorPolicy, mode: str, ops: int, rng: random.Random,
                      adapters: dict[str, SkillAdapter]) -> None:
    mgr = SkillManager(policy, mode)
    for _ in range(ops):
        attached = mgr.skills
        r = rng.random()
        if r < 0.04 and len(attached) < len(adapters):
            name = rng.choice([n for n in adapters if n not in attached])
            mgr.attach(name, adapters[name])
        elif r < 0.07 and attached:
            mgr.detach(rng.choice(attached))
        elif r < 0.17 and len(attached) >= 2:
            mgr.blend({n: rng.uniform(-1, 1) for n in rng.sample(attached, 2)})
        elif r < 0.22:
            mgr.predict_chunk(BATCH)
        else:
            mgr.activate(rng.choice([*attached, None]))
            if rng.random() < 0.5:
                mgr.apply_pending()
    mgr.close()


def test_base_is_bit_identical_after_10k_random_operations_across_modes():
    policy = tiny()
    original = base_state(policy)
    keys = list(policy.state_dict())
    adapters = {f"s{s}": make_adapter(s) for s in (1, 2, 3, 4)}
    rng = random.Random(0)
    for mode in MODES * 2:
        random_operations(policy, mode, 10_000 // 6, rng, adapters)
        assert_base_intact(policy, original)
    assert list(policy.state_dict()) == keys and not lora_layers(policy), "close() must hand back the plain policy"
    assert torch.equal(run(policy), run(tiny()))


@pytest.mark.slow
def test_base_is_bit_identical_after_a_million_switches():
    policy = tiny()
    original = base_state(policy)
    rng = random.Random(1)
    names = ["s1", "s2", "s3", "s4", None]
    for mode in MODES:
        mgr = SkillManager(policy, mode)
        for seed in (1, 2, 3, 4):
            mgr.attach(f"s{seed}", make_adapter(seed))
        for i in range(1_000_000 // 3 + 1):
            mgr.activate(names[rng.randrange(5)])
            mgr.apply_pending()
            if i % 10_000 == 0:
                mgr.predict_chunk(BATCH)
        mgr.activate(None)
        mgr.apply_pending()
        assert_base_intact(policy, original)
        mgr.close()
    assert_base_intact(policy, original)


def test_unknown_skill_errors_list_the_attached_skills():
    mgr = manager("bank", seeds=(1, 2))
    for call in (lambda: mgr.activate("pour"), lambda: mgr.blend({"pour": 1.0, "s1": 0.5}),
                 lambda: mgr.detach("pour"), lambda: mgr.live_check("pour")):
        with pytest.raises(KeyError, match=r"unknown skill.*pour.*attached: \['s1', 's2'\]"):
            call()
    with pytest.raises(TypeError, match="blend"):
        mgr.activate({"s1": 1.0})
    with pytest.raises(ValueError, match="already attached"):
        mgr.attach("s1", make_adapter(1))


@pytest.mark.parametrize("mode", MODES)
def test_detaching_the_active_skill_falls_back_to_the_plain_base(mode):
    mgr = manager(mode)
    plain = run(tiny())
    step(mgr, "s2")
    mgr.detach("s2")
    assert mgr.active is None and mgr.skills == ["s1", "s3"]
    assert torch.equal(mgr.predict_chunk(BATCH), plain)
    step(mgr, "s1")
    mgr.activate("s3")  # pending, then detached before it ran
    mgr.detach("s3")
    assert mgr.active is None and torch.equal(mgr.predict_chunk(BATCH), plain)
    assert (step(mgr, "s1") - reference(make_adapter(1))).abs().max() < 1e-5


def _wrong_shapes() -> SkillAdapter:
    adapter = make_adapter(1)
    adapter.base_fingerprint = None
    adapter.lora = {name: (a[:, :-1], b) for name, (a, b) in adapter.lora.items()}
    return adapter


def _nan_token() -> SkillAdapter:
    adapter = make_adapter(1)
    adapter.skill_token = adapter.skill_token * float("nan")
    return adapter


def _overflowing() -> SkillAdapter:  # finite A and B whose product overflows: the merged weights would be Inf
    adapter = make_adapter(1, targets=MLP)
    adapter.lora = {name: (a * 1e30, b * 1e30) for name, (a, b) in adapter.lora.items()}
    return adapter


def _bad_execution() -> SkillAdapter:
    adapter = make_adapter(1)
    adapter.metadata["execution"] = {"n_action_steps": 99}  # longer than the chunk
    return adapter


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", ["fingerprint", "shapes", "nan_token", "overflow", "execution"])
def test_failed_attach_leaves_outputs_and_state_unchanged(mode, bad):
    mgr = manager(mode, seeds=(1,))
    step(mgr, "s1")
    adapter = {"fingerprint": lambda: adapter_from_policy_of_other_base(), "shapes": _wrong_shapes,
               "nan_token": _nan_token, "overflow": _overflowing, "execution": _bad_execution}[bad]()
    before, keys, memory = mgr.predict_chunk(BATCH), list(mgr.policy.state_dict()), mgr.memory_bytes()
    with pytest.raises(ValueError):
        mgr.attach("bad", adapter)
    assert torch.equal(mgr.predict_chunk(BATCH), before)
    assert list(mgr.policy.state_dict()) == keys and mgr.memory_bytes() == memory
    assert mgr.skills == ["s1"] and mgr.active == "s1"
    assert all("bad" not in layer.adapters for layer in lora_layers(mgr.policy).values())


def adapter_from_policy_of_other_base() -> SkillAdapter:
    policy = tiny(seed=7)
    inject_lora(policy, LoRAConfig(rank=4, alpha=8.0), "skill")
    return adapter_from_policy(policy, "skill")


def test_dead_adapter_is_reported_on_attach(caplog):
    mgr = manager("bank", seeds=())
    with caplog.at_level(logging.WARNING, logger="robolora.skills"):
        check = mgr.attach("untrained", make_adapter(1, b_std=0.0, token=False))
    assert check.delta_norm == 0.0 and check.output_change == 0.0 and not check.live
    assert "looks dead" in caplog.text and mgr.live_check("untrained") == check
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robolora.skills"):
        check = mgr.attach("trained", make_adapter(2))
    assert check.live and check.delta_norm > 0 and check.output_change > 1e-2 and not caplog.text


def test_load_reads_an_adapter_folder(tmp_path):
    save_adapter(make_adapter(1), tmp_path / "wipe")
    mgr = SkillManager(tiny(), "unmerged")
    assert mgr.load(tmp_path / "wipe").skill == "s1"
    assert mgr.load(tmp_path / "wipe", name="wipe_again").live
    assert (step(mgr, "wipe_again") - reference(make_adapter(1))).abs().max() < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_memory_per_skill(mode):
    mgr = manager(mode)
    memory = mgr.memory_bytes()
    for seed in (1, 2, 3):
        adapter = make_adapter(seed)
        lora = sum(t.numel() * 4 for t in adapter.tensors().values())
        targeted = sum(m.weight.numel() * 4 for n, m in tiny().named_modules() if n in adapter.lora)
        expected = {"bank": lora + targeted, "inplace": lora,
                    "unmerged": lora + sum(b.numel() * 4 for _, b in adapter.lora.values())}[mode]
        assert memory[f"s{seed}"] == expected


def test_a_switch_drops_the_old_skills_queued_actions():
    mgr = manager("bank", seeds=(1, 2))
    obs = {k: v[0].numpy() for k, v in BATCH.items() if k != "task_id"}
    chunks = {name: step(mgr, name)[0].numpy() for name in ("s1", "s2")}

    def close(action: np.ndarray, expected: np.ndarray) -> bool:
        # One observation vs a batch of them: float32 kernels differ by ~1e-7; chunk steps differ by > 1e-3.
        return np.allclose(action, expected, rtol=0.0, atol=1e-5)

    mgr.activate("s1")
    assert close(mgr.select_action(obs), chunks["s1"][0])
    assert close(mgr.select_action(obs), chunks["s1"][1])
    mgr.activate("s1")  # not a switch: the queue is kept
    assert close(mgr.select_action(obs), chunks["s1"][2])
    mgr.activate("s2")
    assert close(mgr.select_action(obs), chunks["s2"][0]), "the new skill must be queried afresh"
    mgr.reset()
    mgr.activate("s1")
    assert close(mgr.select_action(obs), chunks["s1"][0])


@pytest.mark.parametrize("mode", MODES)
def test_each_skill_runs_with_its_own_chunk_execution(mode):
    mgr = SkillManager(tiny(), mode)
    long = make_adapter(1)
    long.metadata["execution"] = {"n_action_steps": 8}
    mgr.attach("long", long)
    mgr.attach("plain_exec", make_adapter(2))
    base_steps = mgr.policy.spec.execution.n_action_steps
    assert base_steps != 8
    obs = {k: v[0].numpy() for k, v in BATCH.items() if k != "task_id"}
    calls = []
    inner = mgr.policy.predict_chunk
    mgr.policy.predict_chunk = lambda batch: calls.append(1) or inner(batch)
    for name, expected in (("long", 8), ("plain_exec", base_steps), (None, base_steps), ("long", 8)):
        mgr.activate(name)
        calls.clear()
        for _ in range(8):
            mgr.select_action(obs)
        assert mgr.execution.n_action_steps == expected, name
        assert len(calls) == 8 // expected, name
    mgr.blend({"long": 0.5, "plain_exec": 0.5})  # mixed executions: the base's
    mgr.select_action(obs)
    assert mgr.execution.n_action_steps == base_steps
    mgr.activate("long")
    mgr.select_action(obs)
    assert mgr.policy.spec.execution.n_action_steps == base_steps, "the manager never writes the policy's execution"
    mgr.close()
    assert mgr.policy.spec.execution.n_action_steps == base_steps


@pytest.mark.parametrize("mode", MODES)
def test_switches_from_four_threads_never_mix_skills(mode):
    mgr = manager(mode)
    blend = {"s1": 0.5, "s2": 0.5}
    choices = ["s1", "s2", "s3", None, blend]
    refs = []
    for choice in choices:
        mgr.blend(choice) if isinstance(choice, dict) else mgr.activate(choice)
        refs.append(mgr.predict_chunk(BATCH))
    stop = threading.Event()
    errors: list[BaseException] = []

    def switcher(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                choice = rng.choice(choices)
                mgr.blend(choice) if isinstance(choice, dict) else mgr.activate(choice)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=switcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    seen = set()
    try:
        for _ in range(150):
            out = mgr.predict_chunk(BATCH)
            matches = [i for i, ref in enumerate(refs) if torch.equal(out, ref)]
            assert len(matches) == 1, "a step ran on a mix of skills"
            seen.add(matches[0])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(seen) >= 3


@pytest.mark.parametrize("mode", ["bank", "inplace"])
def test_cycling_16_skills_under_torch_compile_never_recompiles(mode):
    from torch._dynamo.testing import CompileCounter

    mgr = SkillManager(tiny(), mode)
    names = [f"s{seed}" for seed in range(1, 17)]
    for seed, name in zip(range(1, 17), names):
        mgr.attach(name, make_adapter(seed, targets=ATTN + MLP))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(mgr.policy.predict_chunk, backend=counter)
    with torch.no_grad():
        for name in names * 2:
            eager = step(mgr, name)
            assert torch.allclose(compiled(BATCH), eager, atol=1e-6), f"compiled graph ran stale weights for {name}"
    assert counter.frame_count == 1, f"{counter.frame_count - 1} recompiles while cycling 16 skills"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bank", "inplace"])
def test_cycling_16_skills_under_inductor_never_recompiles(mode):
    mgr = SkillManager(tiny(), mode)
    for seed in range(1, 17):
        mgr.attach(f"s{seed}", make_adapter(seed, targets=ATTN + MLP))
    torch._dynamo.reset()
    compiled = torch.compile(mgr.policy.predict_chunk)
    with torch.no_grad():
        step(mgr, "s1")
        compiled(BATCH)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in list(range(1, 17)) * 2:
                eager = step(mgr, f"s{seed}")
                assert torch.allclose(compiled(BATCH), eager, atol=1e-5)


def _steal_jiffies() -> int:
    """Time the hypervisor took this VM's CPUs away (``steal`` in /proc/stat), 0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


@contextlib.contextmanager
def realtime_priority() -> Iterator[bool]:
    """Run the calling thread under SCHED_FIFO, as a robot's control loop runs, when the OS allows it.

    On this shared 2-core VM, ordinary scheduling preempts a 3 ms tick for 50-130 ms now and then (measured: wall
    >> CPU time of the tick), which says nothing about the switch or the step. The loop sleeps ~94% of the time,
    so the priority takes little from other processes."""
    try:
        previous = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, previous[0], previous[1])


def control_loop(mgr: SkillManager, ticks: int, period: float = 0.05) -> str:
    """Switch skill every tick, then act; sleep to each tick's deadline. Returns "" or a report of the misses:
    ticks whose switch + step took longer than the period in wall time, leaving out ticks during which the
    hypervisor stole the CPU (this VM freezes for up to seconds now and then, seen with a plain sleep loop) unless
    the tick itself computed longer than the period."""
    obs = {k: v[0].numpy() for k, v in BATCH.items() if k != "task_id"}
    names = mgr.skills
    misses, stolen, worst, worst_cpu = 0, 0, 0.0, 0.0
    with realtime_priority() as realtime:
        start = time.perf_counter()
        for k in range(ticks):
            tick_start, cpu_start, steal = time.perf_counter(), time.thread_time(), _steal_jiffies()
            mgr.activate(names[k % len(names)])
            mgr.select_action(obs)
            wall, cpu = time.perf_counter() - tick_start, time.thread_time() - cpu_start
            if wall > period:
                excused = cpu <= period and _steal_jiffies() > steal
                stolen += excused
                misses += not excused
                worst, worst_cpu = max(worst, wall), max(worst_cpu, cpu)
            time.sleep(max(0.0, start + (k + 1) * period - time.perf_counter()))
    if not misses:
        return ""
    return (f"{misses} of {ticks} ticks overran {period * 1e3:.0f} ms (another {stolen} during hypervisor steal); "
            f"worst {worst * 1e3:.1f} ms wall, {worst_cpu * 1e3:.1f} ms CPU; realtime priority: {realtime}")


def test_20hz_loop_switching_every_tick_misses_no_deadline():
    report = control_loop(manager("bank"), 500)
    assert not report, report


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_20hz_loop_on_the_base_config_misses_no_deadline_in_10k_ticks(mode):
    torch.manual_seed(0)
    base = VisuomotorPolicy(PolicyConfig.preset("base")).eval()
    adapters = []
    for seed in range(4):
        policy = copy.deepcopy(base)
        inject_lora(policy, LoRAConfig(rank=8, alpha=16.0), "skill", generator=torch.Generator().manual_seed(seed))
        for layer in lora_layers(policy).values():
            layer.lora_B["skill"].data.normal_(0, 0.05)
        adapters.append(adapter_from_policy(policy, "skill"))
    mgr = SkillManager(base, mode)
    for seed, adapter in enumerate(adapters):
        mgr.attach(f"s{seed}", adapter)
    global BATCH
    BATCH, saved = probe_batch(mgr.policy, batch_size=1), BATCH
    try:
        report = control_loop(mgr, 10_000)
    finally:
        BATCH = saved
    assert not report, report


def test_the_manager_refuses_what_it_cannot_drive():
    with pytest.raises(ValueError, match="mode"):
        SkillManager(tiny(), "merged")
    with pytest.raises(ValueError, match="cache_merged"):
        SkillManager(tiny(), "bank", cache_merged=True)
    policy = tiny()
    policy.set_skill_token(nn.Parameter(torch.zeros(policy.config.d_model)))
    with pytest.raises(ValueError, match="skill token"):
        SkillManager(policy, "bank")
    mgr = manager("bank", seeds=(1,))
    with pytest.raises(ValueError, match="another SkillManager"):
        SkillManager(mgr.policy, "unmerged")
    mgr.close()
    assert not lora_layers(mgr.policy)
    SkillManager(mgr.policy, "unmerged").attach("s1", make_adapter(1))


def test_evaluate_runs_a_manager_like_a_policy():
    from robolora.evaluate import evaluate

    mgr = manager("bank", seeds=(1,))
    mgr.activate("s1")
    metrics = evaluate(mgr, "robolora/Reach-v0", episodes=1)
    assert metrics["eval/episodes"] == 1 and 1 <= metrics["eval/mean_length"] <= 50


@pytest.mark.parametrize("mode", ["bank", "inplace", "unmerged"])
def test_shipped_adapters_leave_the_shipped_base_as_it_was(mode):
    """Issue must-show: with both shipped adapters attached, used and detached, the shipped base's outputs (so its
    base-task success) are bit-identical to before and its fingerprint is unchanged; each adapter is live."""
    from robolora.policy import probe_batch
    from robolora.policies import base_fingerprint, load_policy
    from robolora.recipes import shipped_base
    from robolora.rollout import shipped_skills_dir

    policy = load_policy(shipped_base())
    batch = probe_batch(policy, batch_size=4)
    with torch.no_grad():
        before = policy.predict_chunk(batch)
    fingerprint = base_fingerprint(policy)
    manager = SkillManager(policy, mode=mode)
    for skill in ("wipe", "dish_rack"):
        manager.load(shipped_skills_dir() / skill)
    for skill in ("wipe", "dish_rack", None, "dish_rack", "wipe"):
        manager.activate(skill)
        with torch.no_grad():
            out = manager.predict_chunk(batch)
        assert torch.equal(out, before) == (skill is None), skill
    manager.detach("wipe")
    manager.detach("dish_rack")
    with torch.no_grad():
        assert torch.equal(manager.predict_chunk(batch), before) and torch.equal(policy.predict_chunk(batch), before)
    manager.close()
    assert base_fingerprint(policy) == fingerprint
