"""The one stop rule, for every path (generate, chat, serve; a pipeline or one process).

Which token ids end an answer (``stop_token_ids``) and when a turn ends
(``finish_reason`` / ``turn_finished``). No torch here: the chat's conversation and
the pure tests use it as they are.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable

# The chat templates' end-of-turn tokens (ChatML, Llama 3, Phi-3, Gemma); a model ends an answer with one.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tokenizer: Any, generation_eos: Iterable[int] = ()) -> frozenset[int]:
    """The one stop set, for every path (generate, chat, serve): the tokenizer's end of
    sequence, the end-of-turn tokens its vocabulary has, and the model's generation config
    end ids (``hf.generation_eos_ids``: what transformers' generate stops on)."""
    ids = set(generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    unknown = getattr(tokenizer, "unk_token_id", None)
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unknown:
            ids.add(token_id)
    return frozenset(ids)


def finish_reason(generated: int, max_new_tokens: int, token: int, stop_ids: Collection[int]) -> str | None:
    """The one stop rule: after ``token``, the ``generated``-th of a turn, the turn ends with
    "stop" on a stop token (which is still emitted, the turn's last), "length" after
    ``max_new_tokens`` tokens, or goes on (None)."""
    if token in stop_ids:
        return "stop"
    return "length" if generated >= max_new_tokens else None


def turn_finished(generated: int, max_new_tokens: int, token: int, stop_ids: Collection[int]) -> bool:
    """Whether the turn ends after ``token`` (``finish_reason`` is not None)."""
    return finish_reason(generated, max_new_tokens, token, stop_ids) is not None
