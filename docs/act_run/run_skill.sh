#!/usr/bin/env bash
# The ACT-style second policy: base pretrained on reach + drawer_open (4000 steps, batch 32), then a LoRA skill
# on button_press (a task the base never saw), success before/after over 50 held-out episodes.
set -euo pipefail
export MUJOCO_GL=egl OMP_NUM_THREADS=1
robolora eval --policy runs/base/policy --task reach drawer_open button_press --episodes 50 --json > eval_base.json
robolora train-skill --base runs/base/policy --data data/button_press --out runs/button_press --rank 4 --mlp \
    --steps 2000 --batch-size 32 --lr 1e-3 --select-episodes 20 --select-every 500 --json > train_skill.json 2> train_skill.err
robolora eval --policy runs/base/policy --skill runs/button_press --task button_press --episodes 50 --json > eval_skill.json
echo done > DONE
