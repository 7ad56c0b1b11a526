"""BCDataset.get_batch, the training loop's fast path, equals collating items one by one."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from robolora.data import BCDataset, collect


def test_get_batch_equals_collated_items(tmp_path):
    collect("robolora/Reach-v0", 3, tmp_path / "reach", seed=0)
    collect("robolora/Push-v0", 2, tmp_path / "push", seed=0)
    data = BCDataset([tmp_path / "reach", tmp_path / "push"], chunk_size=8, task_ids={"reach": 0, "push": 1})
    indices = [0, len(data) - 1, 5, 5, *torch.randint(0, len(data), (20,)).tolist()]
    expected = default_collate([data[i] for i in indices])
    batch = data.get_batch(indices)
    assert batch.keys() == expected.keys()
    for key in expected:
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key]), key
    assert batch["action_is_pad"][1].any(), "the last step of the last episode pads its chunk"
    assert set(batch["task_id"].tolist()) <= {0, 1}
