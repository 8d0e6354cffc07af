"""Text generation: prompts in, text out, through a model's KV-cached `generate_step`.

The model code is backend-agnostic; this module tokenizes, pads, compiles the decoding loop
for the active backend (a `tf.function` on TensorFlow, `jax.jit` on JAX) and detokenizes.

`jit_compile=True` compiles the whole TensorFlow decoding loop with XLA: on 2 CPU cores it
generates several times faster (`benchmarks/generate_speed.py`), but each new batch size or
padded length costs a compilation of a few seconds, so it pays off for repeated calls
(evaluation, batch generation) rather than a single prompt. JAX always compiles with XLA.
"""
import keras
import keras_hub
import numpy as np
from keras import ops

from keras_llm.errors import ArtifactError

SAMPLERS = ("greedy", "top_k", "top_p", "random")  # plus "beam": `beam_search` below


def make_sampler(name="top_p", temperature=1.0, top_k=50, top_p=0.9, seed=None):
    """Builds a keras-hub sampler by name; `temperature` rescales logits for all but greedy."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if name == "top_k":
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return keras_hub.samplers.TopKSampler(k=top_k, seed=seed, temperature=temperature)
    if name == "top_p":
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return keras_hub.samplers.TopPSampler(p=top_p, seed=seed, temperature=temperature)
    if name == "random":
        return keras_hub.samplers.RandomSampler(seed=seed, temperature=temperature)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")


def _compile(fn, jit_compile=False):
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True, jit_compile=bool(jit_compile))
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


class TextGenerator:
    """Generates continuations of text prompts with a causal LM and its tokenizer.

    Args:
        model: a `GPTCausalLM`.
        tokenizer: a `keras_llm.data.tokenizers` wrapper (encode/decode, special ids).
        jit_compile: compile the decoding loop with XLA (TensorFlow; see the module doc).

    Example (with a trained artifact):

        generator = TextGenerator(model, tokenizer)
        generator.generate(["def main"], max_new_tokens=20, sampler="greedy")
    """

    def __init__(self, model, tokenizer, jit_compile=False):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile
        self.end_token_id = tokenizer.special_token_ids()["eos"]
        self._compiled = {}

    def step_function(self, **sampler_options):
        """The compiled decoding loop for one sampler setting (see `make_sampler`), reused."""
        key = tuple(sorted(sampler_options.items()))
        if key not in self._compiled:
            sampler = make_sampler(**sampler_options)
            self._compiled[key] = _compile(
                lambda ids, mask: self.model.generate_step(
                    ids, mask, sampler, stop_token_ids=(self.end_token_id,)),
                self.jit_compile)
        return self._compiled[key]

    def generate_ids(self, prompt_ids, max_new_tokens, step_function):
        """Token-id level generation: returns the new ids after each prompt, EOS cut off."""
        max_length = self.model.backbone.max_length
        # Every prompt starts after an end-of-document token, as documents do in training.
        prompt_ids = [[self.end_token_id] + list(ids) for ids in prompt_ids]
        longest = max(len(ids) for ids in prompt_ids)
        # Keep the newest tokens when the prompt and the continuation exceed the context.
        keep = max(1, min(longest, max_length - max_new_tokens))
        prompt_ids = [ids[-keep:] for ids in prompt_ids]
        length = min(max_length, max(len(ids) for ids in prompt_ids) + max_new_tokens)
        token_ids = np.zeros((len(prompt_ids), length), "int32")
        mask = np.zeros((len(prompt_ids), length), bool)
        for row, ids in enumerate(prompt_ids):
            token_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        output = ops.convert_to_numpy(step_function(token_ids, mask))
        results = []
        for row, ids in enumerate(prompt_ids):
            new = output[row, len(ids):len(ids) + max_new_tokens].tolist()
            if self.end_token_id in new:
                new = new[:new.index(self.end_token_id)]
            results.append(new)
        return results

    def generate(self, prompts, max_new_tokens=64, sampler="top_p", temperature=1.0, top_k=50,
                 top_p=0.9, seed=None, num_beams=4, length_penalty=0.6):
        """Returns the generated continuation (without the prompt) of each prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= self.model.backbone.max_length:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) must be below the model's context length "
                f"({self.model.backbone.max_length})")
        prompt_ids = self.tokenizer.encode(list(prompts))
        if sampler == "beam":
            new_ids = [self.beam_search_ids(ids, max_new_tokens, num_beams, length_penalty)
                       for ids in prompt_ids]
        else:
            step_function = self.step_function(name=sampler, temperature=temperature,
                                               top_k=top_k, top_p=top_p, seed=seed)
            new_ids = self.generate_ids(prompt_ids, max_new_tokens, step_function)
        return [self.tokenizer.decode(ids) for ids in new_ids]

    def beam_search_ids(self, prompt_ids, max_new_tokens, num_beams=4, length_penalty=0.6):
        """The new ids of the best beam after one prompt (EOS cut off)."""
        max_length = self.model.backbone.max_length
        ids = ([self.end_token_id] + list(prompt_ids))[-max(1, max_length - max_new_tokens):]
        length = min(max_length, len(ids) + max_new_tokens)
        cache = self.model.backbone.empty_cache(num_beams, length)

        def step(token_ids, cache, index):
            logits, _, cache = self.model.call_with_cache(token_ids, cache, index)
            return logits, cache

        best = beam_search(_compile(step, self.jit_compile), cache, np.asarray([ids], "int32"), length,
                           num_beams, self.end_token_id, length_penalty=length_penalty)
        return _until_end(best[0, len(ids):].tolist(), self.end_token_id)


def _until_end(ids, end_token_id):
    return ids[:ids.index(end_token_id)] if end_token_id in ids else ids


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def beam_search(step, cache, prompt, length, num_beams, end_token_id, pad_token_id=0,
                length_penalty=0.6):
    """Beam search over a KV-cached decoding step; returns the best sequence of each row.

    Args:
        step: `step(token_ids (N, T), cache, index) -> (logits (N, T, vocab), cache)`, with
            `N = batch * num_beams` rows, row `b * num_beams + k` being beam k of prompt b.
        cache: the empty cache for `N` rows (a tensor or a nested structure of them, each
            with rows first).
        prompt: `(batch, P)` int array, P >= 1, the same length for every row.
        length: total length of the output (prompt included).
        num_beams: beams kept per prompt.
        end_token_id: a beam that emits it is finished; its score no longer changes.
        pad_token_id: written after the end of a finished beam.
        length_penalty: alpha of GNMT's length normalization `((5 + n) / 6) ** alpha`
            applied to the summed log-probabilities when the best beam is picked.

    Returns:
        `(batch, length)` int32 array: each prompt followed by its best continuation.
    """
    batch, prompt_length = prompt.shape
    rows = batch * num_beams
    tokens = np.full((rows, length), pad_token_id, "int32")
    tokens[:, :prompt_length] = np.repeat(prompt, num_beams, axis=0)
    logits, cache = step(tokens[:, :prompt_length], cache,
                         ops.convert_to_tensor(0, "int32"))
    last = ops.convert_to_numpy(logits)[:, -1]
    scores = np.full((batch, num_beams), -np.inf)
    scores[:, 0] = 0.0  # all beams start equal: keep one so the first step picks distinct ones
    finished = np.zeros((batch, num_beams), bool)
    generated = np.zeros((batch, num_beams))
    for index in range(prompt_length, length):
        log_probabilities = _log_softmax(last).reshape(batch, num_beams, -1)
        vocabulary = log_probabilities.shape[-1]
        # A finished beam may only continue with padding, at no cost.
        log_probabilities[finished] = -np.inf
        log_probabilities[finished, pad_token_id] = 0.0
        candidates = (scores[..., None] + log_probabilities).reshape(batch, -1)
        top = np.argsort(-candidates, axis=1, kind="stable")[:, :num_beams]
        beams, chosen = top // vocabulary, top % vocabulary
        scores = np.take_along_axis(candidates, top, axis=1)
        previous_finished = np.take_along_axis(finished, beams, axis=1)
        generated = np.take_along_axis(generated, beams, axis=1) + ~previous_finished
        finished = previous_finished | (chosen == end_token_id)
        source_rows = (np.arange(batch)[:, None] * num_beams + beams).reshape(-1)
        tokens = tokens[source_rows]
        tokens[:, index] = chosen.reshape(-1)
        if finished.all() or index == length - 1:
            break
        rows_to_keep = ops.convert_to_tensor(source_rows, "int32")
        cache = keras.tree.map_structure(lambda part: ops.take(part, rows_to_keep, axis=0),
                                         cache)
        logits, cache = step(tokens[:, index:index + 1], cache,
                             ops.convert_to_tensor(index, "int32"))
        last = ops.convert_to_numpy(logits)[:, -1]
    normalized = scores / ((5.0 + generated) / 6.0) ** length_penalty
    best = np.argmax(normalized, axis=1)
    return tokens.reshape(batch, num_beams, length)[np.arange(batch), best]


class Seq2SeqGenerator:
    """Generates target text for source texts with a `Seq2SeqLM` and its tokenizers.

    The encoder reads each source followed by `[EOS]`; the decoder starts from `[CLS]` and
    stops at `[EOS]` (the layout of `keras_llm.data.labeled.seq2seq_arrays`).

    Args:
        model: a `Seq2SeqLM`.
        tokenizer: the model's (source) tokenizer.
        target_tokenizer: the target tokenizer when the target has its own vocabulary
            (an artifact's `target_tokenizer`); default: `tokenizer`.
        jit_compile: compile the sampling loop with XLA (TensorFlow; see the module doc).

    Example (with a trained artifact):

        generator = Seq2SeqGenerator(model, tokenizer, target_tokenizer)
        generator.generate(["a man rides a horse ."], sampler="beam", num_beams=4)
    """

    def __init__(self, model, tokenizer, target_tokenizer=None, jit_compile=False):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile
        self.target_tokenizer = target_tokenizer or tokenizer
        source = tokenizer.special_token_ids()
        self.source_end_token_id, self.source_pad_token_id = source["eos"], source["pad"]
        specials = self.target_tokenizer.special_token_ids()
        self.end_token_id, self.start_token_id = specials["eos"], specials["cls"]
        self.pad_token_id = specials["pad"]
        self._compiled = {}

    def encoder_inputs(self, sources):
        max_length = self.model.backbone.max_length
        encoded = [ids[:max_length - 1] + [self.source_end_token_id]
                   for ids in self.tokenizer.encode(list(sources))]
        width = max(len(ids) for ids in encoded)
        token_ids = np.full((len(encoded), width), self.source_pad_token_id, "int32")
        mask = np.zeros((len(encoded), width), bool)
        for row, ids in enumerate(encoded):
            token_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        return token_ids, mask

    def generate_ids(self, sources, max_new_tokens=64, sampler="greedy", num_beams=4,
                     length_penalty=0.6, **sampler_options):
        """New target ids (EOS cut off) for each source text."""
        length = min(self.model.backbone.max_length, max_new_tokens + 1)
        encoder_ids, encoder_mask = self.encoder_inputs(sources)
        if sampler == "beam":
            output = self._beam(encoder_ids, encoder_mask, length, num_beams, length_penalty)
        else:
            key = (sampler, tuple(sorted(sampler_options.items())))
            if key not in self._compiled:
                chosen = make_sampler(sampler, **sampler_options)
                self._compiled[key] = _compile(lambda inputs: self.model.generate_step(
                    inputs, chosen, stop_token_ids=(self.end_token_id,)), self.jit_compile)
            decoder_ids = np.full((len(sources), length), self.pad_token_id, "int32")
            decoder_ids[:, 0] = self.start_token_id
            decoder_mask = np.zeros_like(decoder_ids, bool)
            decoder_mask[:, 0] = True
            output = ops.convert_to_numpy(self._compiled[key]({
                "encoder_token_ids": encoder_ids, "encoder_padding_mask": encoder_mask,
                "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_mask}))
        return [_until_end(row[1:].tolist(), self.end_token_id) for row in output]

    def _beam(self, encoder_ids, encoder_mask, length, num_beams, length_penalty):
        backbone = self.model.backbone
        encoder_ids = np.repeat(encoder_ids, num_beams, axis=0)
        encoder_mask = np.repeat(encoder_mask, num_beams, axis=0)
        cross_cache = backbone.cross_attention_cache(backbone.encode(encoder_ids, encoder_mask))

        def step(token_ids, cache, index):
            logits, _, cache = self.model.call_with_cache(token_ids, cache, index, cross_cache,
                                                          encoder_mask)
            return logits, cache

        prompt = np.full((len(encoder_ids) // num_beams, 1), self.start_token_id, "int32")
        return beam_search(step, backbone.empty_cache(len(encoder_ids), length), prompt,
                           length, num_beams, self.end_token_id, self.pad_token_id,
                           length_penalty)

    def generate(self, sources, max_new_tokens=64, sampler="greedy", temperature=1.0, top_k=50,
                 top_p=0.9, seed=None, num_beams=4, length_penalty=0.6):
        """Returns the generated target text of each source text."""
        if isinstance(sources, str):
            sources = [sources]
        options = {} if sampler in ("greedy", "beam") else dict(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        new_ids = self.generate_ids(list(sources), max_new_tokens, sampler, num_beams,
                                    length_penalty, **options)
        return [self.target_tokenizer.decode(ids) for ids in new_ids]


def make_generator(model, tokenizer, target_tokenizer=None, jit_compile=False):
    """The generator for a model artifact's model: GPT -> `TextGenerator`, seq2seq ->
    `Seq2SeqGenerator` (with `target_tokenizer`, the artifact's, for its outputs); other
    models cannot generate text (`ArtifactError`)."""
    from keras_llm.models import GPTCausalLM, Seq2SeqLM

    if isinstance(model, Seq2SeqLM):
        return Seq2SeqGenerator(model, tokenizer, target_tokenizer, jit_compile)
    if isinstance(model, GPTCausalLM):
        return TextGenerator(model, tokenizer, jit_compile)
    raise ArtifactError(f"a {type(model).__name__} does not generate text; generate needs a "
                        f"GPT (causal LM) or seq2seq model artifact")
