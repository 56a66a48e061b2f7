"""The synthetic dialogues' scenarios: each intent's turns and summary phrasings, and the everyday
vocabulary they are filled with (synthetic.py draws the slots and holds out names and values)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

# Held-out splits draw their names, places and cities from shares of these pools that train never
# uses (HoldOut), so a model that states them must have copied them from the dialogue.
FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "Jack",
    "Karen", "Leo", "Maria", "Nick", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tina",
    "Umar", "Vera", "Will", "Xena", "Yusuf", "Zoe", "Amir", "Bella", "Chen", "Dana",
    "Emil", "Fiona", "Gita", "Hank", "Ines", "Jonas", "Kira", "Lars", "Mei", "Nora",
    "Oscar", "Priya", "Raj", "Sofia", "Tom", "Uma", "Victor", "Wendy", "Yara", "Ziggy",
    "Adele", "Boris", "Celia", "Dmitri", "Esther", "Felix", "Greta", "Hamid", "Ivy", "Jorge",
    "Keiko", "Luis", "Marta", "Nadia", "Omar", "Petra", "Ravi", "Sara", "Theo", "Ursula",
    "Vikram", "Wanda", "Yosef", "Zara", "Aiko", "Bruno", "Chloe", "Diego", "Eva", "Farah",
    "Gustav", "Hana", "Igor", "Julia", "Kofi", "Lena", "Mateo", "Nina", "Otto", "Pablo",
    "Rhea", "Stefan", "Tariq", "Ulla", "Vince", "Wei", "Ximena", "Yuki", "Zane", "Alma",
)
SURNAMES = (  # the name a booking is made under
    "Johnson", "Smith", "Garcia", "Miller", "Brown", "Lopez", "Wilson", "Nakamura", "Kowalski", "Okafor",
    "Schmidt", "Rossi", "Dubois", "Novak", "Jensen", "Patel", "Kim", "Silva", "Murphy", "Fischer",
    "Larsen", "Moreau", "Costa", "Tanaka", "Ivanova", "Becker", "Hughes", "Romero", "Sato", "Walsh",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
HOURS = ("8", "9", "10", "11", "12", "1", "2", "3", "4", "5", "6", "7")
MINUTES = ("00", "15", "30", "45")
RESTAURANTS = (
    "Luigi's", "the Golden Dragon", "Blue Harbor", "Casa Verde", "the Corner Bistro", "Chez Marcel",
    "the Olive Tree", "Sakura House", "the Red Lantern", "Bella Napoli", "the Green Fig", "Taj Palace",
    "the Salty Dog", "Cafe Aurora", "the Copper Pot", "Little Lisbon", "the Silver Spoon", "El Toro",
)
ITEMS = ("jacket", "laptop", "coffee maker", "pair of shoes", "phone", "lamp", "backpack", "watch")
CITIES = (
    "Boston", "Denver", "Chicago", "Seattle", "Madrid", "Tokyo", "Lisbon", "Toronto", "Dublin", "Oslo",
    "Vienna", "Prague", "Nairobi", "Lima", "Sydney", "Athens", "Cairo", "Montreal", "Warsaw", "Dallas",
)
SUBJECTS = ("history", "chemistry", "math", "biology", "economics", "French")
REPAIRS = ("heater", "kitchen sink", "front door lock", "washing machine", "window")
COUNTS = ("two", "three", "four", "five", "six")

SMALL_TALK = (
    ("Hello, do you have a minute?", "Sure, go ahead."),
    ("Lovely weather today, isn't it?", "Yes, finally some sun."),
    ("Sorry to call so early.", "No problem, I was up anyway."),
    ("Did you have a good weekend?", "It was quiet, which was nice."),
    ("Thanks for picking up.", "Of course, what can I do for you?"),
)
CLOSINGS = (
    ("Great, thank you so much.", "You're welcome. Have a nice day."),
    ("Perfect. See you then.", "See you."),
    ("Thanks, that's all I needed.", "Glad I could help. Bye."),
)

Slots = dict[str, str]


@dataclass(frozen=True)
class Scenario:
    """One intent: how its dialogue goes and how its summary is phrased."""

    topic: str
    intent: str
    fact_slots: tuple[str, ...]  # slots every summary states (beside the speakers)
    turns: Callable[[Slots, random.Random], list[tuple[int, str]]]  # (speaker 1|2, text)
    summaries: tuple[str, ...]
    speakers: tuple[str, ...] = ("name1", "name2")  # the names the dialogue gives, in summary order


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


def _exchange(rng: random.Random, *pairs: tuple[str, str], first_speaker: int = 1) -> list[tuple[int, str]]:
    """One question and its matching answer, picked together."""
    question, answer = rng.choice(pairs)
    return [(first_speaker, question), (3 - first_speaker, answer)]


def _offer_then_settle(rng: random.Random, s: Slots, ask: str) -> list[tuple[int, str]]:
    """Person2 first proposes the rejected day (a distractor), then they settle on the real one."""
    if "other_day" not in s:
        return []
    return [
        (2, f"We could do {s['other_day']}{ask}"),
        (1, _pick(rng, f"{s['other_day']} doesn't work for me.", f"Sorry, I'm busy on {s['other_day']}.")),
    ]


def _restaurant_booking(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Good evening, {s['place']}, this is {s['name2']} speaking."),
        (1, f"Hi {s['name2']}, my name is {s['name1']}. I'd like to book a table for {s['count']}."),
        (2, "Certainly. For which day?"),
        *_offer_then_settle(rng, s, "? We have a few tables left."),
        (1, f"{s['day']}, please, at {s['time']}."),
        (2, f"A table for {s['count']} on {s['day']} at {s['time']}. That's booked, {s['name1']}."),
    ]


def _restaurant_booking_by_name(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    """A booking where only the caller's surname is given, last, and the restaurant is not named."""
    when = _pick(rng, f"at {s['time']} on {s['day']}", f"on {s['day']} at {s['time']}")
    return [
        (1, f"Hi, I'd like to {_pick(rng, 'book', 'reserve')} a table for {s['count']} {when}."),
        (2, _pick(rng, "Sure, under what name?", "Of course. What name is it under?", "Certainly, may I have your name?")),
        (1, _pick(rng, f"{s['name1']}.", f"It's {s['name1']}.", f"{s['name1']}, please.")),
        *([(2, f"Thank you, {s['name1']}. See you on {s['day']}.")] if rng.random() < 0.5 else []),
    ]


def _restaurant_cancel(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"Hello, is this {s['place']}? It's {s['name1']} here."),
        (2, f"Yes, {s['name2']} speaking. How can I help?"),
        (1, f"I need to cancel my reservation for {s['day']} at {s['time']}."),
        (2, _pick(rng, "Would you like to move it to another day instead?", "May I ask why?")),
        (1, _pick(rng, "We'll be out of town, I'm afraid.", "Something came up at work.")),
        (2, f"All right, your {s['day']} reservation is cancelled."),
    ]


def _doctor_appointment(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Dr. {s['name2']}'s office, good morning."),
        (1, f"Good morning. This is {s['name1']}. I'd like to see the doctor about my {s['ailment']}."),
        (2, "How long have you had it?"),
        (1, _pick(rng, "About a week now.", "Since last month.", "A few days.")),
        *_offer_then_settle(rng, s, "?"),
        (2, f"The doctor can see you on {s['day']} at {s['time']}."),
        (1, f"{s['day']} at {s['time']} is fine."),
        (2, f"The visit is {s['amount']} without insurance."),
    ]


def _shopping_buy(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Hi, I'm {s['name2']}. Can I help you find anything?"),
        (1, f"Yes, I'm {s['name1']}. I'm looking for a {s['item']}."),
        (2, f"This {s['item']} is on sale for {s['amount']}."),
        *_exchange(rng, ("Does it come with a warranty?", "Yes, one year."),
                   ("Do you have it in another color?", "Only in black, I'm afraid.")),
        (1, f"OK, I'll take it. Can you deliver it on {s['day']}?"),
        (2, f"Sure, it will arrive on {s['day']}."),
    ]


def _shopping_return(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"Hello, my name is {s['name1']}. I want to return this {s['item']}."),
        (2, f"I'm {s['name2']}, I can help. What's wrong with it?"),
        (1, _pick(rng, "It stopped working after two days.", "It's not what I expected.", "It arrived damaged.")),
        (2, "Do you have the receipt?"),
        (1, f"Yes, I bought it on {s['day']} for {s['amount']}."),
        (2, f"Then I'll refund the {s['amount']} to your card."),
    ]


def _flight_booking(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Sky Travel, {s['name2']} speaking."),
        (1, f"Hi, this is {s['name1']}. I need a flight to {s['city']}."),
        (2, "When would you like to leave?"),
        *_offer_then_settle(rng, s, ", there's a cheap seat."),
        (1, f"On {s['day']}, in the morning if possible."),
        (2, f"There's a flight on {s['day']} at {s['time']} for {s['amount']}."),
        (1, "Book it, please."),
    ]


def _flight_change(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"Hello, I'm {s['name1']}. I'd like to change my flight to {s['city']}."),
        (2, f"Of course, this is {s['name2']}. What date would you prefer?"),
        (1, f"{s['day']}, please."),
        (2, f"I can move you to {s['day']} at {s['time']}. The change fee is {s['amount']}."),
        (1, _pick(rng, "That's fine.", "Expensive, but OK.")),
    ]


def _meeting(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"{s['name2']}, do you have time this week to go over the {s['project']} project?"),
        (2, f"Sure, {s['name1']}. When suits you?"),
        *_offer_then_settle(rng, s, " afternoon?"),
        (1, f"How about {s['day']} at {s['time']}?"),
        (2, f"{s['day']} at {s['time']} works. I'll book a room."),
    ]


def _day_off(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"{s['name2']}, could I take {s['day']} off?"),
        (2, f"What's the occasion, {s['name1']}?"),
        (1, _pick(rng, "My sister is getting married.", "I have to move house.", "I have a doctor's appointment.")),
        (2, f"That's fine, but please finish the {s['project']} report first."),
        (1, "I will. Thank you."),
    ]


def _apartment(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"Hi, I'm {s['name1']}. I'm calling about the apartment for rent."),
        (2, f"Hello {s['name1']}, I'm {s['name2']}, the landlord. The rent is {s['amount']} a month."),
        *_exchange(rng, ("Are utilities included?", "Water is, electricity is not."),
                   ("Is it close to the subway?", "Yes, five minutes on foot.")),
        *_offer_then_settle(rng, s, " for a viewing?"),
        (1, f"Could I see it on {s['day']} at {s['time']}?"),
        (2, f"Sure, see you on {s['day']}."),
    ]


def _repair(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"{s['name2']}, it's {s['name1']} from apartment {s['count']}. The {s['repair']} is broken again."),
        (2, "I'm sorry to hear that. I'll send someone."),
        (1, "When can they come?"),
        (2, f"The repairman can come on {s['day']} at {s['time']}."),
        (1, "OK, I'll be home."),
    ]


def _bank_transfer(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Welcome to City Bank, I'm {s['name2']}."),
        (1, f"Hello, I'm {s['name1']}. I'd like to transfer {s['amount']} to my landlord."),
        (2, "Do you have the account number?"),
        (1, "Yes, here it is."),
        (2, f"The transfer will arrive on {s['day']}."),
    ]


def _exam(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"{s['name2']}, do you know when the {s['subject']} exam is?"),
        (2, f"It's on {s['day']} at {s['time']}, {s['name1']}."),
        (1, _pick(rng, "I haven't started studying yet.", "I'm so nervous about it.")),
        (2, "We could study together if you like."),
        (1, "That would be great."),
    ]


def _party(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (1, f"{s['name2']}, I'm having a birthday party at {s['place']}. Would you like to come?"),
        (2, f"I'd love to, {s['name1']}! When is it?"),
        (1, f"On {s['day']} at {s['time']}."),
        *_exchange(rng, ("Should I bring anything?", "Just yourself."),
                   ("Can I bring a friend?", "Sure, the more the merrier."), first_speaker=2),
    ]


def _car_repair(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Hi, {s['name2']} from the garage. We checked your car."),
        (1, f"Thanks, this is {s['name1']}. What's wrong with it?"),
        (2, _pick(rng, "The brakes need new pads.", "The battery is dead.", "There's an oil leak.")),
        (1, "How much will it cost?"),
        (2, f"About {s['amount']}. It'll be ready on {s['day']} at {s['time']}."),
        (1, "OK, go ahead."),
    ]


def _hotel(s: Slots, rng: random.Random) -> list[tuple[int, str]]:
    return [
        (2, f"Grand Hotel {s['city']}, {s['name2']} speaking."),
        (1, f"Hi, this is {s['name1']}. Do you have a room for {s['count']} nights from {s['day']}?"),
        (2, f"Yes, a double room is {s['amount']} per night."),
        *_exchange(rng, ("Is breakfast included?", "Yes, it is."), ("Does it have a view?", "It faces the park.")),
        (1, "I'll take it."),
    ]


SCENARIOS = (
    Scenario("restaurant", "book_table", ("count", "place", "day", "time"), _restaurant_booking, (
        "{name1} books a table for {count} at {place} with {name2} on {day} at {time}.",
        "{name1} calls {place} and {name2} reserves a table for {count} on {day} at {time}.",
    )),
    Scenario("restaurant", "book_table", ("count", "day", "time"), _restaurant_booking_by_name, (
        "{name1} books a table for {count} on {day} at {time}.",
        "{name1} reserves a table for {count} at {time} on {day}.",
    ), speakers=("name1",)),
    Scenario("restaurant", "cancel_reservation", ("place", "day", "time"), _restaurant_cancel, (
        "{name1} tells {name2} to cancel the reservation at {place} for {day} at {time}.",
        "{name1} asks {name2} to cancel the {day} reservation at {place} at {time}.",
    )),
    Scenario("health", "doctor_appointment", ("day", "time", "amount"), _doctor_appointment, (
        "{name1} makes an appointment with Dr. {name2} on {day} at {time} about the {ailment}. It costs {amount}.",
        "{name1} will see Dr. {name2} on {day} at {time} for the {ailment}; the visit is {amount}.",
    )),
    Scenario("shopping", "buy_item", ("amount", "day"), _shopping_buy, (
        "{name1} buys a {item} for {amount} from {name2}. It will be delivered on {day}.",
        "{name2} sells {name1} a {item} for {amount}, delivered on {day}.",
    )),
    Scenario("shopping", "return_item", ("day", "amount"), _shopping_return, (
        "{name1} returns a {item} bought on {day} and {name2} refunds {amount}.",
        "{name2} refunds {name1} {amount} for the {item} bought on {day}.",
    )),
    Scenario("travel", "book_flight", ("city", "day", "time", "amount"), _flight_booking, (
        "{name1} books a flight to {city} on {day} at {time} for {amount} with {name2}.",
        "{name2} books {name1} a flight to {city} on {day} at {time}; it costs {amount}.",
    )),
    Scenario("travel", "change_flight", ("city", "day", "time", "amount"), _flight_change, (
        "{name1} changes the flight to {city} to {day} at {time}. {name2} charges a {amount} fee.",
        "{name2} moves {name1}'s flight to {city} to {day} at {time} for a fee of {amount}.",
    )),
    Scenario("work", "schedule_meeting", ("day", "time"), _meeting, (
        "{name1} and {name2} will meet on {day} at {time} to discuss the {project} project.",
        "{name1} schedules a meeting with {name2} about the {project} project on {day} at {time}.",
    )),
    Scenario("work", "day_off", ("day",), _day_off, (
        "{name1} asks {name2} for {day} off. {name2} agrees if the {project} report is finished first.",
        "{name2} lets {name1} take {day} off after finishing the {project} report.",
    )),
    Scenario("housing", "rent_apartment", ("amount", "day", "time"), _apartment, (
        "{name1} asks {name2} about the apartment for {amount} a month and will see it on {day} at {time}.",
        "{name1} will view {name2}'s apartment on {day} at {time}. The rent is {amount} a month.",
    )),
    Scenario("housing", "report_repair", ("day", "time"), _repair, (
        "{name1} tells {name2} that the {repair} is broken. A repairman will come on {day} at {time}.",
        "{name2} will send a repairman to fix {name1}'s {repair} on {day} at {time}.",
    )),
    Scenario("bank", "transfer_money", ("amount", "day"), _bank_transfer, (
        "{name1} transfers {amount} with {name2}'s help. It will arrive on {day}.",
        "{name2} helps {name1} transfer {amount}, which will arrive on {day}.",
    )),
    Scenario("school", "exam_date", ("day", "time"), _exam, (
        "{name2} tells {name1} the {subject} exam is on {day} at {time}. They will study together.",
        "{name1} and {name2} will study for the {subject} exam on {day} at {time}.",
    )),
    Scenario("social", "invite_party", ("place", "day", "time"), _party, (
        "{name1} invites {name2} to a birthday party at {place} on {day} at {time}.",
        "{name2} will come to {name1}'s birthday party at {place} on {day} at {time}.",
    )),
    Scenario("car", "repair_quote", ("amount", "day", "time"), _car_repair, (
        "{name2} tells {name1} the car repair costs {amount}. The car will be ready on {day} at {time}.",
        "{name1}'s car will be repaired for {amount} and ready on {day} at {time}, says {name2}.",
    )),
    Scenario("travel", "book_hotel", ("city", "count", "day", "amount"), _hotel, (
        "{name1} books a room in {city} with {name2} for {count} nights from {day} at {amount} per night.",
        "{name2} books {name1} a room in {city} for {count} nights from {day}; it is {amount} per night.",
    )),
)

AILMENTS = ("back pain", "cough", "headaches", "sore knee", "rash")
PROJECTS = ("budget", "website", "marketing", "hiring", "Alpha", "data")
