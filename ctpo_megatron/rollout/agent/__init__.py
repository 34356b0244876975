"""The agent: one rollout is a multi-turn conversation with tool calls, scored by a reward.

`loop` drives the conversation against any server of the serving API, `chat` lays out the
turns in a model's template, `reward` (with `reward_checkers`) scores the final answer,
`config` holds the settings and `trajectory` the tokens, log-probs and versions kept for training.
"""
