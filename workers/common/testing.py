"""Tiny models for tests, the demo and benchmarks.

``build_tiny_model`` writes an ordinary Hugging Face model directory (config,
``model.safetensors``, tokenizer files, generation config), so everything that
uses it goes through the same loading code as a user's model. The tokenizer is
a byte-level BPE trained here, on a small corpus, with the ``tokenizers``
library; its pad token is distinct from its EOS token. The same arguments and
seed give byte-identical weights and the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"

ARCHITECTURES = ("gpt2", "llama")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A small chat template (Jinja, as Hugging Face tokenizers carry them): BOS, then each message as
``<|role|>content`` and a newline, then ``<|assistant|>`` where the response begins"""

# A small built-in corpus: dialogue-shaped text like the prompts and responses
# the steps see, and enough distinct words for a few hundred BPE merges.
DEFAULT_CORPUS: tuple[str, ...] = (
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast, let it rise, then bake it.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Can you help me write a poem about the sea?\n\nAssistant: Sure. The sea is wide and blue and deep.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
    "\n\nHuman: How can I learn to play the guitar?\n\nAssistant: Start with a few chords, practice every day, and be patient.",
    "\n\nHuman: What should I cook for dinner tonight?\n\nAssistant: A simple pasta with tomatoes, garlic and basil is quick.",
    "\n\nHuman: Why is the sky blue?\n\nAssistant: Sunlight is scattered by the air, and blue light is scattered the most.",
    "\n\nHuman: How do I fix a flat tire on my bike?\n\nAssistant: Remove the wheel, find the hole, patch the tube, and pump it up.",
    "\n\nHuman: Is it safe to swim after eating?\n\nAssistant: Yes, it is generally safe; a short rest can feel more comfortable.",
    "\n\nHuman: Recommend a good book.\n\nAssistant: You might enjoy a classic novel, a mystery, or a book of short stories.",
    "\n\nHuman: How many legs does a spider have?\n\nAssistant: A spider has eight legs.",
    "\n\nHuman: What time is it in Tokyo?\n\nAssistant: I cannot see a clock, but Tokyo is nine hours ahead of UTC.",
    "\n\nHuman: Explain photosynthesis simply.\n\nAssistant: Plants use light, water and carbon dioxide to make sugar and oxygen.",
    "\n\nHuman: Give me three tips for sleeping better.\n\nAssistant: Keep a regular schedule, avoid screens late, and keep the room cool.",
    "\n\nHuman: I feel sad today.\n\nAssistant: I am sorry to hear that. Would you like to talk about what happened?",
    "\n\nHuman: How do I say thank you in Spanish?\n\nAssistant: You say gracias.",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Numbers: zero one two three four five six seven eight nine ten eleven twelve 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Please, thanks, sorry, hello, goodbye, yes, no, maybe, always, never, sometimes, often, rarely.",
    "Good answers are helpful, honest and harmless. Bad answers are rude, wrong or dangerous.",
)


def build_tokenizer(
    corpus: Iterable[str] | None = None,
    *,
    vocab_size: int = 512,
    add_bos: bool = False,
    model_max_length: int = 1024,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (the built-in corpus when None).

    Special tokens: ``<|pad|>`` (id 0), ``<|endoftext|>`` (id 1, EOS) and
    ``<|startoftext|>`` (id 2, BOS). With ``add_bos`` the tokenizer prepends
    BOS to every encoded text, like Llama tokenizers do; otherwise it adds
    nothing, like GPT-2's. Byte-level BPE encodes any text, so there is no
    unknown token. ``chat_template`` (e.g. ``CHAT_TEMPLATE``) is saved with
    the tokenizer, so chat prompts go through it (``formats.chat``).
    """
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)
    if not texts:
        raise ValueError("the tokenizer corpus is empty")
    specials = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size ({vocab_size}) must be at least {len(alphabet) + len(specials)} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:  # set only when given: a tokenizer without one saves the same files as ever
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(
    output_dir: str | Path,
    *,
    arch: str = "gpt2",
    n_layer: int = 2,
    hidden_size: int = 64,
    n_head: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    dropout: float = 0.1,
    tokenizer: PreTrainedTokenizerFast | None = None,
    corpus: Sequence[str] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised causal LM and its tokenizer to ``output_dir``.

    ``arch`` is "gpt2" (``GPT2LMHeadModel``) or "llama" (``LlamaForCausalLM``,
    whose tokenizer adds BOS). ``dropout`` applies to GPT-2 (its usual 0.1 by
    default, so steps that disable dropout are exercised). A ``tokenizer`` may
    be passed to share one across models; otherwise one is trained on
    ``corpus``. Returns the directory.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch ({arch!r}) must be one of {', '.join(ARCHITECTURES)}")
    if hidden_size % n_head:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_head ({n_head})")
    if tokenizer is None:
        tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, add_bos=arch == "llama", model_max_length=max_positions)
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if arch == "gpt2":
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=hidden_size,
            n_head=n_head,
            n_inner=intermediate_size,
            n_positions=max_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            # GPT-2's tanh GELU as one fused kernel (the same formula as its "gelu_new", about half the time).
            activation_function="gelu_pytorch_tanh",
            **special,
        )
        model_cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            num_hidden_layers=n_layer,
            hidden_size=hidden_size,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **special,
        )
        model_cls = LlamaForCausalLM
    # Initialise under a private generator state so the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
