"""Optional integrations with other libraries (docs/design.md §7).

Each integration lives in its own module, imports its library lazily and says what to install when the library is
missing; core robolora never imports this package. ``robolora.integrations.lerobot``: LeRobot policies behind
robolora's policy protocol; ``robolora.integrations.lerobot_data``: robolora demos as LeRobotDataset v3 and back
(docs/lerobot.md).
"""
