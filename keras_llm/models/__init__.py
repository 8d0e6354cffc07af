"""Model families built from `keras_llm.layers`: backbones and their task heads."""
from keras_llm.models.bert import BertBackbone, BertMaskedLM, MaskedLMHead
from keras_llm.models.electra import ElectraPretrainer
from keras_llm.models.gpt import GPTBackbone, GPTCausalLM
from keras_llm.models.seq2seq import Seq2SeqBackbone, Seq2SeqLM

__all__ = ["BertBackbone", "BertMaskedLM", "ElectraPretrainer", "GPTBackbone", "GPTCausalLM",
           "MaskedLMHead", "Seq2SeqBackbone", "Seq2SeqLM"]
