"""The ``robolora`` command line: one subcommand per step of the workflow.

collect -> pretrain -> train-skill -> eval -> rollout -> export -> control. Every subcommand shares flag names
(``--out``, ``--device``, ``--seed``, ``--episodes``, ``--json``), shows a progress bar on long work and prints a
short table (or one JSON object with ``--json``). The library never prints; this module does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("MUJOCO_GL", "egl")

import robolora  # noqa: E402

if TYPE_CHECKING:
    from tqdm import tqdm

EPILOG = """examples:
  robolora info                                   # versions, device, tasks, shipped checkpoints
  robolora collect --task reach --episodes 200 --out data/reach
  robolora pretrain --data data/reach data/push --out runs/base --steps 20000
  robolora eval --policy runs/base --task reach --episodes 50
  robolora collect --task dish_rack --episodes 200 --out data/dish_rack
  robolora train-skill --data data/dish_rack --out runs/dish_rack --rank 2 --temporal-ensemble 0.05
  robolora eval --skill runs/dish_rack --task dish_rack --episodes 50
"""


class Progress:
    """A tqdm bar the library reports into through plain callbacks (library code never draws bars).

    The bar appears at the library's first report, after it has checked its inputs: a refused command prints its
    one-line error with no bar above it.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar: tqdm | None = None

    def update_to(self, n: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, disable=not self.enabled, dynamic_ncols=True, leave=True)
        self.bar.update(n - self.bar.n)
        if postfix:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emit(args: argparse.Namespace, result: dict[str, Any], table: Callable[[], str] | None = None) -> None:
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    elif table is not None:
        print(table())
    else:
        for key, value in result.items():
            print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[f"{r.get(c, ''):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(list(columns)), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


# ----------------------------------------------------------------------------------------------- subcommands
def cmd_info(args: argparse.Namespace) -> int:
    from robolora.info import describe, environment, summary

    result = describe(args.path) if args.path else environment()
    emit(args, result, (lambda: summary(result)) if args.path else None)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from robolora.data import collect
    from robolora.envs import TASKS

    env_id = TASKS[args.task]
    bar = Progress(args.episodes, f"collect {args.task}", not args.json)
    try:
        manifest = collect(env_id, args.episodes, args.out, seed=args.seed, noise=args.noise,
                           workers=args.workers, image_size=args.image_size, cameras=tuple(args.cameras),
                           progress=bar.update_to, post_success=args.post_success)
    finally:
        bar.close()
    emit(args, {"out": str(args.out), "episodes": len(manifest["episodes"]),
                "success_rate": manifest["success_rate"],
                "mean_length": sum(e["length"] for e in manifest["episodes"]) / len(manifest["episodes"])})
    return 0


def task_arg(text: str) -> str:
    """argparse type for a task: a registered name (``push``) or Gymnasium id (``robolora/Push-v0``) -> its name."""
    from robolora.envs import get_spec

    try:
        return get_spec(text).name
    except KeyError as e:
        raise argparse.ArgumentTypeError(e.args[0]) from None


def task_weight_arg(text: str) -> tuple[str, float]:
    """argparse type for ``TASK=W`` (a base task, W a finite number > 0), shared by ``robolora pretrain`` and
    pretrain_base.py."""
    from robolora.envs import BASE_TASKS

    task, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not sep or not task or not math.isfinite(weight) or weight <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=W with W a number > 0, e.g. push=2")
    if task not in BASE_TASKS:
        raise argparse.ArgumentTypeError(f"{text!r}: {task!r} is not a base task; pretraining weighs "
                                         f"{list(BASE_TASKS)}")
    return task, weight


def cmd_pretrain(args: argparse.Namespace) -> int:
    from robolora.recipes import pretrain
    from robolora.train import TrainConfig

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, checkpoint_every=args.checkpoint_every,
                         augment_shift=args.augment_shift, warmup_steps=min(200, args.steps // 10))
    bar = Progress(args.steps, "pretrain", not args.json)
    try:
        metrics = pretrain(args.data, args.out, policy=args.policy, preset=args.preset, config=config,
                           resume=args.resume,
                           on_step=bar.update_to, init_from=args.init,
                           task_weights=dict(args.task_weight) if args.task_weight else None)
    finally:
        bar.close()
    emit(args, {"out": str(args.out), **metrics})
    return 0


def resolve_run(path: Path, sub: str, marker: str) -> Path:
    """Accept a run folder (``runs/x`` holding ``policy/`` or ``adapter/``) wherever its artifact is expected."""
    return path / sub if not (path / marker).exists() and (path / sub / marker).exists() else path


def load_base(path: Path, device: str = "cpu", action_bounds: tuple[float, float] | None = None,
              bounds_env: str | None = None) -> Any:
    """``--policy``/``--base``: a robolora run or checkpoint folder, or a saved LeRobot policy folder / a
    ``lerobot-train`` output (needs the lerobot extra). A LeRobot policy's actions are clamped to ``action_bounds``,
    or to the action bounds of the env ``bounds_env`` (made only then); a robolora policy has its own."""
    from robolora.integrations.lerobot import is_lerobot_policy_folder, load_lerobot_policy

    if is_lerobot_policy_folder(path):
        if action_bounds is None and bounds_env is not None:
            from robolora.evaluate import env_action_bounds

            action_bounds = env_action_bounds(bounds_env)
        try:
            return load_lerobot_policy(path, device=device, action_bounds=action_bounds)
        except ImportError as e:  # lerobot missing: the message says what to install
            raise ValueError(str(e)) from e
    from robolora.policies import load_policy

    return load_policy(resolve_run(path, "policy", "config.json"), device=device)


def skill_execution(args: argparse.Namespace) -> dict[str, Any] | None:
    """train-skill's ``--n-action-steps`` / ``--temporal-ensemble`` as the adapter's "execution" (None: the base's)."""
    execution: dict[str, Any] = {}
    if args.n_action_steps:
        execution["n_action_steps"] = args.n_action_steps
    if args.temporal_ensemble is not None:
        if execution.get("n_action_steps", 1) != 1:
            raise ValueError(f"--temporal-ensemble re-queries every step: drop --n-action-steps "
                             f"{args.n_action_steps} (ensembling executes 1 action per query)")
        execution.update(n_action_steps=1, temporal_ensemble=args.temporal_ensemble)
    return execution or None


def _train_config(args: argparse.Namespace) -> Any:
    from robolora.train import TrainConfig

    lr = args.lr if args.lr else (1e-3 if args.method == "lora" else 3e-4)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, weight_decay=0.0,
                       warmup_steps=min(100, args.steps // 10), seed=args.seed, device=args.device,
                       checkpoint_every=args.checkpoint_every, augment_shift=args.augment_shift,
                       eval_every=args.select_every if args.select_episodes else 0)


def cmd_train_skill(args: argparse.Namespace) -> int:
    from robolora.integrations.lerobot import is_lerobot_policy_folder
    from robolora.integrations.lerobot_data import lerobot_dataset_version

    if is_lerobot_policy_folder(args.base) or lerobot_dataset_version(args.data) is not None:
        return _train_lerobot_skill(args)
    if args.skill:
        raise ValueError(f"--skill names a skill of a LeRobotDataset; a robolora demo folder names its skill by its "
                         f"task ({args.data}'s manifest): drop --skill")
    from robolora.config import LoRAConfig
    from robolora.policies.checkpoint import policy_class
    from robolora.recipes import train_skill

    base = resolve_run(args.base, "policy", "config.json")
    policy_cls = policy_class(base)  # its default targets: attention projections (+ MLP with --mlp)
    targets = (policy_cls.lora_targets + (policy_cls.lora_mlp_targets if args.mlp else ())
               + (policy_cls.lora_conv_targets if args.conv else ()))
    if args.targets:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha else 2.0 * args.rank, targets=targets)
    config = _train_config(args)
    bar = Progress(args.steps, f"train-skill {args.method}", not args.json)
    try:
        info = train_skill(base, args.data, args.out, method=args.method,
                           lora=lora, config=config, demos=args.demos, resume=args.resume,
                           eval_episodes=args.eval_episodes, on_step=bar.update_to,
                           select_episodes=args.select_episodes,
                           execution=skill_execution(args))
    finally:
        bar.close()
    summary = {"skill": info["skill"], "method": info["method"], "out": info["out"], "demos": info["demos"],
               "trainable_params": info["trainable_params"],
               "trainable_%_of_base": round(info["trainable_percent_of_base"], 3),
               "size_kb": round(info["size_bytes"] / 1024, 1), "train_loss": info["train_metrics"]["train/loss"],
               "train_wall_s": round(info["train_metrics"]["train/wall_s"], 1), **info.get("eval", {})}
    if "selection" in info:
        summary["selected_step"] = info["selection"]["step"]
        summary["val_success"] = info["selection"]["success_rate"]
    emit(args, info if args.json else summary)
    return 0


def _train_lerobot_skill(args: argparse.Namespace) -> int:
    """train-skill on a LeRobot policy folder (``--base``) and a local LeRobotDataset v3 (``--data``): LoRA on the
    frozen policy through ``robolora.integrations.lerobot_data.train_lerobot_skill``. Everything the two folders
    say is checked before lerobot is imported or anything is written."""
    from robolora.config import LoRAConfig
    from robolora.integrations import lerobot_data
    from robolora.integrations.lerobot import LeRobotPolicy, is_lerobot_policy_folder, resolve_lerobot_policy_folder

    version = lerobot_data.lerobot_dataset_version(args.data)
    if not is_lerobot_policy_folder(args.base):
        raise ValueError(f"--data {args.data} is a LeRobotDataset ({version}); train on it with the LeRobot policy "
                         f"it fits: --base <a saved LeRobot policy folder (config.json with \"type\", "
                         f"model.safetensors, processor files) or a lerobot-train output folder>; {args.base} is not one")
    if version is None:
        raise ValueError(f"--base {args.base} is a LeRobot policy folder, so --data must be a LeRobotDataset v3 folder "
                         f"(meta/info.json); {args.data} is not one. Convert robolora demos with `robolora convert "
                         f"--to lerobot {args.data} --out {args.data}_lerobot`")
    if args.method != "lora":
        raise ValueError(f"--method {args.method} is not available for a LeRobot policy (robolora trains LoRA skills "
                         f"on it; fine-tune the whole policy with lerobot-train --policy.path={args.base}): drop it")
    targets = (LeRobotPolicy.lora_targets + (LeRobotPolicy.lora_mlp_targets if args.mlp else ())
               + (LeRobotPolicy.lora_conv_targets if args.conv else ()))
    if args.targets:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha else 2.0 * args.rank, targets=targets)
    base = resolve_lerobot_policy_folder(args.base)
    bar = Progress(args.steps, "train-skill lora (LeRobot)", not args.json)
    try:
        info = lerobot_data.train_lerobot_skill(base, args.data, args.out, skill=args.skill, lora=lora,
                                                config=_train_config(args), execution=skill_execution(args),
                                                resume=args.resume, on_step=bar.update_to, demos=args.demos,
                                                select_episodes=args.select_episodes,
                                                eval_episodes=args.eval_episodes)
    except ImportError as e:  # lerobot missing: the message says what to install
        raise ValueError(str(e)) from e
    finally:
        bar.close()
    summary = {"skill": info["skill"], "method": "lora", "out": info["out"], "lerobot_policy": str(base),
               "demos": info["demos"], "samples": info["samples"], "trainable_params": info["trainable_params"],
               "trainable_%_of_base": round(info["trainable_percent_of_base"], 3),
               "train_loss": info["train_metrics"]["train/loss"],
               "train_wall_s": round(info["train_metrics"]["train/wall_s"], 1), **info.get("eval", {})}
    if "selection" in info:
        summary["selected_step"] = info["selection"]["step"]
        summary["val_success"] = info["selection"]["success_rate"]
    emit(args, info if args.json else summary)
    return 0


def cmd_train_completion(args: argparse.Namespace) -> int:
    from robolora.adapters import load_adapter, resolve_adapter, save_adapter
    from robolora.completion import CompletionConfig, train_completion
    from robolora.data import load_manifest
    from robolora.train import resolve_device

    folder = resolve_adapter(resolve_run(args.skill, "adapter", "adapter.json"))
    out = args.out or folder
    if out != folder and out.exists() and any(out.iterdir()) and not (out / "adapter.json").is_file():
        raise ValueError(f"{out} exists and is not an adapter folder; choose a new or empty folder")
    config = CompletionConfig(hidden=args.hidden, features=not args.no_features, image_channels=args.image_channels,
                              image_kernel=args.image_kernel, image_key=args.image_key, lead=args.lead,
                              steps=args.steps, k=args.k, timeout_ticks=args.timeout_ticks, seed=args.seed)
    episodes = sum(len(load_manifest(d)["episodes"]) for d in [*args.data, *(args.test_data or ())])
    features = Progress(episodes, "features", not args.json)
    steps = Progress(args.steps, "train-completion", not args.json)
    try:
        adapter, m = train_completion(resolve_run(args.base, "policy", "config.json"), load_adapter(folder),
                                      args.data, config, test_dirs=args.test_data,
                                      device=str(resolve_device(args.device)), on_episode=features.update_to,
                                      on_step=steps.update_to)
    finally:
        features.close()
        steps.close()
    save_adapter(adapter, out)  # a new folder replaces the old one whole: LoRA weights and token as they were
    c = adapter.completion
    emit(args, {"skill": adapter.skill, "out": str(out), "threshold": c.threshold, "k": c.k,
                "timeout_ticks": c.timeout_ticks, **{k.split("/", 1)[1]: v for k, v in m.items()}})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from robolora.envs import BASE_TASKS, TASKS
    from robolora.evaluate import evaluate
    from robolora.train import resolve_device

    policy = load_base(args.policy, str(resolve_device(args.device)), bounds_env=TASKS[args.task[0]])
    if args.skill:
        from robolora.adapters import attach_for_eval

        attach_for_eval(policy, resolve_run(args.skill, "adapter", "adapter.json"))
    from robolora.adapters import validate_execution

    flags = {"n_action_steps": args.n_action_steps, "temporal_ensemble": args.temporal_ensemble}
    execution = validate_execution({k: v for k, v in flags.items() if v is not None}, policy.spec.execution)
    if execution:  # overrides the checkpoint's and the skill's execution
        policy.set_execution(**execution)
    rows = []
    for name in args.task:
        env_id = TASKS[name]
        uses_task_id = (name in BASE_TASKS and policy.spec.task_key is not None
                        and getattr(policy, "skill_token", None) is None)
        task_id = BASE_TASKS.index(name) if uses_task_id else None
        bar = Progress(args.episodes, f"eval {name}", not args.json)
        video = None
        if args.video:
            video = Path(args.video) / f"{name}.gif" if len(args.task) > 1 else Path(args.video)
        try:
            m = evaluate(policy, env_id, args.episodes, seed=args.seed, num_envs=args.num_envs,
                         task_id=task_id, video_path=video, env_kwargs=policy.spec.env_kwargs(),
                         on_episode=bar.update_to)
        finally:
            bar.close()
        rows.append({"task": name, "success": m["eval/success_rate"], "ci95": f"[{m['eval/ci_low']:.2f}, "
                     f"{m['eval/ci_high']:.2f}]", "mean_len": m["eval/mean_length"],
                     "lat_p50_ms": m["eval/latency_ms_p50"], "lat_p99_ms": m["eval/latency_ms_p99"],
                     "episodes": m["eval/episodes"], **({"video": m["video"]} if video else {})})
    emit(args, {"results": rows}, lambda: format_table(rows, list(rows[0])))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from robolora.rollout import shipped_skills_dir

    shipped = all((shipped_skills_dir() / s / "adapter.json").exists() for s in ("wipe", "dish_rack"))
    if args.mechanics or not shipped:
        if not shipped and not args.mechanics:
            print("robolora demo: no shipped skill adapters in this installation; showing the LoRA mechanics",
                  file=sys.stderr)
        return _lora_mechanics(args)
    from robolora.demo import kitchen_demo
    from robolora.recipes import shipped_base
    from robolora.rollout import rollout_rows
    from robolora.train import resolve_device

    bar = Progress(args.episodes, "kitchen", not args.json)
    try:
        m = kitchen_demo(shipped_base(), episodes=args.episodes, out_dir=args.out,
                         device=str(resolve_device(args.device)), progress=bar.update_to)
    finally:
        bar.close()

    def table() -> str:
        lat = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith("demo/latency_ms/")}
        rows = rollout_rows(m)
        timing = [
            {"measure": "policy step in the rollout, p50 / p99 (ms)",
             "value": f"{m['rollout/latency_ms_p50']:.2f} / {m['rollout/latency_ms_p99']:.2f}"},
            {"measure": "skill switch, p50 / p99 / max (us)",
             "value": f"{m['rollout/switch_us_p50']:.1f} / {m['rollout/switch_us_p99']:.1f} / "
                      f"{m['rollout/switch_us_max']:.1f}"},
            {"measure": "query latency plain base / skill merged (bank) / unmerged (ms)",
             "value": f"{lat['plain']:.2f} / {lat['bank']:.2f} / {lat['unmerged']:.2f}"},
            {"measure": "merged skill vs plain base", "value": f"{lat['bank'] / lat['plain']:.3f}x"},
        ]
        return "\n".join([format_table(rows, ["stage", "success", "ci95"]), "", format_table(timing, ["measure", "value"]),
                          f"video: {m['video']}", f"plot:  {m['plot']}"])

    emit(args, m, table)
    return 0


def _lora_mechanics(args: argparse.Namespace) -> int:
    from robolora.demo import lora_demo

    m = lora_demo(preset=args.preset, rank=args.rank)
    rows = [
        {"check": "fresh adapter changes nothing (max |diff|)", "value": f"{m['demo/fresh_adapter_max_diff']:.1e}"},
        {"check": "wipe vs dish_rack outputs differ (max |diff|)", "value": f"{m['demo/skill_output_gap']:.3f}"},
        {"check": "switch wipe->dish_rack->wipe restores (max |diff|)",
         "value": f"{m['demo/switch_back_max_diff']:.1e}"},
        {"check": "merged vs unmerged (max |diff|)", "value": f"{m['demo/merged_vs_unmerged_max_diff']:.1e}"},
        {"check": "unmerge restores W0 bit-exactly", "value": str(bool(m["demo/base_restored_bit_exact"]))},
        {"check": "base parameters / LoRA parameters per skill",
         "value": f"{m['demo/params_base']:.0f} / {m['demo/params_per_skill']:.0f}"},
        {"check": "step latency plain / unmerged / merged (ms, batch 1)",
         "value": f"{m['demo/plain_step_ms']:.3f} / {m['demo/unmerged_step_ms']:.3f} / {m['demo/merged_step_ms']:.3f}"},
        {"check": "unmerged LoRA overhead vs plain", "value": f"{m['demo/unmerged_overhead']:.2f}x"},
        {"check": "merge / unmerge whole policy (ms)", "value": f"{m['demo/merge_ms']:.2f} / {m['demo/unmerge_ms']:.2f}"},
    ]
    emit(args, m, lambda: format_table(rows, ["check", "value"]))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from robolora.rollout import rollout_main, rollout_rows
    from robolora.train import resolve_device

    device = str(resolve_device(args.device))
    base = load_base(args.base, device, bounds_env=args.env)
    bar = Progress(args.episodes, "rollout", not args.json)
    try:
        m = rollout_main(args.skills, base, episodes=args.episodes, seed=args.seed, switch=args.switch,
                         schedule_ticks=args.schedule, mode=args.mode, video_path=args.video, device=device,
                         progress=bar.update_to, env_id=args.env)
    finally:
        bar.close()

    def table() -> str:
        timing = (f"switch latency p50/p99/max: {m['rollout/switch_us_p50']:.1f} / {m['rollout/switch_us_p99']:.1f} / "
                  f"{m['rollout/switch_us_max']:.1f} us; policy step p50/p99: {m['rollout/latency_ms_p50']:.2f} / "
                  f"{m['rollout/latency_ms_p99']:.2f} ms; mean length {m['rollout/mean_length']:.1f}")
        if "rollout/premature_switches" in m:
            timing += (f"\nlearned switches: {m['rollout/premature_switches']} premature; completion head p50/p99: "
                       f"{m['rollout/completion_ms_p50']:.2f} / {m['rollout/completion_ms_p99']:.2f} ms")
        return format_table(rollout_rows(m), ["stage", "success", "ci95"]) + "\n" + timing + (
            f"\nvideo: {m['video']}" if m.get("video") else "")

    emit(args, m, table)
    return 0


def cmd_finetune_rl(args: argparse.Namespace) -> int:
    import dataclasses

    from robolora.rl import RLConfig, finetune_rl

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    bar = Progress(args.steps, "finetune-rl", not args.json)
    try:
        info = finetune_rl(resolve_run(args.skill, "adapter", "adapter.json"), args.steps, args.out,
                           base=resolve_run(args.base, "policy", "config.json"), config=config, env_id=args.env,
                           eval_episodes=args.eval_episodes, resume=args.resume, progress=bar.update_to)
    finally:
        bar.close()

    def table() -> str:
        rows = [{"": "best validation success", "value": f"{info['rl/best_validation_success']:.2f} at "
                 f"{info['rl/best_step']} env steps"},
                {"": "env steps / wall", "value": f"{info['rl/env_steps']} / {info['rl/wall_s']:.0f} s"},
                {"": "residual head", "value": f"{info['rl/residual_params']} params (skill "
                 f"{info['rl/skill_percent_of_base']:.2f}% of the base)"}]
        if "eval" in info:
            m = info["eval"]
            rows.append({"": "held-out success", "value": f"{m['eval/success_rate']:.2f} [{m['eval/ci_low']:.2f}, "
                         f"{m['eval/ci_high']:.2f}] over {m['eval/episodes']} episodes"})
        return format_table(rows, ["", "value"]) + f"\nadapter: {info['out']}"

    emit(args, {k: v for k, v in info.items() if k != "eval"} | (
        {"eval": {k: v for k, v in info["eval"].items() if k != "episodes"}} if "eval" in info else {}), table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from robolora.export import export_bundle, export_skills

    from robolora.integrations.lerobot import is_lerobot_policy_folder

    lerobot = is_lerobot_policy_folder(args.base)
    if args.action_bounds and not lerobot:
        raise ValueError("--action-bounds is for a LeRobot policy folder; a robolora policy's bounds are its own")
    # a robolora base goes to the exporter as its folder; a LeRobot one is loaded here, with the given bounds
    base = (load_base(args.base, action_bounds=tuple(args.action_bounds) if args.action_bounds else None)
            if lerobot else resolve_run(args.base, "policy", "config.json"))
    if args.skills and args.skill:
        raise ValueError("give --skill (one skill) or --skills (a multi-skill bundle), not both")
    if args.skills:
        skills = [resolve_run(Path(s), "adapter", "adapter.json") if Path(s).exists() else s
                  for s in _names(args.skills)]
        index = export_skills(base, skills, args.out, control_hz=args.hz,
                              sequence=_names(args.sequence) if args.sequence else None)
        summary = {"out": index["path"], "skills": index["skills"], "sequence": index["sequence"],
                   **{f"parity_max_abs_diff/{k}": v for k, v in index["parity"].items()},
                   "bytes": sum(f["bytes"] for f in index["files"].values())}
        emit(args, index if args.json else summary)
        return 0
    if args.sequence:
        raise ValueError("--sequence orders the skills of a multi-skill bundle; pass them with --skills")
    skill = resolve_run(args.skill, "adapter", "adapter.json") if args.skill else None
    meta = export_bundle(base, skill, args.out, control_hz=args.hz, task_id=args.task_id)
    files = {name: f["bytes"] for name, f in meta["files"].items()}
    summary = {"out": meta["path"], "skill": meta.get("skill"), "parity_max_abs_diff": meta["parity"]["max_abs_diff"],
               **{f"bytes/{k}": v for k, v in files.items()}}
    emit(args, meta if args.json else summary)
    return 0


def _names(text: str) -> list[str]:
    """``"wipe, dish_rack"`` -> ``["wipe", "dish_rack"]``."""
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_control(args: argparse.Namespace) -> int:
    from robolora.controller import control_main
    from robolora.envs import TASKS

    env_id = TASKS[args.env]
    timeout = None if args.timeout is None else args.timeout[0] if len(args.timeout) == 1 else args.timeout
    bar = Progress(args.episodes, "control", not args.json)
    try:
        m = control_main(args.bundle, env_id, hz=args.hz, episodes=args.episodes, seed=args.seed,
                         task_id=args.task_id, on_episode=bar.update_to,
                         sequence=_names(args.sequence) if args.sequence else None, switch=args.switch,
                         schedule=args.schedule, threshold=args.threshold, k=args.k, timeout=timeout,
                         finish=args.finish)
    finally:
        bar.close()
    emit(args, m if args.json else {k: v for k, v in m.items() if k != "episodes"})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from robolora.data import load_manifest
    from robolora.integrations.lerobot_data import to_lerobot_dataset

    episodes = sum(len(load_manifest(d)["episodes"][:args.episodes]) for d in args.demos)
    bar = Progress(episodes, f"convert to {args.to}", not args.json)
    try:
        info = to_lerobot_dataset(args.demos, args.out, repo_id=args.repo_id, videos=args.images == "video",
                                  max_episodes=args.episodes, keep_post_success=args.keep_post_success,
                                  progress=bar.update_to)
    except (ImportError, FileExistsError) as e:
        raise ValueError(str(e)) from e
    finally:
        bar.close()
    emit(args, info)
    return 0


# ----------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="log library progress (INFO)")
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default auto)")


def _training_flags(p: argparse.ArgumentParser, steps: int, lr: float | None, lr_help: str,
                    checkpoint_every: int) -> None:
    """The flags every behaviour-cloning subcommand shares, with one spelling."""
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr_help})")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints (default {checkpoint_every})")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--augment-shift", type=int, default=0,
                   help="DrQ random image shift in pixels, 0-16 (default 0: off)")


def _add_dataclass_flags(p: argparse.ArgumentParser, module: str, name: str, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of a config dataclass, with the field's help text (CleanRL style)."""
    import dataclasses
    import importlib

    cls = getattr(importlib.import_module(module), name)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        help_text = f"{f.metadata.get('help', '')} (default {f.default})".replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.default is None:
            p.add_argument(flag, type=float if "kl" in f.name else int, default=None, help=help_text)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robolora", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robolora {robolora.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="inspect a checkpoint, adapter, bundle or dataset; or the installation")
    p.add_argument("path", nargs="?", help="a policy checkpoint, adapter, export bundle or dataset folder")
    _common(p, device=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="kitchen rollout switching the shipped skills; prints a table, writes video + plot",
                       epilog="example: robolora demo --episodes 10 --out robolora_demo")
    p.add_argument("--episodes", type=int, default=10, help="kitchen episodes (default 10)")
    p.add_argument("--out", type=Path, default=Path("robolora_demo"), help="folder for the video and the plot")
    p.add_argument("--mechanics", action="store_true",
                   help="instead: attach two untrained LoRA skills to the policy, switch, merge, measure")
    p.add_argument("--preset", default="base", help="with --mechanics: policy size tiny, base or large")
    p.add_argument("--rank", type=int, default=8, help="with --mechanics: LoRA rank (default 8)")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("collect", help="record scripted-expert demonstrations into a dataset folder",
                       epilog="example: robolora collect --task pick_place --episodes 200 --out data/pick_place")
    p.add_argument("--task", type=task_arg, required=True,
                   help="task name (reach, push, ..., dish_rack, wipe) or gym id")
    p.add_argument("--episodes", type=int, default=100, help="successful episodes to record (default 100)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder (resumed when it exists)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--noise", type=float, default=None, help="expert action noise (default: the expert's)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--image-size", type=int, default=64, help="camera image size in pixels (default 64)")
    p.add_argument("--cameras", nargs="+", default=["front"], help="cameras to record (front, wrist)")
    p.add_argument("--post-success", type=int, default=0, metavar="N",
                   help="record N more expert steps after success: positives for a completion head (default 0)")
    _common(p, device=False)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("pretrain", help="multi-task behaviour cloning of the base policy (all weights)",
                       epilog="example: robolora pretrain --data data/reach data/push --out runs/base --resume")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="dataset folders of base tasks")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics.jsonl, policy")
    p.add_argument("--policy", default="visuomotor", choices=["visuomotor", "act"],
                   help="policy architecture: visuomotor (encoder-only, the shipped base) or act (ACT-style "
                        "encoder-decoder on nn.MultiheadAttention); default visuomotor")
    p.add_argument("--preset", default="base", help="policy size: tiny, base or large (act: tiny or base); "
                                                    "default base")
    _training_flags(p, steps=20_000, lr=5e-4, lr_help="5e-4", checkpoint_every=500)
    p.add_argument("--init", type=Path, default=None,
                   help="continue pretraining from this saved policy (same preset) instead of a fresh one")
    p.add_argument("--task-weight", type=task_weight_arg, action="append", default=None, metavar="TASK=W",
                   help="sample TASK W times as often as the other tasks (repeatable; default: all equally)")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train-skill", help="train a new skill on the frozen base: LoRA adapter (or a baseline)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "example, the shipped dish_rack recipe (200 demos, 0.96 held-out; docs/results.md 'The skill"
                           " table'):\n  robolora train-skill --data data/dish_rack --out runs/dish_rack --rank 2 "
                           "--lr 2e-3 --steps 6000 --temporal-ensemble 0.05 \\\n      --targets "
                           "attn.q,attn.k,attn.v,attn.o,mlp.fc1,mlp.fc2,action_head,proprio_proj\n"
                           "the shipped wipe recipe executes 8-action chunks instead: --n-action-steps 8 in place of "
                           "--temporal-ensemble 0.05 (200 demos; 0.96)\n"
                           "a LeRobot policy on a LeRobotDataset v3 (Python >= 3.12, pip install \"robolora[lerobot]\";"
                           " docs/lerobot.md):\n  robolora train-skill --base runs/lerobot_act --data "
                           "data/lerobot/pick_place --out runs/lerobot_pick_place --mlp"))
    p.add_argument("--data", type=Path, required=True,
                   help="dataset folder of the skill: robolora demos (robolora collect) or a local LeRobotDataset v3 "
                        "(meta/info.json; needs --base LeRobot policy and the lerobot extra)")
    p.add_argument("--out", type=Path, required=True, help="run folder; the adapter goes to OUT/adapter")
    p.add_argument("--base", type=Path, default=None,
                   help="base policy checkpoint (default: the shipped base), or a saved LeRobot policy folder "
                        "(config.json with \"type\": act) / lerobot-train output folder")
    p.add_argument("--skill", default=None,
                   help="skill name, for a LeRobotDataset (default: its task, when it holds one)")
    p.add_argument("--method", default="lora", choices=["lora", "full", "scratch"],
                   help="lora (default; base frozen), full fine-tuning, or from scratch (baselines)")
    p.add_argument("--rank", type=int, default=4,
                   help="LoRA rank (default 4: 1.6%% of the base's parameters on q/k/v/o)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--mlp", action="store_true", help="also adapt the MLP (visuomotor: mlp.fc1/fc2; act: linear1/2), "
                                                      "not only the attention projections")
    p.add_argument("--conv", action="store_true",
                   help="also adapt the vision encoder's convolutions (LoRA on nn.Conv2d; visuomotor/act: the camera "
                        "stems; a LeRobot ACT: the ResNet backbone and its 1x1 input projection)")
    p.add_argument("--targets", default=None,
                   help="comma-separated Linear / Conv2d name patterns to adapt, overriding the default, --mlp and --conv "
                        "(e.g. attn.q,attn.k,attn.v,attn.o,mlp.fc1,mlp.fc2,action_head)")
    p.add_argument("--demos", type=int, default=None, help="use only the first N demos (default all)")
    _training_flags(p, steps=3000, lr=None, lr_help="1e-3 LoRA, 3e-4 otherwise", checkpoint_every=250)
    p.add_argument("--n-action-steps", type=int, default=None,
                   help="actions this skill executes per predicted chunk, saved in adapter.json and used whenever "
                        "the skill is active (default: the base's)")
    p.add_argument("--temporal-ensemble", type=float, default=None, metavar="M",
                   help="execute this skill with ACT temporal ensembling, coefficient M (re-query every step, "
                        "average the overlapping chunks with weights exp(-M*i)); saved in adapter.json")
    p.add_argument("--select-episodes", type=int, default=0,
                   help="every --select-every steps, roll out on N validation episodes (seeds from 30,000,000) and "
                        "keep the best step's weights (default 0: keep the last)")
    p.add_argument("--select-every", type=int, default=500,
                   help="steps between validation rollouts with --select-episodes (default 500)")
    p.add_argument("--eval-episodes", type=int, default=0, help="evaluate on N held-out episodes at the end")
    _common(p)
    p.set_defaults(func=cmd_train_skill)

    p = sub.add_parser("train-completion", help="train a skill's completion head (its goal reached?) from demos",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "example (docs/completion.md):\n  robolora collect --task wipe --episodes 200 --post-success"
                           " 20 --out data/wipe\n  robolora train-completion --skill wipe --data data/wipe"))
    p.add_argument("--skill", type=Path, required=True,
                   help="adapter folder (or train-skill run folder) or shipped skill name; the head is written into "
                        "it unless --out is given")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="demo folders of the skill, best collected with --post-success 20")
    p.add_argument("--base", type=Path, default=None, help="base policy checkpoint (default: the shipped base)")
    p.add_argument("--out", type=Path, default=None, help="write the adapter with its head here instead")
    p.add_argument("--test-data", type=Path, nargs="+", default=None,
                   help="more demo folders, never trained on, to report the head's precision and recall on")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--hidden", type=int, default=8, help="hidden width of the head, 0 for linear (default 8)")
    p.add_argument("--image-channels", type=int, default=0, metavar="C",
                   help="add an image branch on the policy's camera: C convolution maps, max- and mean-pooled "
                        "(default 0: features only; the shipped wipe head uses 4, docs/completion.md)")
    p.add_argument("--image-kernel", type=int, default=3, help="the image branch's kernel size (odd, default 3)")
    p.add_argument("--image-key", default=None, help="the camera the branch reads (default the policy's first)")
    p.add_argument("--no-features", action="store_true",
                   help="do not read the policy's features: the image branch alone (needs --image-channels)")
    p.add_argument("--lead", type=int, default=0, help="frames before the first success labelled positive too")
    p.add_argument("--k", type=int, default=3, help="ticks at or above the threshold before switching (default 3)")
    p.add_argument("--timeout-ticks", type=int, default=None,
                   help="ticks before the sequencer gives up on the skill (default 1.5 x the longest demo's "
                        "ticks to success + k - 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episode split and training (default 0)")
    _common(p)
    p.set_defaults(func=cmd_train_completion)

    p = sub.add_parser("eval", help="success rate (95%% interval), episode length and latency over seeded episodes",
                       epilog="example: robolora eval --policy policies/pretrained/base --task reach push")
    p.add_argument("--policy", type=Path, default=None,
                   help="policy checkpoint, or a LeRobot policy folder / lerobot-train output (default: the "
                        "shipped base)")
    p.add_argument("--skill", type=Path, default=None, help="skill adapter folder to attach")
    p.add_argument("--task", type=task_arg, nargs="+", required=True, help="task names or gym ids")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task (default 50)")
    p.add_argument("--seed", type=int, default=None, help="first evaluation seed (default: held-out range)")
    p.add_argument("--num-envs", type=int, default=1, help="parallel environments (default 1)")
    p.add_argument("--n-action-steps", type=int, default=None,
                   help="actions executed per predicted chunk before re-querying (default: the checkpoint's)")
    p.add_argument("--temporal-ensemble", type=float, default=None,
                   help="ACT temporal ensembling coefficient m (re-query every step; needs --n-action-steps 1)")
    p.add_argument("--video", default=None, help="write the first episode as .gif/.mp4 (folder for many tasks)")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rollout", help="multi-stage episodes (the kitchen by default), switching skills at run time "
                                       "(SkillManager)",
                       epilog="examples:\n  robolora rollout --skills wipe,dish_rack --episodes 50 --video kitchen.gif"
                              "\n  robolora rollout --skills wipe,dish_rack --switch learned  # on the adapters' "
                              "completion heads",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skills", default="wipe,dish_rack",
                   help="comma-separated skills in stage order: shipped names or adapter folders")
    p.add_argument("--env", default="kitchen",
                   help="task name or env id (default kitchen); with --switch success or schedule it must "
                        "report info['stage_success'], one flag per skill; with --switch learned any env")
    p.add_argument("--base", type=Path, default=None, help="base policy checkpoint (default: the shipped base)")
    p.add_argument("--episodes", type=int, default=50, help="episodes (default 50)")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default: held-out range)")
    p.add_argument("--switch", default="success", choices=["success", "schedule", "learned"],
                   help="switch on the env's stage success (the oracle, default), at --schedule ticks, or on each "
                        "skill's completion head (learned: every skill but the last needs one)")
    p.add_argument("--schedule", type=int, nargs="+", default=None, help="tick at which each next skill starts")
    p.add_argument("--mode", default="bank", choices=["bank", "inplace", "unmerged"],
                   help="SkillManager mode (default bank: precomputed merged weights, zero added step latency)")
    p.add_argument("--video", default=None, help="write the first episode as .gif/.mp4")
    _common(p)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("finetune-rl", help="RL (PPO) fine-tuning of a skill's residual action head (base and LoRA "
                                           "frozen)",
                       epilog="example: robolora finetune-rl --skill runs/dish_rack50 --steps 150000 --out "
                              "runs/dish_rack_rl --eval-episodes 50 --threads 1   (docs/rl.md)")
    p.add_argument("--skill", type=Path, required=True, help="skill adapter folder (or train-skill run folder)")
    p.add_argument("--steps", type=int, required=True, help="environment steps of RL")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: OUT/checkpoint (after each validation) and OUT/adapter (the result)")
    p.add_argument("--base", type=Path, default=None, help="base policy checkpoint (default: the shipped base)")
    p.add_argument("--env", default=None, help="gym id to train on (default: the skill's task)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a kill")
    p.add_argument("--eval-episodes", type=int, default=0, help="evaluate the result on N held-out seeds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is fastest for batch-8 rollouts on a busy 2-core machine)")
    _add_dataclass_flags(p, "robolora.rl", "RLConfig", skip=("device",))
    _common(p)
    p.set_defaults(func=cmd_finetune_rl)

    p = sub.add_parser("export", help="merge skills into the base, strip LoRA, write a verified controller bundle",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  robolora export --skill policies/pretrained/skills/dish_rack --out bundles/dish\n"
                           "  robolora export --skills wipe,dish_rack --sequence wipe,dish_rack --out bundles/kitchen"))
    p.add_argument("--base", type=Path, default=None,
                   help="base policy checkpoint, or a LeRobot policy folder / lerobot-train output (default: the "
                        "shipped base)")
    p.add_argument("--skill", type=Path, default=None, help="skill adapter to merge (default: the base alone)")
    p.add_argument("--skills", default=None,
                   help="comma-separated skills (adapter folders or shipped names): one multi-skill bundle")
    p.add_argument("--sequence", default=None,
                   help="with --skills: the order they run in; the bundle allows only its transitions")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--hz", type=float, default=20.0, help="control rate recorded in the bundle (default 20)")
    p.add_argument("--task-id", type=int, default=None, help="bake a base task id into a base-only bundle")
    p.add_argument("--action-bounds", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="a LeRobot --base: the robot's action bounds, recorded and clamped to by the controller "
                        "(robolora's envs: -1 1; default none: unbounded)")
    _common(p, device=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("control", help="run a bundle with the torch-free controller at a fixed rate in MuJoCo",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  robolora control --bundle bundles/dish --env robolora/DishRack-v0 --hz 20\n"
                           "  robolora control --bundle bundles/kitchen --env kitchen --sequence wipe,dish_rack "
                           "--switch learned"))
    p.add_argument("--bundle", type=Path, required=True, help="controller bundle folder (robolora export)")
    p.add_argument("--env", type=task_arg, required=True, help="task name or gym id to drive")
    p.add_argument("--hz", type=float, default=None, help="control rate (default: the bundle's; 0 = unpaced)")
    p.add_argument("--episodes", type=int, default=20, help="episodes (default 20)")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default: held-out range)")
    p.add_argument("--task-id", type=int, default=None, help="task id for a base bundle (default: the env's)")
    p.add_argument("--sequence", default=None,
                   help="comma-separated skills of a multi-skill bundle to run in order (default: the bundle's)")
    p.add_argument("--switch", default=None, choices=["learned", "schedule", "command"],
                   help="when the next skill takes over: its predecessor's completion head (learned, the default "
                        "for a multi-skill bundle), --schedule ticks, or commands (here the env's stage success "
                        "stands in for the planner)")
    p.add_argument("--schedule", type=int, nargs="+", default=None, help="tick at which each next skill acts first")
    p.add_argument("--threshold", type=float, default=None, help="override the completion threshold (0, 1]")
    p.add_argument("--k", type=int, default=None, help="override the consecutive ticks above the threshold")
    p.add_argument("--timeout", type=int, nargs="+", default=None,
                   help="override the skills' timeouts in ticks: one for all, or one per skill of the sequence")
    p.add_argument("--finish", default=None, choices=["hold", "continue"],
                   help="after the last skill's own completion signal: hold still (default) or let it act on "
                        "(the finish is reported either way)")
    _common(p, device=False)
    p.set_defaults(func=cmd_control)

    p = sub.add_parser("convert", help="write robolora demo folders as another library's dataset (LeRobotDataset v3)",
                       epilog="example: robolora convert --to lerobot data/reach data/push --out data/lerobot_base")
    p.add_argument("demos", type=Path, nargs="+", help="robolora demo folders (robolora collect), one task each")
    p.add_argument("--to", required=True, choices=["lerobot"],
                   help="lerobot: a LeRobotDataset v3 folder (needs the lerobot extra, Python >= 3.12)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create (must not exist)")
    p.add_argument("--repo-id", default=None, help="dataset name recorded in it (default robolora/<tasks>)")
    p.add_argument("--episodes", type=int, default=None, help="the first N episodes of each folder (default all)")
    p.add_argument("--keep-post-success", action="store_true",
                   help="keep the frames recorded past success (collect --post-success); default: end each episode "
                        "at its first success, as training does")
    p.add_argument("--images", default="video", choices=["video", "png"],
                   help="camera frames as mp4 video (LeRobot's default, lossy) or lossless PNG (default video)")
    _common(p, device=False)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "seed", 0) is None:
        from robolora.stats import EVAL_SEED

        args.seed = EVAL_SEED
    for attr in ("policy", "base"):
        if getattr(args, attr, 0) is None:
            from robolora.recipes import shipped_base

            setattr(args, attr, shipped_base())
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"robolora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
