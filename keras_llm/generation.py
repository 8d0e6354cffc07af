"""Text generation: prompts in, text out, through a model's KV-cached `generate_step`.

The model code is backend-agnostic; this module tokenizes, pads, compiles the decoding loop
for the active backend (a `tf.function` on TensorFlow, `jax.jit` on JAX) and detokenizes.
"""
import keras
import keras_hub
import numpy as np
from keras import ops

SAMPLERS = ("greedy", "top_k", "top_p", "random")


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


def _compile(fn):
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


class TextGenerator:
    """Generates continuations of text prompts with a causal LM and its tokenizer.

    Args:
        model: a `GPTCausalLM`.
        tokenizer: a `keras_llm.data.tokenizers` wrapper (encode/decode, special ids).

    Example (with a trained artifact):

        generator = TextGenerator(model, tokenizer)
        generator.generate(["def main"], max_new_tokens=20, sampler="greedy")
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.end_token_id = tokenizer.special_token_ids()["eos"]
        self._compiled = {}

    def step_function(self, **sampler_options):
        """The compiled decoding loop for one sampler setting (see `make_sampler`), reused."""
        key = tuple(sorted(sampler_options.items()))
        if key not in self._compiled:
            sampler = make_sampler(**sampler_options)
            self._compiled[key] = _compile(
                lambda ids, mask: self.model.generate_step(
                    ids, mask, sampler, stop_token_ids=(self.end_token_id,)))
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
                 top_p=0.9, seed=None):
        """Returns the generated continuation (without the prompt) of each prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= self.model.backbone.max_length:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) must be below the model's context length "
                f"({self.model.backbone.max_length})")
        step_function = self.step_function(name=sampler, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed)
        new_ids = self.generate_ids(self.tokenizer.encode(list(prompts)), max_new_tokens,
                                    step_function)
        return [self.tokenizer.decode(ids) for ids in new_ids]
