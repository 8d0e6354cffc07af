"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""
import keras

# Norm scales, biases and position tables are not decayed (as in GPT-2 and nanoGPT for 1-D
# parameters): decaying them pulls activations toward zero without regularizing anything.
NO_DECAY = ["bias", "gamma", "beta"]


def learning_rate_schedule(train_config, total_steps):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_learning_rate_ratio`
    of it at `total_steps` (keras' `CosineDecay` with its warmup arguments)."""
    warmup = min(train_config.warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup, 1),
        alpha=train_config.min_learning_rate_ratio,
        warmup_target=train_config.learning_rate,
        warmup_steps=warmup,
    )


def make_optimizer(train_config, total_steps):
    """The optimizer every training command uses; see `learning_rate_schedule`."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(train_config, total_steps),
        weight_decay=train_config.weight_decay,
        beta_1=0.9,
        beta_2=train_config.beta_2,
        global_clipnorm=train_config.clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer
