"""Engines behind narrow interfaces: trainer strategies (ddp, fsdp, colossalai_*) and, with the PPO
stage, generation backends. Heavy optional packages load lazily inside their engine."""
