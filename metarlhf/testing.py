"""Tiny random models for tests: built from configs in milliseconds, no downloads.

The tokenizer is a byte-level vocabulary built in memory, so tests need neither the
Hub nor the embedded wheels.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> object:
    """A byte-level ``PreTrainedTokenizerFast`` (259 byte tokens + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<cls>", "<sep>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        cls_token="<cls>",
        sep_token="<sep>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_policy(seed: int = 0, hidden: int = 32, layers: int = 2) -> tuple:
    """A random 2-layer Llama causal LM and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def tiny_encoder(seed: int = 0, hidden: int = 32, layers: int = 2) -> tuple:
    """A random 2-layer BERT encoder and its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    return BertModel(cfg).eval(), tok


def save_tiny(model: object, tok: object, path: str | Path) -> Path:
    """Save a tiny model + tokenizer as a local HF directory (for path-based loaders)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_thumbs(user: str = "u") -> list:
    """Four thumbs on two prompts: bulleted answers up, plain ones down."""
    from metarlhf.data import Thumbs

    return [
        Thumbs(user, "tell me", "- a\n- b\n- c", 1),
        Thumbs(user, "tell me", "just words", 0),
        Thumbs(user, "say more", "- x\n- y", 1),
        Thumbs(user, "say more", "nope nope", 0),
    ]
