"""Greedy generation speed: new tokens/s and time to first token, batch 1 and batch 8.

Contenders, same weight shapes, same prompts, all greedy, in one run:

    ours            GPTCausalLM.generate_step (KV cache) compiled with tf.function, token ids in
    keras_hub_gpt2  keras_hub GPT2CausalLM.generate (its own compiled KV-cached loop), token
                    ids in, `preprocessor=None`, `stop_token_ids=None`
    ours_text       keras_llm.generation.TextGenerator: strings in, strings out (tokenize,
                    pad, the same compiled loop, detokenize)
    ours_xla, keras_hub_gpt2_xla, ours_text_xla, exported_xla
                    the same four with the whole decoding loop compiled by XLA
                    (`jit_compile=True`: keras-llm's `generate --xla` and `export --xla`,
                    keras-hub's `compile(jit_compile=True)`; keras-hub's default resolves to
                    no XLA here)
    exported        the `generate` signature of `keras-llm export`'s SavedModel, loaded with
                    tf.saved_model.load: strings in, strings out, everything in the graph

`exported` is compared with `ours_text` (both text -> text), `ours` with `keras_hub_gpt2`,
`ours_xla` with `keras_hub_gpt2_xla` (and, in its record, with keras-hub's default too),
`exported_xla` with `ours_text_xla`.
Time to first token is the latency of a call that generates one token (prefill + one step);
new tokens/s is batch * new tokens / latency of the full call. Weights are random: the end
token's embedding row is zeroed so that no text path stops early (every call generates
exactly `--new-tokens` tokens; checked).

    python benchmarks/generate_speed.py            # gpt-tiny shape, 32 prompt + 64 new tokens
    python benchmarks/generate_speed.py --quick    # a smoke run; numbers are not meaningful
"""
import argparse
import functools
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

SHAPES = {  # gpt-tiny and gpt-small (configs/), and a toy shape for --quick
    "quick": dict(vocab=512, layers=1, heads=2, width=32, max_length=32),
    "tiny": dict(vocab=4096, layers=4, heads=4, width=128, max_length=128),
    "small": dict(vocab=8192, layers=12, heads=12, width=768, max_length=512),
}
CONTENDERS = ("ours", "keras_hub_gpt2", "ours_text", "exported", "ours_xla",
              "keras_hub_gpt2_xla", "ours_text_xla", "exported_xla")
BASELINE = {"ours": "keras_hub_gpt2", "exported": "ours_text",
            "ours_xla": "keras_hub_gpt2_xla", "ours_text_xla": "ours_text",
            "exported_xla": "ours_text_xla"}
WORDS = ("return the value of a list string number file open read write close object "
         "class function module name path data type error default").split()


def synthetic_texts(count, seed, words=30):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(count)]


def build_artifact(directory, shape, seed):
    """A model artifact with random GPT weights and a BPE tokenizer; the end token's
    embedding row zeroed (its logit is 0 while the best of the others is > 0)."""
    import keras

    from keras_llm.artifacts import make_metadata, save_model_artifact
    from keras_llm.config import load_config
    from keras_llm.data.tokenizers import train_tokenizer
    from keras_llm.models import GPTBackbone, GPTCausalLM

    keras.utils.set_random_seed(seed)
    tokenizer = train_tokenizer("bpe", synthetic_texts(400, seed), shape["vocab"])
    config = load_config("gpt-tiny", overrides={
        "model.vocab_size": shape["vocab"], "model.num_layers": shape["layers"],
        "model.num_heads": shape["heads"], "model.hidden_size": shape["width"],
        "model.intermediate_size": 4 * shape["width"], "model.max_length": shape["max_length"],
        "data.seq_len": shape["max_length"]})
    # The model's vocabulary is the shape's, even if the tokenizer learned fewer tokens.
    model = GPTCausalLM(GPTBackbone.from_model_config(config.model, shape["vocab"]))
    model(np.ones((1, 4), "int32"))
    embeddings = model.backbone.token_embedding.embeddings
    values = np.asarray(embeddings)
    values[tokenizer.special_token_ids()["eos"]] = 0.0
    embeddings.assign(values)
    save_model_artifact(directory, model, tokenizer, config, {},
                        make_metadata("keras_llm.PretrainedModel", config))
    return model, tokenizer


def build_keras_hub(shape):
    """keras-hub's GPT2CausalLM as compiled by default, and the same one with XLA."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_dim=shape["width"], intermediate_dim=4 * shape["width"], dropout=0.0,
        max_sequence_length=shape["max_length"])
    default = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    default.compile(sampler="greedy")
    xla = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    xla.compile(sampler="greedy", jit_compile=True)
    return default, xla


def time_interleaved(calls, repeats):
    """`{name: median seconds}` of each call after one warm-up call each (tracing); the calls
    take turns, round after round, so a change in machine load hits them all alike."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            with benchlib.Stopwatch() as watch:
                call()
            times[name].append(watch.seconds)
    return {name: benchlib.median(values) for name, values in times.items()}


def contenders(model, tokenizer, keras_hub_models, exports, prompts, prompt_ids):
    """`{name: make(new_tokens) -> call}`; every call generates `new_tokens` per prompt."""
    import keras_hub
    import tensorflow as tf

    from keras_llm.generation import TextGenerator

    generators = {False: TextGenerator(model, tokenizer), True: TextGenerator(model, tokenizer,
                                                                              jit_compile=True)}
    width = len(prompt_ids[0])
    batch = len(prompt_ids)
    greedy = keras_hub.samplers.GreedySampler()
    steps = {jit: tf.function(lambda ids, mask: model.generate_step(ids, mask, greedy),
                              jit_compile=jit) for jit in (False, True)}
    generates = {jit: loaded.signatures["generate"] for jit, loaded in exports.items()}

    def token_inputs(new_tokens):
        ids = np.zeros((batch, width + new_tokens), "int32")
        ids[:, :width] = prompt_ids
        mask = np.zeros_like(ids, bool)
        mask[:, :width] = True
        return ids, mask

    def ours(new_tokens, jit=False):
        ids, mask = token_inputs(new_tokens)
        return lambda: steps[jit](ids, mask).numpy()

    def keras_hub_gpt2(new_tokens, jit=False):
        ids, mask = token_inputs(new_tokens)
        return lambda: keras_hub_models[jit].generate(
            {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)

    def ours_text(new_tokens, jit=False):
        return lambda: generators[jit].generate(prompts, max_new_tokens=new_tokens,
                                                sampler="greedy")

    def exported(new_tokens, jit=False):
        inputs = dict(prompt=tf.constant(prompts), max_new_tokens=tf.constant(new_tokens),
                      temperature=tf.constant(0.0), top_k=tf.constant(1))
        return lambda: generates[jit](**inputs)["text"].numpy()

    makers = {"ours": ours, "keras_hub_gpt2": keras_hub_gpt2, "ours_text": ours_text,
              "exported": exported}
    return {**makers, **{f"{name}_xla": functools.partial(make, jit=True)
                         for name, make in makers.items()}}


def prompts_of(tokenizer, count, prompt_tokens, seed):
    """`count` texts of exactly `prompt_tokens` tokens, and their ids as TextGenerator feeds
    them (after an end-of-document token)."""
    texts, ids = [], []
    for text in synthetic_texts(count * 4, seed + 1, words=2 * prompt_tokens):
        tokens = tokenizer.encode([text])[0][:prompt_tokens - 1]
        decoded = tokenizer.decode(tokens)
        if tokenizer.encode([decoded])[0] == tokens and len(tokens) == prompt_tokens - 1:
            texts.append(decoded)
            ids.append([tokenizer.special_token_ids()["eos"]] + tokens)
        if len(texts) == count:
            return texts, np.asarray(ids, "int32")
    benchlib.fail("could not build prompts that round-trip through the tokenizer")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=9)
    args = benchlib.start(parser)
    if args.quick:
        args.shape, args.prompt_tokens, args.new_tokens, args.repeats = "quick", 6, 4, 1
    shape = SHAPES[args.shape]
    if args.prompt_tokens + args.new_tokens > shape["max_length"]:
        benchlib.fail(f"--prompt-tokens + --new-tokens must fit the context "
                      f"({shape['max_length']})")

    import tensorflow as tf

    from keras_llm.export import export
    from keras_llm.generation import TextGenerator

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build_artifact(os.path.join(tmp, "model"), shape, args.seed)
        exports = {jit: tf.saved_model.load(export(
            os.path.join(tmp, "model"), os.path.join(tmp, "exports"), validate=False, xla=jit))
            for jit in (False, True)}
        keras_hub_models = build_keras_hub(shape)
        rows, results = [], []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompts, prompt_ids = prompts_of(tokenizer, batch, args.prompt_tokens, args.seed)
            generated = TextGenerator(model, tokenizer).generate_ids(
                [row[1:].tolist() for row in prompt_ids], args.new_tokens,
                TextGenerator(model, tokenizer).step_function(name="greedy"))
            if any(len(ids) != args.new_tokens for ids in generated):
                benchlib.fail("a text path stopped early at an end token")
            # The exports and the XLA loop are the same computation: same text.
            in_process = TextGenerator(model, tokenizer).generate(
                prompts, max_new_tokens=args.new_tokens, sampler="greedy")
            for jit, loaded in exports.items():
                exported_text = loaded.signatures["generate"](
                    prompt=tf.constant(prompts), max_new_tokens=tf.constant(args.new_tokens),
                    temperature=tf.constant(0.0), top_k=tf.constant(1))["text"].numpy()
                if [t.decode("utf-8", "replace") for t in exported_text] != \
                        [str(t) for t in in_process]:
                    benchlib.fail(f"the {'XLA ' if jit else ''}export's greedy text differs "
                                  f"from TextGenerator's")
            if TextGenerator(model, tokenizer, jit_compile=True).generate(
                    prompts, max_new_tokens=args.new_tokens, sampler="greedy") != in_process:
                benchlib.fail("the XLA-compiled loop's greedy text differs from the plain loop's")
            makers = contenders(model, tokenizer, keras_hub_models, exports, prompts, prompt_ids)
            calls = {(name, n): makers[name](n) for name in CONTENDERS
                     for n in (args.new_tokens, 1)}
            seconds = time_interleaved(calls, args.repeats)
            measured = {}
            for name in CONTENDERS:
                full, first = seconds[(name, args.new_tokens)], seconds[(name, 1)]
                measured[name] = {
                    "batch_size": batch, "contender": name,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                    "seconds": full, "time_to_first_token_s": first,
                    "new_tokens_per_s": batch * args.new_tokens / full}
            for name, record in measured.items():
                baseline = measured.get(BASELINE.get(name))
                record["speedup_vs"] = BASELINE.get(name)
                record["speedup"] = (record["new_tokens_per_s"] / baseline["new_tokens_per_s"]
                                     if baseline else None)
                if name == "ours_xla":
                    record["speedup_vs_keras_hub_default"] = (
                        record["new_tokens_per_s"] /
                        measured["keras_hub_gpt2"]["new_tokens_per_s"])
                results.append(record)
                rows.append([batch, name, f"{record['new_tokens_per_s']:.1f}",
                             f"{1000 * record['time_to_first_token_s']:.1f}",
                             f"{record['speedup']:.2f}x vs {record['speedup_vs']}"
                             if baseline else ""])
    print(benchlib.format_table(
        ["batch", "contender", "new tokens/s", "first token ms", "ratio"], rows))
    name = "generate_speed_quick" if args.quick else "generate_speed"
    path = benchlib.write_result(name, args, {"shape": shape, "results": results})
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
