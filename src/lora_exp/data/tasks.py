"""The built-in task, generated deterministically by code: no download, no copied data set.

``json_extract``: read a short sentence about a person and answer with a JSON record of their
name, age, job and city, keys in a fixed order. The base model knows what JSON is but not this
exact record format (it adds prose, code fences, other keys or key orders), so held-out exact
match starts near zero; a few minutes of LoRA teaches the format and the copying, which shows as
a large rise in exact match and a large drop in held-out loss.
"""

from __future__ import annotations

import json
import random

NAMES = """Ada Alan Amara Anya Arjun Beatriz Bruno Carmen Chen Chiara Dmitri Elena Emeka Farah Felix
Freya Gustav Hana Hugo Ines Ivan Jamal Jonas Kai Keiko Lars Leila Lena Luca Malik Marta Mateo Mei
Mila Nadia Nia Nikolai Noor Omar Oscar Paulo Priya Quinn Rafael Rosa Sami Sara Sven Tariq Tomas
Uma Vera Viktor Wen Yara Yusuf Zainab Zoe Anton Bianca Diego""".split()
CITIES = """Lisbon Oslo Nairobi Lima Kyoto Porto Dakar Quito Hanoi Tunis Cork Graz Lyon Bergen Turin
Seville Krakow Riga Tallinn Leeds Hobart Perth Austin Denver Boise Halifax Regina Accra Kigali Lusaka
Cusco Recife Osaka Busan Pune Jaipur Tabriz Izmir Split Bruges Ghent Basel Bern Malmo Aarhus""".split()
JOBS = """baker nurse pilot carpenter teacher chemist plumber architect farmer librarian dentist
painter welder surgeon editor florist jeweler mechanic tailor geologist translator pharmacist
electrician potter sculptor firefighter butcher lawyer""".split()
TEMPLATES = [
    "{name} is {age} years old and works as a {job} in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "In {city}, {name} ({age}) earns a living as a {job}.",
    "{name}, age {age}, lives in {city} and is a {job}.",
    "The {job} {name} turned {age} this year and calls {city} home.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
    "{city} is where {name}, a {job} aged {age}, lives.",
    "At {age}, {name} is the best-known {job} in {city}.",
]
INSTRUCTION = (
    "Extract the person's name, age, job and city from the text. Answer with only a JSON "
    "object with the keys name, age, job, city.\n\nText: "
)


def json_extract_example(rng: random.Random) -> dict:
    """One chat example: a user turn with the sentence, an assistant turn with the JSON record."""
    person = {
        "name": rng.choice(NAMES),
        "age": rng.randint(18, 90),
        "job": rng.choice(JOBS),
        "city": rng.choice(CITIES),
    }
    sentence = rng.choice(TEMPLATES).format(**person)
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + sentence},
            {"role": "assistant", "content": json.dumps(person)},
        ]
    }


TASKS = {"json_extract": json_extract_example}


def generate(task: str, num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Generate disjoint train and held-out splits; the same arguments always give the same data."""
    make = TASKS[task]
    rng = random.Random(f"{task}:{seed}")
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, n in ((1, num_val), (0, num_train)):  # held-out first, so it never depends on num_train
        while len(splits[split]) < n:
            example = make(rng)
            key = json.dumps(example, sort_keys=True)
            if key not in seen:
                seen.add(key)
                splits[split].append(example)
    return splits[0], splits[1]
