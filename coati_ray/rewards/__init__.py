"""Where a sample's score comes from (stage 3): the reward sources the reward actors hold.

    rm       a trained reward model (`--rm_path`)                                    models/heads.py
    fn       a Python function (`--reward_fn rewards.py:name`) or a built-in verifier  functions.py, verifiers.py
    remote   a reward server (`--reward_url http://...`)                              remote.py

`sources.py` turns the flags into `RewardSpec`s (checked before Ray starts) and a `RewardSource`
for each inside a reward actor; several sources are summed with `--reward_weights`. Every source
scores a `RewardBatch`: the prompts and responses as text, the prompt rows' other columns, and the
sample ids (named in errors).
"""
