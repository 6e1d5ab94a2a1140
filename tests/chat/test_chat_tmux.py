"""`swarm chat --local 2` driven in a real terminal (tmux), with the default model.

A person's session: a question and its streamed answer, a follow-up that reuses
the cache, /peers, /plan, Ctrl-C during an answer while a peer hangs, /quit; then
nothing may be left running (the chat, and the peers it started, carry the terminal's
tag). A peer killed mid-answer: the answer completes as if nothing happened, with one
notice.
"""

from __future__ import annotations

import re
import signal
import sys

import pytest

from tests.helpers.tmux import Terminal

pytestmark = pytest.mark.slow

START_S = 420.0  # first run: peers and source profile the model, shards load
ANSWER_S = 120.0


def chat(*extra: str, local: int = 2) -> list[str]:
    return [sys.executable, "-m", "swarm", "chat", "--local", str(local), "--no-history-file", "--max-new-tokens", "48",
            "--local-peer-arg=--heartbeat", "--local-peer-arg=0.3", *extra]


def ask(term: Terminal, text: str) -> int:
    """Wait for the prompt, type a line; returns where its echo starts on the screen."""
    term.wait_for(r"you>\s*$", ANSWER_S)  # typed earlier, keys would be echoed mid-output
    start = len(term.screen())
    term.type(text)
    term.press("Enter")
    return term.wait_for(re.escape(text), 10, after=max(0, start - len(text) - 10)).start()


def test_chat_with_a_local_swarm(smollm2_dir):
    with Terminal(chat(), width=110, height=50) as term:
        term.wait_for(r"swarm chat with .* /help", START_S)
        term.wait_for(r"you>", 10)

        at = ask(term, "What is the capital of France?")
        answer = term.wait_for(r"Paris[^\n]*\n\[(\d+) tokens, first after \d+ ms, [\d.]+ ms/token, prefilled (\d+)\]",
                               ANSWER_S, after=at)
        first_prefill = int(answer.group(2))

        at = ask(term, "And of Italy?")
        follow = term.wait_for(r"\[(\d+) tokens, [^\n]*prefilled (\d+)\]", ANSWER_S, after=at)
        # The second turn prefilled only its own tokens, not the first turn's again.
        assert 0 < int(follow.group(2)) < first_prefill
        assert "recomputed" not in follow.group(0)

        at = ask(term, "/peers")
        term.wait_for(r"local-1", 10, after=at)
        peers = term.screen()[at:]
        assert re.search(r"local-2 .*alive", peers) and re.search(r"\(you\)", peers)
        assert re.search(r"↔[^\n]*(Gbit|Mbit)/s[^\n]*ms", peers)  # links with bandwidth and RTT

        at = ask(term, "/plan")
        plan = term.wait_for(r"layers (1+)(2+)(3+)\b", 10, after=at)
        assert len("".join(plan.groups())) == 32  # SmolLM2: embedding, 30 blocks, head
        term.wait_for(r"32 units in 3 stages", 5, after=at)

        at = ask(term, "/view")
        term.wait_for(r"topology panel on", 10, after=at)
        at = ask(term, "Tell me a long story about a brave dragon and a knight.")
        # The live panel under the streaming answer: the pipeline's rate and per-stage load.
        term.wait_for(r"pipeline: [\d.]+ tok/s, \d micro-batch", ANSWER_S, after=at)
        # A peer frozen mid-answer (not dead: its connections stay open): the step in flight never
        # lands, yet Ctrl-C ends the answer at once (the session's turn is cancelled; the lost
        # token is dropped whenever it comes), and /quit still ends everything.
        peer = next(p for p in term.leftover_processes() if "join" in p.cmdline() and "local-2" in p.cmdline())
        peer.suspend()
        term.press("C-c")
        stopped = term.wait_for(r"\[(\d+) tokens[^\n]*\] \[stopped\]", 5, after=at)
        assert int(stopped.group(1)) < 48
        term.wait_for(r"you>\s*$", 10, after=stopped.end())

        ask(term, "/quit")
        assert term.wait_exit(60) == 0
        assert "bye" in term.screen() and "Traceback" not in term.screen()
        term.wait_no_processes(timeout=30)  # the frozen peer too


def test_a_peer_lost_mid_answer_is_recovered_and_the_answer_completes(smollm2_dir):
    """--local 3: any two peers hold the model. A stage's peer killed mid-answer: the answer
    goes on to the end, equal to the same answer undisturbed; one notice line; /peers lists two."""
    question = "Tell me a long story about a brave dragon and a knight."
    with Terminal(chat(local=3), width=110, height=50) as term:
        term.wait_for(r"you>", START_S)
        at = ask(term, question)
        done = term.wait_for(r"\n\[48 tokens[^\n]*\]", ANSWER_S, after=at)
        undisturbed = term.screen()[at + len(question):done.start()].strip()

        at = ask(term, "/peers")  # its "#" column: the stage each peer serves ("-": none)
        term.wait_for(r"local-3", 10, after=at)
        term.wait_for(r"you>\s*$", 10, after=at + 1)
        stage_peers = sorted(set(re.findall(r"(local-\d)\s*│\s*\d\s*│", term.screen()[at:])))
        assert stage_peers, term.screen()[at:]
        at = ask(term, "/reset")
        term.wait_for(r"conversation cleared", 10, after=at)

        at = ask(term, question)
        # Killed after the second word: with chat's default prompt lookup a pass may bring up to
        # 9 tokens, and the 45-odd tokens left still take at least 5 passes through the stages.
        term.wait_for(r"\n\w+ \w+", ANSWER_S, after=at)
        victim = stage_peers[-1]
        peer = next(p for p in term.leftover_processes() if "join" in p.cmdline() and victim in p.cmdline())
        peer.send_signal(signal.SIGKILL)
        # The notice may name what the replay computes per stage; the terminal may wrap it.
        notice = term.wait_for(rf"\[peer {victim} lost; re-planned over \d peers? in [\d.]+ s"
                               r"(, replaying [\d/\s]+positions\s+per\s+stage)?\]", 60, after=at)
        done = term.wait_for(r"\n\[48 tokens[^\n]*\]", ANSWER_S, after=at)
        screen = term.screen()
        disturbed = (screen[at + len(question):notice.start()] + screen[notice.end():done.start()]).strip()
        # Compared without whitespace: the notice line and the terminal's wrapping split the text.
        assert re.sub(r"\s+", "", disturbed) == re.sub(r"\s+", "", undisturbed)
        assert "error" not in screen[at:done.end()]

        at = ask(term, "/peers")
        term.wait_for(r"local-\d", 10, after=at)
        table = term.screen()[at:]
        assert len(re.findall(r"local-\d .*alive", table)) == 2
        assert victim not in re.findall(r"local-\d(?= .*alive)", table)

        ask(term, "/quit")
        assert term.wait_exit(60) == 0
        term.wait_no_processes(timeout=20)


def test_single_process_chat_commands_and_ctrl_d(smollm2_dir):
    cmd = [sys.executable, "-m", "swarm", "chat", "--no-swarm", "--no-history-file", "--max-new-tokens", "12"]
    with Terminal(cmd, width=110, height=50) as term:
        term.wait_for(r"you>", START_S)
        at = ask(term, "/help")
        term.wait_for(r"/reset +forget the conversation", 10, after=at)
        at = ask(term, "/frobnicate")
        term.wait_for(r"unknown command /frobnicate; /help lists them", 10, after=at)
        at = ask(term, "What is the capital of France?")
        first = term.wait_for(r"Paris[^\n]*\n\[\d+ tokens[^\n]*prefilled (\d+)\]", ANSWER_S, after=at)
        at = ask(term, "/plan")
        term.wait_for(r"layers 1{32}\b", 10, after=at)
        at = ask(term, "/reset")
        term.wait_for(r"conversation cleared", 10, after=at)
        at = ask(term, "What is the capital of France?")
        again = term.wait_for(r"Paris[^\n]*\n\[\d+ tokens[^\n]*prefilled (\d+)\]", ANSWER_S, after=at)
        assert again.group(1) == first.group(1)  # after /reset the question costs the same again
        term.press("Up")  # input history: the last question comes back
        term.wait_for(r"you> What is the capital of France\?\s*$", 10, after=again.end())
        term.press("C-u", "C-d")
        assert term.wait_exit(30) == 0
        assert "\nbye\n" in term.screen()
        term.wait_no_processes(timeout=10)
