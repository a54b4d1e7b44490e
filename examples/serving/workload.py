"""A shared-prefix multi-turn chat workload (examples/serving, prefix caching), without torch.

A few system prompts; sessions, each on one system prompt, of several turns. Turn 0's prompt is
the system prompt and a user message; turn k's prompt is turn k-1's prompt, the answer the engine
generated for it, and a new user message, so every turn starts with the whole previous turn (what
a chat front end sends). The token ids and lengths come from a seed; the answers' token ids are
the model's own (greedy), their lengths are fixed by the seed, so every run of a workload computes
the same number of tokens whatever the numerics.

Sessions are closed loops: a session's next turn is submitted once its previous turn finished
(plus a think time); sessions start at seeded offsets.
"""
import random
import time
from dataclasses import dataclass, field


@dataclass
class Turn:
    user: list  # the user message's token ids
    max_new: int  # tokens the engine generates for this turn


@dataclass
class Session:
    sid: int
    system: int  # index of its system prompt
    start_s: float  # when its first turn arrives, from the workload's start
    turns: list
    think_s: float = 0.0  # between a turn's last token and the next turn's arrival
    prompts: list = field(default_factory=list)  # each submitted turn's prompt
    answers: list = field(default_factory=list)  # each finished turn's generated tokens


@dataclass
class Workload:
    system_prompts: list
    sessions: list

    def turns(self):
        return sum(len(s.turns) for s in self.sessions)


def shared_prefix_workload(seed, vocab, systems=4, system_tokens=1024, sessions=48, turns=4,
                           user_tokens=(32, 128), answer_tokens=(64, 128), start_spread_s=2.0, think_s=0.0):
    """A Workload from a seed: `systems` system prompts of system_tokens tokens; `sessions`
    sessions of `turns` turns, each on a system prompt picked at random, starting uniformly in
    [0, start_spread_s); user messages and answers of lengths uniform in the given ranges.
    Lengths are drawn from their own generator, so they do not depend on `vocab`."""
    lengths, tokens = random.Random(seed), random.Random(seed + 1)
    system_prompts = [[tokens.randrange(vocab) for _ in range(system_tokens)] for _ in range(systems)]
    out = []
    for sid in range(sessions):
        system = lengths.randrange(systems)
        start = lengths.uniform(0.0, start_spread_s) if start_spread_s > 0 else 0.0
        session_turns = []
        for _ in range(turns):
            n_user, n_answer = lengths.randint(*user_tokens), lengths.randint(*answer_tokens)
            session_turns.append(Turn([tokens.randrange(vocab) for _ in range(n_user)], n_answer))
        out.append(Session(sid, system, start, session_turns, think_s))
    out.sort(key=lambda s: (s.start_s, s.sid))
    return Workload(system_prompts, out)


def peak_context_tokens(workload):
    """Tokens of every session's last turn (its prompt and answer) at once, each system prompt
    counted once (sessions share it): what the workload's contexts fill at most."""
    total = len(workload.system_prompts) * len(workload.system_prompts[0]) if workload.system_prompts else 0
    for s in workload.sessions:
        total += sum(len(t.user) + t.max_new for t in s.turns)
    return total


def next_prompt(workload, session):
    """The prompt of the session's next turn (len(session.answers) turns are done)."""
    k = len(session.answers)
    user = session.turns[k].user
    if k == 0:
        return workload.system_prompts[session.system] + user
    return session.prompts[k - 1] + session.answers[k - 1] + user


class SessionDriver:
    """Runs a Workload's sessions through an engine (submit, step, idle, finished: engine.Engine)
    in closed loops. make_request(rid, prompt, max_new, arrival) builds the engine's request.
    clock: seconds; None runs without time (every session starts at once and a turn follows its
    predecessor at the next step: the schedule depends on nothing but the engine). sleep: how
    the driver waits, idle, for the next turn that is due."""

    def __init__(self, workload, engine, make_request, clock=None, sleep=time.sleep):
        self.workload, self.engine, self.make_request = workload, engine, make_request
        self.clock, self.sleep = clock, sleep
        self.requests = []  # every submitted request, in submission order
        self.turn_of = {}  # rid -> (session, turn index)
        self._due = []  # (due time, session): turns ready to submit once due
        self._seen_finished = 0

    def _submit(self, session, arrival):
        prompt = next_prompt(self.workload, session)
        session.prompts.append(prompt)
        k = len(session.answers)
        rid = len(self.requests)
        request = self.make_request(rid, prompt, session.turns[k].max_new, arrival)
        self.requests.append(request)
        self.turn_of[rid] = (session, k)
        self.engine.submit(request)

    def _collect_finished(self, now):
        finished = self.engine.finished
        for request in finished[self._seen_finished:]:
            session, k = self.turn_of[request.rid]
            session.answers.append(list(request.output))
            if len(session.answers) < len(session.turns):
                self._due.append((now + session.think_s if self.clock else 0.0, session))
        self._seen_finished = len(finished)

    def run(self, deadline_s=None, on_step=None):
        """Until every turn of every session finished (or the deadline, seconds from the start,
        passed); returns the start time (the clock's, or 0). on_step(now): after each step."""
        start = self.clock() if self.clock else 0.0
        self._due = sorted(((start + s.start_s if self.clock else 0.0, s) for s in self.workload.sessions),
                           key=lambda d: (d[0], d[1].sid))
        while self._due or not self.engine.idle():
            now = self.clock() if self.clock else 0.0
            if deadline_s is not None and self.clock and now - start > deadline_s:
                break
            ready = [d for d in self._due if d[0] <= now]
            self._due = [d for d in self._due if d[0] > now]
            for due, session in ready:
                self._submit(session, due if self.clock else 0.0)
            if self.engine.idle():
                if self._due and self.clock:
                    self.sleep(max(0.0, min(min(d[0] for d in self._due) - now, 0.05)))
                continue
            if self.engine.step() == 0:
                raise RuntimeError(f"{len(self.engine.waiting)} requests wait for memory that no one will free")
            now = self.clock() if self.clock else 0.0
            self._collect_finished(now)
            if on_step is not None:
                on_step(now)
        return start

    def answers(self):
        """{(session id, turn): generated tokens} of every finished turn."""
        return {(s.sid, k): a for s in self.workload.sessions for k, a in enumerate(s.answers)}
