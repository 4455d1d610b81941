"""Cases for the NLP and vision families."""

import torch
import transformers as T

from .cases import Case, register, seeded

VOCAB = 99


def _text(seed: int, batch: int = 2, seq: int = 7) -> dict:
    g = seeded(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _bert_like(config_cls, model_cls, model_type, **extra):
    def build(attn=None):
        config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=3, **extra)
        return model_cls._from_config(config, attn_implementation=attn)

    register(Case(model_type, build, _text, attn_implementations=("eager", "sdpa")))


_bert_like(T.BertConfig, T.BertForSequenceClassification, "bert")
_bert_like(T.RobertaConfig, T.RobertaForSequenceClassification, "roberta", pad_token_id=1)
_bert_like(T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, "xlm-roberta", pad_token_id=1)
_bert_like(T.ElectraConfig, T.ElectraForSequenceClassification, "electra", embedding_size=32)


def _distilbert(attn=None):
    config = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                                max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, num_labels=3)
    return T.DistilBertForSequenceClassification._from_config(config, attn_implementation=attn)


register(Case("distilbert", _distilbert, _text, attn_implementations=("eager", "sdpa")))


def _gpt2(attn=None):
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=37, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
    return T.GPT2LMHeadModel._from_config(config, attn_implementation=attn)


register(Case("gpt2", _gpt2, _text, attn_implementations=("eager", "sdpa"), generate=True))


def _llama_like(config_cls, model_cls, model_type, **extra):
    def build(attn=None):
        config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=37, max_position_embeddings=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
        return model_cls._from_config(config, attn_implementation=attn)

    register(Case(model_type, build, _text, attn_implementations=("eager", "sdpa"), generate=True))


_llama_like(T.LlamaConfig, T.LlamaForCausalLM, "llama", attention_bias=True)
_llama_like(T.MistralConfig, T.MistralForCausalLM, "mistral", sliding_window=4)
_llama_like(T.Qwen2Config, T.Qwen2ForCausalLM, "qwen2")
_llama_like(T.Qwen3Config, T.Qwen3ForCausalLM, "qwen3")


def _vit(attn=None):
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                         image_size=16, patch_size=8, num_channels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=3)
    return T.ViTForImageClassification._from_config(config, attn_implementation=attn)


def _pixels(seed: int) -> dict:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=seeded(seed))}


register(Case("vit", _vit, _pixels, attn_implementations=("eager", "sdpa")))
