"""Training loops, optimizers and schedules (TensorFlow-side code: tf.data in, artifacts out)."""
