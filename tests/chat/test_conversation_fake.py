"""Conversation against a fake Session and a character tokenizer: reuse, recompute, rollback, stop."""

from __future__ import annotations

import pytest

from swarm.chat.conversation import ContextFull, Conversation
from swarm.model.stopping import turn_finished
from swarm.runtime.schedule import check_turn_fits

EOS = 0


class CharTokenizer:
    """One token per character (ids = code points); id 0 is the end of a turn."""

    eos_token_id = EOS
    unk_token_id = None

    def __init__(self, template: str = "plain") -> None:
        self.template = template

    def convert_tokens_to_ids(self, token: str) -> None:
        return None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        if self.template == "last-only":  # a template that rewrites earlier turns (some do)
            messages = messages[-1:]
        text = "".join(f"<{m['role'][0]}>{m['content']}</>" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if t == EOS and skip_special_tokens else ("</>" if t == EOS else chr(t)) for t in ids)


class FakeSession:
    """A sequence that answers each turn with a scripted text, by the pipeline's rules:
    the stop token is the last yielded, the last sampled token is fed with the next turn."""

    def __init__(self, answers: list[str], max_len: int = 10_000, fail_at: tuple[int, int] | None = None) -> None:
        self.answers, self.max_len, self.fail_at = answers, max_len, fail_at  # fail_at: (turn, token)
        self.tokens: list[int] = []
        self.fed_tokens = 0
        self.cached = 0
        self.fed_turns: list[list[int]] = []
        self.cancelled = False
        self.closed = False

    @property
    def history(self) -> tuple[int, ...]:
        return tuple(self.tokens)

    async def generate(self, new_tokens, max_new_tokens, stop_ids=()):
        check_turn_fits(len(self.tokens) + len(new_tokens), max_new_tokens, self.max_len)
        self.tokens += new_tokens
        self.fed_turns.append(list(self.tokens[self.cached:]))
        self.cancelled = False
        script = [ord(c) for c in self.answers.pop(0)] + [EOS]
        for i, token in enumerate(script):
            if self.fail_at == (len(self.fed_turns) - 1, i):
                raise ConnectionError("peer lost and not recovered")
            self.fed_tokens += len(self.tokens) - self.cached
            self.cached = len(self.tokens)
            self.tokens.append(token)
            yield token
            if self.cancelled or turn_finished(i + 1, max_new_tokens, token, stop_ids):
                return

    def cancel(self) -> None:
        self.cancelled = True

    async def aclose(self) -> None:
        self.closed = True


class Opener:
    def __init__(self, *sessions: FakeSession) -> None:
        self.sessions, self.opened = list(sessions), []

    async def __call__(self) -> FakeSession:
        session = self.sessions.pop(0)
        self.opened.append(session)
        return session


async def ask(conversation: Conversation, text: str) -> str:
    return "".join([piece async for piece in conversation.ask(text)])


async def test_a_second_turn_feeds_only_what_the_template_added():
    session = FakeSession(["Paris", "Rome"])
    conversation = Conversation(Opener(session), CharTokenizer())
    assert await ask(conversation, "France?") == "Paris"
    first = conversation.last_turn
    assert not first.reused_cache and not first.recomputed
    assert first.prefilled == len("<u>France?</><a>") and first.generated == len("Paris") + 1

    assert await ask(conversation, "Italy?") == "Rome"
    turn = conversation.last_turn
    # Fed: the first answer's stop token (sampled, never fed), then only the new question.
    assert session.fed_turns[1] == [EOS] + [ord(c) for c in "<u>Italy?</><a>"]
    assert turn.reused_cache and turn.prefilled == 1 + len("<u>Italy?</><a>")
    assert CharTokenizer().decode(session.history) == "<u>France?</><a>Paris</><u>Italy?</><a>Rome</>"
    assert conversation.messages == [{"role": "user", "content": "France?"}, {"role": "assistant", "content": "Paris"},
                                     {"role": "user", "content": "Italy?"}, {"role": "assistant", "content": "Rome"}]


async def test_a_template_that_rewrites_earlier_turns_recomputes_on_a_new_sequence():
    first, second = FakeSession(["Paris"]), FakeSession(["Rome"])
    opener = Opener(first, second)
    conversation = Conversation(opener, CharTokenizer("last-only"))
    await ask(conversation, "France?")
    assert await ask(conversation, "Italy?") == "Rome"
    assert first.closed and opener.opened == [first, second]
    assert conversation.last_turn.recomputed and not conversation.last_turn.reused_cache
    assert second.fed_turns == [[ord(c) for c in "<u>Italy?</><a>"]]


async def test_a_failed_answer_is_rolled_back_and_the_next_question_recomputes():
    broken, fresh = FakeSession(["Paris", "Rome is"], fail_at=(1, 3)), FakeSession(["Rome"])
    conversation = Conversation(Opener(broken, fresh), CharTokenizer())
    await ask(conversation, "France?")
    pieces = []
    with pytest.raises(ConnectionError):
        async for piece in conversation.ask("Italy?"):
            pieces.append(piece)
    assert pieces == ["R", "o", "m"]
    assert broken.closed and conversation.messages[-1] == {"role": "assistant", "content": "Paris"}
    assert await ask(conversation, "Italy?") == "Rome"
    assert conversation.last_turn.recomputed
    # The new sequence is fed the whole conversation, as the template renders it, at once.
    assert [CharTokenizer().decode(fed) for fed in fresh.fed_turns] == ["<u>France?</><a>Paris</><u>Italy?</><a>"]


async def test_stop_keeps_what_was_said_and_the_next_turn_reuses_it():
    session = FakeSession(["A long poem", "You are welcome"])
    conversation = Conversation(Opener(session), CharTokenizer())
    pieces = []
    async for piece in conversation.ask("Poem?"):
        pieces.append(piece)
        if len(pieces) == 3:
            conversation.stop()
    assert "".join(pieces) == "A l" and conversation.last_turn.stopped
    assert conversation.messages[-1] == {"role": "assistant", "content": "A l"}
    await ask(conversation, "Thanks")
    assert conversation.last_turn.reused_cache and not conversation.last_turn.stopped


async def test_a_turn_too_long_for_the_cache_is_refused_and_not_kept():
    session = FakeSession(["Hi", "never"], max_len=24)
    conversation = Conversation(Opener(session, FakeSession(["again"])), CharTokenizer(), max_new_tokens=4)
    await ask(conversation, "Hi")
    with pytest.raises(ContextFull):
        await ask(conversation, "Tell me everything about Rome")
    assert conversation.messages[-1] == {"role": "assistant", "content": "Hi"}
    await conversation.reset()
    assert conversation.messages == [] and conversation.session is None
