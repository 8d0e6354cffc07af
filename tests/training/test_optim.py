import numpy as np
import pytest

from keras_llm.config import TrainConfig
from keras_llm.training.optim import learning_rate_schedule, make_optimizer


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
