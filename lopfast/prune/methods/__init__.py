"""Pruning methods that need more than a channel-importance plug-in (ThiNet's rescaling,
EagleEye's candidate search, ADMM training, AMC's DDPG agent)."""
