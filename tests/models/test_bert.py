"""BERT / RoBERTa backbone and masked-LM task: shapes, masks, ties, saving, tokenizer check."""
import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_llm.config import ModelConfig
from keras_llm.errors import ArtifactError
from keras_llm.models import bert as bert_module
from keras_llm.models.bert import BertBackbone, BertMaskedLM

VOCABULARY, BATCH, LENGTH, PREDICTIONS = 50, 2, 8, 3
SPECIALS = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)


def make_backbone(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    arguments = dict(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_size=16,
                     intermediate_size=32, max_length=LENGTH, dropout=0.0,
                     special_token_ids=SPECIALS)
    arguments.update(overrides)
    return BertBackbone(**arguments)


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(6, VOCABULARY, (BATCH, LENGTH)).astype("int32"),
        "segment_ids": np.array([[0] * 4 + [1] * 4] * BATCH, "int32"),
        "padding_mask": np.array([[True] * LENGTH, [True] * 6 + [False] * 2]),
        "mask_positions": np.array([[1, 2, 5], [3, 0, 0]], "int32"),
    }


class FakeTokenizer:
    def __init__(self, size=VOCABULARY, specials=SPECIALS):
        self.size, self.specials = size, specials

    def vocabulary_size(self):
        return self.size

    def special_token_ids(self):
        return dict(self.specials)


def test_backbone_shapes_and_pooled_output_is_tanh_of_cls():
    backbone = make_backbone()
    outputs = backbone(inputs())
    assert ops.shape(outputs["sequence_output"]) == (BATCH, LENGTH, 16)
    cls = ops.convert_to_numpy(outputs["sequence_output"])[:, 0]
    expected = np.tanh(cls @ ops.convert_to_numpy(backbone.pooler.kernel)
                       + ops.convert_to_numpy(backbone.pooler.bias))
    np.testing.assert_allclose(ops.convert_to_numpy(outputs["pooled_output"]), expected,
                               atol=1e-5)


def test_padding_positions_do_not_change_real_outputs():
    backbone = make_backbone()
    x = inputs()
    changed = {k: v.copy() for k, v in x.items()}
    changed["token_ids"][1, 6:] = 7
    a = ops.convert_to_numpy(backbone(x)["sequence_output"])[1, :6]
    b = ops.convert_to_numpy(backbone(changed)["sequence_output"])[1, :6]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_segment_ids_matter_for_bert_and_not_for_roberta():
    x = inputs()
    other = dict(x, segment_ids=np.zeros_like(x["segment_ids"]))
    bert = make_backbone()
    assert not np.allclose(bert(x)["sequence_output"], bert(other)["sequence_output"])
    roberta = make_backbone(num_segments=0)
    assert roberta.segment_embedding is None
    np.testing.assert_allclose(roberta(x)["sequence_output"], roberta(other)["sequence_output"])


def masked_lm_logits_by_hand(model, x, output_kernel):
    head = model.masked_lm_head
    sequence = ops.convert_to_numpy(model.backbone(x)["sequence_output"])
    gathered = np.take_along_axis(sequence, x["mask_positions"][..., None], axis=1)
    hidden = head.norm(keras.activations.gelu(head.transform(gathered), approximate=False))
    return ops.convert_to_numpy(hidden) @ output_kernel + ops.convert_to_numpy(head.output_bias)


def test_masked_lm_logits_are_tied_to_the_token_embedding():
    model = BertMaskedLM(make_backbone())
    x = inputs()
    logits = ops.convert_to_numpy(model(x))
    assert logits.shape == (BATCH, PREDICTIONS, VOCABULARY)
    embeddings = ops.convert_to_numpy(model.backbone.token_embedding.embeddings)
    np.testing.assert_allclose(logits, masked_lm_logits_by_hand(model, x, embeddings.T),
                               atol=1e-4)
    untied = BertMaskedLM(make_backbone(tie_embeddings=False))
    logits = ops.convert_to_numpy(untied(x))
    kernel = ops.convert_to_numpy(untied.backbone.token_embedding.reverse_embeddings)
    np.testing.assert_allclose(logits, masked_lm_logits_by_hand(untied, x, kernel), atol=1e-4)
    assert untied.count_params() == model.count_params() + 16 * VOCABULARY


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}, {"position": "rotary"},
                                       {"num_layers": 1}])
def test_masked_lm_last_block_at_the_positions_equals_the_full_model(overrides):
    """BertMaskedLM runs its last block at the masked positions (and [CLS]) only: logits,
    NSP logits and every gradient equal those of the full backbone's outputs gathered."""
    model = BertMaskedLM(make_backbone(**overrides), next_sentence_prediction=True)
    x = inputs()

    def outputs_and_gradients(outputs):
        with tf.GradientTape() as tape:
            mlm, nsp = outputs()
            loss = tf.reduce_sum(mlm * mlm) + tf.reduce_sum(nsp * nsp)
        return (mlm, nsp), tape.gradient(loss, model.trainable_variables)

    def full():
        sequence = model.backbone(x, training=True)
        return (model.masked_lm_head(sequence["sequence_output"], x["mask_positions"]),
                model.next_sentence_head(sequence["pooled_output"]))

    def fewer():
        outputs = model(x, training=True)
        return outputs["mlm"], outputs["nsp"]

    (mlm, nsp), gradients = outputs_and_gradients(fewer)
    (expected_mlm, expected_nsp), expected_gradients = outputs_and_gradients(full)
    np.testing.assert_allclose(mlm, expected_mlm, atol=1e-5)
    np.testing.assert_allclose(nsp, expected_nsp, atol=1e-5)
    assert len(gradients) == len(expected_gradients)
    for got, expected in zip(gradients, expected_gradients):
        np.testing.assert_allclose(tf.convert_to_tensor(got), tf.convert_to_tensor(expected),
                                   atol=1e-5)


def test_output_positions_select_sequence_rows_and_keep_the_pooled_output():
    backbone = make_backbone()
    x = inputs()
    full = backbone(x)
    picked = backbone(x, output_positions=x["mask_positions"])
    np.testing.assert_allclose(
        picked["sequence_output"],
        np.take_along_axis(ops.convert_to_numpy(full["sequence_output"]),
                           x["mask_positions"][..., None], axis=1), atol=1e-5)
    none = backbone(x, output_positions=np.zeros((BATCH, 0), "int32"))
    assert ops.shape(none["sequence_output"]) == (BATCH, 0, 16)
    for outputs in (picked, none):
        np.testing.assert_allclose(outputs["pooled_output"], full["pooled_output"], atol=1e-5)


def test_next_sentence_head_and_training_lower_the_loss():
    model = BertMaskedLM(make_backbone(), next_sentence_prediction=True)
    x = inputs()
    outputs = model(x)
    assert ops.shape(outputs["nsp"]) == (BATCH, 2)
    y = {"mlm": np.array([[7, 8, 9], [10, 0, 0]], "int32"), "nsp": np.array([0, 1], "int32")}
    w = {"mlm": np.array([[1, 1, 1], [1, 0, 0]], "float32"), "nsp": np.ones(2, "float32")}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="mean_with_sample_weight")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"mlm": loss, "nsp": loss})
    data = tf.data.Dataset.from_tensors((x, y, w)).repeat(30)
    history = model.fit(data, epochs=2, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]


@pytest.mark.parametrize("next_sentence_prediction", [False, True])
def test_keras_round_trip(tmp_path, next_sentence_prediction):
    model = BertMaskedLM(make_backbone(embedding_size=8),
                         next_sentence_prediction=next_sentence_prediction)
    x = inputs()
    expected = keras.tree.map_structure(ops.convert_to_numpy, model(x))
    model.save(tmp_path / "bert.keras")
    restored = keras.saving.load_model(tmp_path / "bert.keras")
    actual = keras.tree.map_structure(ops.convert_to_numpy, restored(x))
    keras.tree.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                             actual, expected)
    assert restored.backbone.special_token_ids == SPECIALS
    assert restored.backbone.embedding_size == 8


def test_from_model_config_roberta_has_no_segments():
    config = ModelConfig(family="roberta", vocab_size=100, hidden_size=16, num_heads=2,
                         intermediate_size=32, num_layers=1, max_length=8)
    backbone = BertBackbone.from_model_config(config, vocabulary_size=60)
    assert backbone.num_segments == 0 and backbone.vocabulary_size == 60
    assert BertBackbone.from_model_config(ModelConfig(family="bert")).num_segments == 2


@pytest.mark.parametrize("position", ["sinusoidal", "rotary"])
def test_position_encoding_follows_the_config(tmp_path, position):
    config = ModelConfig(family="bert", vocab_size=VOCABULARY, hidden_size=16, num_heads=2,
                         intermediate_size=32, num_layers=1, max_length=LENGTH,
                         position=position)
    backbone = BertBackbone.from_model_config(config)
    x = inputs()
    backbone(x)
    # Large random weights: at BERT's initialization, attention is nearly uniform.
    rng = np.random.default_rng(0)
    for weight in backbone.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.3)
    outputs = ops.convert_to_numpy(backbone(x)["sequence_output"])
    assert backbone.position == position
    assert not [v for v in backbone.weights if "position" in v.path]  # nothing to learn
    # Without position information an encoder is permutation-equivariant: swapping two
    # tokens would only swap their outputs.
    swapped = {k: v.copy() for k, v in x.items()}
    swapped["token_ids"][:, [1, 2]] = x["token_ids"][:, [2, 1]]
    swapped_outputs = ops.convert_to_numpy(backbone(swapped)["sequence_output"])
    assert np.abs(swapped_outputs[:, [2, 1]] - outputs[:, [1, 2]]).max() > 1e-3
    model = BertMaskedLM(backbone)
    expected = ops.convert_to_numpy(model(x))
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.backbone.position == position
    np.testing.assert_allclose(ops.convert_to_numpy(restored(x)), expected, atol=1e-6)


def test_unknown_position_encoding_is_refused():
    with pytest.raises(ValueError, match="position must be one of learned, sinusoidal, rotary"):
        make_backbone(position="alibi")


def test_a_mismatched_tokenizer_is_refused():
    model = BertMaskedLM(make_backbone())
    model.check_tokenizer(FakeTokenizer())
    with pytest.raises(ArtifactError, match="vocabulary of 50 tokens but the tokenizer has 60"):
        model.check_tokenizer(FakeTokenizer(size=60))
    with pytest.raises(ArtifactError, match="disagree on special tokens \\(mask 4 vs 9\\)"):
        model.check_tokenizer(FakeTokenizer(specials=dict(SPECIALS, mask=9)))


def test_docstring_examples_run():
    assert doctest.testmod(bert_module).failed == 0


def test_masked_lm_under_a_mixed_policy_runs_in_the_compute_dtype():
    # Dropout layers left at the float32 policy turned the hidden states into float32, and
    # the tied projection, called inside the head, multiplied by the float32 table.
    model = BertMaskedLM(make_backbone(dtype="mixed_bfloat16", dropout=0.1))
    for training in (False, True):
        logits = model(inputs(), training=training)
        assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
        assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(logits, "float32"))))
