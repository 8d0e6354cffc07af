"""The check that a tokenizer fits a model: same vocabulary size, same special-token ids."""
from keras_llm.errors import ArtifactError


def check_tokenizer_matches(model_name, vocabulary_size, special_token_ids, tokenizer):
    """Raises `ArtifactError` when `tokenizer` does not produce the ids `model_name` expects.

    Args:
        model_name: the model, named in the message.
        vocabulary_size: the size of the model's token embedding.
        special_token_ids: the special-token ids the model was trained with, or `None` to
            skip that part of the check.
        tokenizer: anything with `vocabulary_size()` and `special_token_ids()`.
    """
    if tokenizer.vocabulary_size() != vocabulary_size:
        raise ArtifactError(
            f"{model_name} has a vocabulary of {vocabulary_size} tokens but the tokenizer has "
            f"{tokenizer.vocabulary_size()}; use the tokenizer the model was trained with")
    if special_token_ids:
        theirs = tokenizer.special_token_ids()
        different = sorted(role for role, token_id in special_token_ids.items()
                           if theirs.get(role) != token_id)
        if different:
            details = ", ".join(f"{role} {special_token_ids[role]} vs {theirs.get(role)}"
                                for role in different)
            raise ArtifactError(
                f"{model_name} and the tokenizer disagree on special tokens ({details})")
