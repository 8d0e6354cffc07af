"""AdamW with linear warmup, cosine or warmup-stable-decay schedules and global-norm gradient
clipping."""
import math

import keras
from keras import ops

from keras_llm.fusion import fused

# Norm scales, biases and position tables are not decayed (as in GPT-2 and nanoGPT for 1-D
# parameters): decaying them pulls activations toward zero without regularizing anything.
NO_DECAY = ["bias", "gamma", "beta"]
# The fused update's XLA compile costs about 90 ms per variable on 2 CPU cores (3.6 s for a
# 2-layer BERT's 40 variables) and saves about 3 ns per parameter per step (4.5 ms of a
# gpt-tiny step, 1.3M parameters): it repays itself from about 3e7 parameter-steps per
# variable (gpt-tiny: about 1,200 steps; BERT at the benchmark's small shape: about 100).
FUSE_MIN_PARAMETER_STEPS_PER_VARIABLE = 3e7


def learning_rate_schedule(train_config, total_steps):
    """Linear warmup from 0 to `learning_rate`, then `train_config.schedule`'s decay to
    `min_learning_rate_ratio` of it at `total_steps`: "cosine" (keras' `CosineDecay` with its
    warmup arguments) or "wsd" (`WarmupStableDecay`: constant, then linear over the last
    `decay_fraction` of the steps)."""
    warmup = min(train_config.warmup_steps, max(total_steps - 1, 0))
    if train_config.schedule == "wsd":
        return WarmupStableDecay(
            train_config.learning_rate, warmup_steps=warmup, total_steps=max(total_steps, 1),
            decay_fraction=train_config.decay_fraction,
            final_ratio=train_config.min_learning_rate_ratio)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup, 1),
        alpha=train_config.min_learning_rate_ratio,
        warmup_target=train_config.learning_rate,
        warmup_steps=warmup,
    )


@keras.saving.register_keras_serializable(package="keras_llm")
class WarmupStableDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Warmup-stable-decay ("trapezoidal") learning rate: linear warmup from 0 to
    `peak` over `warmup_steps`, constant at `peak`, then linear decay to `final_ratio * peak`
    over the last `decay_fraction` of `total_steps` (1.0: linear decay right after warmup).

    Training at the peak rate for longer and annealing briefly at the end matches or beats
    cosine decay for the same step count (Hägele et al., 2024). On nanoGPT's character-level
    Shakespeare recipe (2,000 steps, seeds 1337-1339), decaying over the last 20% ends at
    validation loss 1.85 where cosine ends at 1.91 (`benchmarks/shakespeare_char.py`).

    Args:
        peak: the learning rate after warmup.
        warmup_steps: steps of linear warmup from 0.
        total_steps: the step at which the decay ends (the rate stays there after).
        decay_fraction: the final fraction of `total_steps` that decays, in (0, 1].
        final_ratio: the rate at the end, as a fraction of `peak`.

    Example:

    >>> schedule = WarmupStableDecay(1.0, warmup_steps=2, total_steps=10, decay_fraction=0.5,
    ...                              final_ratio=0.0)
    >>> [round(float(schedule(step)), 2) for step in range(0, 11, 2)]
    [0.0, 1.0, 1.0, 0.8, 0.4, 0.0]

    References:
        - [Hägele et al., 2024](https://arxiv.org/abs/2405.18392)
    """

    def __init__(self, peak, warmup_steps, total_steps, decay_fraction=0.2, final_ratio=0.0):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay_fraction = decay_fraction
        self.final_ratio = final_ratio

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.cast(self.warmup_steps, "float32")
        total = ops.cast(self.total_steps, "float32")
        decay_start = ops.maximum(total * (1.0 - self.decay_fraction), warmup)
        warming = self.peak * step / ops.maximum(warmup, 1.0)
        progress = ops.clip((step - decay_start) / ops.maximum(total - decay_start, 1.0), 0.0, 1.0)
        decaying = self.peak * (1.0 - (1.0 - self.final_ratio) * progress)
        return ops.where(step < warmup, warming, decaying)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "decay_fraction": self.decay_fraction,
                "final_ratio": self.final_ratio}


@keras.saving.register_keras_serializable(package="keras_llm")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW whose whole update (clipping, decay, Adam) is one fused program.

    Keras updates each variable with about a dozen elementwise ops (moments, bias
    correction, step), after a pass for the global norm, one to scale each gradient and two
    to decay each weight. On TensorFlow, outside a distribution strategy, this class runs the
    same arithmetic for all variables as one XLA program (`keras_llm.fusion`): one loop per
    variable that reads the gradient, weight and moments once, after one pass for the norm:
    3% (gpt-tiny) to 4% (bert-tiny) of a training step on 2 CPU cores against Keras' AdamW,
    and about 150 fewer ops per step.

    The formulas are Keras' (clipping by global norm, decoupled decay with the current
    learning rate, Keras' epsilon placement and bias correction), so the weights follow
    `keras.optimizers.AdamW` step for step, and the slot variables are the same, so
    checkpoints are interchangeable. Other backends, strategies, gradient accumulation,
    EMA, AMSGrad and per-variable `clipnorm` / `clipvalue` take Keras' own update.

    `total_steps` (set by `make_optimizer`): a run too short to repay the program's compile
    (`FUSE_MIN_PARAMETER_STEPS_PER_VARIABLE`) takes Keras' update too; None always fuses.
    """

    def __init__(self, *args, total_steps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_steps = total_steps

    def get_config(self):
        return {**super().get_config(), "total_steps": self.total_steps}

    def fuses_update(self, trainable_variables):
        """Whether updates of these variables run as the fused program."""
        if (keras.backend.backend() != "tensorflow" or self.amsgrad or self.use_ema
                or self.gradient_accumulation_steps or self.clipnorm or self.clipvalue):
            return False
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return False
        if self.total_steps is None:
            return True
        parameters = sum(math.prod(v.shape) for v in trainable_variables)
        return (self.total_steps * parameters
                >= FUSE_MIN_PARAMETER_STEPS_PER_VARIABLE * len(trainable_variables))

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self.fuses_update(trainable_variables):
            return super()._backend_apply_gradients(grads, trainable_variables)
        import tensorflow as tf  # (the fused path is TensorFlow's)

        indices = [self._get_variable_index(v) for v in trainable_variables]
        weight_decay = self.weight_decay or 0.0
        if "_fused_update" not in self.__dict__:  # (not a tracked attribute)
            self.__dict__["_fused_update"] = fused(_fused_adamw_update)
        self._fused_update(
            [tf.convert_to_tensor(g) for g in grads],  # dense (IndexedSlices too)
            [v.value for v in trainable_variables],
            [self._momentums[i].value for i in indices],
            [self._velocities[i].value for i in indices],
            [weight_decay if self._use_weight_decay(v) else 0.0 for v in trainable_variables],
            tf.convert_to_tensor(self.learning_rate), self.iterations.value,
            self.beta_1, self.beta_2, self.epsilon, self.global_clipnorm or 0.0)


def _fused_adamw_update(grads, variables, momentums, velocities, decays, learning_rate,
                        iterations, beta_1, beta_2, epsilon, clip_norm):
    """Keras' `clip_by_global_norm` (when `clip_norm` > 0), AdamW's decoupled decay
    `w -= w * decay * lr`, then Adam's update, as Keras computes each, for all variables."""
    if clip_norm > 0:  # a Python number when traced: one program with, one without
        norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
        # Keras' arithmetic: a no-op below the norm, NaN when the norm is not finite.
        scale = clip_norm * ops.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
        grads = [g * ops.cast(scale, g.dtype) for g in grads]
    for grad, variable, momentum, velocity, decay in zip(grads, variables, momentums,
                                                         velocities, decays):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        step = ops.cast(iterations + 1, dtype)
        beta_1_, beta_2_ = ops.cast(beta_1, dtype), ops.cast(beta_2, dtype)
        alpha = lr * ops.sqrt(1 - ops.power(beta_2_, step)) / (1 - ops.power(beta_1_, step))
        grad = ops.cast(grad, dtype)
        value = ops.convert_to_tensor(variable)
        if decay:
            value = value - value * ops.cast(decay, dtype) * lr
        m = momentum + (grad - momentum) * (1 - beta_1_)
        v = velocity + (ops.square(grad) - velocity) * (1 - beta_2_)
        momentum.assign(m)
        velocity.assign(v)
        variable.assign(value - m * alpha / (ops.sqrt(v) + ops.cast(epsilon, dtype)))


def make_optimizer(train_config, total_steps, optimizer_class=AdamW):
    """The optimizer every training command uses; see `learning_rate_schedule`.
    `optimizer_class=keras.optimizers.AdamW` gives Keras' own, configured alike."""
    # Ours fuses its update only when `total_steps` repay the fused program's compile.
    extra = {"total_steps": total_steps} if issubclass(optimizer_class, AdamW) else {}
    optimizer = optimizer_class(
        **extra,
        learning_rate=learning_rate_schedule(train_config, total_steps),
        weight_decay=train_config.weight_decay,
        beta_1=0.9,
        beta_2=train_config.beta_2,
        global_clipnorm=train_config.clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer
