import doctest

import numpy as np
import pytest

from keras_llm.config import Config, TrainConfig
from keras_llm.errors import ConfigError
from keras_llm.training import optim as optim_module
from keras_llm.training.optim import WarmupStableDecay, learning_rate_schedule, make_optimizer


def test_schedule_warms_up_linearly_then_decays_to_floor():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1)
    schedule = learning_rate_schedule(config, total_steps=110)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
    assert values[0] == pytest.approx(0.0)
    assert values[1] == pytest.approx(5e-4, rel=1e-5)
    assert values[2] == pytest.approx(1e-3, rel=1e-5)
    # Halfway through the cosine: floor + (peak - floor) / 2.
    assert values[3] == pytest.approx(1e-4 + 0.45e-3, rel=1e-4)
    assert values[4] == pytest.approx(1e-4, rel=1e-4)
    assert values[5] == pytest.approx(1e-4, rel=1e-4)


def test_warmup_stable_decay_schedule():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1,
                         schedule="wsd", decay_fraction=0.25)
    schedule = learning_rate_schedule(config, total_steps=210)
    assert isinstance(schedule, WarmupStableDecay)
    values = {step: float(schedule(step)) for step in (0, 5, 10, 100, 157, 184, 210, 300)}
    assert values[0] == pytest.approx(0.0)
    assert values[5] == pytest.approx(5e-4, rel=1e-5)
    # Constant at the peak until the last quarter (step 157.5), then linear to the floor.
    assert values[10] == values[100] == values[157] == pytest.approx(1e-3, rel=1e-6)
    assert values[184] == pytest.approx(1e-3 - 0.9e-3 * (184 - 157.5) / 52.5, rel=1e-5)
    assert values[210] == values[300] == pytest.approx(1e-4, rel=1e-5)
    # A decay fraction of 1 decays linearly from the end of warmup.
    linear = learning_rate_schedule(
        TrainConfig(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.0,
                    schedule="wsd", decay_fraction=1.0), total_steps=110)
    assert float(linear(60)) == pytest.approx(5e-4, rel=1e-5)
    # make_optimizer uses it, and it serializes with the optimizer.
    optimizer = make_optimizer(config, total_steps=210)
    restored = type(optimizer).from_config(optimizer.get_config())
    assert float(restored.learning_rate) == pytest.approx(0.0)
    assert restored._learning_rate.get_config() == schedule.get_config()


def test_docstring_examples_run():
    results = doctest.testmod(optim_module)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("overrides, message", [
    ({"schedule": "linear"}, "train.schedule must be one of cosine, wsd"),
    ({"schedule": "wsd", "decay_fraction": 0.0}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"decay_fraction": 1.5}, r"train.decay_fraction must be in \(0, 1\], got 1.5"),
])
def test_schedule_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"train": overrides})


def test_optimizer_clips_and_skips_decay_on_norms_and_biases():
    import keras

    optimizer = make_optimizer(TrainConfig(clip_norm=0.5, weight_decay=0.1), total_steps=10)
    assert optimizer.global_clipnorm == 0.5
    layer = keras.layers.LayerNormalization()
    layer.build((None, 4))
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    decayed = [v.path for v in (*layer.weights, *dense.weights)
               if optimizer._use_weight_decay(v)]
    assert decayed == [dense.kernel.path]
    assert np.isclose(optimizer.weight_decay, 0.1)


def _train(optimizer_class, steps=6, **optimizer_arguments):
    """A few steps of a small GPT with the product's schedule, decay and clipping."""
    import keras

    from keras_llm.models import GPTBackbone, GPTCausalLM
    from keras_llm.training.optim import NO_DECAY

    config = TrainConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, clip_norm=0.5)
    optimizer = optimizer_class(learning_rate=learning_rate_schedule(config, steps),
                                weight_decay=config.weight_decay, beta_2=config.beta_2,
                                global_clipnorm=config.clip_norm, **optimizer_arguments)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    keras.utils.set_random_seed(5)
    model = GPTCausalLM(GPTBackbone(vocabulary_size=50, num_layers=1, num_heads=2,
                                    hidden_size=16, intermediate_size=32, max_length=8))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = np.random.default_rng(0).integers(0, 50, (4, 9))
    losses = [float(model.train_on_batch(batch[:, :-1], batch[:, 1:])) for _ in range(steps)]
    return losses, [np.asarray(v) for v in model.weights], optimizer


def test_fused_adamw_follows_keras_adamw_step_for_step():
    import keras

    from keras_llm.training.optim import AdamW

    losses, weights, optimizer = _train(AdamW)
    expected_losses, expected_weights, expected_optimizer = _train(keras.optimizers.AdamW)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    # Steps are ~1e-2 here; float32 rounding in a different order moves a weight ~1e-6.
    for value, expected in zip(weights, expected_weights):
        np.testing.assert_allclose(value, expected, rtol=1e-3, atol=2e-5)
    # Same slot variables, so checkpoints are interchangeable.
    def slots(optimizer):  # kind and shape (names carry auto-numbered layer names)
        return [(v.name.rsplit("_", 1)[-1], tuple(v.shape)) for v in optimizer.variables]

    assert slots(optimizer) == slots(expected_optimizer)
    for value, expected in zip(optimizer.variables, expected_optimizer.variables):
        np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=1e-3,
                                   atol=1e-6)
    assert losses[-1] < losses[0]


def test_fused_update_runs_on_tensorflow_and_keras_update_where_it_cannot(monkeypatch):
    import keras

    from keras_llm.training import optim

    calls = []
    fused_update = optim._fused_adamw_update
    monkeypatch.setattr(optim, "_fused_adamw_update",
                        lambda *args: calls.append(1) or fused_update(*args))
    _train(optim.AdamW, steps=2)
    assert calls  # traced into the training step
    calls.clear()
    # Keras' gradient accumulation keeps Keras' update, and still equals Keras' optimizer.
    losses, weights, _ = _train(optim.AdamW, steps=4, gradient_accumulation_steps=2)
    assert not calls
    expected_losses, expected_weights, _ = _train(keras.optimizers.AdamW, steps=4,
                                                  gradient_accumulation_steps=2)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for value, expected in zip(weights, expected_weights):
        np.testing.assert_allclose(value, expected, rtol=1e-3, atol=2e-5)


def test_make_optimizer_fuses_only_runs_long_enough_to_repay_the_compile(monkeypatch):
    import keras

    from keras_llm.training import optim

    variables = [keras.Variable(np.zeros((100, 10), "float32")) for _ in range(4)]
    # 4 variables of 1,000 parameters: 3e7 x 4 / 4,000 = 30,000 steps repay the compile.
    assert not make_optimizer(TrainConfig(), total_steps=29_999).fuses_update(variables)
    optimizer = make_optimizer(TrainConfig(), total_steps=30_000)
    assert optimizer.fuses_update(variables)
    restored = type(optimizer).from_config(optimizer.get_config())
    assert restored.total_steps == 30_000 and restored.fuses_update(variables)
    assert optim.AdamW(learning_rate=0.1).fuses_update(variables)  # no total: always
    assert not make_optimizer(TrainConfig(), 10**9, keras.optimizers.AdamW).get_config().get(
        "total_steps")
    # A short run traces Keras' update, and still trains.
    calls = []
    monkeypatch.setattr(optim, "_fused_adamw_update", lambda *args: calls.append(1))
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
    model.compile(optimizer=make_optimizer(TrainConfig(warmup_steps=0), total_steps=3),
                  loss="mse")
    before = np.asarray(model.weights[0]).copy()
    model.fit(np.ones((8, 10), "float32"), np.ones((8, 1), "float32"), epochs=1, verbose=0)
    assert not calls and not np.allclose(np.asarray(model.weights[0]), before)


def test_fused_update_clips_like_keras_and_propagates_a_non_finite_norm():
    import keras

    from keras_llm.training.optim import AdamW

    def step(optimizer_class, gradient):
        variable = keras.Variable(np.ones((3,), "float32"))
        optimizer = optimizer_class(learning_rate=0.1, weight_decay=0.5, global_clipnorm=1.0)
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
        return np.asarray(variable)

    for gradient in ([3.0, 4.0, 0.0], [0.3, 0.4, 0.0]):  # norm 5 (clipped) and 0.5 (not)
        gradient = np.array(gradient, "float32")
        np.testing.assert_allclose(step(AdamW, gradient),
                                   step(keras.optimizers.AdamW, gradient), rtol=1e-6)
    assert np.isnan(step(AdamW, np.array([np.inf, 0.0, 0.0], "float32"))).all()
