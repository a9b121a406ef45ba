"""Tiny local model directories for tests that run vLLM's CPU build.

Run with the vLLM virtualenv's interpreter (this file imports only the
standard library, torch, transformers and tokenizers)::

    .venv-vllm/bin/python tests/vllm_models.py OUT_DIR

It writes, in a few seconds and deterministically (fixed seeds):

``OUT_DIR/tiny-llama``
    ``LlamaForCausalLM`` with random weights (hidden 128, 2 layers, 2 heads of
    64, 1 KV head, bf16) and a byte-level BPE tokenizer (vocab 2048), so that
    vLLM's ``response_format`` json_schema yields valid JSON. Random text.

``OUT_DIR/tool-caller``
    A "scripted" model: every layer's ``o_proj`` and ``down_proj`` is zero, so
    the hidden state at the last layer is the current token's embedding and
    the next token depends on the current token only. The untied ``lm_head``
    then encodes a chain of next tokens::

        assistant: -> <tool_call> -> {"name": "get_weather", "arguments": {"city": "Paris"}}
                   -> </tool_call> -> eos

    Serve with ``--enable-auto-tool-choice --tool-call-parser hermes``.

``OUT_DIR/thinker``
    A scripted reasoning model whose template pre-opens ``<think>`` (like
    Qwen3-*-Thinking-2507: the generation prompt ends ``assistant:<think>\\n``)::

        \\n -> "The user asks" -> " a question." -> " I should answer briefly."
           -> </think> -> "The answer" -> " is 42." -> eos

    Serve with ``--reasoning-parser deepseek_r1`` (or ``qwen3``): reasoning
    ``"The user asks a question. I should answer briefly."``, content
    ``"The answer is 42."``.

``OUT_DIR/thinker-open``
    The same weights with a template that does not pre-open (DeepSeek-R1
    style): the prompt ends ``assistant:`` and the model emits ``<think>``
    first (``assistant: -> <think> -> "The user asks" -> ...``).

``build_all(out_dir)`` and one ``build_*`` function per model are importable.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

SEED = 1234
VOCAB_SIZE = 2048
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

ASSISTANT = "assistant:"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = {"city": "Paris"}
TOOL_CALL = json.dumps({"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS})
THINK_START = "<think>"
THINK_END = "</think>"
REASONING_TOKENS = ["The user asks", " a question.", " I should answer briefly."]
ANSWER_TOKENS = ["The answer", " is 42."]
REASONING = "".join(REASONING_TOKENS)
ANSWER = "".join(ANSWER_TOKENS)

# Scale of a chain row of lm_head (the doc's 20 * E[a] / |E[a]|).
CHAIN_SCALE = 20.0

# -- chat templates -----------------------------------------------------------

# Hermes-like: tools listed in <tools></tools>, calls as <tool_call>JSON</tool_call>,
# tool results as <tool_response>; one "role: content" line per message.
_MESSAGES = (
    "{%- if tools %}"
    "system: You may call functions. Available tools:{{ '\\n' }}<tools>"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\\n' }}</tools>{{ '\\n' }}"
    'To call a function reply with <tool_call>{"name": <function-name>, '
    "\"arguments\": <args-json-object>}</tool_call>{{ '\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "assistant: {{ message.content or '' }}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    '<tool_call>{"name": "{{ fn.name }}", "arguments": '
    "{% if fn.arguments is string %}{{ fn.arguments }}"
    "{%- else %}{{ fn.arguments | tojson }}{%- endif %}}</tool_call>"
    "{%- endfor %}{{ '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "tool: <tool_response>{{ message.content or '' }}</tool_response>{{ '\\n' }}"
    "{%- else %}"
    "{{ message.role }}: {{ message.content or '' }}{{ '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
CHAT_TEMPLATE = _MESSAGES + "{%- if add_generation_prompt %}assistant:{%- endif %}"
# Pre-opens the reasoning block, as Qwen3-*-Thinking-2507 does.
THINKING_TEMPLATE = (
    _MESSAGES + "{%- if add_generation_prompt %}assistant:<think>{{ '\\n' }}{%- endif %}"
)

# -- tokenizer ------------------------------------------------------------------

_WORDS = (
    "the a an of to in is it you that he was for on are with as his they be at one "
    "have this from or had by hot word but what some we can out other were all there "
    "when up use your how said each she which do their time if will way about many "
    "then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find name age city weather Paris London "
    "Tokyo Berlin answer question think reason tool function arguments result hello "
    "world yes true false null user assistant system value list item count text"
).split()
_SYLLABLES = (
    "ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu "
    "ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu an en in on un "
    "ar er ir or ur st tr pl gr ch sh th ng"
).split()
_PUNCT = [*"{}[]\":,.!?;-_()<>/'=+*#", '{"', '": ', '", "', '"}', "}, {", "[{", "}]"]


def _corpus(lines: int = 6000, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    made = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(600)]
    words = _WORDS + made
    out: list[str] = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))))
        elif kind == 1:
            obj = {
                rng.choice(words): rng.choice(
                    [rng.randint(-1000, 100000), rng.choice(words), rng.random() > 0.5, None]
                )
                for _ in range(rng.randint(1, 4))
            }
            out.append(json.dumps(obj, indent=rng.choice([None, 2])))
        elif kind == 2:
            out.append(
                " ".join(
                    str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(1, 8))
                )
            )
        else:
            out.append(
                "".join(rng.choice(_PUNCT) + rng.choice(words) for _ in range(rng.randint(2, 8)))
            )
    return out


_BASE_TOKENIZER_JSON: str | None = None


def _base_tokenizer_json() -> str:
    """Serialized byte-level BPE, trained once per process."""
    global _BASE_TOKENIZER_JSON
    if _BASE_TOKENIZER_JSON is None:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            _corpus(),
            vocab_size=VOCAB_SIZE,
            min_frequency=2,
            special_tokens=[PAD, BOS, EOS],
            show_progress=False,
        )
        _BASE_TOKENIZER_JSON = bpe._tokenizer.to_str()
    return _BASE_TOKENIZER_JSON


def _tokenizer(
    chat_template: str, added: list[str] | tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    if added:
        tok.add_tokens(
            [AddedToken(t, normalized=False, special=False, single_word=False) for t in added]
        )
    tok.chat_template = chat_template
    return tok


# -- model ---------------------------------------------------------------------


def _config(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _random_model(tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok))
    model.eval()
    return model


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Also plain in tokenizer_config.json, for readers that look only there.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def _last_prompt_token(tok: PreTrainedTokenizerFast) -> int:
    """Id of the last token of a generation prompt (what the chain starts from)."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    return tok(ids, add_special_tokens=False)["input_ids"][-1]


def _single_id(tok: PreTrainedTokenizerFast, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RuntimeError(f"{text!r} is not one token: {ids}")
    return ids[0]


def _scripted_model(
    tok: PreTrainedTokenizerFast, steps: list[tuple[int, int]], seed: int
) -> LlamaForCausalLM:
    """A model whose greedy next token after token a is b, for each (a, b) in steps."""
    model = _random_model(tok, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.hidden_size
    vocab = model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.randn(vocab, hidden, generator=gen)
        # Orthonormal directions for the chain's sources: no cross-talk.
        sources = sorted({a for a, _ in steps})
        q, _ = torch.linalg.qr(torch.randn(hidden, len(sources), generator=gen))
        for i, a in enumerate(sources):
            emb[a] = q[:, i] * emb[a].norm()
        model.model.embed_tokens.weight.copy_(emb)
        model.model.norm.weight.fill_(1.0)
        head = torch.randn(vocab, hidden, generator=gen) * 0.01
        targets = {b for _, b in steps}
        for b in targets:
            head[b] = 0.0
        for a, b in steps:
            head[b] += CHAIN_SCALE * emb[a] / emb[a].norm()
        model.lm_head.weight.copy_(head)
    return model


def _check_chain(model: LlamaForCausalLM, steps: list[tuple[int, int]]) -> None:
    with torch.no_grad():
        for a, b in steps:
            got = model(torch.tensor([[a]])).logits[0, -1].float().argmax().item()
            if got != b:
                raise RuntimeError(f"chain step {a}->{b} gives {got}")


# -- the models --------------------------------------------------------------------


def _json_friendly(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, seed: int) -> None:
    """Random logits plus a fixed per-token bias that lets constrained JSON end.

    Purely random weights make xgrammar-constrained output loop: greedy picks
    whitespace between JSON tokens forever, sampling almost never closes a
    string. Here hidden dimension 0 of every embedding is a constant, so after
    the final RMSNorm it is nearly the same whatever the context, and column 0
    of lm_head acts as a bias: tokens holding '"' get +6 (a string closes
    after ~3 tokens at temperature 1, at once when greedy), tokens holding
    '}' or ']' +4 (containers close), digit-only tokens -2 (numbers end),
    whitespace-only tokens -12.
    Other columns are random (logit std ~1): free text stays random, if
    rich in quotes and brackets.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.hidden_size
    vocab = model.config.vocab_size
    bias = torch.zeros(vocab)
    for i in range(vocab):
        text = tok.decode([i])
        if i in tok.all_special_ids or not text:
            continue
        if not text.strip():
            bias[i] = -12.0
        elif '"' in text:
            bias[i] = 6.0
        elif any(c in text for c in "}]"):
            bias[i] = 4.0
        elif text.strip().isdigit():
            bias[i] = -2.0
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        # After the final norm dimension 0 is ~8.7 and the other 127 have a
        # norm of ~7: random logits of std ~1, bias as given (+-20%).
        head = torch.randn(vocab, hidden, generator=gen) * 0.15
        head[:, 0] = bias / 8.7
        model.lm_head.weight.copy_(head)


def build_tiny_llama(out: Path) -> Path:
    """Random-weight Llama with a BPE tokenizer (structured output works)."""
    tok = _tokenizer(CHAT_TEMPLATE)
    model = _random_model(tok, SEED)
    _json_friendly(model, tok, SEED)
    return _save(model, tok, Path(out))


def build_tool_caller(out: Path) -> Path:
    """Scripted model that always answers with a get_weather(city=Paris) call."""
    tok = _tokenizer(CHAT_TEMPLATE, [ASSISTANT, TOOL_CALL_START, TOOL_CALL, TOOL_CALL_END])
    start = _last_prompt_token(tok)
    if start != _single_id(tok, ASSISTANT):
        raise RuntimeError("the generation prompt does not end with the assistant: token")
    chain = [start] + [_single_id(tok, t) for t in (TOOL_CALL_START, TOOL_CALL, TOOL_CALL_END)]
    chain.append(tok.eos_token_id)
    steps = list(itertools.pairwise(chain))
    model = _scripted_model(tok, steps, SEED + 10)
    _check_chain(model.to(torch.bfloat16), steps)
    return _save(model, tok, Path(out))


def _thinker(template: str) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    added = [ASSISTANT, THINK_START, THINK_END, *REASONING_TOKENS, *ANSWER_TOKENS]
    tok = _tokenizer(template, added)
    # Both templates share the same weights: the pre-opening one ends in
    # "<think>\n" (its last token is the BPE newline), the other in "assistant:".
    newline = _last_prompt_token(_tokenizer(THINKING_TEMPLATE, added))
    ids = [_single_id(tok, t) for t in (*REASONING_TOKENS, THINK_END, *ANSWER_TOKENS)]
    chain = [*ids, tok.eos_token_id]
    think_start = _single_id(tok, THINK_START)
    steps = [
        (_single_id(tok, ASSISTANT), think_start),
        (think_start, ids[0]),
        (newline, ids[0]),
        *itertools.pairwise(chain),
    ]
    model = _scripted_model(tok, steps, SEED + 20)
    _check_chain(model.to(torch.bfloat16), steps)
    return model, tok


def build_thinker(out: Path) -> Path:
    """Scripted reasoning model; the template pre-opens <think>."""
    model, tok = _thinker(THINKING_TEMPLATE)
    return _save(model, tok, Path(out))


def build_thinker_open(out: Path) -> Path:
    """Same weights; the template does not pre-open, the model emits <think>."""
    model, tok = _thinker(CHAT_TEMPLATE)
    return _save(model, tok, Path(out))


BUILDERS = {
    "tiny-llama": build_tiny_llama,
    "tool-caller": build_tool_caller,
    "thinker": build_thinker,
    "thinker-open": build_thinker_open,
}


def build_all(out_dir: Path) -> dict[str, Path]:
    """Build every model under out_dir; returns {name: directory}."""
    out_dir = Path(out_dir)
    return {name: build(out_dir / name) for name, build in BUILDERS.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    for name, path in build_all(Path(argv[1])).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
