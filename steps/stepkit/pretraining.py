"""The stand-in's pretraining corpus: broad synthetic text with invented names, and tasks that teach copying.

Flan-T5 arrives able to find a name or a date in its input and write it out; the stand-in must too,
or no fine-tune of it can state a fact it has not memorised. This corpus teaches that, and nothing
of the summarisation task:

* **Texts** of three kinds: conversations (the synthetic generator's scenarios, so the domain's
  words are known), short narratives and messages written from their own sentence templates. Every
  name, surname, restaurant and city is an invented word (``synthetic.invented_name``), never one
  of the evaluation generator's pools, so evaluation names are unseen by pretraining as well as by the
  fine-tune. Amounts and clock times are drawn afresh for every text.
* **Tasks**, each with a Flan-style instruction: text infilling (spans masked with T5's sentinels,
  the target the whole text: copying in order), T5's span corruption (the target only the spans:
  language modelling), and extractive questions (who is #Person1#, what time, how much, which
  city: copying a value found by its context, out of order).

No conversation is ever paired with a summary. DialogSum (CC BY-NC-SA) is never read.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from . import scenarios, synthetic

def random_time(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    minute = rng.choice((0, 0, 0, 15, 30, 45, rng.randint(1, 59)))
    suffix = rng.choice(("am", "pm"))
    return f"{hour} {suffix}" if minute == 0 else f"{hour}:{minute:02d} {suffix}"


def random_amount(rng: random.Random) -> str:
    whole = rng.choice((rng.randint(1, 99), rng.randint(100, 999), rng.randint(1000, 9999)))
    return f"${whole}" if rng.random() < 0.6 else f"${whole}.{rng.randint(0, 99):02d}"


def invented_slots(rng: random.Random, names: str = "letters") -> dict[str, str]:
    """The synthetic generator's slots, with invented names and places (``names``: their style) and fresh values."""
    name1, name2 = synthetic.invented_name(rng, names), synthetic.invented_name(rng, names)
    while name2 == name1:
        name2 = synthetic.invented_name(rng, names)
    day = rng.choice(scenarios.DAYS)
    slots = {
        "name1": name1, "name2": name2, "surname": synthetic.invented_name(rng, names), "day": day,
        "time": random_time(rng), "amount": random_amount(rng), "count": rng.choice(scenarios.COUNTS),
        "place": synthetic.invented_place(rng, names), "item": rng.choice(scenarios.ITEMS),
        "city": synthetic.invented_name(rng, names), "subject": rng.choice(scenarios.SUBJECTS),
        "repair": rng.choice(scenarios.REPAIRS), "ailment": rng.choice(scenarios.AILMENTS),
        "project": rng.choice(scenarios.PROJECTS),
    }
    if rng.random() < 0.4:
        slots["other_day"] = rng.choice([d for d in scenarios.DAYS if d != day])
    return slots


NARRATIVE_SENTENCES = (
    "{name1} met {name2} at {place} on {day}.",
    "On {day} at {time}, {name1} called {name2}.",
    "{name2} paid {amount} for a {item}.",
    "The train to {city} leaves at {time}.",
    "{name1} moved to {city} last year.",
    "{name2} works at {place} in {city}.",
    "The {item} that {name1} wanted cost {amount}.",
    "{name1} and {name2} had lunch at {place}.",
    "{name2} forgot the {subject} homework again.",
    "{name1} will be back on {day}.",
    "The meeting about the {project} project starts at {time}.",
    "{name2} lent {name1} {amount}.",
    "Every {day}, {name1} visits {city}.",
    "{name1} wrote to {name2} about the broken {repair}.",
    "Tickets for {count} people cost {amount}.",
    "{name2} waited at {place} until {time}.",
)


def narrative(slots: dict[str, str], rng: random.Random) -> str:
    return " ".join(rng.sample(NARRATIVE_SENTENCES, rng.randint(2, 5))).format(**slots)


def message(slots: dict[str, str], rng: random.Random) -> str:
    body = rng.choice((
        "Can we move our call to {day} at {time}? I will be in {city} until then.",
        "The invoice for the {item} is {amount}. Please pay it by {day}.",
        "I booked a table for {count} at {place} on {day} at {time}.",
        "Your {repair} will be fixed on {day}. The visit costs {amount}.",
    )).format(**slots)
    return f"From: {slots['name1']}\nTo: {slots['name2']}\n\nHi {slots['name2']},\n{body}\n\n{slots['name1']}"


def conversation(slots: dict[str, str], rng: random.Random) -> tuple[str, scenarios.Scenario]:
    scenario = rng.choice(scenarios.SCENARIOS)
    if scenario.speakers == ("name1",):
        slots = {**slots, "name1": slots["surname"]}
    dialogue, _summaries = synthetic.render(scenario, slots, rng)  # the summaries are never used
    return dialogue, scenario


def turn_window(dialogue: str, rng: random.Random, turns: int = 4) -> str:
    lines = dialogue.splitlines()
    start = rng.randrange(max(1, len(lines) - turns + 1))
    return "\n".join(lines[start:start + turns])


@dataclass(frozen=True)
class Pair:
    task: str
    source: str
    target: str


INFILL_PROMPT = "Fill in the missing parts of the text.\n\n{text}\n\nText:"
CORRUPT_PROMPT = "Write the missing spans.\n\n{text}\n\nSpans:"
QUESTION_PROMPT = "Answer the question about the text.\n\n{text}\n\nQuestion: {question}\n\nAnswer:"


def questions(slots: dict[str, str], scenario: scenarios.Scenario | None) -> list[tuple[str, str]]:
    """Extractive questions whose answers the text states, found by their context."""
    if scenario is None:   # a message: the sender and the addressee are known
        return [("Who wrote the message?", slots["name1"]), ("Who is the message for?", slots["name2"])]
    speakers = [slots["surname"]] if scenario.speakers == ("name1",) else [slots["name1"], slots["name2"]]
    asked = [("What is the name of #Person1#?", speakers[0])]
    if len(speakers) == 2:
        asked += [("What is the name of #Person2#?", speakers[1]),
                  ("Who are the speakers?", f"{speakers[0]} and {speakers[1]}")]
    which = {"day": "Which day do they settle on?", "time": "At what time?", "amount": "How much money is it?",
             "city": "Which city?", "place": "Which place?", "count": "How many?"}
    asked += [(which[slot], slots[slot]) for slot in scenario.fact_slots if slot in which]
    return asked


TASK_SHARES = {"question": 0.6, "infill": 0.3, "corrupt": 0.1}   # questions only where a text has answers


def corpus_pairs(count: int, seed: int, shares: dict[str, float] | None = None, names: str = "letters") -> list[Pair]:
    """``count`` (source, target) pairs of the tasks above, as text, seeded; ``names`` as in invented_name."""
    shares = shares or TASK_SHARES
    rng = random.Random(seed)
    pairs: list[Pair] = []
    while len(pairs) < count:
        slots = invented_slots(rng, names)
        kind = rng.random()
        scenario = None
        if kind < 0.6:
            text, scenario = conversation(slots, rng)
        elif kind < 0.8:
            text = narrative(slots, rng)
        else:
            text = message(slots, rng)
        task = rng.random()
        if task < shares["question"] and (scenario is not None or text.startswith("From:")):
            question, answer = rng.choice(questions(slots, scenario))
            pairs.append(Pair("question", QUESTION_PROMPT.format(text=text, question=question), answer))
        elif task < shares["question"] + shares["infill"]:    # a window of a conversation: rebuilding it costs its length twice
            window = turn_window(text, rng) if scenario is not None else text
            pairs.append(Pair("infill", window, window))  # masked when encoded: the target is the whole text
        else:
            pairs.append(Pair("corrupt", text, ""))       # masked when encoded: the target is the spans
    return pairs
