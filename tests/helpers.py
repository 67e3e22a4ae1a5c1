"""Overrides that shrink the quickstart recipe to seconds for end-to-end tests."""

TINY = [
    "env.image_size=32",
    "env.max_episode_env_steps=200",
    "policy.hidden_dim=32",
    "policy.num_filters=8",
    "replay.batch_size=8",
    "replay.capacity=2000",
    "run.seed_env_steps=80",
    "run.eval_episodes=1",
    "run.eval_every_env_steps=400",
    "run.checkpoint_every_env_steps=200",
    "run.log_every_env_steps=80",
]
"""Cartpole at 32x32 with 25-agent-step episodes, a tiny network and batch: about a second per 100 env steps."""
